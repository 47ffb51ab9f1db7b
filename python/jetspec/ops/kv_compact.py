"""``jetspec::kv_compact`` (contract: ``cpp/kv_compact.cpp``): its typed wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import use_kernel


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


@torch.library.register_fake("jetspec::kv_compact")
def _fake(cache: Tensor, accepted: Tensor, accept_len: Tensor, base: Tensor) -> None:
    torch._check(cache.dim() >= 3, lambda: "jetspec.kv_compact: 'cache' must be [planes, batch, slots, *row]")
    for name, t, dim in (("accepted", accepted, 2), ("accept_len", accept_len, 1), ("base", base, 1)):
        torch._check(t.dtype == torch.long, lambda: f"jetspec.kv_compact: '{name}' must be int64")
        torch._check(t.dim() == dim, lambda: f"jetspec.kv_compact: '{name}' must be {dim}-D")
        torch._check(t.shape[0] == cache.shape[1], lambda: f"jetspec.kv_compact: '{name}' batch mismatch")
