"""The CUDA build_tree kernel against the CPU reference (the float64 heap of jetspec.ops.reference), output for
output and bit for bit, on thousands of random candidate sets with forced score ties; strided
inputs and outputs, argument checks, opcheck and CUDA-graph capture."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

import jetspec
from conftest import requires_cuda
from jetspec.ops import Tree, build_tree
from jetspec.ops.tree import words_for

pytestmark = requires_cuda

BUDGETS = [1, 2, 3, 31, 32, 33, 64, 255, 256, 511, 1023, 1024]
KINDS = ["spread", "quantized", "zeros", "neg_inf", "duplicated", "subnormal", "softmax"]


def candidates(kind: str, batch: int, depth: int, width: int, g: torch.Generator) -> torch.Tensor:
    """[batch, depth, width] float32 log-probs, descending along width, of one kind of tie pattern."""
    shape = (batch, depth, width)
    if kind == "spread":
        x = -torch.rand(shape, generator=g, dtype=torch.float64) * 8
    elif kind == "quantized":  # few distinct values: ties between siblings, cousins and depths
        values = torch.tensor([0.0, -0.25, -0.5, -1.0, -2.0], dtype=torch.float64)
        x = values[torch.randint(0, int(torch.randint(1, 6, (1,), generator=g)), shape, generator=g)]
    elif kind == "zeros":  # every score 0: creation order decides every pop (breadth first)
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "neg_inf":
        x = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
        x[torch.rand(shape, generator=g) < 0.3] = -math.inf
    elif kind == "duplicated":  # one value per depth, repeated across its ranks
        x = (-torch.rand(batch, depth, 1, generator=g, dtype=torch.float64) * 3).expand(shape).clone()
        x[..., width // 2:] -= 0.5
    elif kind == "subnormal":  # float32 subnormals must widen exactly, not flush to zero
        x = -torch.rand(shape, generator=g, dtype=torch.float64) * 1e-40
        x[torch.rand(shape, generator=g) < 0.3] = 0.0
    else:  # what a draft head gives: the top-K of a log-softmax
        logits = torch.randn(batch, depth, 4096, generator=g) * float(torch.empty(1).uniform_(0.5, 6, generator=g))
        x = torch.log_softmax(logits, -1).topk(width, -1).values.double()
    return x.float().sort(-1, descending=True).values


def poisoned_outputs(batch: int, budget: int, device) -> list[torch.Tensor]:
    outs = [torch.full((batch, budget), -7, dtype=torch.long, device=device) for _ in range(4)]
    outs.append(torch.full((batch, budget, words_for(budget)), -7, dtype=torch.int32, device=device))
    outs.append(torch.full((batch,), -7, dtype=torch.long, device=device))
    return outs


def run_op(inputs, outs) -> None:
    torch.ops.jetspec.build_tree(*inputs, *outs)


def assert_same_tree(got, want) -> None:
    for name, g_, w in zip(Tree._fields, got, want):
        assert torch.equal(g_.cpu(), w.cpu()), name


def check_case(lp, ids, root, base, budget) -> None:
    want = poisoned_outputs(lp.shape[0], budget, "cpu")
    run_op((lp, ids, root, base), want)
    got = poisoned_outputs(lp.shape[0], budget, "cuda")
    run_op((lp.cuda(), ids.cuda(), root.cuda(), base.cuda()), got)
    assert_same_tree(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(10))
def test_matches_cpu_reference_on_random_candidates(kind, seed):
    """~1,900 trees: random B, D in 0..32, K in 1..32, N in 1..1024 (edges included), every tie pattern."""
    rng = random.Random(1000 * seed + KINDS.index(kind))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(12):
        batch = rng.choice([1, 1, 2, 5])
        depth = rng.choice([0, 1, 2, 3, 8, 16, 31, 32, rng.randint(1, 32)])
        width = rng.choice([1, 2, 3, 4, 8, 32, rng.randint(1, 32)])
        budget = rng.choice(BUDGETS + [rng.randint(1, 1024)])
        lp = candidates(kind, batch, depth, width, g)
        ids = torch.randint(0, 1 << 40, (batch, depth, width), generator=g)
        root = torch.randint(0, 1 << 20, (batch,), generator=g)
        base = torch.randint(0, 1 << 16, (batch,), generator=g)
        check_case(lp, ids, root, base, budget)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("kind", ["zeros", "quantized", "softmax"])
def test_many_entries_per_lane(width, kind):
    """Narrow, deep trees at the largest budgets: up to 511 frontier entries, 16 per lane."""
    g = torch.Generator().manual_seed(width)
    for budget in (700, 1023, 1024):
        lp = candidates(kind, 2, 32, width, g)
        ids = torch.randint(0, 1000, (2, 32, width), generator=g)
        check_case(lp, ids, torch.tensor([1, 2]), torch.tensor([0, 77]), budget)


@pytest.mark.parametrize("width", [2, 4, 8, 16])
@pytest.mark.parametrize("kind", ["softmax", "spread", "quantized", "duplicated"])
def test_wide_trees_of_many_expansions(width, kind):
    """Budgets of 40 or more expansions beyond the root, where the kernel tries its threshold path:
    it settles softmax and spread candidates (scores rarely tie) and hands quantized and duplicated
    ones, whose cousins tie, to the pop path; every depth from 2 (one level of expandable nodes) to 32."""
    g = torch.Generator().manual_seed(10 + width)
    for budget in sorted({2 + 40 * width, 2 + 41 * width, 513, 1024}):
        for depth in (2, 3, 7, 16, 32):
            lp = candidates(kind, 3, depth, width, g)
            ids = torch.randint(0, 1 << 30, (3, depth, width), generator=g)
            check_case(lp, ids, torch.tensor([5, 6, 7]), torch.tensor([0, 9, 99]), budget)


@pytest.mark.parametrize("breakage", ["shuffled", "nan", "inf"])
def test_rows_that_break_the_contract_still_give_a_tree(breakage):
    """Rows not descending, or holding NaN / +inf, may build a tree other than the reference's (the
    contract excludes them), but never hang or read out of bounds: every node's parent comes before it,
    one level up."""
    g = torch.Generator().manual_seed(21)
    for width, budget in ((4, 1024), (8, 1024), (2, 300), (32, 1024)):
        lp = candidates("softmax", 2, 16, width, g)
        if breakage == "shuffled":
            lp = lp[..., torch.randperm(width, generator=g)]
        else:
            lp[:, ::3, -1] = math.nan if breakage == "nan" else math.inf
        ids = torch.randint(0, 1000, (2, 16, width), generator=g)
        outs = poisoned_outputs(2, budget, "cuda")
        run_op((lp.cuda(), ids.cuda(), torch.tensor([1, 2], device="cuda"), torch.tensor([0, 5], device="cuda")), outs)
        tokens, parents, depths, positions, ancestors, num_nodes = (t.cpu() for t in outs)
        for b in range(2):
            n = int(num_nodes[b])
            assert 1 <= n <= budget
            assert parents[b, 0] == -1 and depths[b, 0] == 0
            kids = torch.arange(1, n)
            assert (parents[b, 1:n] >= 0).all() and (parents[b, 1:n] < kids).all()
            assert torch.equal(depths[b, 1:n], depths[b, parents[b, 1:n]] + 1)


def test_hand_checked_ties():
    """The tie-break cases of test_build_tree.py, on the GPU: equal scores pop in creation order."""
    lp = torch.tensor([[[-1.0, -1.0], [0.0, -3.0]]])
    ids = torch.tensor([[[10, 11], [20, 21]]])
    for budget in (6, 7, 9):
        check_case(lp, ids, torch.tensor([7]), torch.tensor([0]), budget)
    tree = build_tree(lp.cuda(), ids.cuda(), torch.tensor([7], device="cuda"), torch.tensor([0], device="cuda"), 7)
    assert tree.tokens[0].tolist() == [7, 10, 11, 20, 21, 20, 21]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("kind,width,budget", [("quantized", 5, 100), ("softmax", 4, 400)])
def test_strided_inputs_and_outputs(kind, width, budget):
    """Transposed and sliced inputs, outputs that are views into larger buffers: no copy needed (the
    pop path, and the threshold path whose ancestor rows are not one dense block)."""
    g = torch.Generator().manual_seed(3)
    batch, depth = 3, 9
    lp = candidates(kind, batch, depth, width, g)
    ids = torch.randint(0, 500, (batch, depth, width), generator=g)
    root, base = torch.tensor([4, 5, 6]), torch.tensor([10, 0, 3])
    want = poisoned_outputs(batch, budget, "cpu")
    run_op((lp, ids, root, base), want)

    lp_t = lp.cuda().transpose(0, 2).contiguous().transpose(0, 2)  # [B, D, K] with batch innermost
    ids_s = torch.zeros(batch, depth, 2 * width, dtype=torch.long, device="cuda")[:, :, ::2]
    ids_s.copy_(ids)
    root_s = torch.zeros(2 * batch, dtype=torch.long, device="cuda")[::2]
    root_s.copy_(root)
    assert not (lp_t.is_contiguous() or ids_s.is_contiguous() or root_s.is_contiguous())
    big = [torch.full((batch, 2 * budget), -7, dtype=torch.long, device="cuda") for _ in range(4)]
    outs = [t[:, 1::2] for t in big]
    anc_big = torch.full((budget, batch, words_for(budget) + 3), -7, dtype=torch.int32, device="cuda")
    outs.append(anc_big[:, :, 1:1 + words_for(budget)].transpose(0, 1))
    outs.append(torch.full((batch, 2), -7, dtype=torch.long, device="cuda")[:, 0])
    run_op((lp_t, ids_s, root_s, base.cuda()), outs)
    assert_same_tree(outs, want)
    for t in big:  # the interleaved elements are untouched
        assert t[:, ::2].eq(-7).all()
    assert anc_big[:, :, 0].eq(-7).all() and anc_big[:, :, 1 + words_for(budget):].eq(-7).all()


def test_budget_one_and_no_depths():
    g = torch.Generator().manual_seed(4)
    lp, ids = candidates("spread", 2, 3, 4, g), torch.randint(0, 9, (2, 3, 4), generator=g)
    check_case(lp, ids, torch.tensor([3, 4]), torch.tensor([5, 6]), 1)
    check_case(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4, dtype=torch.long), torch.tensor([3, 4]),
               torch.tensor([5, 6]), 40)


def test_empty_batch():
    outs = poisoned_outputs(0, 8, "cuda")
    run_op((torch.zeros(0, 3, 2, device="cuda"), torch.zeros(0, 3, 2, dtype=torch.long, device="cuda"),
            torch.zeros(0, dtype=torch.long, device="cuda"), torch.zeros(0, dtype=torch.long, device="cuda")), outs)


def good_inputs(batch=2, depth=3, width=2):
    g = torch.Generator().manual_seed(5)
    return dict(topk_logprobs=candidates("spread", batch, depth, width, g).cuda(),
                topk_ids=torch.randint(0, 50, (batch, depth, width), generator=g).cuda(),
                root_token=torch.arange(batch, device="cuda"), base_pos=torch.arange(batch, device="cuda"))


@pytest.mark.parametrize(
    "change,budget,fragment",
    [
        (dict(topk_logprobs=torch.zeros(2, 3, 2, dtype=torch.float64)), 8, "'topk_logprobs'"),
        (dict(topk_ids=torch.zeros(2, 3, 2, dtype=torch.int32)), 8, "'topk_ids'"),
        (dict(topk_ids=torch.zeros(2, 3, 3, dtype=torch.long)), 8, "'topk_ids'"),
        (dict(topk_logprobs=torch.zeros(2, 6)), 8, "'topk_logprobs'"),
        (dict(root_token=torch.zeros(3, dtype=torch.long)), 8, "'root_token'"),
        (dict(base_pos=torch.zeros(2, dtype=torch.int32)), 8, "'base_pos'"),
        (dict(topk_logprobs=torch.zeros(2, 33, 2), topk_ids=torch.zeros(2, 33, 2, dtype=torch.long)), 8,
         "depth D <= 32"),
        (dict(topk_logprobs=torch.zeros(2, 3, 33), topk_ids=torch.zeros(2, 3, 33, dtype=torch.long)), 8, "K = 32"),
        (dict(topk_logprobs=torch.zeros(2, 3, 0), topk_ids=torch.zeros(2, 3, 0, dtype=torch.long)), 8, "width K"),
        ({}, 1025, "budget"),
        ({}, 0, "budget"),
    ],
)
def test_bad_inputs_raise_value_error_before_any_kernel(change, budget, fragment):
    args = {**good_inputs(), **{k: v.cuda() for k, v in change.items()}}
    outs = poisoned_outputs(2, budget, "cuda")
    with pytest.raises(ValueError, match=fragment):
        run_op(tuple(args.values()), outs)
    torch.cuda.synchronize()
    assert all(t.eq(-7).all() for t in outs)  # nothing was written: no kernel ran


@pytest.mark.parametrize("name", ["topk_ids", "root_token", "base_pos"])
def test_inputs_on_another_device_are_rejected(name):
    args = good_inputs()
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=f"'{name}' is on cpu"):
        run_op(tuple(args.values()), poisoned_outputs(2, 8, "cuda"))


@pytest.mark.parametrize(
    "index,bad,fragment",
    [
        (0, torch.zeros(2, 8, dtype=torch.int32), "'tokens'"),
        (1, torch.zeros(2, 7, dtype=torch.long), "'parents'"),
        (3, torch.zeros(3, 8, dtype=torch.long), "'positions'"),
        (4, torch.zeros(2, 8, 2, dtype=torch.int32), "'ancestors'"),
        (4, torch.zeros(2, 8, 1, dtype=torch.long), "'ancestors'"),
        (5, torch.zeros(1, dtype=torch.long), "'num_nodes'"),
    ],
)
def test_bad_outputs_raise_value_error(index, bad, fragment):
    outs = poisoned_outputs(2, 8, "cuda")
    outs[index] = bad.cuda()
    with pytest.raises(ValueError, match=fragment):
        run_op(tuple(good_inputs().values()), outs)


@pytest.mark.parametrize("index,name", list(enumerate(Tree._fields)))
def test_outputs_on_another_device_are_rejected(index, name):
    outs = poisoned_outputs(2, 8, "cuda")
    outs[index] = poisoned_outputs(2, 8, "cpu")[index]
    with pytest.raises(ValueError, match=f"'{name}' is on cpu"):
        run_op(tuple(good_inputs().values()), outs)


def test_wrapper_runs_the_cuda_kernel():
    """jetspec.ops.build_tree keeps everything on the GPU (no fallback warning, no host copy)."""
    args = good_inputs(batch=3, depth=5, width=4)
    assert jetspec.ops.supports("build_tree", torch.device("cuda"), depth=5, width=4, nodes=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = build_tree(**args, budget=50)
    assert not [w for w in caught if "jetspec" in str(w.message)]
    assert all(t.is_cuda for t in tree)
    want = build_tree(**{k: v.cpu() for k, v in args.items()}, budget=50)
    assert_same_tree(tree, want)


def test_replays_in_a_cuda_graph():
    """No host sync, no allocation: the op captures into a graph and replays on new candidates."""
    g = torch.Generator().manual_seed(6)
    batch, depth, width, budget = 2, 16, 8, 256
    inputs = [t.cuda() for t in (candidates("softmax", batch, depth, width, g),
                                 torch.randint(0, 1000, (batch, depth, width), generator=g),
                                 torch.tensor([1, 2]), torch.tensor([30, 40]))]
    outs = poisoned_outputs(batch, budget, "cuda")
    run_op(inputs, outs)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_op(inputs, outs)
    for kind in ("quantized", "softmax"):
        lp = candidates(kind, batch, depth, width, g)
        inputs[0].copy_(lp)
        graph.replay()
        want = poisoned_outputs(batch, budget, "cpu")
        run_op([t.cpu() for t in inputs], want)
        assert_same_tree(outs, want)


@pytest.mark.parametrize("batch,depth,width,budget", [(1, 3, 2, 8), (2, 4, 3, 33), (1, 0, 2, 3), (2, 16, 8, 256)])
def test_opcheck(batch, depth, width, budget):
    inputs = tuple(good_inputs(batch, depth, width).values())
    torch.library.opcheck(torch.ops.jetspec.build_tree.default, (*inputs, *poisoned_outputs(batch, budget, "cuda")))


def test_module_reports_cuda():
    assert jetspec.WITH_CUDA
