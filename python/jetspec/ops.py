"""Typed wrappers and fake (meta) impls of the ``torch.ops.jetspec`` custom ops.

Each op's contract (schema, shapes, dtypes) is written once, next to its
registration and CPU kernel in ``cpp/<op>.cpp``. Other engines can call
``torch.ops.jetspec.<op>`` directly; these wrappers add allocation of outputs
and fall back to :mod:`jetspec.reference` on a device the build has no kernel for.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import reference
from ._ext import has_kernel

__all__ = ["kv_compact", "accept_greedy", "draft_topk", "tree_attention"]

_warned: set[tuple[str, str]] = set()

#: The widest ``k`` the CUDA kernel of ``draft_topk`` keeps (``kDraftTopkMaxK`` in ``cuda/draft_topk.cuh``).
DRAFT_TOPK_CUDA_MAX_K = 32


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether the build has ``op``'s kernel for ``device``; warns once per (op, device) when it has not."""
    if has_kernel(op, device):
        return True
    if (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(
            f"jetspec: no compiled {device.type} kernel for '{op}' in this build; using the PyTorch reference "
            "(slower, synchronizes with the host)",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def kv_compact(cache: Tensor, accepted: Tensor, accept_len: Tensor, base: Tensor) -> None:
    """Move the accepted tree nodes' rows of every cache plane to consecutive slots, in place.

    Args:
        cache: ``[planes, batch, slots, *row]``, any dtype; e.g. a stacked KV cache viewed as
            ``[layers * 2, batch, slots, kv_heads * head_dim]``.
        accepted: ``[batch, M]`` int64 accepted node offsets (``accept_greedy``'s output).
        accept_len: ``[batch]`` int64, valid entries of ``accepted``.
        base: ``[batch]`` int64, slot of tree node 0.
    """
    if use_kernel("kv_compact", cache.device):
        torch.ops.jetspec.kv_compact(cache, accepted, accept_len, base)
    else:
        reference.kv_compact(cache, accepted, accept_len, base)


def accept_greedy(
    tokens: Tensor, parents: Tensor, target_ids: Tensor, num_nodes: Tensor, max_accept: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy acceptance of a verified tree, without a host sync.

    Args:
        tokens, parents, target_ids: ``[batch, N]`` int64 node tokens, parent indices (root: -1) and the
            target's prediction at each node.
        num_nodes: ``[batch]`` int64 nodes in use per row.
        max_accept: capacity of the accepted path (default ``N``); longer matches are cut, losslessly.

    Returns:
        ``(accepted [batch, max_accept], accept_len [batch], bonus [batch])``, all int64.
    """
    m = tokens.shape[-1] if max_accept is None else max_accept
    if not use_kernel("accept_greedy", tokens.device):
        return reference.accept_greedy(tokens, parents, target_ids, num_nodes, m)
    batch = tokens.shape[0]
    accepted = tokens.new_empty((batch, m))
    accept_len = tokens.new_empty((batch,))
    bonus = tokens.new_empty((batch,))
    torch.ops.jetspec.accept_greedy(tokens, parents, target_ids, num_nodes, accepted, accept_len, bonus)
    return accepted, accept_len, bonus


def draft_topk(hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-``k`` log-probs of the LM head over ``hidden`` (logits accumulated in float32).

    Without a compiled kernel for the device, or on CUDA with ``k`` above the kernel's
    :data:`DRAFT_TOPK_CUDA_MAX_K`, this runs :func:`jetspec.reference.draft_topk`, which converts
    ``weight`` to float32 on every call.

    Args:
        hidden: ``[B, D, H]`` final hidden states of the D predicted depths.
        weight: ``[V, H]`` LM-head weight (same dtype as ``hidden``).
        k: candidates per depth.
        temperature: divides the logits before the softmax.

    Returns:
        ``(logprobs [B, D, k] float32 descending, ids [B, D, k] int64)``; equal values rank by lower id.
    """
    if (hidden.device.type == "cuda" and k > DRAFT_TOPK_CUDA_MAX_K) or not use_kernel("draft_topk", hidden.device):
        return reference.draft_topk(hidden, weight, k, temperature)
    batch, depth, _ = hidden.shape
    logprobs = hidden.new_empty((batch, depth, k), dtype=torch.float32)
    ids = hidden.new_empty((batch, depth, k), dtype=torch.long)
    torch.ops.jetspec.draft_topk(hidden, weight, temperature, logprobs, ids)
    return logprobs, ids


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
    if use_kernel("tree_attention", query.device):
        torch.ops.jetspec.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, scale, max_prefix, out)
    else:
        out.copy_(reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, scale))
    return out


# Fake impls: shapes/dtypes only, so the ops trace under torch.compile and FakeTensor.


@torch.library.register_fake("jetspec::kv_compact")
def _kv_compact_fake(cache: Tensor, accepted: Tensor, accept_len: Tensor, base: Tensor) -> None:
    torch._check(cache.dim() >= 3, lambda: "jetspec.kv_compact: 'cache' must be [planes, batch, slots, *row]")
    for name, t, dim in (("accepted", accepted, 2), ("accept_len", accept_len, 1), ("base", base, 1)):
        torch._check(t.dtype == torch.long, lambda: f"jetspec.kv_compact: '{name}' must be int64")
        torch._check(t.dim() == dim, lambda: f"jetspec.kv_compact: '{name}' must be {dim}-D")
        torch._check(t.shape[0] == cache.shape[1], lambda: f"jetspec.kv_compact: '{name}' batch mismatch")


@torch.library.register_fake("jetspec::accept_greedy")
def _accept_greedy_fake(
    tokens: Tensor,
    parents: Tensor,
    target_ids: Tensor,
    num_nodes: Tensor,
    accepted: Tensor,
    accept_len: Tensor,
    bonus: Tensor,
) -> None:
    for name, t in (("tokens", tokens), ("parents", parents), ("target_ids", target_ids)):
        torch._check(t.dtype == torch.long, lambda: f"jetspec.accept_greedy: '{name}' must be int64")
        torch._check(t.shape == tokens.shape, lambda: f"jetspec.accept_greedy: '{name}' shape mismatch")
    torch._check(accepted.dim() == 2 and accepted.shape[0] == tokens.shape[0])


@torch.library.register_fake("jetspec::draft_topk")
def _draft_topk_fake(hidden: Tensor, weight: Tensor, temperature: float, logprobs: Tensor, ids: Tensor) -> None:
    torch._check(hidden.dim() == 3 and weight.dim() == 2 and weight.shape[1] == hidden.shape[2])
    torch._check(logprobs.dtype == torch.float32 and ids.dtype == torch.long and ids.shape == logprobs.shape)


@torch.library.register_fake("jetspec::tree_attention")
def _tree_attention_fake(query: Tensor, key_cache: Tensor, value_cache: Tensor, prefix_len: Tensor,
                         ancestors: Tensor, scale: float, max_prefix: int, out: Tensor) -> None:
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
