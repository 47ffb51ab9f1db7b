"""build_tree: best-first trees of N nodes from D = 16 depths of top-K candidates, batch 1 and 8.

The op is one launch of one block per tree, so its floor is the launch itself: times are reported
against an empty kernel measured in the same run (the issue's target is N = 256 and 1024 in under
20 us at batch 1). The peer is what a driver without the kernel does: copy the candidates to the
host, run the CPU kernel and copy the tree back.

A tree of N nodes takes ceil((N - 1) / K) expansions (fewer when depth D runs out; K = 1 builds a
chain of D + 1). The kernel builds trees of many expansions (``LIMITS``) with its threshold path (a score
bound, then every node above it, sorted) and the others with a chain of single pops; `path` says
which one the rule picks. "softmax" candidates are the top-K of a log-softmax over a 32k vocabulary of
Gaussian logits (std 4), what a draft head gives; "ties" candidates take five values (0, -0.25, -0.5,
-1, -2): rows repeat values, cousins tie, and the kernel builds these trees with pops.
"""

from __future__ import annotations

import statistics
import time

import torch

import jetspec  # noqa: F401  (registers the ops)
from jetspec.ops import LIMITS
from jetspec.ops.tree import words_for

from .harness import Ceilings, Timer

DEPTH = 16
VOCAB = 32768
BUDGETS = [64, 256, 1024]
WIDTHS = [1, 4, 8, 32]
BATCHES = [1, 8]
TIE_VALUES = [0.0, -0.25, -0.5, -1.0, -2.0]


def _candidates(kind: str, batch: int, width: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(batch * 100 + width)
    logits = torch.randn(batch, DEPTH, VOCAB, generator=g, device=device) * 4
    logprobs, ids = torch.log_softmax(logits, -1).topk(width, -1)  # descending along K
    if kind == "ties":
        values = torch.tensor(TIE_VALUES, device=device)
        picks = torch.randint(0, len(TIE_VALUES), logprobs.shape, generator=g, device=device)
        logprobs = values[picks].sort(-1, descending=True).values
    root = torch.randint(0, VOCAB, (batch,), generator=g, device=device)
    base = torch.full((batch,), 2048, dtype=torch.long, device=device)
    return logprobs.contiguous(), ids.contiguous(), root, base


def _path(logprobs: torch.Tensor, budget: int) -> str:
    """The kernel's rule: the threshold path for trees of enough expansions whose expanding depths
    repeat no log-prob within a row (it may still hand a tree to the pop path, which this cannot see)."""
    width = logprobs.shape[-1]
    repeats = bool((logprobs[:, :-1, 1:] == logprobs[:, :-1, :-1]).any())
    enough = (budget - 2) // width >= LIMITS["build_tree"]["cuda"]["threshold_expansions"]
    return "threshold" if width >= 2 and enough and not repeats else "pops"


def _outputs(batch: int, budget: int, device: torch.device):
    long = [torch.empty(batch, budget, dtype=torch.long, device=device) for _ in range(4)]
    return long + [torch.empty(batch, budget, words_for(budget), dtype=torch.int32, device=device),
                   torch.empty(batch, dtype=torch.long, device=device)]


def _host_ms(fn, reps: int = 5) -> float:
    """Median wall time of fn, which synchronizes with the device itself."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    cases = [("softmax", batch, width, budget) for batch in BATCHES for width in WIDTHS for budget in BUDGETS]
    cases += [("ties", 1, width, budget) for width in (4, 8) for budget in (256, 1024)]
    rows = []
    for kind, batch, width, budget in cases:
        inputs = _candidates(kind, batch, width, timer.device)
        host_inputs = [t.cpu() for t in inputs]
        outs = _outputs(batch, budget, timer.device)
        host_outs = _outputs(batch, budget, torch.device("cpu"))

        def op():
            torch.ops.jetspec.build_tree(*inputs, *outs)

        def cpu_reference_with_copies():
            for h, d in zip(host_inputs, inputs):
                h.copy_(d)
            torch.ops.jetspec.build_tree(*host_inputs, *host_outs)
            for d, h in zip(outs, host_outs):
                d.copy_(h, non_blocking=True)

        t_op = timer.graph_ms(op)
        t_eager = timer.eager_ms(op)
        t_peer = _host_ms(cpu_reference_with_copies)
        op()
        nodes = int(outs[5].min())
        expansions = -(-(nodes - 1) // width)  # the root's included
        rows.append({
            "candidates": kind,
            "batch": batch,
            "budget": budget,
            "width": width,
            "depth": DEPTH,
            "nodes_built": nodes,
            "expansions": expansions,
            "path": _path(inputs[0], budget),
            "us": t_op * 1e3,
            "eager_us": t_eager * 1e3,
            "vs_empty_kernel": t_op / ceil.empty_kernel_ms,
            "peer_ms": t_peer,
            "speedup_vs_peer": t_peer / t_op,
            "speedup_vs_peer_eager": t_peer / t_eager,
            "under_20us": t_op * 1e3 < 20.0,
        })
    return rows


COLUMNS = [
    ("candidates", "candidates", ""),
    ("batch", "B", "d"),
    ("budget", "N", "d"),
    ("width", "K", "d"),
    ("nodes_built", "built", "d"),
    ("expansions", "expansions", "d"),
    ("path", "path (rule)", ""),
    ("us", "op us", ".2f"),
    ("vs_empty_kernel", "x empty", ".2f"),
    ("eager_us", "eager us", ".2f"),
    ("peer_ms", "cpu ref+copies ms", ".3f"),
    ("speedup_vs_peer", "x vs ref", ".0f"),
    ("speedup_vs_peer_eager", "x vs ref (eager)", ".0f"),
    ("under_20us", "< 20 us", ""),
]
