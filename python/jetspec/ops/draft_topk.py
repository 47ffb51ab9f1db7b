"""``jetspec::draft_topk`` (contract: ``cpp/draft_topk.cpp``): its typed wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import use_kernel


def draft_topk(hidden: Tensor, weight: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Top-``k`` log-probs of the LM head over ``hidden`` (logits accumulated in float32).

    Where the build has no kernel for these arguments (see :func:`jetspec.ops.supports`), this runs
    :func:`jetspec.ops.reference.draft_topk`, which converts ``weight`` to float32 on every call.

    Args:
        hidden: ``[B, D, H]`` final hidden states of the D predicted depths.
        weight: ``[V, H]`` LM-head weight (same dtype as ``hidden``).
        k: candidates per depth.
        temperature: divides the logits before the softmax.

    Returns:
        ``(logprobs [B, D, k] float32 descending, ids [B, D, k] int64)``; equal values rank by lower id.
    """
    if not use_kernel("draft_topk", hidden.device, k=k):
        return reference.draft_topk(hidden, weight, k, temperature)
    batch, depth, _ = hidden.shape
    logprobs = hidden.new_empty((batch, depth, k), dtype=torch.float32)
    ids = hidden.new_empty((batch, depth, k), dtype=torch.long)
    torch.ops.jetspec.draft_topk(hidden, weight, temperature, logprobs, ids)
    return logprobs, ids


@torch.library.register_fake("jetspec::draft_topk")
def _fake(hidden: Tensor, weight: Tensor, temperature: float, logprobs: Tensor, ids: Tensor) -> None:
    torch._check(hidden.dim() == 3 and weight.dim() == 2 and weight.shape[1] == hidden.shape[2])
    torch._check(logprobs.dtype == torch.float32 and ids.dtype == torch.long and ids.shape == logprobs.shape)
