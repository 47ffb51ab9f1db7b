"""``budget="auto"``: each round's tree sized from a measured cost curve and the draft's own confidence.

The model. A round that verifies the best-first tree of N nodes commits, in expectation,
``E(N) = 1 + sum over its non-root nodes of P(the target agrees with the node's whole root path)``. The
draft estimates that probability as the product of its probabilities along the path, ``exp(score)``
with ``score`` the accumulated log-prob ``build_tree`` orders nodes by; the tree of budget N is the first
N nodes the builder creates, so one build at the largest budget gives ``E(N)`` for every N at once. A
head is rarely calibrated: :class:`BudgetChooser` multiplies the draft's path probability of a node at
depth d by a per-depth scale, fitted online as (observed rounds reaching depth d) / (predicted), both
decayed so the fit follows the text. Each round runs the tree shape (N, W) that maximises
``E(N, W) / t(N, W)``, with ``t`` the round's measured cost (:func:`calibrate`, cached per device, model
shape, dtype and mode).

When it decides. A device round is queued before the host has read the previous one (that is what
keeps the host off the critical path, and a CUDA graph has one tree size), so the choice for the next
round uses the newest draft the host has read: one or two rounds old. Draft confidence changes slowly
with the text, so the stale estimate costs little, and no round ever waits for the host. The same rule
runs in every mode. A round of plain decoding (N = 1) drafts nothing, so after one the chooser would
never see a draft again; it probes with a drafted round after 8 plain ones, doubling the wait while
probes keep losing (up to 256 rounds), so that a head that does not pay costs almost nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..ops.reference import best_first

__all__ = ["TreeShape", "CANDIDATE_BUDGETS", "CANDIDATE_WIDTHS", "candidate_shapes", "BudgetChooser",
           "CostTable", "calibration_key", "calibrate"]

#: Budgets and widths ``budget="auto"`` chooses among (a CUDA graph is captured for each shape).
CANDIDATE_BUDGETS = (1, 4, 16, 64, 256)
CANDIDATE_WIDTHS = (1, 4, 8)
_PROBE_AFTER, _PROBE_MAX = 8, 256
_DECAY = 0.97  # per round, of the calibration's counts: the fit follows the last ~30 rounds
_PRIOR = 2.0  # pseudo-rounds of "the draft is calibrated" each depth starts with


@dataclass(frozen=True, order=True)
class TreeShape:
    """A round's tree: ``budget`` nodes incl. the root, ``width`` candidates per depth (budget 1: plain
    decoding, no draft)."""

    budget: int
    width: int

    def __str__(self) -> str:
        return "1" if self.budget == 1 else f"{self.budget}x{self.width}"


def candidate_shapes(budgets: Iterable[int], widths: Iterable[int], depth: int) -> list[TreeShape]:
    """Every (budget, width) pair worth a graph: budget 1 once, and a chain (width 1) no longer than the
    deepest depth + 1 (a longer budget adds no node)."""
    shapes = {TreeShape(1, 1)}
    for n in budgets:
        for w in widths:
            if n > 1 and (w > 1 or n <= depth + 1):
                shapes.add(TreeShape(n, w))
    return sorted(shapes)


class BudgetChooser:
    """Picks each round's :class:`TreeShape` from ``costs`` (seconds per round of each shape) and the draft
    log-probs the host reads back (:meth:`observe`)."""

    def __init__(self, costs: dict[TreeShape, float], depth: int) -> None:
        if TreeShape(1, 1) not in costs or len(costs) < 2:
            raise ValueError("jetspec: the cost table needs plain decoding and at least one drafted shape")
        self.costs, self.depth = costs, depth
        self.drafted = sorted(s for s in costs if s.budget > 1)
        self.observed = [_PRIOR] * (depth + 1)  # decayed rounds whose path reached depth d (d >= 1)
        self.predicted = [_PRIOR] * (depth + 1)  # decayed sum of the draft's P(reach depth d) in those trees
        self.expected: dict[TreeShape, float] | None = None  # E(N, W) of the newest draft read
        self.plain_run, self.probe_after = 0, _PROBE_AFTER

    def scale(self, d: int) -> float:
        return self.observed[d] / self.predicted[d]

    def trees(self, logprobs: Sequence[Sequence[float]]) -> dict[int, tuple[list[int], list[float]]]:
        """Per width: the depths and draft path probabilities of the nodes (root excluded) of the largest
        drafted tree of that width. The tree of a smaller budget is a prefix of it (the builder makes the
        same nodes in the same order until the budget runs out)."""
        trees = {}
        for width in sorted({s.width for s in self.drafted}):
            budget = max(s.budget for s in self.drafted if s.width == width)
            _, depths, _, scores = best_first([row[:width] for row in logprobs[:self.depth]], budget)
            trees[width] = depths[1:], [math.exp(s) for s in scores[1:]]
        return trees

    def expected_committed(self, logprobs: Sequence[Sequence[float]],
                           trees: dict[int, tuple[list[int], list[float]]] | None = None) -> dict[TreeShape, float]:
        """Calibrated E(N, W) of every drafted shape for a draft's top-K log-probs ``[depth][K]`` (``trees``:
        :meth:`trees` of that draft, when already built)."""
        trees = self.trees(logprobs) if trees is None else trees
        curves = {}
        for width, (depths, probs) in trees.items():
            running, curve = 1.0, [1.0]
            for d, p in zip(depths, probs):
                running += min(1.0, self.scale(d) * p)
                curve.append(running)
            curves[width] = curve
        return {s: curves[s.width][min(s.budget, len(curves[s.width])) - 1] for s in self.drafted}

    def observe(self, shape: TreeShape, logprobs: Sequence[Sequence[float]] | None, committed: int) -> None:
        """A round of ``shape`` committed ``committed`` tokens; ``logprobs`` is its draft (None: plain)."""
        if logprobs is None:
            self.plain_run += 1
            return
        trees = self.trees(logprobs)
        depths, probs = trees[shape.width]
        reach = [0.0] * (self.depth + 1)
        for d, p in zip(depths[:shape.budget - 1], probs[:shape.budget - 1]):
            reach[d] += p
        for d in range(1, self.depth + 1):
            if reach[d] > 0:
                self.predicted[d] = _DECAY * self.predicted[d] + min(1.0, reach[d])
                self.observed[d] = _DECAY * self.observed[d] + (1.0 if committed - 1 >= d else 0.0)
        probing = self.plain_run >= self.probe_after
        self.expected = self.expected_committed(logprobs, trees)
        if probing:  # a probe that loses waits twice as long next time; one that wins resets the wait
            loses = self.best_rate()[0].budget == 1
            self.probe_after = min(2 * self.probe_after, _PROBE_MAX) if loses else _PROBE_AFTER
        self.plain_run = 0

    def best_rate(self) -> tuple[TreeShape, float]:
        """The shape of the highest expected tokens per second, and that rate."""
        rates = {TreeShape(1, 1): 1.0 / self.costs[TreeShape(1, 1)]}
        for shape, e in (self.expected or {}).items():
            rates[shape] = e / self.costs[shape]
        best = max(rates, key=lambda s: (rates[s], -s.budget))
        return best, rates[best]

    def choose(self) -> TreeShape:
        """The next round's shape."""
        if self.expected is None or self.plain_run >= self.probe_after:
            # No draft seen yet, or time to probe: the best drafted shape the last draft (or the costs) allow.
            drafted = {s: e / self.costs[s] for s, e in (self.expected or {}).items()}
            return max(drafted, key=drafted.get) if drafted else min(self.drafted, key=self.costs.get)
        return self.best_rate()[0]


