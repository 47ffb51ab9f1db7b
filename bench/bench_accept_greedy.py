"""accept_greedy: the longest target-agreeing root path of a verified tree plus its bonus token.

The op is one launch reading a few int64 rows per tree, so its floor is the launch itself: times are
reported against an empty kernel measured in the same run. The peer is the best torch expression that
needs no host sync (so that it, too, replays inside a CUDA graph): mark the nodes whose token equals the
target's prediction at their parent, propagate "on an agreeing path" level by level for D levels, take
the deepest such node (ties: highest index, as the op) and walk its ancestors back into the path.
Trees are best-first trees of N nodes from D = 16 depths of top-8 candidates (``build_tree``), and the
target predicts each node's first child, so the accepted path follows the rank-0 chain to a leaf.
"""

from __future__ import annotations

import torch

import jetspec  # noqa: F401  (registers the ops)
from jetspec.ops import build_tree

from .harness import Ceilings, Timer

DEPTH, WIDTH = 16, 8
BUDGETS = [16, 64, 256, 1024]
BATCHES = [1, 8]


def _case(batch: int, budget: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(batch * 7919 + budget)
    logprobs, ids = torch.randn(batch, DEPTH, 4096, generator=g, device=device).log_softmax(-1).topk(WIDTH, -1)
    root = torch.randint(0, 4096, (batch,), generator=g, device=device)
    tree = build_tree(logprobs.contiguous(), ids.contiguous(), root, torch.zeros_like(root), budget)
    # The target predicts, at every node, the token of its first (most likely) child: the path follows
    # the rank-0 chain down to a leaf. Padding and the root point at slot `budget`, which no node has.
    index = torch.where(tree.parents >= 0, torch.arange(budget, device=device), budget)
    first_child = torch.full((batch, budget + 1), budget, device=device).scatter_reduce(
        1, torch.where(tree.parents >= 0, tree.parents, budget), index, "amin")[:, :budget]
    return tree, torch.where(first_child < budget, tree.tokens.gather(1, first_child.clamp(max=budget - 1)), -1)


def torch_peer(tokens, parents, target_ids, num_nodes, depths, max_accept):
    """accept_greedy in batched torch, without a host sync."""
    batch, nodes = tokens.shape
    real = torch.arange(nodes, device=tokens.device) < num_nodes.unsqueeze(1)
    parent = parents.clamp(min=0)
    agrees = real & (tokens == target_ids.gather(1, parent)) & (parents >= 0)
    on_path = torch.zeros_like(agrees)
    on_path[:, 0] = True
    for _ in range(max_accept - 1):
        on_path = on_path | (agrees & on_path.gather(1, parent))
    index = torch.arange(nodes, device=tokens.device)
    key = torch.where(on_path, depths.clamp(max=max_accept - 1) * nodes + index, -1)
    last = key.argmax(1)
    accepted = torch.empty(batch, max_accept, dtype=torch.long, device=tokens.device)
    length = depths.gather(1, last.unsqueeze(1)).squeeze(1).clamp(max=max_accept - 1) + 1
    node = last
    for step in range(max_accept - 1, -1, -1):
        accepted[:, step] = torch.where(step < length, node, -1)
        node = torch.where(step < length, parents.gather(1, node.unsqueeze(1)).squeeze(1).clamp(min=0), node)
    return accepted, length, target_ids.gather(1, last.unsqueeze(1)).squeeze(1)


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    rows = []
    for batch in BATCHES:
        for budget in BUDGETS:
            tree, target_ids = _case(batch, budget, timer.device)
            m = DEPTH + 1
            accepted = torch.empty(batch, m, dtype=torch.long, device=timer.device)
            accept_len = torch.empty(batch, dtype=torch.long, device=timer.device)
            bonus = torch.empty(batch, dtype=torch.long, device=timer.device)

            def op():
                torch.ops.jetspec.accept_greedy(tree.tokens, tree.parents, target_ids, tree.num_nodes, accepted,
                                                accept_len, bonus)

            def peer():
                return torch_peer(tree.tokens, tree.parents, target_ids, tree.num_nodes, tree.depths, m)

            op()
            path_len = int(accept_len.min())
            got = peer()
            # The peer walks back from the deepest agreeing node; it must find the op's path.
            assert all(torch.equal(a, b) for a, b in zip(got, (accepted, accept_len, bonus))), "the peer disagrees"
            t_op = timer.graph_ms(op, flush_l2=False)
            row = {"batch": batch, "budget": budget, "path_len": path_len, "ms": t_op,
                   "vs_empty_kernel": t_op / ceil.empty_kernel_ms, "eager_ms": timer.eager_ms(op),
                   "torch_ms": timer.graph_ms(peer, flush_l2=False)}
            row["speedup_vs_torch"] = row["torch_ms"] / t_op
            rows.append(row)
    return rows


COLUMNS = [
    ("batch", "B", "d"),
    ("budget", "N", "d"),
    ("path_len", "path", "d"),
    ("ms", "op ms", ".4f"),
    ("vs_empty_kernel", "x empty", ".2f"),
    ("eager_ms", "op eager ms", ".4f"),
    ("torch_ms", "torch ms", ".4f"),
    ("speedup_vs_torch", "x vs torch", ".1f"),
]
