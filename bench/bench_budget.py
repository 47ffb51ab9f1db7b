"""budget="auto" against every fixed tree shape it chooses among, on Qwen3-8B shapes (random bf16 weights,
graph mode), with an oracle drafter whose rank-0 proposal is right with probability p per token and says
so (its log-prob is log p): auto should land within 5% of the best fixed shape for each p.

Every configuration decodes the same prompt for ``NEW`` tokens after a warm-up generation (which captures
its graphs); auto's cost table is measured first, in the same run, on the same machine.
"""

from __future__ import annotations

import torch

from jetspec import SpeculativeGenerator
from jetspec.runtime import OracleDrafter

from .bench_e2e import PROMPT, random_pair
from .harness import Ceilings, Timer

ACCURACIES = (0.3, 0.6, 0.9)
NEW = 128
DEPTH = 15


def _tok_s(gen: SpeculativeGenerator, prompt: torch.Tensor) -> tuple[float, float, dict]:
    gen.generate(prompt, max_new_tokens=16, eos_token_id=[])  # warm-up, capture
    torch.cuda.synchronize()
    out = gen.generate(prompt, max_new_tokens=NEW, eos_token_id=[])
    torch.cuda.synchronize()
    return out.stats.tokens_per_second, out.stats.mean_accept_length, out.stats.tree_histogram()


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    config, model, _ = random_pair(torch.bfloat16, timer.device)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT), device=timer.device)
    plain = SpeculativeGenerator(model, None, budget=1, mode="graph")
    # Long enough for every round of every configuration, warm-ups included.
    continuation = plain.generate(prompt, max_new_tokens=NEW + 2 * (DEPTH + 1), eos_token_id=[]).sequences
    continuation = continuation[0, PROMPT:].tolist()
    rows = []
    for p in ACCURACIES:
        oracle = OracleDrafter(continuation, DEPTH, config.vocab_size, accuracy=p)
        auto = SpeculativeGenerator(model, oracle, budget="auto", mode="graph")
        costs = auto.calibrate(force=True, progress=False)
        for shape in auto.shapes:
            gen = SpeculativeGenerator(model, oracle if shape.budget > 1 else None, budget=shape.budget,
                                       width=shape.width, mode="graph")
            tok_s, tau, _ = _tok_s(gen, prompt)
            rows.append({"accuracy": p, "config": str(shape), "tok_s": tok_s, "tau": tau,
                         "round_ms": costs[shape] * 1e3})
            del gen
            torch.cuda.empty_cache()
        tok_s, tau, trees = _tok_s(auto, prompt)
        best = max((r for r in rows if r["accuracy"] == p), key=lambda r: r["tok_s"])
        rows.append({"accuracy": p, "config": "auto", "tok_s": tok_s, "tau": tau, "trees": trees,
                     "best_fixed": best["config"], "vs_best_fixed": tok_s / best["tok_s"]})
        del auto
        torch.cuda.empty_cache()
    return rows


COLUMNS = [
    ("accuracy", "p", ".1f"),
    ("config", "tree", "s"),
    ("round_ms", "round ms", ".2f"),
    ("tau", "tau", ".2f"),
    ("tok_s", "tok/s", ".1f"),
    ("best_fixed", "best fixed", "s"),
    ("vs_best_fixed", "auto / best", ".3f"),
]