class CostTable:
    """Measured seconds per round of each tree shape, cached as JSON under ``folder``."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"{key}.json"

    def load(self) -> dict[TreeShape, float] | None:
        if not self.path.exists():
            return None
        try:
            rows = json.loads(self.path.read_text())["seconds"]
            return {TreeShape(int(r["budget"]), int(r["width"])): float(r["seconds"]) for r in rows}
        except (ValueError, KeyError, TypeError):
            return None  # a damaged file is measured again

    def save(self, costs: dict[TreeShape, float], about: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"budget": s.budget, "width": s.width, "seconds": t} for s, t in sorted(costs.items())]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"about": about, "seconds": rows}, indent=1))
        os.replace(tmp, self.path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"


def calibration_key(about: dict) -> str:
    """A file name for the facts a cost table depends on (device, model and head shapes, dtype, mode)."""
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:24]


def calibrate(run: Callable[[TreeShape], Callable[[], None]], shapes: Sequence[TreeShape], device: torch.device,
              reps: int = 3, progress: bool = True) -> dict[TreeShape, float]:
    """Seconds per round of each shape: ``run(shape)`` returns a callable that runs one round of it (and
    leaves the state as it was); the median of ``reps`` runs after one warm-up."""
    def timed(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    costs = {}
    for shape in tqdm(shapes, desc="jetspec calibrate", disable=not progress):
        fn = run(shape)
        fn()
        costs[shape] = sorted(timed(fn) for _ in range(reps))[reps // 2]
    return costs
