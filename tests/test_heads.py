"""Draft heads: the published config/tensor format (hand-written checkpoints), save/load round trips,
rejections, fit-to-target checks, and the head forward (against a from-the-spec reference,
causality, incremental context K/V)."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

import jetspec
from jetspec.runtime import HeadDrafter
from jetspec.heads import (CheckpointError, DraftHead, HeadSpec, build_target_layer_ids, check_head_fits_target,
                           head_config_for, load_head, save_head)
from jetspec.runtime import Target

# The hand-written head's geometry: h_q * d (64) != H (32), so a transposed projection cannot load.
H, I, N_LAYERS, HQ, HKV, D, BLOCK, VOCAB = 32, 48, 2, 4, 2, 16, 4, 64
TAPS = [1, 3, 5]
MASK = VOCAB - 1
THETA = 5000.0
EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# build_target_layer_ids
# ---------------------------------------------------------------------------------------------


def test_build_target_layer_ids_published_examples():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert build_target_layer_ids(48, 5) == [1, 12, 23, 34, 45]
    for layers in (2, 7, 28, 36, 48, 64):
        assert build_target_layer_ids(layers, 1) == [layers // 2]


def test_build_target_layer_ids_formula():
    assert build_target_layer_ids(36, 2) == [1, 33]
    assert build_target_layer_ids(12, 3) == [1, 5, 9]
    # span 8 over 3 gaps: 1 + 8/3 * i = 1, 3.67, 6.33, 9 -> 1, 4, 6, 9
    assert build_target_layer_ids(12, 4) == [1, 4, 6, 9]
    # half-way ties round half to even (Python round): 1 + 5*i/2 = 1, 3.5, 6 -> 1, 4, 6
    assert build_target_layer_ids(9, 3) == [1, 4, 6]
    # 1 + 9*i/2 = 1, 5.5, 10 -> 1, 6, 10
    assert build_target_layer_ids(13, 3) == [1, 6, 10]


# ---------------------------------------------------------------------------------------------
# A checkpoint written by hand in the published format (JETSPEC.md 2.1, 2.2)
# ---------------------------------------------------------------------------------------------


def published_config(**overrides) -> dict:
    config = {
        "model_type": "qwen3",
        "architectures": ["DFlashDraftModel"],
        "block_size": BLOCK,
        "num_target_layers": 6,
        "dflash_config": {"causal_head": True, "target_layer_ids": TAPS, "mask_token_id": MASK},
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": HQ,
        "num_key_value_heads": HKV,
        "head_dim": D,
        "rms_norm_eps": EPS,
        "hidden_act": "silu",
        "rope_theta": THETA,
        "max_position_embeddings": 512,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def published_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HQ * D, H),
            p + "self_attn.k_proj.weight": (HKV * D, H),
            p + "self_attn.v_proj.weight": (HKV * D, H),
            p + "self_attn.o_proj.weight": (H, HQ * D),
            p + "self_attn.q_norm.weight": (D,),
            p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        })
    shapes.update({"norm.weight": (H,), "fc.weight": (H, len(TAPS) * H), "hidden_norm.weight": (H,)})
    return shapes


def random_tensors(seed=0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Distinct random values everywhere (norm weights too), so any mix-up of names shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in published_shapes().items():
        if len(shape) == 1:
            t = 1.0 + 0.3 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        out[name] = t.to(dtype)
    return out


def write_checkpoint(folder: Path, tensors: dict, config: dict | None = None, prefix: str = "",
                     shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or published_config()))
    named = {prefix + k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(named, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(named)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: named[k] for k in names[s::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in named.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def tensors():
    return random_tensors()


@pytest.fixture
def checkpoint(tmp_path, tensors):
    return write_checkpoint(tmp_path / "head", tensors)


def assert_loaded(head: DraftHead, tensors: dict):
    state = head.state_dict()
    assert set(state) == set(tensors)
    for name, t in tensors.items():
        assert state[name].dtype == t.dtype, name
        assert torch.equal(state[name], t), name


def test_load_hand_written_checkpoint(checkpoint, tensors):
    head = load_head(checkpoint)
    assert_loaded(head, tensors)
    assert next(head.parameters()).dtype == torch.bfloat16  # the config's torch_dtype
    assert not head.training
    assert head.spec == HeadSpec(hidden_size=H, num_layers=N_LAYERS, num_heads=HQ, kv_heads=HKV, head_dim=D,
                                 block_size=BLOCK, causal=True, target_layer_ids=tuple(TAPS), mask_token_id=MASK,
                                 target_hidden_size=H)
    assert head.spec.depth == BLOCK - 1
    # (RoPE from the file's rope_theta: test_forward_matches_spec_reference)


def test_load_with_model_prefix(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "head", tensors, prefix="model.")
    assert_loaded(load_head(folder), tensors)


def test_load_sharded(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "head", tensors, shards=2)
    assert len(list(folder.glob("model-*-of-00002.safetensors"))) == 2
    assert not (folder / "model.safetensors").exists()
    assert_loaded(load_head(folder), tensors)


def test_load_subfolder_form(tmp_path, tensors):
    write_checkpoint(tmp_path / "repo" / "heads" / "b4", tensors)
    assert_loaded(load_head(f"{tmp_path / 'repo'}::heads/b4"), tensors)
    with pytest.raises(CheckpointError, match="config.json"):
        load_head(f"{tmp_path / 'repo'}::heads/b8")


def test_load_dtype_and_device_arguments(checkpoint, tensors):
    head = load_head(checkpoint, dtype=torch.float32, device="cpu")
    for name, p in head.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, tensors[name].float())


def test_bidirectional_flag_and_default_taps(tmp_path, tensors):
    """causal_head false (DFlash); target_layer_ids absent -> build_target_layer_ids(num_target_layers, n)."""
    config = published_config(num_target_layers=36, dflash_config={"causal_head": False, "mask_token_id": MASK})
    taps = build_target_layer_ids(36, N_LAYERS)  # [1, 33]: two taps -> fc is [H, 2H]
    tensors = dict(tensors, **{"fc.weight": torch.randn(H, len(taps) * H).bfloat16()})
    head = load_head(write_checkpoint(tmp_path / "head", tensors, config))
    assert head.spec.causal is False
    assert head.spec.target_layer_ids == tuple(taps)
    assert_loaded(head, tensors)


# ---------------------------------------------------------------------------------------------
# The head's forward against a reference written from the spec (JETSPEC.md 1.2-1.6), using the
# checkpoint's tensors by their published names
# ---------------------------------------------------------------------------------------------


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope(x, pos):
    """x [T, heads, D] at integer positions pos [T]; rotate-half convention."""
    inv = 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None].float(), torch.cat([ang.sin(), ang.sin()], -1)[:, None].float()
    rot = torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
    return x * cos + rot * sin


def spec_forward(w, tapped, block, causal):
    """tapped [T, k*H] (context at positions 0..T-1), block [S, H] at positions T..T+S-1 -> [S, H]."""
    w = {k: v.float() for k, v in w.items()}
    t, s = tapped.shape[0], block.shape[0]
    ctx = rms(tapped @ w["fc.weight"].T, w["hidden_norm.weight"])
    ctx_pos, blk_pos = torch.arange(t), torch.arange(t, t + s)
    x = block
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        a = p + "self_attn."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(rms((h @ w[a + "q_proj.weight"].T).view(s, HQ, D), w[a + "q_norm.weight"]), blk_pos)
        kv_in = torch.cat([ctx, h])  # the context is not normed by input_layernorm
        k = rope(rms((kv_in @ w[a + "k_proj.weight"].T).view(t + s, HKV, D), w[a + "k_norm.weight"]),
                 torch.cat([ctx_pos, blk_pos]))
        v = (kv_in @ w[a + "v_proj.weight"].T).view(t + s, HKV, D)
        out = torch.empty(s, HQ, D)
        for head in range(HQ):
            kvh = head // (HQ // HKV)
            scores = q[:, head] @ k[:, kvh].T / math.sqrt(D)  # [s, t + s]
            if causal:
                blocked = torch.arange(t + s)[None] > (t + torch.arange(s))[:, None]
                scores = scores.masked_fill(blocked, float("-inf"))
            out[:, head] = scores.softmax(-1) @ v[:, kvh]
        x = x + out.reshape(s, HQ * D) @ w[a + "o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["norm.weight"])


@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_spec_reference(tmp_path, tensors, causal):
    config = published_config(dflash_config={"causal_head": causal, "target_layer_ids": TAPS, "mask_token_id": MASK})
    head = load_head(write_checkpoint(tmp_path / "head", tensors, config), dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    t, s = 7, BLOCK
    tapped, block = torch.randn(t, len(TAPS) * H, generator=g), torch.randn(s, H, generator=g)
    with torch.no_grad():
        ctx = head.context_key_values(tapped[None], torch.arange(t)[None])
        got = head(block[None], torch.arange(t, t + s)[None], ctx)[0]
    want = spec_forward(tensors, tapped, block, causal)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# save_head / load_head round trips
# ---------------------------------------------------------------------------------------------


def tiny_target_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=I, num_hidden_layers=6, num_attention_heads=HQ,
                num_key_value_heads=HKV, head_dim=D, max_position_embeddings=512, rope_theta=THETA,
                rms_norm_eps=EPS, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    base.update(kw)
    return Qwen3Config(**base)


def random_head(causal=True, dtype=torch.float32, seed=0, **kw) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead(head_config_for(tiny_target_config(), num_layers=2, block_size=BLOCK, causal=causal,
                                     mask_token_id=MASK, **kw))
    with torch.no_grad():
        for p in head.parameters():  # norms away from 1 too
            p.add_(0.1 * torch.randn_like(p))
    return head.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_save_load_round_trip(tmp_path, dtype, causal):
    head = random_head(causal, dtype)
    folder = save_head(head, tmp_path / "out")
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    loaded = load_head(folder)
    assert loaded.spec == head.spec
    assert next(loaded.parameters()).dtype == dtype
    a, b = head.state_dict(), loaded.state_dict()
    assert set(a) == set(b) == set(published_shapes())
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["block_size"] == BLOCK
    assert config["num_target_layers"] == 6
    assert config["dflash_config"]["causal_head"] is causal
    assert config["dflash_config"]["target_layer_ids"] == list(head.spec.target_layer_ids)
    assert config["dflash_config"]["mask_token_id"] == MASK
    assert config["rope_theta"] == THETA
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    for key, value in dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=HQ,
                           num_key_value_heads=HKV, head_dim=D, vocab_size=VOCAB).items():
        assert config[key] == value, key


def test_saved_head_loads_from_published_keys_only(tmp_path):
    """What save_head writes is readable by a consumer that knows only the published keys."""
    head = random_head()
    folder = save_head(head, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    slim = {k: config[k] for k in published_config() if k in config}
    slim["dflash_config"] = {k: config["dflash_config"][k] for k in ("causal_head", "target_layer_ids", "mask_token_id")}
    assert set(slim) == set(published_config())
    (folder / "config.json").write_text(json.dumps(slim))
    loaded = load_head(folder)
    assert loaded.spec == head.spec
    # same function (rope_theta, eps, ... read back), at positions where RoPE matters
    g = torch.Generator().manual_seed(0)
    tapped, block = torch.randn(1, 6, 2 * H, generator=g), torch.randn(1, BLOCK, H, generator=g)
    with torch.no_grad():
        outs = [h(block, torch.arange(300, 300 + BLOCK)[None],
                  h.context_key_values(tapped, torch.arange(294, 300)[None])) for h in (head, loaded)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_sharded_save_round_trip(tmp_path):
    head = random_head(dtype=torch.float32)
    folder = save_head(head, tmp_path / "out", max_shard_bytes=8 * 1024)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(head.state_dict())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    loaded = load_head(folder)
    for name, t in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # saving again unsharded into the same folder leaves no stale shards behind
    save_head(head, folder)
    assert not list(folder.glob("model-*-of-*.safetensors"))
    assert not (folder / "model.safetensors.index.json").exists()
    assert_loaded(load_head(folder), head.state_dict())


# ---------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------


def test_reject_missing_tensor(tmp_path, tensors):
    tensors.pop("layers.1.self_attn.k_norm.weight")
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.self_attn\.k_norm\.weight"):
        load_head(write_checkpoint(tmp_path / "h", tensors))


def test_reject_unexpected_tensor(tmp_path, tensors):
    tensors["embed_tokens.weight"] = torch.zeros(VOCAB, H, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"unexpected.*embed_tokens\.weight"):
        load_head(write_checkpoint(tmp_path / "h", tensors))


def test_reject_extra_layer(tmp_path, tensors):
    tensors["layers.2.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.2"):
        load_head(write_checkpoint(tmp_path / "h", tensors))


@pytest.mark.parametrize("name,shape", [("layers.0.self_attn.q_proj.weight", (H, HQ * D)),  # transposed
                                        ("fc.weight", (H, 2 * H)), ("norm.weight", (H + 1,))])
def test_reject_wrong_shape(tmp_path, tensors, name, shape):
    tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}.*shape"):
        load_head(write_checkpoint(tmp_path / "h", tensors))


def test_reject_missing_block_size(tmp_path, tensors):
    config = published_config()
    del config["block_size"]
    with pytest.raises(CheckpointError, match="block_size"):
        load_head(write_checkpoint(tmp_path / "h", tensors, config))


def test_reject_missing_mask_token_id(tmp_path, tensors):
    config = published_config(dflash_config={"causal_head": True, "target_layer_ids": TAPS})
    with pytest.raises(CheckpointError, match="mask_token_id"):
        load_head(write_checkpoint(tmp_path / "h", tensors, config))


def test_reject_pickle_only_without_unpickling(tmp_path, monkeypatch):
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(published_config()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle \xff\x00" * 10)

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_head(folder)


def test_safetensors_preferred_over_pickle(checkpoint, tensors):
    (checkpoint / "pytorch_model.bin").write_bytes(b"garbage")
    assert_loaded(load_head(checkpoint), tensors)


def test_reject_no_weights(tmp_path):
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(published_config()))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_head(folder)


def test_reject_missing_shard(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "h", tensors, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shards that are not there"):
        load_head(folder)


def test_reject_tensor_present_twice(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "h", tensors)
    both = {**tensors, "model.norm.weight": tensors["norm.weight"].clone()}
    save_file({k: v.contiguous() for k, v in both.items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'norm.weight' twice"):
        load_head(folder)


def test_reject_no_config(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "h", tensors)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_head(folder)
    with pytest.raises(CheckpointError, match="config.json"):
        load_head(tmp_path / "does-not-exist")


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------------
# Does the head fit the target?
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_target_config()).eval()


def misfit_heads():
    wide = tiny_target_config(hidden_size=48, head_dim=12)
    return [
        ("hidden size", DraftHead(head_config_for(wide, num_layers=1, block_size=4, causal=True, mask_token_id=1,
                                                  target_layer_ids=[1]))),
        ("target_layer_ids", DraftHead(head_config_for(tiny_target_config(), num_layers=1, block_size=4, causal=True,
                                                       mask_token_id=1, target_layer_ids=[1, 6]))),
        ("mask_token_id", DraftHead(head_config_for(tiny_target_config(), num_layers=1, block_size=4, causal=True,
                                                    mask_token_id=VOCAB))),
    ]


@pytest.mark.parametrize("case", range(3))
def test_head_must_fit_target(target, case):
    fragment, head = misfit_heads()[case]
    with pytest.raises(CheckpointError, match=fragment):
        check_head_fits_target(head, target.config)
    with pytest.raises(CheckpointError, match=fragment):
        jetspec.SpeculativeGenerator(target, head, budget=8, width=2)


def test_fitting_head_is_accepted(target):
    head = random_head()
    check_head_fits_target(head, target.config)
    jetspec.SpeculativeGenerator(target, head, budget=8, width=2)


# ---------------------------------------------------------------------------------------------
# The head forward: in-block causality and incremental context K/V
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_block_causality(causal):
    head = random_head(causal)
    g = torch.Generator().manual_seed(1)
    t, s = 5, 8
    tapped = torch.randn(1, t, len(head.spec.target_layer_ids) * H, generator=g)
    block = torch.randn(1, s, H, generator=g)
    positions = torch.arange(t, t + s)[None]
    with torch.no_grad():
        ctx = head.context_key_values(tapped, torch.arange(t)[None])
        base = head(block, positions, ctx)
        for j in range(1, s):
            changed = block.clone()
            changed[:, j:] = torch.randn(1, s - j, H, generator=g)
            out = head(changed, positions, ctx)
            assert not torch.allclose(out[:, j], base[:, j], atol=1e-4)  # slot j sees itself
            if causal:
                torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            else:
                assert not torch.allclose(out[:, :j], base[:, :j], atol=1e-4)


def test_context_changes_every_slot():
    head = random_head(True)
    g = torch.Generator().manual_seed(2)
    tapped = torch.randn(1, 5, len(head.spec.target_layer_ids) * H, generator=g)
    block, positions = torch.randn(1, 4, H, generator=g), torch.arange(5, 9)[None]
    with torch.no_grad():
        a = head(block, positions, head.context_key_values(tapped, torch.arange(5)[None]))
        tapped[:, 2] += 1.0
        b = head(block, positions, head.context_key_values(tapped, torch.arange(5)[None]))
    assert all(not torch.allclose(a[:, i], b[:, i], atol=1e-4) for i in range(4))


@pytest.mark.parametrize("causal", [True, False])
def test_incremental_context_equals_one_piece(target, causal):
    head = random_head(causal)
    tgt = Target(target)
    g = torch.Generator().manual_seed(3)
    total = 23
    tapped = torch.randn(1, total, len(head.spec.target_layer_ids) * H, generator=g)
    anchor = torch.tensor([17])

    whole = HeadDrafter(head, tgt)
    whole.start(tapped, 64)
    want_lp, want_ids = whole.propose(anchor, 8)
    assert want_lp.shape == (1, head.spec.depth, 8) and want_lp.dtype == torch.float32
    assert want_ids.dtype == torch.long
    assert (want_lp.diff(dim=-1) <= 0).all()

    pieces = HeadDrafter(head, tgt)
    pieces.start(tapped[:, :5], 64)
    mid_lp, _ = pieces.propose(anchor, 8)
    for a, b in [(5, 6), (6, 13), (13, 20), (20, 23)]:
        pieces.extend(tapped[:, a:b])
    assert pieces.length == whole.length == total
    got_lp, got_ids = pieces.propose(anchor, 8)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids, want_ids)
    assert not torch.allclose(mid_lp, want_lp, atol=1e-4)  # the proposal does depend on the context

    # restarting forgets the old sequence
    pieces.start(tapped, 64)
    torch.testing.assert_close(pieces.propose(anchor, 8)[0], want_lp, rtol=1e-5, atol=1e-5)


def test_proposal_is_full_vocabulary_log_softmax(target):
    """propose(): log-probs over the whole vocabulary (not renormalised over the top K) of
    lm_head(head(embed([anchor, mask, ...])))[1:]."""
    head = random_head(True)
    tgt = Target(target)
    g = torch.Generator().manual_seed(4)
    tapped = torch.randn(1, 9, len(head.spec.target_layer_ids) * H, generator=g)
    drafter = HeadDrafter(head, tgt)
    drafter.start(tapped, 32)
    lp, ids = drafter.propose(torch.tensor([5]), 3)
    with torch.no_grad():
        block = target.model.embed_tokens(torch.tensor([[5] + [MASK] * (BLOCK - 1)]))
        hidden = head(block, torch.arange(9, 9 + BLOCK)[None], head.context_key_values(tapped, torch.arange(9)[None]))
        full = torch.log_softmax(target.lm_head(hidden[:, 1:]).float(), -1)
    want_lp, want_ids = full.topk(3, dim=-1)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want_ids)
    assert (lp.exp().sum(-1) < 1).all()


# ---------------------------------------------------------------------------------------------
# Rejections of malformed or hostile files: each a CheckpointError naming the file (issue #23.6)
# ---------------------------------------------------------------------------------------------


def _shard_index(folder: Path, tensors: dict, shard_name: str) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(tensors, shard_name)}))


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_reject_index_naming_a_shard_outside_the_folder(tmp_path, tensors, how):
    # A complete, valid checkpoint outside the head's folder: the old loader read it.
    outside = tmp_path / "outside.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(outside), metadata={"format": "pt"})
    folder = tmp_path / "head"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(published_config()))
    name = "../outside.safetensors" if how == "dotdot" else str(outside)
    _shard_index(folder, tensors, name)
    with pytest.raises(CheckpointError, match=r"outside the head's folder"):
        load_head(folder)


def test_a_hub_cache_snapshot_loads(tmp_path, tensors):
    """A hub cache links each file of a snapshot into its blob store, outside the snapshot's folder: the
    folder's own links are followed (only names in the index are checked)."""
    blobs = write_checkpoint(tmp_path / "blobs", tensors)
    folder = tmp_path / "snapshots" / "abc"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(blobs / name)
    assert_loaded(load_head(folder), tensors)


