"""Token trees as the ops pass them: :class:`Tree` (``build_tree``'s outputs) and the packed
"may attend" bits (``ancestors``) that ``build_tree`` writes and ``tree_attention`` reads."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Tree", "words_for", "ancestor_mask", "pack_mask", "root_only"]


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


def root_only(anchor: Tensor, base_pos: Tensor) -> Tree:
    """The one-node trees of plain decoding: the ``anchor`` ``[B]`` at ``base_pos`` ``[B]``. The tokens and
    positions are views of those tensors, so a round that updates them in place reuses the tree."""
    ones = torch.ones(anchor.shape[0], 1, dtype=torch.long, device=anchor.device)
    return Tree(tokens=anchor.view(-1, 1), parents=-ones, depths=ones - 1, positions=base_pos.view(-1, 1),
                ancestors=torch.ones(anchor.shape[0], 1, words_for(1), dtype=torch.int32, device=anchor.device),
                num_nodes=ones[:, 0])


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
