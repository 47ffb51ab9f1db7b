"""``jetspec::tree_attention`` (contract: ``cpp/tree_attention.cpp``): its typed wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import LIMITS, supports, use_kernel


def tree_attention_supports(query: Tensor) -> bool:
    """Whether the op runs a compiled kernel for these queries ``[B, N, Hq, d]`` (its contract's dtypes and
    head dims, and the node limit); callers with a faster path than the float32 reference ask this."""
    limits = LIMITS["tree_attention"].get(query.device.type, {})
    return (query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in limits.get("head_dims", ())
            and supports("tree_attention", query.device, nodes=query.shape[1]))


def tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, prefix_len: Tensor, ancestors: Tensor,
                   scale: float | None = None, max_prefix: int | None = None, out: Tensor | None = None) -> Tensor:
    """Attention of N tree nodes over the committed prefix and their ancestors in the tree (GQA included).

    Args:
        query: ``[B, N, Hq, d]`` bf16/fp16, last dim dense (other strides free).
        key_cache, value_cache: ``[B, S, Hkv, d]``, e.g. ``cache.data[layer, 0]`` / ``[layer, 1]``; the tree's
            keys and values already stored at slots ``prefix_len[b] + j``.
        prefix_len: ``[B]`` int64 committed prefix lengths, on the device.
        ancestors: ``[B, N, ceil(N / 32)]`` int32 packed ancestor bits (``build_tree``'s output).
        scale: softmax scale (default ``d ** -0.5``).
        max_prefix: a host upper bound of ``prefix_len`` that sizes the work split (default ``S - N``, always
            valid; a tighter bound gives a better split).
        out: ``[B, N, Hq, d]`` output buffer (allocated when omitted).

    Returns:
        ``out``: ``[B, N, Hq, d]`` in query's dtype.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    max_prefix = key_cache.shape[1] - query.shape[1] if max_prefix is None else max_prefix
    out = query.new_empty(query.shape) if out is None else out
    if use_kernel("tree_attention", query.device, nodes=query.shape[1]):
        torch.ops.jetspec.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, scale, max_prefix, out)
    else:
        out.copy_(reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, scale))
    return out


@torch.library.register_fake("jetspec::tree_attention")
def _fake(query: Tensor, key_cache: Tensor, value_cache: Tensor, prefix_len: Tensor, ancestors: Tensor,
          scale: float, max_prefix: int, out: Tensor) -> None:
    torch._check(query.dim() == 4 and key_cache.dim() == 4, lambda: "jetspec.tree_attention: 4-D query and caches")
    torch._check(value_cache.shape == key_cache.shape, lambda: "jetspec.tree_attention: cache shape mismatch")
    torch._check(key_cache.shape[0] == query.shape[0] and key_cache.shape[3] == query.shape[3],
                 lambda: "jetspec.tree_attention: 'key_cache' must be [B, S, Hkv, d] of query's B and d")
    torch._check(prefix_len.dtype == torch.long and prefix_len.shape == (query.shape[0],),
                 lambda: "jetspec.tree_attention: 'prefix_len' must be int64 [B]")
    torch._check(ancestors.dtype == torch.int32 and ancestors.dim() == 3,
                 lambda: "jetspec.tree_attention: 'ancestors' must be int32 [B, N, words]")
    torch._check(out.shape == query.shape and out.dtype == query.dtype,
                 lambda: "jetspec.tree_attention: 'out' must match 'query'")
