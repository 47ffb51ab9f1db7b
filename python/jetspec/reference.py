"""Plain-PyTorch references of the ops: the tests' ground truth, and the fallback
the typed wrappers in :mod:`jetspec.ops` use on a device the extension has no
kernel for. Written for clarity, not speed (they may synchronize with the host)."""

from __future__ import annotations

import torch
from torch import Tensor


def kv_compact(cache: Tensor, accepted: Tensor, accept_len: Tensor, base: Tensor) -> None:
    """``cache[:, b, base[b] + j] = cache[:, b, base[b] + accepted[b, j]]`` for ``j < accept_len[b]``."""
    for b, (n, start) in enumerate(zip(accept_len.tolist(), base.tolist())):
        src = start + accepted[b, :n].to(cache.device)
        dst = torch.arange(start, start + n, device=cache.device)
        cache[:, b, dst] = cache[:, b, src].clone()


def accept_greedy(
    tokens: Tensor, parents: Tensor, target_ids: Tensor, num_nodes: Tensor, max_accept: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The sequential walk of greedy tree acceptance, with a token -> child map per node
    (filled in node order, so a later sibling with the same token wins)."""
    batch = tokens.shape[0]
    accepted = torch.full((batch, max_accept), -1, dtype=torch.long)
    accept_len = torch.zeros(batch, dtype=torch.long)
    bonus = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        tok, par, tgt = tokens[b].tolist(), parents[b].tolist(), target_ids[b].tolist()
        children: list[dict[int, int]] = [{} for _ in range(int(num_nodes[b]))]
        for i in range(1, len(children)):
            children[par[i]][tok[i]] = i
        path = [0]
        while len(path) < max_accept and tgt[path[-1]] in children[path[-1]]:
            path.append(children[path[-1]][tgt[path[-1]]])
        accepted[b, : len(path)] = torch.tensor(path)
        accept_len[b] = len(path)
        bonus[b] = tgt[path[-1]]
    device = tokens.device
    return accepted.to(device), accept_len.to(device), bonus.to(device)


def draft_topk(hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``log_softmax(hidden @ weight.T / temperature)`` in float32, equal values by lower id."""
    logits = (hidden.float() @ weight.float().T) / temperature
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    return values[..., :k] - logits.logsumexp(-1, keepdim=True), order[..., :k]


def tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, prefix_len: Tensor, ancestors: Tensor,
                   scale: float) -> Tensor:
    """The contract of ``jetspec::tree_attention`` (``cpp/tree_attention.cpp``) with a dense mask, in float32.

    Returns ``[B, N, Hq, d]`` float32: node ``i`` attends the first ``prefix_len[b]`` cache slots and the tree
    slots ``prefix_len[b] + j`` for ``j <= i`` whose ancestor bit is set; a node that sees nothing gets 0."""
    batch, nodes, q_heads, _ = query.shape
    groups = q_heads // key_cache.shape[2]
    shifts = torch.arange(32, device=ancestors.device, dtype=torch.int32)
    out = query.new_zeros(query.shape, dtype=torch.float32)
    for b, n in enumerate(prefix_len.tolist()):
        tree = ((ancestors[b].unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, :nodes].bool()
        tree &= torch.ones(nodes, nodes, dtype=torch.bool, device=tree.device).tril()
        visible = torch.cat([tree.new_ones(nodes, n), tree], dim=1).to(query.device)  # [N, n + N]
        q = query[b].float().transpose(0, 1)  # [Hq, N, d]
        k = key_cache[b, : n + nodes].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value_cache[b, : n + nodes].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        probs = scores.softmax(-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
        out[b] = (probs @ v).transpose(0, 1)
    return out
