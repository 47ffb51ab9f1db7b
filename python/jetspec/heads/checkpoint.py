"""Loading and saving draft heads in the published HF format: ``config.json`` plus
``model.safetensors`` (or shards with ``model.safetensors.index.json``). Safetensors
only — nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import Qwen3Config

from .config import rope_theta_of
from .model import DraftHead

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A head checkpoint that is malformed or does not fit its target."""


def _resolve(path: str | Path) -> Path:
    """``dir`` or ``dir::subfolder`` (the published multi-head repos' form)."""
    text = str(path)
    root, _, sub = text.partition("::")
    folder = Path(root) / sub if sub else Path(root)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"jetspec: no draft head at {text!r}: {folder / 'config.json'} does not exist")
    return folder


def _read_json(file: Path, what: str) -> dict:
    """A JSON object from ``file``, or a CheckpointError naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"jetspec: {file} is not a valid {what}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"jetspec: {file} is not a valid {what}: expected a JSON object, got "
                              f"{type(data).__name__}")
    return data


def _inside(folder: Path, name: str, source: Path) -> Path:
    """``folder / name``, refused when the name leaves ``folder`` (an absolute path, or ``..`` past it). The
    check is on the name, not on where symlinks lead: a folder's own links are the user's (a hub cache
    links every file of a snapshot to its blob store); what may not be trusted is a name in the index."""
    file = Path(os.path.normpath(folder / name))
    if Path(name).is_absolute() or not file.is_relative_to(Path(os.path.normpath(folder))):
        raise CheckpointError(f"jetspec: {source}: {name!r} leads outside the head's folder {folder} (to {file}); "
                              "refusing to read it")
    return file


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        index = _read_json(folder / INDEX, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"jetspec: {folder / INDEX}: 'weight_map' must be an object mapping tensor "
                                  f"names to shard file names, got {type(weight_map).__name__}"
                                  + ("" if not isinstance(weight_map, dict) else " with non-string entries"))
        names = sorted(set(weight_map.values()))
        files = [_inside(folder, name, folder / INDEX) for name in names]
        missing = [name for name, f in zip(names, files) if not f.is_file()]
        if not files or missing:
            raise CheckpointError(f"jetspec: {folder / INDEX} names shards that are not there: {missing or 'none'}")
        return files
    if (folder / WEIGHTS).is_file():
        return [_inside(folder, WEIGHTS, folder)]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"jetspec: {folder} has only pickle weights; jetspec loads safetensors only")
    raise CheckpointError(f"jetspec: {folder} has no {WEIGHTS} or {INDEX}")


def _read_config(folder: Path) -> tuple[Qwen3Config, torch.dtype | None]:
    """The head's ``config.json`` as a ``Qwen3Config``, and the dtype it names (``dtype`` or
    ``torch_dtype``), every problem reported as a CheckpointError naming the file."""
    file = folder / "config.json"
    raw = _read_json(file, "head config (config.json)")
    dtype = None
    for key in ("dtype", "torch_dtype"):  # checked before transformers turns any torch attribute into a "dtype"
        value = raw.get(key)
        if value is None:
            continue
        named = getattr(torch, value, None) if isinstance(value, str) else None
        if not isinstance(named, torch.dtype) or not named.is_floating_point:
            raise CheckpointError(f"jetspec: {file}: {key!r} must name a floating-point torch dtype "
                                  f"(e.g. \"bfloat16\"), got {value!r}")
        dtype = dtype or named
    try:
        config = Qwen3Config.from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"jetspec: {file} is not a valid head config: {err}") from err
    return config, dtype


def load_head(path: str | Path, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> DraftHead:
    """Load a head saved in the published format; every tensor must be present with its exact shape."""
    folder = _resolve(path)
    config, config_dtype = _read_config(folder)
    try:
        head = DraftHead(config)
    except ValueError as err:
        raise CheckpointError(f"jetspec: {folder / 'config.json'}: {str(err).removeprefix('jetspec: ')}") from err
    expected = head.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        for key, tensor in _read_safetensors(file).items():
            name = key[len("model."):] if key.startswith("model.") else key
            if name in tensors:
                raise CheckpointError(f"jetspec: {folder} holds '{name}' twice (with and without 'model.', "
                                      "or in two shards)")
            if not tensor.dtype.is_floating_point:
                raise CheckpointError(f"jetspec: {file}: tensor '{key}' is {str(tensor.dtype).removeprefix('torch.')}"
                                      "; a head's weights are floating point (refusing to cast them)")
            tensors[name] = tensor
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"jetspec: {folder} does not match its config.json: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"jetspec: {folder}: '{name}' has shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(expected[name].shape)}")
    head.load_state_dict(tensors)
    dtype = dtype or config_dtype or torch.bfloat16
    return head.to(device=device, dtype=dtype).eval()


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never unpickled), or a CheckpointError naming the file."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"jetspec: {file} is not a readable safetensors file: {err}") from err


def save_head(head: DraftHead, path: str | Path, *, max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and the weights (sharded when larger than ``max_shard_bytes``)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_published_config(head), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    for stale in [folder / WEIGHTS, folder / INDEX, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def _published_config(head: DraftHead) -> dict:
    """The head's config.json as published heads have it: transformers' keys, plus the legacy
    ``rope_theta``/``torch_dtype`` spellings that older transformers releases read."""
    config = head.config.to_dict()
    dtype = str(next(head.parameters()).dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    config.setdefault("rope_theta", rope_theta_of(head.config))
    return config


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def check_head_fits_target(head: DraftHead, target_config) -> None:
    """Reject a head that was not made for this target, before anything runs."""
    spec = head.spec
    layers = target_config.num_hidden_layers
    problems = []
    if spec.target_hidden_size != target_config.hidden_size:
        problems.append(f"the head reads target hidden states of width {spec.target_hidden_size}, the target's "
                        f"is {target_config.hidden_size}")
    if spec.hidden_size != target_config.hidden_size:
        problems.append(f"the head's hidden size {spec.hidden_size} differs from the target's "
                        f"{target_config.hidden_size}, whose embeddings and LM head it shares")
    bad = [i for i in spec.target_layer_ids if not 0 <= i < layers]
    if bad:
        problems.append(f"target_layer_ids {bad} are outside the target's {layers} layers")
    if not 0 <= spec.mask_token_id < target_config.vocab_size:
        problems.append(f"mask_token_id {spec.mask_token_id} is outside the target's vocabulary "
                        f"({target_config.vocab_size})")
    if problems:
        raise CheckpointError("jetspec: draft head does not fit the target: " + "; ".join(problems))
