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

__all__ = ["kv_compact", "accept_greedy", "draft_topk"]

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
