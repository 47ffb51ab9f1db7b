"""Token trees: the best-first builder (the ``build_tree`` op) and helpers to read its output.

The contract is in ``cpp/build_tree.cpp``. The CPU kernel below is the reference: a
binary heap in Python, exactly the published ``accum_logp`` builder, with scores
accumulated in float64 (a Python float) so that any other kernel can reproduce
every tie. The CUDA kernel (``cuda/build_tree.cu``) builds the same trees bit for bit,
on the device, in one launch.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import torch
from torch import Tensor

from .ops import use_kernel

__all__ = ["Tree", "build_tree", "ancestor_mask", "words_for"]


class Tree(NamedTuple):
    """A batch of token trees in node order (node 0 is the root, ``parents[i] < i``)."""

    tokens: Tensor  # [B, N] int64
    parents: Tensor  # [B, N] int64, -1 for the root and for padding
    depths: Tensor  # [B, N] int64
    positions: Tensor  # [B, N] int64, base_pos + depth
    ancestors: Tensor  # [B, N, ceil(N / 32)] int32 packed "may attend" bits
    num_nodes: Tensor  # [B] int64


def words_for(nodes: int) -> int:
    """int32 words per row of a packed ancestor mask over ``nodes`` nodes."""
    return (nodes + 31) // 32


def _check(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, budget: int) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"jetspec.build_tree: {msg}")

    if topk_logprobs.dtype != torch.float32:
        fail(f"'topk_logprobs' must have dtype float32, got {topk_logprobs.dtype}")
    if topk_ids.dtype != torch.long:
        fail(f"'topk_ids' must have dtype int64, got {topk_ids.dtype}")
    if topk_logprobs.dim() != 3 or topk_ids.shape != topk_logprobs.shape:
        fail(f"'topk_logprobs' and 'topk_ids' must both be [batch, depth, width], got {tuple(topk_logprobs.shape)} "
             f"and {tuple(topk_ids.shape)}")
    batch, _, width = topk_logprobs.shape
    if width < 1:
        fail("the candidate width K must be at least 1")
    for name, t in (("root_token", root_token), ("base_pos", base_pos)):
        if t.dtype != torch.long or t.shape != (batch,):
            fail(f"'{name}' must be int64 of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("topk_ids", topk_ids), ("root_token", root_token), ("base_pos", base_pos)):
        if t.device != topk_logprobs.device:
            fail(f"'{name}' is on {t.device} but 'topk_logprobs' is on {topk_logprobs.device}")
    if budget < 1:
        fail(f"the budget (nodes including the root) must be at least 1, got {budget}")


def _build_one(logprobs: list[list[float]], ids: list[list[int]], budget: int):
    """One tree, as the published heap builds it. Returns tokens, parents, depths (root excluded)."""
    depth_limit = len(logprobs)
    width = len(logprobs[0]) if depth_limit else 0
    tokens, parents, depths = [0], [-1], [0]
    heap = [(-0.0, 0)]  # (-score, node index): equal scores pop in creation order
    while heap and len(tokens) < budget:
        neg_score, node = heapq.heappop(heap)
        d = depths[node]
        if d >= depth_limit:
            continue
        for r in range(min(width, budget - len(tokens))):
            child = len(tokens)
            score = -neg_score + logprobs[d][r]
            tokens.append(ids[d][r])
            parents.append(node)
            depths.append(d + 1)
            heapq.heappush(heap, (-score, child))
    return tokens, parents, depths


def _build_tree_cpu(
    topk_logprobs: Tensor,
    topk_ids: Tensor,
    root_token: Tensor,
    base_pos: Tensor,
    tokens: Tensor,
    parents: Tensor,
    depths: Tensor,
    positions: Tensor,
    ancestors: Tensor,
    num_nodes: Tensor,
) -> None:
    budget = tokens.shape[1]
    _check(topk_logprobs, topk_ids, root_token, base_pos, budget)
    _check_outputs(topk_logprobs.shape[0], budget, tokens, parents, depths, positions, ancestors, num_nodes)
    words = words_for(budget)
    for b in range(topk_logprobs.shape[0]):
        tok, par, dep = _build_one(topk_logprobs[b].tolist(), topk_ids[b].tolist(), budget)
        n = len(tok)
        tok[0] = int(root_token[b])
        pad = budget - n
        tokens[b] = torch.tensor(tok + [0] * pad)
        parents[b] = torch.tensor(par + [-1] * pad)
        depths[b] = torch.tensor(dep + [0] * pad)
        positions[b] = depths[b] + base_pos[b]
        rows = [0] * budget  # row i as one Python int: bit j set iff j is i or an ancestor of i
        for i in range(budget):
            rows[i] = (rows[par[i]] if 0 < i < n else 0) | (1 << i)
        packed = torch.tensor([[(r >> (32 * w)) & 0xFFFFFFFF for w in range(words)] for r in rows], dtype=torch.int64)
        ancestors[b] = (packed - ((packed >> 31) << 32)).to(torch.int32)  # the low 32 bits, as signed int32
        num_nodes[b] = n


def _check_outputs(batch, budget, tokens, parents, depths, positions, ancestors, num_nodes) -> None:
    for name, t in (("tokens", tokens), ("parents", parents), ("depths", depths), ("positions", positions)):
        if t.dtype != torch.long or t.shape != (batch, budget):
            raise ValueError(f"jetspec.build_tree: '{name}' must be int64 [{batch}, {budget}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if ancestors.dtype != torch.int32 or ancestors.shape != (batch, budget, words_for(budget)):
        raise ValueError(f"jetspec.build_tree: 'ancestors' must be int32 [{batch}, {budget}, {words_for(budget)}], "
                         f"got {ancestors.dtype} {tuple(ancestors.shape)}")
    if num_nodes.dtype != torch.long or num_nodes.shape != (batch,):
        raise ValueError(f"jetspec.build_tree: 'num_nodes' must be int64 [{batch}]")


torch.library.impl("jetspec::build_tree", "CPU")(_build_tree_cpu)


@torch.library.register_fake("jetspec::build_tree")
def _build_tree_fake(topk_logprobs, topk_ids, root_token, base_pos, tokens, parents, depths, positions, ancestors,
                     num_nodes) -> None:
    torch._check(topk_logprobs.dim() == 3 and topk_ids.shape == topk_logprobs.shape)
    torch._check(tokens.dim() == 2 and ancestors.dim() == 3)


def build_tree(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, budget: int) -> Tree:
    """Build a best-first tree of ``budget`` nodes (root included) from per-depth top-K candidates.

    Args:
        topk_logprobs: ``[B, D, K]`` float32 full-vocabulary log-probs, descending along K.
        topk_ids: ``[B, D, K]`` int64 token ids.
        root_token: ``[B]`` int64 anchor tokens.
        base_pos: ``[B]`` int64 position of each root.
        budget: nodes per tree including the root (the output width N).
    """
    _check(topk_logprobs, topk_ids, root_token, base_pos, budget)
    device = topk_logprobs.device
    on = device if use_kernel("build_tree", device) else torch.device("cpu")
    batch = topk_logprobs.shape[0]
    out = Tree(
        tokens=torch.empty(batch, budget, dtype=torch.long, device=on),
        parents=torch.empty(batch, budget, dtype=torch.long, device=on),
        depths=torch.empty(batch, budget, dtype=torch.long, device=on),
        positions=torch.empty(batch, budget, dtype=torch.long, device=on),
        ancestors=torch.empty(batch, budget, words_for(budget), dtype=torch.int32, device=on),
        num_nodes=torch.empty(batch, dtype=torch.long, device=on),
    )
    torch.ops.jetspec.build_tree(
        topk_logprobs.to(on), topk_ids.to(on), root_token.to(on), base_pos.to(on), *out
    )
    return out if on == device else Tree(*(t.to(device) for t in out))


def ancestor_mask(ancestors: Tensor, nodes: int) -> Tensor:
    """Unpack ``[..., N, W]`` int32 ancestor bits to a ``[..., N, nodes]`` bool "may attend" mask."""
    shifts = torch.arange(32, device=ancestors.device, dtype=torch.int32)
    bits = (ancestors.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :nodes].bool()


def pack_mask(visible: Tensor) -> Tensor:
    """Pack a ``[..., N, N]`` bool "may attend" mask into ``[..., N, ceil(N / 32)]`` int32 ancestor words
    (the inverse of :func:`ancestor_mask`)."""
    n = visible.shape[-1]
    words = words_for(n)
    padded = torch.zeros(*visible.shape[:-1], words * 32, dtype=torch.int64, device=visible.device)
    padded[..., :n] = visible
    weights = torch.ones(32, dtype=torch.int64, device=visible.device) << torch.arange(32, device=visible.device)
    packed = (padded.view(*visible.shape[:-1], words, 32) * weights).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
