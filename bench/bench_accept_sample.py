"""accept_sample on Qwen3's vocabulary (151936, bf16 logits), B = 1, trees of 16, 64 and 256 nodes.

The walk visits PATH nodes (a chain whose tokens the logits make near-certain at every temperature, as a
good draft's accepted prefix is; the last visited node's draw is the bonus), so greedy and sampling take
the same path. Compared in the same run:
  - greedy: accept_greedy alone, fed precomputed argmaxes (it reads no logits), and the fair greedy baseline
    argmax over every node's logits + accept_greedy (what the driver runs);
  - peer: the same sampling in torch eager ops, the way HF does it and a driver without the op would:
    temperature, top-k (topk + mask), top-p (sort + cumsum + scatter), softmax, one exponential-race draw
    at every node, then accept_greedy on the draws (the per-node draws make it the same walk);
  - floor: an empty launch + the visited nodes' logits at the copy bandwidth (each visited node's row is
    read once from memory; the op's later passes over it hit L2). argmax's floor reads every node's row.
Times are medians of CUDA-graph replays of 20 calls with L2 flushed before each replay; the logits are cycled
through enough copies that back-to-back calls read them from memory ("hot": one copy, L2 not flushed).
The op advances its offset on the device, so every replayed call draws fresh numbers.
"""

from __future__ import annotations

import itertools
import math

import torch

import jetspec

from .harness import Ceilings, Timer

VOCAB = 151936
BUDGETS = [16, 64, 256]
PATH = 5  # visited nodes: 4 accepted drafted tokens + the root
MAX_ACCEPT = 8
REPS = 20
# (name, temperature, top_k, top_p)
CONFIGS = [("T=0", 0.0, 0, 1.0), ("T=1", 1.0, 0, 1.0), ("T=.6 k20 p.95", 0.6, 20, 0.95), ("T=.7 p.8", 0.7, 0, 0.8)]


def _tree(budget: int, device: torch.device):
    """A tree whose first PATH - 1 nodes after the root form a chain the logits all but force; the other nodes
    hang off random earlier nodes with random tokens. Logits: N(0, 2) background, the chain's next token +20."""
    g = torch.Generator().manual_seed(budget)
    tokens = torch.randint(0, VOCAB, (1, budget), generator=g)
    parents = torch.zeros(1, budget, dtype=torch.long)
    parents[0, 0] = -1
    chain = min(PATH - 1, budget - 1)
    for i in range(1, budget):
        parents[0, i] = i - 1 if i <= chain else int(torch.randint(0, i, (1,), generator=g))
    logits = torch.randn(1, budget, VOCAB, generator=g) * 2
    for i in range(chain):
        logits[0, i, tokens[0, i + 1]] = 20.0
    return (tokens.to(device), parents.to(device), logits.to(torch.bfloat16).to(device),
            torch.tensor([budget], device=device))


def _copies(t: torch.Tensor) -> list[torch.Tensor]:
    l2 = torch.cuda.get_device_properties(t.device).L2_cache_size
    n = max(1, min(64, math.ceil(3 * l2 / (t.numel() * t.element_size()))))
    return [t] + [t.clone() for _ in range(n - 1)]


