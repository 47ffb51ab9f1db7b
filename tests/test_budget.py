"""budget="auto": the cost model's choices, its online calibration and probing, the cached calibration,
and losslessness of generations whose rounds change tree shape."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

import jetspec
from jetspec.runtime import OracleDrafter
from jetspec.runtime import budget as budget_module
from jetspec.runtime.budget import BudgetChooser, TreeShape, candidate_shapes

from test_generator import hf_greedy, qwen3, random_head, random_prompt

DEPTH = 7
PLAIN, SMALL, LARGE = TreeShape(1, 1), TreeShape(4, 1), TreeShape(16, 4)


def draft(p: float, width: int = 4) -> list[list[float]]:
    """A draft whose rank-0 candidate at every depth has probability ``p``, rank r ``p / 10 ** r``."""
    return [[math.log(p) - r * math.log(10) for r in range(width)] for _ in range(DEPTH)]


def chooser(costs=None) -> BudgetChooser:
    return BudgetChooser(costs or {PLAIN: 1.0, SMALL: 1.2, LARGE: 1.3}, DEPTH)


def test_candidate_shapes():
    shapes = candidate_shapes((1, 4, 16, 64), (1, 4, 8), depth=7)
    assert shapes[0] == PLAIN and shapes.count(PLAIN) == 1
    assert TreeShape(4, 1) in shapes and TreeShape(16, 1) not in shapes  # a 16-node chain is 8 nodes deep
    assert TreeShape(64, 8) in shapes


def test_expected_committed_is_the_sum_of_path_probabilities():
    c = chooser()
    e = c.expected_committed(draft(0.5))
    assert e[SMALL] == pytest.approx(1 + 0.5 + 0.25 + 0.125)  # a chain of 3 draft tokens
    assert e[LARGE] > e[SMALL]


def test_choices_follow_confidence_and_cost():
    c = chooser()
    assert c.choose() != PLAIN  # nothing seen yet: try drafting
    c.observe(LARGE, draft(0.95), committed=8)
    assert c.choose() == LARGE  # confident draft, the tree pays for its cost
    c = chooser()
    c.observe(LARGE, draft(0.02), committed=1)
    assert c.choose() == PLAIN  # hopeless draft
    expensive = chooser({PLAIN: 1.0, SMALL: 5.0, LARGE: 9.0})
    expensive.observe(LARGE, draft(0.9), committed=8)
    assert expensive.choose() == PLAIN  # a cost curve that no acceptance can pay for


def test_an_over_confident_head_is_corrected():
    c = chooser()
    for _ in range(60):  # the draft claims 0.9 per token; the target never agrees
        c.observe(LARGE, draft(0.9), committed=1)
    assert c.scale(1) < 0.1
    assert c.choose() == PLAIN
    honest = chooser()
    for _ in range(60):
        honest.observe(LARGE, draft(0.9), committed=8)
    assert honest.scale(1) == pytest.approx(1.0, abs=0.05)  # agrees every time: min(1, 0.9 s) ~ 1 per level
    assert honest.choose() == LARGE


def test_plain_rounds_probe_with_a_growing_wait():
    c = chooser()
    c.observe(LARGE, draft(0.02), committed=1)
    waits = []
    for _ in range(3):
        run = 0
        while c.choose() == PLAIN:
            c.observe(PLAIN, None, committed=1)
            run += 1
        waits.append(run)
        c.observe(c.choose(), draft(0.02), committed=1)  # the probe loses
    assert waits == [8, 16, 32]


def test_calibration_is_cached_reused_and_keyed(tmp_path):
    model = qwen3(True)
    head = random_head(model, layers=1, block=8, causal=True, seed=0)
    prompt = random_prompt(model, 12, seed=0)
    gen = jetspec.SpeculativeGenerator(model, head, calibration_dir=tmp_path, mode="host")
    with mock.patch.object(budget_module, "tqdm", side_effect=lambda it, **_: it) as measured:
        gen.generate(prompt, max_new_tokens=8)
    assert measured.call_count == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert set(gen.costs) == set(gen.shapes)
    again = jetspec.SpeculativeGenerator(model, head, calibration_dir=tmp_path, mode="host")
    with mock.patch.object(budget_module, "calibrate", side_effect=AssertionError("measured again")):
        again.generate(prompt, max_new_tokens=8)
    assert again.costs == gen.costs
    # Another mode (or dtype, device, model shape) is another table.
    device_mode = jetspec.SpeculativeGenerator(model, head, calibration_dir=tmp_path, mode="device")
    device_mode.calibrate(progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 2
    gen.calibrate(force=True, progress=False)  # --force measures again, same file
    assert len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize("mode", ["host", "device"])
def test_auto_is_lossless(mode, tmp_path):
    model = qwen3(True)
    prompt = random_prompt(model, 15, seed=5)
    want = hf_greedy(model, prompt, 60)
    continuation = want[0, prompt.shape[1]:].tolist()
    drafters = [random_head(model, layers=1, block=8, causal=True, seed=5),
                OracleDrafter(continuation, depth=7, vocab_size=model.config.vocab_size)]
    for drafter in drafters:
        gen = jetspec.SpeculativeGenerator(model, drafter, mode=mode, calibration_dir=tmp_path)
        # Costs that make every shape worth trying at some confidence.
        gen.costs = {s: 1.0 + 0.02 * s.budget for s in gen.shapes}
        out = gen.generate(prompt, max_new_tokens=60)
        assert out.sequences.tolist() == want.tolist()
        assert sum(out.stats.tree_histogram().values()) == out.stats.rounds
    assert len(out.stats.tree_histogram()) > 1  # the oracle's rounds changed shape
    assert "trees" in out.stats.summary()
