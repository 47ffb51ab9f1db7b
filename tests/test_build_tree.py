"""The build_tree op against independent brute-force builders, its packed ancestor bits, edge
cases, argument checks and the op registration (opcheck)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

import jetspec
from jetspec.ops import build_tree
from jetspec.ops.tree import ancestor_mask, pack_mask, words_for


# ---------------------------------------------------------------------------------------------
# Independent models of the published accum_logp builder. Scores are exact rationals (Fraction):
# every input below is a float32 of moderate magnitude, so float64 sums of <= 4 of them are exact
# and exact arithmetic decides every tie the same way the contract's float64 scores do.
# ---------------------------------------------------------------------------------------------


def frontier_builder(lp, ids, budget):
    """Best-first with a linear scan instead of a heap: repeatedly take the best not-yet-taken
    node by (score desc, creation index asc); one at depth < D gets min(K, remaining) children at
    once, in rank order. Returns (tokens excluding the root's, parents, depths, rank paths)."""
    depth_limit = len(lp)
    width = len(lp[0]) if depth_limit else 0
    scores = [Fraction(0)]
    parents, depths, tokens, paths = [-1], [0], [None], [()]
    taken = [False]
    while len(scores) < budget:
        open_ = [i for i in range(len(scores)) if not taken[i]]
        if not open_:
            break
        best = max(open_, key=lambda i: (scores[i], -i))
        taken[best] = True
        d = depths[best]
        if d >= depth_limit:
            continue
        for r in range(min(width, budget - len(scores))):
            scores.append(scores[best] + Fraction(lp[d][r]))
            parents.append(best)
            depths.append(d + 1)
            tokens.append(ids[d][r])
            paths.append(paths[best] + (r,))
            taken.append(False)
    return tokens, parents, depths, paths


def enumeration_builder(lp, budget):
    """For strictly negative log-probs with pairwise-distinct path scores: enumerate every node of
    the full K-ary tree of depth D with its cumulative score; best-first then expands the internal
    nodes (depth < D) exactly in descending score order. Returns the rank paths in creation order."""
    depth_limit, width = len(lp), len(lp[0])
    internal = [()]
    for d in range(1, depth_limit):
        internal += list(itertools.product(range(width), repeat=d))

    def score(path):
        return sum((Fraction(lp[i][r]) for i, r in enumerate(path)), Fraction(0))

    created = [()]
    for node in sorted(internal, key=score, reverse=True):
        if len(created) >= budget:
            break
        assert node in created  # its parent scores higher, so it was expanded earlier
        created += [node + (r,) for r in range(min(width, budget - len(created)))]
    return created


def full_size(depth, width):
    return sum(width ** d for d in range(depth + 1))


def descending_logprobs(depth, width, g, values=None):
    """[depth, width] float32, descending along width; drawn from ``values`` when given (ties)."""
    if values is None:
        x = -torch.rand(depth, width, generator=g, dtype=torch.float64) * 8 - 1e-3
    else:
        pick = torch.randint(0, len(values), (depth, width), generator=g)
        x = torch.tensor(values, dtype=torch.float64)[pick]
    return x.float().sort(dim=-1, descending=True).values


def distinct_ids(depth, width, g, vocab=1000):
    """Token ids, all distinct, so a node's token identifies its (depth, rank)."""
    return torch.randperm(vocab, generator=g)[: depth * width].view(depth, width)


def check_tree(tree, b, lp, ids, budget, root, base):
    """Compare row ``b`` of a built tree with the frontier model, node for node."""
    tokens, parents, depths, _ = frontier_builder(lp.tolist(), ids.tolist(), budget)
    n = len(tokens)
    pad = budget - n
    assert int(tree.num_nodes[b]) == n
    assert tree.tokens[b].tolist() == [root] + tokens[1:] + [0] * pad
    assert tree.parents[b].tolist() == parents + [-1] * pad
    assert tree.depths[b].tolist() == depths + [0] * pad
    assert tree.positions[b].tolist() == [base + d for d in depths] + [base] * pad


def run(lp, ids, budget, roots=None, bases=None):
    """build_tree on a batch of [D, K] candidate tables."""
    batch = len(lp)
    roots = roots or [7 + b for b in range(batch)]
    bases = bases or [3 * b for b in range(batch)]
    return build_tree(torch.stack(lp), torch.stack(ids), torch.tensor(roots), torch.tensor(bases), budget)


# ---------------------------------------------------------------------------------------------
# Against the brute-force builders
# ---------------------------------------------------------------------------------------------

TIE_VALUES = [0.0, -0.5, -1.0]  # exact ties between siblings, across depths and with the root


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_matches_frontier_model_every_budget(depth, width, gen):
    """Every budget from 1 to past the full tree; a batch row each of distinct scores, tied scores
    (sibling and cousin ties), and all-zero log-probs (every score ties: creation order decides)."""
    full = full_size(depth, width)
    for _ in range(2):
        lp = [descending_logprobs(depth, width, gen), descending_logprobs(depth, width, gen, TIE_VALUES),
              torch.zeros(depth, width)]
        ids = [distinct_ids(depth, width, gen) for _ in lp]
        roots, bases = [11, 0, 999], [0, 5, 1234]
        for budget in range(1, full + 3):
            tree = run(lp, ids, budget, roots, bases)
            for b in range(3):
                check_tree(tree, b, lp[b], ids[b], budget, roots[b], bases[b])


@pytest.mark.parametrize("depth,width", [(1, 3), (2, 2), (3, 3), (4, 2), (4, 3)])
def test_matches_full_enumeration(depth, width, gen):
    """Distinct scores: the node set and creation order follow from sorting the full tree."""
    for _ in range(3):
        lp = descending_logprobs(depth, width, gen)
        ids = distinct_ids(depth, width, gen)
        where = {int(ids[d, r]): (d, r) for d in range(depth) for r in range(width)}
        for budget in range(1, full_size(depth, width) + 2):
            expected = enumeration_builder(lp.tolist(), budget)
            tree = run([lp], [ids], budget)
            n = int(tree.num_nodes[0])
            assert n == len(expected)
            paths = [()]
            for i in range(1, n):
                d, r = where[int(tree.tokens[0, i])]
                parent = int(tree.parents[0, i])
                assert d == len(paths[parent])
                paths.append(paths[parent] + (r,))
            assert paths == expected


def test_tie_break_prefers_earlier_created_node():
    """Hand-checked case. Depth 1 candidates tie (-1, -1); depth 2 has (-0, -3).
    root pops -> children 1 (-1) and 2 (-1); node 1 (earlier) pops first -> 3 (-1), 4 (-4);
    then 2 and 3 tie at -1: 2 was created first -> 5 (-1), 6 (-4); then 3, 5 are leaves."""
    lp = torch.tensor([[-1.0, -1.0], [0.0, -3.0]])
    ids = torch.tensor([[10, 11], [20, 21]])
    tree = run([lp], [ids], 7)
    assert tree.tokens[0].tolist() == [7, 10, 11, 20, 21, 20, 21]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1, 1, 2, 2]
    tree = run([lp], [ids], 6)  # budget runs out mid-expansion of node 2: only its rank-0 child
    assert tree.tokens[0].tolist() == [7, 10, 11, 20, 21, 20]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1, 1, 2]


