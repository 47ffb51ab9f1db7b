"""A whole round replayed from one CUDA graph, on Qwen3-8B shapes (random weights, bf16).

Drafters as in ``bench_e2e``: a random 5-layer JetSpec head (the real drafting
cost; acceptance ~1) and an oracle that proposes the driver's own greedy
continuation (every round commits depth + 1 tokens: the tree sizes a good head
produces). A random model's next-token distributions are near-flat, so in bf16
the tree forward and an AR step flip near-tied argmaxes within a few tokens and
an oracle's drafts go wrong (``bench_e2e``'s bf16 oracle rows: tau ~1); here the
model is made decisive instead (embeddings x4000, LM head = the original
embeddings: the token's own embedding dominates the residual stream of all 36
layers, so it repeats its last token by a wide margin), which changes
no shape, so every phase costs what it costs on the plain random model.
Per configuration:

- ``phase_us``: each phase of :class:`~jetspec.runtime.DeviceRound` captured as
  its own graph and the graphs replayed in round order, median GPU time per phase
  over the rounds (a phase shorter than a graph launch, ~2-4 us, is measured as that);
- ``round_us``: the whole round from one graph (median), against the same round
  issued eagerly from Python (``eager_round_us``, host dispatch included) and the
  host-driven round of ``mode="host"`` (``host_round_us``, wall time per round);
- ``syncs``: what the host does during 10 replays, from the profiler: graph
  launches and synchronising CUDA calls (must be 0), and torch's sync debug mode
  over 3 eager device rounds (``eager_syncs``: must be 0);
- tokens/s of ``generate`` with ``mode="graph"`` against ``mode="host"`` and HF
  ``generate`` in the same run, and whether their tokens agree (bf16: near-ties may
  flip, see ``bench_e2e``).
"""

from __future__ import annotations

import statistics
import warnings

import torch

from jetspec import SpeculativeGenerator
from jetspec.runtime import DeviceRound, HeadDrafter, OracleDrafter, Target
from jetspec.runtime.budget import TreeShape

from .bench_e2e import PROMPT, random_pair, timed_hf_generate
from .harness import Ceilings, Timer

NEW = 96
ROUNDS = 20
#: (drafter, budget, width); depth 15 (the head's block 16)
CONFIGS = [("AR", 1, 1), ("random head", 64, 8), ("random head", 256, 8), ("oracle", 16, 1), ("oracle", 64, 4),
           ("oracle", 256, 8)]


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _replay_times(graphs: list[tuple[str, torch.cuda.CUDAGraph]], rounds: DeviceRound) -> dict[str, float]:
    """Median GPU microseconds of each graph, replaying the list ``ROUNDS`` times from the prefilled state."""
    marks = []
    with rounds.rewound():
        for _ in range(ROUNDS):
            for name, graph in graphs:
                start, end = _events()
                start.record()
                graph.replay()
                end.record()
                marks.append((name, start, end))
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for name, start, end in marks:
        times.setdefault(name, []).append(start.elapsed_time(end) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _eager_round_us(rounds: DeviceRound, shape: TreeShape) -> float:
    times = []
    with rounds.rewound():
        for _ in range(ROUNDS):
            start, end = _events()
            start.record()
            rounds.step(shape)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _sync_counts(rounds: DeviceRound, shape: TreeShape, graph: torch.cuda.CUDAGraph) -> dict:
    with rounds.rewound():
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                graph.replay()
        torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        syncing = [n for n in names if "Synchronize" in n or n in ("cudaMemcpy", "cudaMemset", "cudaMalloc",
                                                                   "cudaFree")]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    rounds.step(shape)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"replays": 10, "graph_launches": names.count("cudaGraphLaunch"), "syncing_calls": len(syncing),
            "syncing_call_names": sorted(set(syncing)),
            "eager_syncs": sum("synchroniz" in str(w.message) for w in caught)}


