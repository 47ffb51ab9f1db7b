"""Plain-PyTorch references of the ops: the tests' ground truth, and the fallback the typed wrappers
in :mod:`jetspec.ops` run on a device the extension has no kernel for. Written for clarity, not
speed (they may synchronize with the host). Each op's contract is in ``cpp/<op>.cpp``."""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import Tensor

from .tree import Tree, ancestor_mask, words_for

__all__ = ["kv_compact", "accept_greedy", "build_tree", "draft_topk", "tree_attention", "masked_attention"]


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


def build_tree(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, budget: int) -> Tree:
    """The published ``accum_logp`` builder: a binary heap of (score, creation index), scores accumulated
    in float64 (a Python float) so that every tie resolves as the contract says. Returns the trees on the
    inputs' device."""
    batch = topk_logprobs.shape[0]
    words = words_for(budget)
    tokens = torch.zeros(batch, budget, dtype=torch.long)
    parents = torch.full((batch, budget), -1, dtype=torch.long)
    depths = torch.zeros(batch, budget, dtype=torch.long)
    ancestors = torch.zeros(batch, budget, words, dtype=torch.int32)
    num_nodes = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        tok, par, dep = _build_one(topk_logprobs[b].tolist(), topk_ids[b].tolist(), budget)
        n = len(tok)
        tok[0] = int(root_token[b])
        tokens[b, :n], parents[b, :n], depths[b, :n] = torch.tensor(tok), torch.tensor(par), torch.tensor(dep)
        rows = [0] * budget  # row i as one Python int: bit j set iff j is i or an ancestor of i
        for i in range(budget):
            rows[i] = (rows[par[i]] if 0 < i < n else 0) | (1 << i)
        packed = torch.tensor([[(r >> (32 * w)) & 0xFFFFFFFF for w in range(words)] for r in rows], dtype=torch.int64)
        ancestors[b] = (packed - ((packed >> 31) << 32)).to(torch.int32)  # the low 32 bits, as signed int32
        num_nodes[b] = n
    positions = depths + base_pos.cpu().unsqueeze(1)
    device = topk_logprobs.device
    return Tree(*(t.to(device) for t in (tokens, parents, depths, positions, ancestors, num_nodes)))


def _build_one(logprobs: list[list[float]], ids: list[list[int]], budget: int):
    """One tree, as the published heap builds it. Returns tokens, parents, depths (root token 0)."""
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


def draft_topk(hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``log_softmax(hidden @ weight.T / temperature)`` in float32, equal values by lower id."""
    logits = (hidden.float() @ weight.float().T) / temperature
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    return values[..., :k] - logits.logsumexp(-1, keepdim=True), order[..., :k]


def masked_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA of ``query`` ``[B, Hq, n, d]`` over ``key``/``value`` ``[B, Hkv, T, d]`` (GQA: each kv head serves
    ``Hq / Hkv`` query heads) under a boolean ``mask`` broadcastable to ``[B, Hq, n, T]``: the one attention
    behind every path of tree attention that does not run the op. No host sync (CUDA graphs replay it)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def tree_mask(prefix_len: Tensor, visible: Tensor, slots: int) -> Tensor:
    """``[B, n, slots]`` bool: which cache slots each of ``n`` new tokens sees when they sit at slots
    ``prefix_len[b] + j`` after a committed prefix: every prefix slot, and new token j where ``visible``
    ``[B, n, n]`` allows it."""
    batch, n, _ = visible.shape
    node = torch.arange(slots, device=visible.device) - prefix_len.unsqueeze(1)  # [B, S]: new token at each slot
    tree = visible.gather(2, node.clamp(0, n - 1).unsqueeze(1).expand(batch, n, slots))
    return (node < 0).unsqueeze(1) | (tree & (node < n).unsqueeze(1))


def tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, prefix_len: Tensor, ancestors: Tensor,
                   scale: float) -> Tensor:
    """The contract of ``jetspec::tree_attention`` with a dense mask, in float32.

    Returns ``[B, N, Hq, d]`` float32: node ``i`` attends the first ``prefix_len[b]`` cache slots and the tree
    slots ``prefix_len[b] + j`` for ``j <= i`` whose ancestor bit is set; a node that sees nothing gets 0, and
    a key a node may not see contributes nothing to it, even where its value is NaN or infinite."""
    nodes = query.shape[1]
    visible = ancestor_mask(ancestors, nodes) & torch.ones(nodes, nodes, dtype=torch.bool,
                                                             device=ancestors.device).tril()
    mask = tree_mask(prefix_len.to(query.device), visible.to(query.device), key_cache.shape[1])[:, None]
    groups = query.shape[2] // key_cache.shape[2]
    q = query.float().transpose(1, 2)  # [B, Hq, N, d]
    k, v = (c.float().transpose(1, 2).repeat_interleave(groups, dim=1) for c in (key_cache, value_cache))
    probs = (q @ k.transpose(2, 3) * scale).masked_fill(~mask, float("-inf")).softmax(-1)  # [B, Hq, N, S]
    finite = v.isfinite()
    out = probs @ torch.where(finite, v, 0)
    # Non-finite values count only where their key is visible (probability 0 times NaN would be NaN).
    bad = (~finite).any(-1).any(1).any(0).nonzero().squeeze(1)  # slots holding one
    if bad.numel():
        values = torch.where(finite, 0, v)[:, :, bad, None]  # [B, Hq, c, 1, d]
        terms = probs[..., bad].transpose(2, 3)[..., None] * values  # [B, Hq, c, N, d]
        out = out + torch.where(mask[..., bad].transpose(2, 3)[..., None], terms, 0).sum(2)
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # a node that sees nothing (its softmax is NaN)
    return out.transpose(1, 2)