def test_shards_inside_the_folder_still_load(tmp_path, tensors):
    """Containment is checked on the name: a subfolder, a harmless '..' and an in-folder symlink pass."""
    folder = write_checkpoint(tmp_path / "head", tensors)
    (folder / "sub").mkdir()
    (folder / "model.safetensors").rename(folder / "sub" / "w.safetensors")
    (folder / "link.safetensors").symlink_to(folder / "sub" / "w.safetensors")
    for name in ("sub/w.safetensors", "sub/../sub/w.safetensors", "link.safetensors"):
        _shard_index(folder, tensors, name)
        assert_loaded(load_head(folder), tensors)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_reject_unreadable_safetensors_naming_the_file(tmp_path, tensors, damage):
    folder = write_checkpoint(tmp_path / "h", tensors)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_head(folder)


def test_reject_truncated_shard_naming_the_file(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "h", tensors, shards=2)
    file = folder / "model-00002-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_head(folder)


@pytest.mark.parametrize("index", ["{not json", "[1, 2]", '"weight_map"', '{"weight_map": ["a.safetensors"]}',
                                   '{"weight_map": {"norm.weight": 7}}', '{"weight_map": {"norm.weight": null}}',
                                   '{"weight_map": "model-00001-of-00002.safetensors"}'])