def _generate(model, drafter, budget, width, mode, prompt):
    gen = SpeculativeGenerator(model, drafter, budget=budget, width=width, mode=mode)
    gen.generate(prompt, max_new_tokens=NEW, eos_token_id=[])  # warm-up (and capture)
    torch.cuda.synchronize()
    out = gen.generate(prompt, max_new_tokens=NEW, eos_token_id=[])
    torch.cuda.synchronize()
    return out.sequences[0, PROMPT:].tolist(), out.stats


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    device = timer.device
    config, model, head = random_pair(torch.bfloat16, device)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        model.model.embed_tokens.weight.mul_(4000)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT), device=device)
    target = Target(model)
    hf, hf_tok_s = timed_hf_generate(model, prompt, NEW)
    reference = hf[0, PROMPT:].tolist()
    # The oracle's continuation: the graphed driver's own greedy tokens, long enough for every timed round.
    long_gen = SpeculativeGenerator(model, None, budget=1, mode="graph")
    continuation = long_gen.generate(prompt, max_new_tokens=ROUNDS * 16 * 3, eos_token_id=[]).sequences[0, PROMPT:]
    continuation = continuation.tolist()

    rows = [{"config": "HF generate", "tok_s": hf_tok_s}]
    for label, budget, width in CONFIGS:
        depth = min(15, budget - 1)
        if label == "AR":
            drafter = None
        elif label == "oracle":
            drafter = OracleDrafter(continuation, 15, config.vocab_size)
        else:
            drafter = head
        graph_tokens, graph_stats = _generate(model, drafter, budget, width, "graph", prompt)
        host_tokens, host_stats = _generate(model, drafter, budget, width, "host", prompt)

        device_drafter = HeadDrafter(head, target) if label == "random head" else drafter
        rounds = DeviceRound(target, device_drafter, depth, width, capacity=4096)
        shape = TreeShape(budget, width)
        rounds.prefill(prompt)
        phase_us = _replay_times(rounds.capture_phases(shape), rounds)
        whole = rounds.capture(shape)
        round_us = _replay_times([("round", whole)], rounds)["round"]
        row = {
            "config": label, "budget": budget, "width": width, "depth": depth,
            "tau": graph_stats.mean_accept_length,
            "tok_s": graph_stats.tokens_per_second, "speedup_vs_hf": graph_stats.tokens_per_second / hf_tok_s,
            "host_tok_s": host_stats.tokens_per_second, "graph_vs_host": graph_stats.tokens_per_second
            / host_stats.tokens_per_second,
            "round_us": round_us, "phase_us": phase_us, "phase_sum_us": sum(phase_us.values()),
            "eager_round_us": _eager_round_us(rounds, shape),
            "host_round_us": host_stats.wall_seconds / max(host_stats.rounds, 1) * 1e6,
            "syncs": _sync_counts(rounds, shape, whole),
            "graph_same_as_host": graph_tokens == host_tokens, "graph_same_as_hf": graph_tokens == reference,
            "first_divergence_vs_hf": next((i for i, (a, b) in enumerate(zip(graph_tokens, reference)) if a != b),
                                           None),
        }
        row["syncing_calls"] = row["syncs"]["syncing_calls"]
        row.update({f"{k}_us": v for k, v in phase_us.items()})
        rows.append(row)
        print(f"  {label} {budget}x{width}: round {round_us:.0f} us (phases {phase_us}), "
              f"{row['tok_s']:.1f} tok/s graph vs {row['host_tok_s']:.1f} host, syncs {row['syncs']}", flush=True)
        del rounds, whole
        torch.cuda.empty_cache()
    return rows


COLUMNS = [
    ("config", "drafter", "s"),
    ("budget", "budget", "d"),
    ("width", "width", "d"),
    ("tau", "tau", ".2f"),
    ("tok_s", "graph tok/s", ".1f"),
    ("host_tok_s", "host tok/s", ".1f"),
    ("speedup_vs_hf", "x HF", ".2f"),
    ("round_us", "round us", ".0f"),
    ("phase_sum_us", "sum of phases us", ".0f"),
    ("draft_us", "draft", ".0f"),
    ("topk_us", "topk", ".0f"),
    ("build_us", "build", ".0f"),
    ("verify_us", "verify", ".0f"),
    ("accept_us", "accept", ".0f"),
    ("compact_us", "compact", ".0f"),
    ("eager_round_us", "eager round us", ".0f"),
    ("host_round_us", "host round us", ".0f"),
    ("syncing_calls", "syncs in 10 replays", "d"),
    ("graph_same_as_hf", "same as HF", ""),
]
