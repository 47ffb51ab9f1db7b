"""``jetspec bench``: tokens/s and tau of plain decoding, of every fixed tree shape ``budget="auto"`` chooses
among, and of ``budget="auto"``, for one model + head + prompt set, measured in one run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .heads import DraftHead
from .runtime import SpeculativeGenerator
from .runtime.budget import TreeShape

__all__ = ["SpeedRow", "measure_speed", "write_report"]


@dataclass
class SpeedRow:
    config: str  # "plain", a shape ("16x4"), or "auto"
    budget: int | str
    width: int
    tokens: int
    seconds: float
    rounds: int
    tau: float
    trees: dict[str, int]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def measure_speed(model: nn.Module, head: DraftHead, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  mode: str | None = None, eos_token_id=None, progress: bool = True) -> list[SpeedRow]:
    """Decode every prompt with each configuration (plain first, auto last); the first prompt of each
    configuration runs once more first, untimed (warm-up, CUDA-graph capture)."""
    device = model.lm_head.weight.device
    auto = SpeculativeGenerator(model, head, budget="auto", mode=mode)
    auto.calibrate(progress=progress)
    configs: list[tuple[str, SpeculativeGenerator]] = [("plain", SpeculativeGenerator(model, None, budget=1,
                                                                                       mode=mode))]
    configs += [(str(s), SpeculativeGenerator(model, head, budget=s.budget, width=s.width, mode=mode))
                for s in auto.shapes if s != TreeShape(1, 1)]
    configs.append(("auto", auto))
    rows = []
    bar = tqdm(total=len(configs) * len(prompts), desc="jetspec bench", disable=not progress)
    for name, gen in configs:
        ids = [torch.tensor([list(p)], device=device) for p in prompts]
        gen.generate(ids[0], max_new_tokens=min(8, max_new_tokens), eos_token_id=eos_token_id)
        tokens = rounds = 0
        seconds = 0.0
        lengths: list[int] = []
        trees: dict[str, int] = {}
        for prompt in ids:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = gen.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            tokens += out.stats.new_tokens
            rounds += out.stats.rounds
            lengths += out.stats.accept_lengths
            for tree, count in out.stats.tree_histogram().items():
                trees[tree] = trees.get(tree, 0) + count
            bar.update(1)
        rows.append(SpeedRow(config=name, budget=gen.budget, width=gen.width, tokens=tokens, seconds=seconds,
                             rounds=rounds, tau=sum(lengths) / max(len(lengths), 1), trees=trees))
    bar.close()
    return rows


def write_report(rows: list[SpeedRow], out: Path, about: dict) -> list[Path]:
    """``out/speed.json`` and, where matplotlib is installed, ``out/speed.png`` (tok/s against the budget per
    width; plain decoding and auto as lines). Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"about": about, "rows": [dict(vars(r), tok_s=r.tok_s) for r in rows]}
    written = [out / "speed.json"]
    written[0].write_text(json.dumps(payload, indent=1))
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [r for r in rows if r.config not in ("plain", "auto")]
    for width in sorted({r.width for r in fixed}):
        points = sorted((r.budget, r.tok_s) for r in fixed if r.width == width)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"width {width}")
    for name, style in (("plain", ":"), ("auto", "--")):
        for r in rows:
            if r.config == name:
                ax.axhline(r.tok_s, linestyle=style, color="k" if name == "plain" else "r", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tree nodes per round)")
    ax.set_ylabel("tokens / s")
    ax.set_title(about.get("title", "jetspec bench"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    plt.close(fig)
    return written + [out / "speed.png"]