def test_whole_expansion_not_one_node_at_a_time():
    """A popped node adds all K children at once even when a cousin would score higher."""
    lp = torch.tensor([[-0.1, -5.0], [-0.1, -6.0]])
    ids = torch.tensor([[1, 2], [3, 4]])
    tree = run([lp], [ids], 4)
    # root -> (1: -0.1), (2: -5); node 1 pops -> its rank-0 child (-0.2) fills the budget.
    assert tree.tokens[0].tolist() == [7, 1, 2, 3]
    tree = run([lp], [ids], 5)
    assert tree.tokens[0].tolist() == [7, 1, 2, 3, 4]  # the -6.1 child comes before anything under node 2
    assert tree.parents[0].tolist() == [-1, 0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# Ancestor bits
# ---------------------------------------------------------------------------------------------


def expected_words(parents, num_nodes, budget):
    rows = []
    for i in range(budget):
        bits = 1 << i
        if i < num_nodes:
            j = parents[i]
            while j != -1:
                bits |= 1 << j
                j = parents[j]
        words = []
        for w in range(words_for(budget)):
            u = (bits >> (32 * w)) & 0xFFFFFFFF
            words.append(u - (1 << 32) if u >= 1 << 31 else u)  # as a signed int32
        rows.append(words)
    return rows


@pytest.mark.parametrize("budget", [1, 2, 31, 32, 33, 63, 64, 65, 96, 255, 256, 341, 400])
def test_ancestor_bits_are_the_path(budget, gen):
    depth, width = 4, 4  # full tree: 341 nodes
    lp = [descending_logprobs(depth, width, gen), torch.zeros(depth, width)]
    ids = [distinct_ids(depth, width, gen) for _ in lp]
    tree = run(lp, ids, budget)
    assert tree.ancestors.shape == (2, budget, words_for(budget))
    assert tree.ancestors.dtype == torch.int32
    for b in range(2):
        n = int(tree.num_nodes[b])
        assert n == min(budget, 341)
        parents = tree.parents[b].tolist()
        assert all(parents[i] < i for i in range(1, n))
        assert tree.ancestors[b].tolist() == expected_words(parents, n, budget)
        # the unpacked mask: row i is True exactly on the path root..i (and only i for padding)
        mask = ancestor_mask(tree.ancestors[b], budget)
        assert mask.shape == (budget, budget) and mask.dtype == torch.bool
        dense = torch.zeros(budget, budget, dtype=torch.bool)
        for i in range(budget):
            dense[i, i] = True
            j = parents[i] if i < n else -1
            while j != -1:
                dense[i, j] = True
                j = parents[j]
        assert torch.equal(mask, dense)
        assert torch.equal(mask.sum(-1)[:n], tree.depths[b, :n] + 1)
        assert torch.equal(pack_mask(dense), tree.ancestors[b])  # packing is the inverse, word for word


def test_ancestor_mask_bit_order():
    """bit j % 32 of word j // 32; the sign bit is node 31 of a word."""
    words = torch.tensor([[[(1 << 31) - (1 << 32), 0], [0, 1 | 4]]], dtype=torch.int64).to(torch.int32)
    mask = ancestor_mask(words, 35)
    assert mask.shape == (1, 2, 35)
    assert mask[0, 0].nonzero().flatten().tolist() == [31]
    assert mask[0, 1].nonzero().flatten().tolist() == [32, 34]
    assert ancestor_mask(words, 33)[0, 1].nonzero().flatten().tolist() == [32]
    assert torch.equal(pack_mask(mask), words)


def test_padding_rows_see_only_themselves(gen):
    lp, ids = torch.zeros(2, 2), torch.tensor([[1, 2], [3, 4]])
    tree = run([lp], [ids], 40)  # full tree is 7 nodes
    assert int(tree.num_nodes[0]) == 7
    mask = ancestor_mask(tree.ancestors[0], 40)
    assert torch.equal(mask[7:], torch.eye(40, dtype=torch.bool)[7:])
    assert tree.tokens[0, 7:].eq(0).all() and tree.parents[0, 7:].eq(-1).all()
    assert tree.depths[0, 7:].eq(0).all() and tree.positions[0, 7:].eq(3 * 0).all()


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


def test_budget_one_is_the_root(gen):
    lp, ids = descending_logprobs(3, 2, gen), distinct_ids(3, 2, gen)
    tree = build_tree(lp[None], ids[None], torch.tensor([42]), torch.tensor([17]), 1)
    assert tree.tokens.tolist() == [[42]] and tree.parents.tolist() == [[-1]]
    assert tree.depths.tolist() == [[0]] and tree.positions.tolist() == [[17]]
    assert tree.num_nodes.tolist() == [1] and tree.ancestors.tolist() == [[[1]]]


@pytest.mark.parametrize("budget", [1, 5, 33])
def test_no_depths(budget):
    """D = 0 candidates ([B, 0, K]): the root alone, whatever the budget."""
    tree = build_tree(torch.zeros(2, 0, 3), torch.zeros(2, 0, 3, dtype=torch.long), torch.tensor([5, 6]),
                      torch.tensor([10, 20]), budget)
    assert tree.num_nodes.tolist() == [1, 1]
    assert tree.tokens[:, 0].tolist() == [5, 6]
    assert tree.positions.tolist() == [[10] * budget, [20] * budget]
    assert torch.equal(ancestor_mask(tree.ancestors, budget), torch.eye(budget, dtype=torch.bool).expand(2, -1, -1))


@pytest.mark.parametrize("budget", [1, 3, 6, 7, 20])
def test_width_one_is_a_chain(budget, gen):
    depth = 6
    lp, ids = descending_logprobs(depth, 1, gen), distinct_ids(depth, 1, gen)
    tree = build_tree(lp[None], ids[None], torch.tensor([3]), torch.tensor([100]), budget)
    n = min(budget, depth + 1)
    assert int(tree.num_nodes[0]) == n
    assert tree.tokens[0, :n].tolist() == [3] + ids[: n - 1, 0].tolist()
    assert tree.parents[0, :n].tolist() == list(range(-1, n - 1))
    assert tree.depths[0, :n].tolist() == list(range(n))
    assert tree.positions[0, :n].tolist() == list(range(100, 100 + n))
    mask = ancestor_mask(tree.ancestors[0], budget)
    assert torch.equal(mask[:n, :n], torch.ones(n, n, dtype=torch.bool).tril())


def test_budget_larger_than_full_tree(gen):
    lp, ids = descending_logprobs(3, 3, gen), distinct_ids(3, 3, gen)
    tree = build_tree(lp[None], ids[None], torch.tensor([1]), torch.tensor([0]), 100)
    assert int(tree.num_nodes[0]) == 40
    assert tree.depths[0, :40].bincount().tolist() == [1, 3, 9, 27]
    # every (depth, rank) candidate appears under every node of the depth above
    for i in range(40):
        kids = [j for j in range(40) if int(tree.parents[0, j]) == i]
        d = int(tree.depths[0, i])
        assert [int(tree.tokens[0, j]) for j in kids] == (ids[d].tolist() if d < 3 else [])


def test_batch_rows_are_independent(gen):
    """Each batch row equals the same row built alone; roots and base positions are per row."""
    depth, width, budget = 4, 3, 30
    lp = [descending_logprobs(depth, width, gen, TIE_VALUES if b % 2 else None) for b in range(5)]
    ids = [distinct_ids(depth, width, gen) for _ in range(5)]
    roots, bases = [9, 8, 7, 6, 5], [0, 1, 50, 1000, 3]
    tree = run(lp, ids, budget, roots, bases)
    for b in range(5):
        alone = run([lp[b]], [ids[b]], budget, [roots[b]], [bases[b]])
        for field_batch, field_alone in zip(tree, alone):
            assert torch.equal(field_batch[b], field_alone[0])
        check_tree(tree, b, lp[b], ids[b], budget, roots[b], bases[b])
        n = int(tree.num_nodes[b])
        assert torch.equal(tree.positions[b, :n], bases[b] + tree.depths[b, :n])


def test_output_device_and_dtypes(device, gen):
    lp, ids = descending_logprobs(3, 2, gen), distinct_ids(3, 2, gen)
    tree = build_tree(lp[None].to(device), ids[None].to(device), torch.tensor([1], device=device),
                      torch.tensor([2], device=device), 9)
    for name, t in zip(tree._fields, tree):
        assert t.device.type == device.type, name
        assert t.dtype == (torch.int32 if name == "ancestors" else torch.long), name
    check_tree(jetspec.ops.Tree(*(t.cpu() for t in tree)), 0, lp, ids, 9, 1, 2)


# ---------------------------------------------------------------------------------------------
# Argument checks and the op registration
# ---------------------------------------------------------------------------------------------


def good_args(batch=2, depth=3, width=2):
    return dict(topk_logprobs=-torch.rand(batch, depth, width).sort(-1).values,
                topk_ids=torch.randint(0, 50, (batch, depth, width)),
                root_token=torch.arange(batch), base_pos=torch.arange(batch), budget=8)


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(topk_logprobs=-torch.rand(2, 3, 2, dtype=torch.float64)), "topk_logprobs"),
        (dict(topk_logprobs=-torch.rand(2, 3, 2).half()), "topk_logprobs"),
        (dict(topk_ids=torch.randint(0, 50, (2, 3, 2), dtype=torch.int32)), "topk_ids"),
        (dict(topk_ids=torch.randint(0, 50, (2, 3, 3))), "topk_ids"),
        (dict(topk_ids=torch.randint(0, 50, (2, 4, 2))), "topk_ids"),
        (dict(topk_logprobs=-torch.rand(3, 2), topk_ids=torch.randint(0, 50, (3, 2))), "topk_logprobs"),
        (dict(budget=0), "budget"),
        (dict(budget=-3), "budget"),
        (dict(root_token=torch.tensor([1, 2, 3])), "root_token"),
        (dict(root_token=torch.tensor([[1], [2]])), "root_token"),
        (dict(root_token=torch.tensor([1.0, 2.0])), "root_token"),
        (dict(base_pos=torch.tensor([0])), "base_pos"),
        (dict(base_pos=torch.tensor([0, 1], dtype=torch.int32)), "base_pos"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(change, fragment):
    args = good_args()
    args.update(change)
    with pytest.raises(ValueError, match=fragment):
        build_tree(**args)


def alloc_outputs(batch, budget):
    return [torch.empty(batch, budget, dtype=torch.long) for _ in range(4)] + [
        torch.empty(batch, budget, words_for(budget), dtype=torch.int32), torch.empty(batch, dtype=torch.long)]


def test_raw_op_checks_inputs_and_outputs():
    args = good_args()
    lp, ids, root, base = args["topk_logprobs"], args["topk_ids"], args["root_token"], args["base_pos"]
    with pytest.raises(ValueError, match="topk_ids"):
        torch.ops.jetspec.build_tree(lp, ids.int(), root, base, *alloc_outputs(2, 8))
    outs = alloc_outputs(2, 8)
    outs[4] = torch.empty(2, 8, 2, dtype=torch.int32)  # wrong number of words
    with pytest.raises(ValueError, match="ancestors"):
        torch.ops.jetspec.build_tree(lp, ids, root, base, *outs)
    outs = alloc_outputs(2, 8)
    outs[1] = torch.empty(2, 7, dtype=torch.long)
    with pytest.raises(ValueError, match="parents"):
        torch.ops.jetspec.build_tree(lp, ids, root, base, *outs)


def test_raw_op_writes_outputs_in_place():
    args = good_args()
    outs = [t.fill_(123) for t in alloc_outputs(2, 8)]
    torch.ops.jetspec.build_tree(args["topk_logprobs"], args["topk_ids"], args["root_token"], args["base_pos"], *outs)
    want = build_tree(**args)
    for got, exp in zip(outs, want):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("batch,depth,width,budget", [(1, 3, 2, 8), (2, 4, 3, 33), (1, 0, 2, 3)])
def test_opcheck(batch, depth, width, budget):
    args = good_args(batch, depth, width)
    inputs = (args["topk_logprobs"], args["topk_ids"], args["root_token"], args["base_pos"])
    torch.library.opcheck(torch.ops.jetspec.build_tree.default, (*inputs, *alloc_outputs(batch, budget)))
