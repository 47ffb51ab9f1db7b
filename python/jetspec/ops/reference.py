"""Plain-PyTorch references of the ops: the tests' ground truth, and the fallback the typed wrappers
in :mod:`jetspec.ops` run on a device the extension has no kernel for. Written for clarity, not
speed (they may synchronize with the host). Each op's contract is in ``cpp/<op>.cpp``."""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import Tensor

from .tree import Tree, ancestor_mask, words_for

__all__ = ["kv_compact", "accept_greedy", "accept_sample", "philox_uniforms", "build_tree", "draft_topk", "tree_attention", "masked_attention", "rms_norm",
           "skinny_gemm"]


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


def accept_sample(
    tokens: Tensor, parents: Tensor, logits: Tensor, num_nodes: Tensor, temperature: Tensor | float,
    top_k: Tensor | int, top_p: Tensor | float, uniforms: Tensor, max_accept: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The sampling walk of ``jetspec::accept_sample`` (contract: ``cpp/accept_sample.cpp``) with explicit
    uniforms: ``uniforms[b, i]`` in [0, 1) is the one node ``i`` of row ``b`` draws with (only the visited
    nodes' are read; the op's own are :func:`philox_uniforms`). A uniform counts through its top 53 bits,
    ``floor(u * 2^53)``. ``temperature``, ``top_k`` and ``top_p`` are per row or scalars."""
    batch, nodes = tokens.shape
    temps, ks, ps = (torch.as_tensor(v).reshape(-1).expand(batch).tolist() for v in (temperature, top_k, top_p))
    temps = torch.tensor(temps, dtype=torch.float32)  # the op's float32 values
    ps = torch.tensor(ps, dtype=torch.float32)
    accepted = torch.full((batch, max_accept), -1, dtype=torch.long)
    accept_len = torch.zeros(batch, dtype=torch.long)
    bonus = torch.zeros(batch, dtype=torch.long)
    logits_cpu = logits.detach().cpu()
    for b in range(batch):
        tok, par = tokens[b].tolist(), parents[b].tolist()
        children: list[dict[int, int]] = [{} for _ in range(int(num_nodes[b]))]
        for i in range(1, len(children)):
            children[par[i]][tok[i]] = i  # in node order: a later sibling with the same token wins
        path = [0]
        while True:
            y = _sample_draw(logits_cpu[b, path[-1]].float(), temps[b], int(ks[b]), ps[b], float(uniforms[b, path[-1]]))
            if len(path) >= max_accept or y not in children[path[-1]]:
                break
            path.append(children[path[-1]][y])
        accepted[b, : len(path)] = torch.tensor(path)
        accept_len[b] = len(path)
        bonus[b] = y
    device = tokens.device
    return accepted.to(device), accept_len.to(device), bonus.to(device)


def philox_uniforms(seed: int, offset: int, batch: int, nodes: int) -> Tensor:
    """``[batch, nodes]`` float64: the uniform ``jetspec::accept_sample`` draws node ``i`` of row ``b`` with,
    for this seed and offset (the offset's value before the call): Philox4x32-10 with key
    ``(seed mod 2^32, seed >> 32)`` at counter ``(i, b, offset mod 2^32, 0)``, its first two words
    ``x0, x1`` as ``((x1 * 2^32 + x0) >> 11) / 2^53``."""
    import numpy as np

    node = np.arange(nodes, dtype=np.uint64)[None, :].repeat(batch, 0)
    row = np.arange(batch, dtype=np.uint64)[:, None].repeat(nodes, 1)
    call = np.full((batch, nodes), offset % 2**32, dtype=np.uint64)
    words = philox4x32_10((node, row, call, np.zeros_like(node)), (seed % 2**64) & 0xFFFFFFFF, (seed % 2**64) >> 32)
    u53 = ((words[1] << np.uint64(32)) | words[0]) >> np.uint64(11)
    return torch.from_numpy(u53.astype(np.float64) * 2.0**-53)


def philox4x32_10(counter, key0: int, key1: int):
    """Philox4x32-10 (Salmon et al., SC 2011; Random123's constants) over numpy uint64 arrays that hold
    32-bit words: ``counter`` is 4 arrays, the key 2 ints; returns the 4 output words."""
    import numpy as np

    mask = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key0 & 0xFFFFFFFF), np.uint64(key1 & 0xFFFFFFFF)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)  # exact: both factors < 2^32
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def _f32(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float32)


# qexp's constants (cuda/accept_sample_math.cuh), as exact float32 values.
_QEXP = {name: _f32(float.fromhex(h)) for name, h in (
    ("log2e", "0x1.715476p+0"), ("magic", "0x1.8p23"), ("c1", "0x1.63p-1"), ("c2", "-0x1.bd0106p-13"),
    ("p0", "0x1.a0d2cep-13"), ("p1", "0x1.6e879cp-10"), ("p2", "0x1.11121p-7"), ("p3", "0x1.555382p-5"),
    ("p4", "0x1.555554p-3"), ("p5", "0x1.0p-1"), ("one", "0x1.0p0"), ("min_x", "-0x1.ep4"), ("q", "0x1.0p43"))}


def _qexp(x: Tensor) -> Tensor:
    """accept_sample's exp (cuda/accept_sample_math.cuh), one float32 tensor op per rounded operation."""
    c = _QEXP
    t = x * c["log2e"] + c["magic"]
    n = t - c["magic"]
    ni = t.view(torch.int32) - 0x4B400000
    r = (x - n * c["c1"]) - n * c["c2"]
    p = c["p0"] * r + c["p1"]
    for name in ("p2", "p3", "p4", "p5"):
        p = p * r + c[name]
    p = (p * (r * r) + r) + c["one"]
    scale = torch.bitwise_left_shift(ni + 127, 23).view(torch.float32)
    return torch.where(x >= c["min_x"], p * scale, 0.0)


def _sample_draw(logits: Tensor, temperature: Tensor, top_k: int, top_p: Tensor, u: float) -> int:
    """One node's draw, step by step as the contract of ``jetspec::accept_sample`` says."""
    a = int(torch.argmax(logits))
    if float(temperature) == 0:
        return a
    zmax = logits[a] / temperature
    if not (torch.isfinite(logits[a]) and torch.isfinite(zmax)):
        return a
    z = logits / temperature
    vocab = z.numel()
    e = _qexp(z - zmax)
    if 0 < top_k < vocab:
        e = torch.where(z >= torch.topk(z, top_k).values[-1], e, 0.0)
    q = (e * _QEXP["q"]).to(torch.int64)
    kept = q > 0
    if float(top_p) < 1:
        p32 = int(float(top_p) * 2**32)
        cut = max(1, -((-p32 * int(q.sum())) >> 32))
        ev, qv = e[kept], q[kept]
        order = torch.argsort(ev)
        suffix = qv[order].flip(0).cumsum(0).flip(0)  # suffix[i]: mass of the i-th smallest e and above
        first_larger = torch.searchsorted(ev[order], ev, right=True)
        above = torch.where(first_larger < ev.numel(), suffix[first_larger.clamp(max=ev.numel() - 1)], 0)
        kept[kept.clone()] = above < cut
    mass = torch.where(kept, q, 0)
    target = (int(u * 2**53) * int(mass.sum())) >> 53
    return int(torch.searchsorted(mass.cumsum(0), torch.tensor(target), right=True))


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
        par, dep, rank, _ = best_first(topk_logprobs[b].tolist(), budget)
        ids = topk_ids[b].tolist()
        tok = [int(root_token[b])] + [ids[d - 1][r] for d, r in zip(dep[1:], rank[1:])]
        n = len(tok)
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


def best_first(logprobs: list[list[float]], budget: int) -> tuple[list[int], list[int], list[int], list[float]]:
    """One tree, as the published heap builds it from per-depth candidate log-probs ``[D][K]``: each node's
    parent, depth, candidate rank (the root's: -1) and score (accumulated log-prob, float64), in node order."""
    depth_limit = len(logprobs)
    width = len(logprobs[0]) if depth_limit else 0
    parents, depths, ranks, scores = [-1], [0], [-1], [0.0]
    heap = [(-0.0, 0)]  # (-score, node index): equal scores pop in creation order
    while heap and len(parents) < budget:
        neg_score, node = heapq.heappop(heap)
        d = depths[node]
        if d >= depth_limit:
            continue
        for r in range(min(width, budget - len(parents))):
            child = len(parents)
            score = -neg_score + logprobs[d][r]
            parents.append(node)
            depths.append(d + 1)
            ranks.append(r)
            scores.append(score)
            heapq.heappush(heap, (-score, child))
    return parents, depths, ranks, scores


def draft_topk(hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``log_softmax(hidden @ weight.T / temperature)`` in float32, equal values by lower id."""
    logits = (hidden.float() @ weight.float().T) / temperature
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    return values[..., :k] - logits.logsumexp(-1, keepdim=True), order[..., :k]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """HF's ``residual + x`` then Qwen3RMSNorm / LlamaRMSNorm over the last dim: ``(out, h)`` with
    ``h = x + residual`` (``x`` without one) in the dtype and ``out = weight * (h * rsqrt(mean(h^2) + eps))``,
    the statistics in float32 and each step rounded to the dtype as those modules do."""
    h = x if residual is None else residual + x
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    return weight * (hf * torch.rsqrt(variance + eps)).to(x.dtype), h


def skinny_gemm(x: Tensor, weight: Tensor, epilogue: int = 0, residual: Tensor | None = None) -> Tensor:
    """``y = x @ weight.T`` accumulated in float32 and rounded to the dtype, then the epilogue as the HF modules
    apply it: 0 ``y``; 1 ``silu(gate) * up`` of ``y``'s halves (``weight = [gate; up]``); 2 ``residual + y``."""
    y = (x.float() @ weight.float().T).to(x.dtype)
    if epilogue == 1:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    if epilogue == 2:
        return residual + y
    return y


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
