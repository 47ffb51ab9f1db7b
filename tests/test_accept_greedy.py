import pytest
import torch

import jetspec
from jetspec.ops import reference
from trees import random_parents


def make_tree(batch, nodes, vocab, device, g, max_accept=None, hit_rate=0.7):
    """Random trees whose target predictions often agree with a child, so paths get long."""
    tokens = torch.randint(0, vocab, (batch, nodes), generator=g)
    parents = torch.stack([random_parents(nodes, g, max_depth=int(torch.randint(1, 33, (1,), generator=g))) for _ in range(batch)])
    target = torch.randint(0, vocab, (batch, nodes), generator=g)
    for b in range(batch):
        for i in range(1, nodes):
            if float(torch.rand(1, generator=g)) < hit_rate / 4:  # make node i the predicted child
                target[b, parents[b, i]] = tokens[b, i]
    num_nodes = torch.randint(1, nodes + 1, (batch,), generator=g)
    num_nodes[0] = nodes
    m = nodes if max_accept is None else max_accept
    return [t.to(device) for t in (tokens, parents, target, num_nodes)], m


def run_op(tokens, parents, target, num_nodes, m):
    batch = tokens.shape[0]
    accepted = torch.full((batch, m), 7, dtype=torch.long, device=tokens.device)  # poisoned
    accept_len = torch.full((batch,), 7, dtype=torch.long, device=tokens.device)
    bonus = torch.full((batch,), 7, dtype=torch.long, device=tokens.device)
    torch.ops.jetspec.accept_greedy(tokens, parents, target, num_nodes, accepted, accept_len, bonus)
    return accepted, accept_len, bonus


@pytest.mark.parametrize("batch,nodes,vocab", [(1, 1, 5), (1, 2, 2), (3, 16, 4), (2, 64, 3), (2, 255, 8), (1, 1024, 6)])
@pytest.mark.parametrize("max_accept", [None, 1, 4])
def test_matches_sequential_walk(device, batch, nodes, vocab, max_accept, gen):
    for _ in range(4):
        (tokens, parents, target, num_nodes), m = make_tree(batch, nodes, vocab, device, gen, max_accept)
        got = run_op(tokens, parents, target, num_nodes, m)
        want = reference.accept_greedy(tokens.cpu(), parents.cpu(), target.cpu(), num_nodes.cpu(), m)
        for g_, w in zip(got, want):
            assert torch.equal(g_.cpu(), w)


def test_long_paths_are_found(device, gen):
    # A chain whose every node matches: the whole chain is accepted, then the bonus.
    n = 40
    tokens = torch.arange(n, device=device).view(1, n)
    parents = (torch.arange(n, device=device) - 1).view(1, n)
    target = (torch.arange(n, device=device) + 1).view(1, n)
    accepted, accept_len, bonus = run_op(tokens, parents, target, torch.tensor([n], device=device), n)
    assert accept_len.item() == n and bonus.item() == n
    assert accepted[0].tolist() == list(range(n))
    accepted, accept_len, bonus = run_op(tokens, parents, target, torch.tensor([n], device=device), 5)
    assert accept_len.item() == 5 and bonus.item() == 5 and accepted[0].tolist() == [0, 1, 2, 3, 4]


def test_root_only_tree_commits_the_bonus(device):
    accepted, accept_len, bonus = run_op(*(torch.tensor([[v]], device=device) for v in (3, -1, 9)), torch.tensor([1], device=device), 3)
    assert accepted.tolist() == [[0, -1, -1]] and accept_len.tolist() == [1] and bonus.tolist() == [9]


def test_later_sibling_with_same_token_wins(device):
    tokens = torch.tensor([[0, 5, 5, 6, 6]], device=device)
    parents = torch.tensor([[-1, 0, 0, 1, 2]], device=device)
    target = torch.tensor([[5, 6, 6, 1, 2]], device=device)
    accepted, accept_len, bonus = run_op(tokens, parents, target, torch.tensor([5], device=device), 5)
    assert accepted[0, :3].tolist() == [0, 2, 4] and bonus.item() == 2


def test_padding_nodes_are_ignored(device):
    tokens = torch.tensor([[0, 5, 6]], device=device)
    parents = torch.tensor([[-1, 0, 1]], device=device)
    target = torch.tensor([[5, 6, 7]], device=device)
    accepted, accept_len, bonus = run_op(tokens, parents, target, torch.tensor([2], device=device), 3)
    assert accept_len.item() == 2 and bonus.item() == 6


def test_wrapper_allocates_outputs(device, gen):
    (tokens, parents, target, num_nodes), m = make_tree(2, 32, 3, device, gen)
    got = jetspec.ops.accept_greedy(tokens, parents, target, num_nodes, max_accept=8)
    want = reference.accept_greedy(tokens.cpu(), parents.cpu(), target.cpu(), num_nodes.cpu(), 8)
    for g_, w in zip(got, want):
        assert g_.device == tokens.device and torch.equal(g_.cpu(), w)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("tokens", lambda t: t.int(), "'tokens' must have dtype Long"),
        ("parents", lambda t: t[:, :2], "'parents' must have size 3 in dim 1"),
        ("num_nodes", lambda t: t.view(1, 1), "'num_nodes' must be 1-D"),
        ("accepted", lambda t: t[:, :0], "'accepted' needs room for the root"),
        ("bonus", lambda t: t.float(), "'bonus' must have dtype Long"),
    ],
)
def test_bad_arguments_raise_value_error(device, field, value, message):
    args = {
        "tokens": torch.tensor([[1, 2, 3]], device=device),
        "parents": torch.tensor([[-1, 0, 1]], device=device),
        "target_ids": torch.tensor([[2, 3, 4]], device=device),
        "num_nodes": torch.tensor([3], device=device),
        "accepted": torch.empty(1, 3, dtype=torch.long, device=device),
        "accept_len": torch.empty(1, dtype=torch.long, device=device),
        "bonus": torch.empty(1, dtype=torch.long, device=device),
    }
    args[field] = value(args[field])
    with pytest.raises(ValueError, match=message):
        torch.ops.jetspec.accept_greedy(**args)


@pytest.mark.parametrize(
    "parents,num_nodes,message",
    [([0, 0, 1], 3, "must be -1"), ([-1, 0, 2], 3, r"must be in \[0, 2\)"), ([-1, 0, 1], 4, "outside")],
)
def test_cpu_rejects_malformed_trees(parents, num_nodes, message):
    with pytest.raises(ValueError, match=message):
        run_op(torch.tensor([[1, 2, 3]]), torch.tensor([parents]), torch.tensor([[2, 3, 4]]), torch.tensor([num_nodes]), 3)


def test_opcheck(device, gen):
    for batch, nodes in ((1, 1), (2, 33)):
        (tokens, parents, target, num_nodes), m = make_tree(batch, nodes, 3, device, gen)
        outs = [torch.empty(batch, m, dtype=torch.long, device=device)] + [
            torch.empty(batch, dtype=torch.long, device=device) for _ in range(2)
        ]
        torch.library.opcheck(torch.ops.jetspec.accept_greedy.default, (tokens, parents, target, num_nodes, *outs))
