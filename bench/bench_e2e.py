"""End to end on Qwen3-8B shapes (random weights): the driver against plain greedy.

Random weights make a trained head impossible, so two kinds of drafter run: a
random 5-layer JetSpec head (real drafting cost, acceptance ~1) and an oracle
that replays the driver's own greedy continuation (the most a round can
accept), which exercises every phase at the tree sizes a good head produces.
Recorded per configuration: tokens/s, tau, per-round phase times
(device-synchronised), and agreement with HF ``generate`` greedy. This is the
host-driven round (``mode="host"``); ``bench_round`` measures the graphed one.

Two model variants: fp32, where the output must be identical to HF's, and bf16.
A random model's next-token distributions are near-flat, so in bf16 any change
of kernel or shape flips near-tied argmaxes; as the yardstick for that, HF's
own greedy output with its eager attention is compared with HF's sdpa one. For
every divergence from HF the top-1/top-2 gap of HF's logits there is recorded:
a gap of a few bf16 ulps says a near-tie flipped, a large one would say a bug.
In bf16 the verify forward runs the ``tree_attention`` op; the largest oracle tree
also runs with the SDPA reference attention, the peer, in the same run.
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import jetspec.layers.attention
from jetspec import DraftHead, SpeculativeGenerator
from jetspec.runtime import OracleDrafter
from jetspec.heads import head_config_for

from .harness import Ceilings, Timer

PROMPT = 128
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
VARIANTS = [("fp32", torch.float32, 32), ("bf16", torch.bfloat16, 96)]  # (name, dtype, new tokens)


def _random(module_cls, config, dtype, device):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return module_cls(config).eval()
    finally:
        torch.set_default_dtype(previous)


def _agreement(tokens: list[int], reference: list[int]) -> dict:
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    return {"identical": tokens == reference, "first_divergence": first,
            "matching_fraction": sum(a == b for a, b in zip(tokens, reference)) / len(reference)}


def _top2_gap(model, sequence: torch.Tensor, position: int) -> float:
    """HF's own top-1 minus top-2 logit where ``sequence`` predicts token ``position`` of the output."""
    with torch.no_grad():
        logits = model(sequence[:, :PROMPT + position]).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def _timed_generate(gen: SpeculativeGenerator, prompt: torch.Tensor, new: int):
    gen.generate(prompt, max_new_tokens=8)  # warm-up
    out = gen.generate(prompt, max_new_tokens=new)
    return out.sequences[0, PROMPT:].tolist(), out.stats


def random_pair(dtype: torch.dtype, device) -> tuple[Qwen3Config, Qwen3ForCausalLM, DraftHead]:
    """A Qwen3-8B-shaped target and a 5-layer JetSpec head (block 16), random weights (seed 0)."""
    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3_8B)
    model = _random(Qwen3ForCausalLM, config, dtype, device)
    head = _random(DraftHead, head_config_for(config, num_layers=5, block_size=16, causal=True,
                                              mask_token_id=config.vocab_size - 1), dtype, device)
    return config, model, head


def timed_hf_generate(model, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    """HF ``generate`` greedy of exactly ``new`` tokens after a warm-up: the sequences and tokens/s."""
    model.generate(prompt, do_sample=False, max_new_tokens=4, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hf = model.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    torch.cuda.synchronize()
    return hf, new / (time.perf_counter() - t0)


def _variant(name: str, dtype: torch.dtype, new: int, device) -> list[dict]:
    config, model, head = random_pair(dtype, device)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT), device=device)
    hf, hf_tok_s = timed_hf_generate(model, prompt, new)
    reference = hf[0, PROMPT:].tolist()
    rows = [{"variant": name, "config": "HF generate", "tok_s": hf_tok_s, "tau": 1.0}]
    model.config._attn_implementation = "eager"
    eager = model.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    vs_hf = _agreement(eager[0, PROMPT:].tolist(), reference)
    rows.append({"variant": name, "config": "HF generate, eager attn", "vs_hf": vs_hf,
                 "identical_to_hf": vs_hf["identical"], "first_divergence": vs_hf["first_divergence"]})
    if vs_hf["first_divergence"] is not None:
        rows[-1]["hf_top2_gap_at_divergence"] = _top2_gap(model, hf, vs_hf["first_divergence"])

    ar_tokens, _ = _timed_generate(SpeculativeGenerator(model, None, budget=1, mode="host"), prompt, new)
    configs = [("AR (driver)", None, 1, 1, False), ("random head", head, 64, 8, False)]
    configs += [("oracle", OracleDrafter(ar_tokens, 15, config.vocab_size), b, w, False) for b, w in ((16, 1), (64, 4),
                                                                                                      (256, 8))]
    if dtype != torch.float32:
        configs.append(("oracle (SDPA verify)", OracleDrafter(ar_tokens, 15, config.vocab_size), 256, 8, True))
    for label, drafter, budget, width, sdpa in configs:
        # The peer: the same rounds with the verify attention in torch SDPA instead of the op.
        with mock.patch.object(jetspec.ops, "tree_attention_supports", lambda *_: False) if sdpa else contextlib.nullcontext():
            tokens, stats = _timed_generate(SpeculativeGenerator(model, drafter, budget=budget, width=width,
                                                                 mode="host"), prompt, new)
            _, profiled = _timed_generate(SpeculativeGenerator(model, drafter, budget=budget, width=width,
                                                               profile=True), prompt, new)
        vs_hf = _agreement(tokens, reference)
        row = {
            "variant": name, "config": label, "budget": budget, "width": width,
            "tok_s": stats.tokens_per_second, "speedup_vs_hf": stats.tokens_per_second / hf_tok_s,
            "tau": stats.mean_accept_length, "rounds": stats.rounds,
            "vs_hf": vs_hf, "vs_driver_ar": _agreement(tokens, ar_tokens),
            "identical_to_hf": vs_hf["identical"], "first_divergence": vs_hf["first_divergence"],
            "phase_ms_per_round": {k: v * 1e3 / max(profiled.rounds, 1) for k, v in profiled.phase_seconds.items()
                                   if k != "prefill"},
            "prefill_ms": profiled.phase_seconds["prefill"] * 1e3,
        }
        if vs_hf["first_divergence"] is not None:
            row["hf_top2_gap_at_divergence"] = _top2_gap(model, hf, vs_hf["first_divergence"])
        row["draft_ms"] = row["phase_ms_per_round"]["draft"]
        row["verify_ms"] = row["phase_ms_per_round"]["verify"]
        rows.append(row)
    del model, head
    torch.cuda.empty_cache()
    return rows


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    return [row for name, dtype, new in VARIANTS for row in _variant(name, dtype, new, timer.device)]


COLUMNS = [
    ("variant", "model", "s"),
    ("config", "drafter", "s"),
    ("budget", "budget", "d"),
    ("width", "width", "d"),
    ("tau", "tau", ".2f"),
    ("tok_s", "tok/s", ".1f"),
    ("speedup_vs_hf", "x HF", ".2f"),
    ("draft_ms", "draft ms", ".1f"),
    ("verify_ms", "verify ms", ".1f"),
    ("identical_to_hf", "same as HF", ""),
    ("first_divergence", "1st diff", "d"),
    ("hf_top2_gap_at_divergence", "HF top2 gap there", ".4f"),
]
