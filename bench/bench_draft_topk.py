"""draft_topk: LM head + log-softmax normaliser + top-K of a few drafted rows, against the weight-read floor.

The op streams the [V, H] LM-head weight once; its floor is the weight's bytes at the copy bandwidth
measured in the same run (``ceil.copy_gbps``, bytes read + written; a read-only stream can beat it a
little), and "floor/op" is the fraction of that floor reached. Peer: the torch chain a driver runs without the op,
``torch.topk(torch.log_softmax((h @ W.T).float() / t, -1), K)``, timed the same way.

Times are medians of CUDA-graph replays of 20 calls (L2 flushed before each replay). A weight smaller
than 3x L2 (SmolLM2's 57 MB) is cycled through several copies, so that back-to-back calls inside a
replay read it from memory, as a decoding step would.
"""

from __future__ import annotations

import itertools

import torch

import jetspec  # noqa: F401  (registers the ops)

from .harness import Ceilings, Timer, cold_weights

# (name, vocab, hidden size) of real LM heads
MODELS = [("Qwen3-8B", 151936, 4096), ("Qwen3-0.6B", 151936, 1024), ("SmolLM2-135M", 49152, 576)]
ROWS = [1, 4, 16, 32]
KS = [8, 32]
TEMPERATURE = 0.7
REPS = 20


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    rows_out = []
    for name, vocab, size in MODELS:
        weights = cold_weights(vocab, size, timer.device)
        weight_bytes = weights[0].numel() * weights[0].element_size()
        floor_ms = weight_bytes / ceil.copy_gbps / 1e6
        for rows, k in itertools.product(ROWS, KS):
            hidden = torch.randn(1, rows, size, device=timer.device).to(torch.bfloat16)
            logprobs = torch.empty(1, rows, k, device=timer.device)
            ids = torch.empty(1, rows, k, dtype=torch.long, device=timer.device)
            cycle = itertools.cycle(weights)

            def op():
                torch.ops.jetspec.draft_topk(hidden, next(cycle), TEMPERATURE, logprobs, ids)

            def torch_chain():
                torch.topk(torch.log_softmax((hidden @ next(cycle).T).float() / TEMPERATURE, -1), k)

            t_op = timer.graph_ms(op, reps=REPS)
            t_torch = timer.graph_ms(torch_chain, reps=REPS)
            rows_out.append({
                "model": name, "vocab": vocab, "hidden": size, "rows": rows, "k": k,
                "weight_bytes": weight_bytes, "weight_copies": len(weights),
                "ms": t_op, "torch_ms": t_torch, "speedup": t_torch / t_op,
                "gbps": weight_bytes / t_op / 1e6, "floor_ms": floor_ms, "of_ceiling": floor_ms / t_op,
            })
        del weights
    return rows_out


COLUMNS = [
    ("model", "model", "s"),
    ("rows", "rows", "d"),
    ("k", "K", "d"),
    ("ms", "op ms", ".4f"),
    ("torch_ms", "torch ms", ".4f"),
    ("speedup", "x torch", ".2f"),
    ("gbps", "GB/s", ".0f"),
    ("floor_ms", "floor ms", ".4f"),
    ("of_ceiling", "floor/op", ".1%"),
]