def _torch_walk(tokens, parents, logits, num_nodes, temperature, top_k, top_p, max_accept):
    """The peer: the processed distribution at every node in torch ops, an exponential-race draw at each, then
    the greedy walk over the draws."""
    if temperature == 0:
        draws = logits.argmax(-1)
    else:
        z = logits.float() / temperature
        if 0 < top_k < z.shape[-1]:
            z = z.masked_fill(z < z.topk(top_k, -1).values[..., -1:], -math.inf)
        if top_p < 1:
            sorted_z, order = z.sort(-1)
            cum = sorted_z.softmax(-1).cumsum(-1)
            remove = cum <= 1 - top_p
            remove[..., -1] = False
            z = z.masked_fill(remove.scatter(-1, order, remove), -math.inf)
        probs = z.softmax(-1)
        draws = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
    return jetspec.ops.accept_greedy(tokens, parents, draws, num_nodes, max_accept=max_accept)


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    device = timer.device
    rows = []
    seed = torch.tensor([1], device=device)
    offset = torch.tensor([0], device=device)
    for budget in BUDGETS:
        tokens, parents, logits, num_nodes = _tree(budget, device)
        copies = _copies(logits)
        row_bytes = VOCAB * logits.element_size()
        argmaxes = logits.argmax(-1)
        accepted = torch.empty(1, MAX_ACCEPT, dtype=torch.long, device=device)
        accept_len, bonus = (torch.empty(1, dtype=torch.long, device=device) for _ in range(2))

        def greedy_only():
            torch.ops.jetspec.accept_greedy(tokens, parents, argmaxes, num_nodes, accepted, accept_len, bonus)

        def argmax_greedy(cycle=itertools.cycle(copies)):
            torch.ops.jetspec.accept_greedy(tokens, parents, next(cycle).argmax(-1), num_nodes, accepted, accept_len,
                                            bonus)

        t_greedy = timer.graph_ms(greedy_only, reps=REPS)
        t_argmax = timer.graph_ms(argmax_greedy, reps=REPS)
        greedy_floor = ceil.empty_kernel_ms + budget * row_bytes / ceil.copy_gbps / 1e6
        for name, temperature, top_k, top_p in CONFIGS:
            per_row = [torch.full((1,), v, dtype=dt, device=device)
                       for v, dt in ((temperature, torch.float32), (top_k, torch.long), (top_p, torch.float32))]

            def op(cycle=itertools.cycle(copies)):
                torch.ops.jetspec.accept_sample(tokens, parents, next(cycle), num_nodes, *per_row, seed, offset,
                                                accepted, accept_len, bonus)

            def op_hot():
                torch.ops.jetspec.accept_sample(tokens, parents, logits, num_nodes, *per_row, seed, offset, accepted,
                                                accept_len, bonus)

            def peer(cycle=itertools.cycle(copies)):
                _torch_walk(tokens, parents, next(cycle), num_nodes, temperature, top_k, top_p, MAX_ACCEPT)

            op_hot()
            path = int(accept_len)
            t_op = timer.graph_ms(op, reps=REPS)
            floor = ceil.empty_kernel_ms + path * row_bytes / ceil.copy_gbps / 1e6
            row = {
                "budget": budget,
                "config": name,
                "path": path,
                "ms": t_op,
                "ms_l2_hot": timer.graph_ms(op_hot, reps=REPS, flush_l2=False),
                "eager_ms": timer.eager_ms(op),
                "greedy_ms": t_greedy,
                "argmax_greedy_ms": t_argmax,
                "vs_greedy": t_op / t_greedy,
                "vs_argmax_greedy": t_op / t_argmax,
                "floor_ms": floor,
                "vs_floor": t_op / floor,
                "argmax_greedy_floor_ms": greedy_floor,
                "peer_ms": timer.graph_ms(peer, reps=REPS),
            }
            row["speedup_vs_peer"] = row["peer_ms"] / t_op
            rows.append(row)
    return rows


COLUMNS = [
    ("budget", "nodes", "d"),
    ("config", "sampling", "s"),
    ("path", "visited", "d"),
    ("ms", "op ms", ".4f"),
    ("ms_l2_hot", "hot ms", ".4f"),
    ("eager_ms", "eager ms", ".4f"),
    ("greedy_ms", "greedy ms", ".4f"),
    ("argmax_greedy_ms", "argmax+greedy ms", ".4f"),
    ("vs_greedy", "x greedy", ".2f"),
    ("vs_argmax_greedy", "x argmax+greedy", ".2f"),
    ("floor_ms", "floor ms", ".4f"),
    ("vs_floor", "x floor", ".1f"),
    ("argmax_greedy_floor_ms", "argmax floor ms", ".4f"),
    ("peer_ms", "torch ms", ".4f"),
    ("speedup_vs_peer", "x vs torch", ".1f"),
]
