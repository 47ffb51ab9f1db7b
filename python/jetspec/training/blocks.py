"""The head's training and replay layout: every anchored block of a sequence in one packed forward,
exactly as a decoding round anchored there sees its context."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..heads import DraftHead
from ..runtime.target import Target

__all__ = ["block_mask", "anchored_blocks"]


def block_mask(anchors: Sequence[int], context_len: int, block_size: int, causal: bool,
               device: torch.device | str = "cpu") -> Tensor:
    """``[n * B, T + n * B]`` bool: block j (anchor a_j) sees context rows < a_j and its own slots."""
    n = len(anchors)
    rows = n * block_size
    slot = torch.arange(rows, device=device)
    block_of = slot // block_size
    anchor = torch.tensor(list(anchors), device=device)[block_of]
    context = torch.arange(context_len, device=device)[None, :] < anchor[:, None]
    same_block = block_of[:, None] == block_of[None, :]
    if causal:
        same_block &= slot[None, :] <= slot[:, None]
    return torch.cat([context, same_block], dim=1)


def anchored_blocks(head: DraftHead, target: Target, tokens: Tensor, tapped: Tensor, anchors: Tensor) -> Tensor:
    """The head's final hidden states ``[B, n, block, H]`` for the block at every anchor of ``tokens``
    ``[B, T]``, all in one packed forward: block j of row b is ``[tokens[b, a], mask, ...]`` at positions
    a..a+block-1 (a = ``anchors[b, j]``), seeing the context rows < a of ``tapped`` ``[B, T, F]`` (the target's
    tapped states of ``tokens``) and its own slots, exactly as a decoding round anchored at a does."""
    spec = head.spec
    batch, width = tokens.shape
    blocks = anchors.shape[1]
    device = tokens.device
    positions = torch.arange(width, device=device).expand(batch, -1)
    block_pos = (anchors[:, :, None] + torch.arange(spec.block_size, device=device)).flatten(1)
    block_ids = torch.full_like(block_pos, spec.mask_token_id)
    block_ids.view(batch, blocks, -1)[:, :, 0] = tokens.gather(1, anchors)
    mask = torch.stack([block_mask(a.tolist(), width, spec.block_size, spec.causal, device)
                        for a in anchors]).unsqueeze(1)  # [batch, 1, rows, width + rows]
    context = head.context_key_values(tapped, positions)
    hidden = head(target.embed_tokens(block_ids).to(tapped.dtype), block_pos, context, mask)
    return hidden.view(batch, blocks, spec.block_size, -1)