def test_reject_malformed_index_naming_the_file(tmp_path, tensors, index):
    folder = write_checkpoint(tmp_path / "h", tensors, shards=2)
    file = folder / "model.safetensors.index.json"
    file.write_text(index)
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_head(folder)


@pytest.mark.parametrize("text", ["{not json", "[]", "[1, 2]", '"qwen3"', "null", "3", "\xff\xfe"])
def test_reject_malformed_config_naming_the_file(tmp_path, tensors, text):
    folder = write_checkpoint(tmp_path / "h", tensors)
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "config.json"))):
        load_head(folder)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value", ["bogus", "int32", "bool", "nn", "complex64", 16, ["bfloat16"]])
def test_reject_bad_config_dtype_naming_the_file(tmp_path, tensors, key, value):
    config = published_config(**{key: value})
    folder = write_checkpoint(tmp_path / "h", tensors, config)
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "config.json")) + f".*{key}"):
        load_head(folder)
    # an explicit dtype does not make a malformed config acceptable either
    with pytest.raises(CheckpointError, match=key):
        load_head(folder, dtype=torch.float32)


def test_config_dtype_spellings(tmp_path, tensors):
    for key, value, want in [("dtype", "float32", torch.float32), ("torch_dtype", "float16", torch.float16),
                             ("torch_dtype", None, torch.bfloat16)]:
        folder = write_checkpoint(tmp_path / f"h-{key}-{value}", tensors, published_config(**{key: value}))
        assert next(load_head(folder).parameters()).dtype == want


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool])
def test_reject_integer_tensors_naming_the_tensor(tmp_path, tensors, dtype):
    tensors["layers.1.mlp.up_proj.weight"] = torch.ones(I, H, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.mlp\.up_proj\.weight'.*" + name):
        load_head(write_checkpoint(tmp_path / "h", tensors))
