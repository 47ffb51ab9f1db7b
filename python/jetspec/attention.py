"""Tree attention for the target model, registered with transformers' attention interface.

The driver calls the HF model with ``use_cache=False`` and a :class:`TreeBatch`
in the ``jetspec`` keyword argument; HF computes q/k/v (projections, norms,
RoPE at the positions we give) and calls :func:`tree_attention_forward` per
layer, which writes the new keys/values into our static cache and attends over
the committed prefix (no mask) plus the new tokens under their ancestor mask. A
causal prefill is the special case of a chain-shaped mask; one AR step is a
one-node tree. No HF module is patched: the model's attention implementation
is switched to ours only for the duration of each of our forwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from .cache import KVCache

ATTN_IMPLEMENTATION = "jetspec_tree"


@dataclass
class TreeBatch:
    """What the attention layers need to know about the tokens being run."""

    cache: KVCache
    start: int  # cache slot of the first new token = length of the committed prefix
    visible: Tensor  # [batch, n, n] bool: new token i may attend new token j


def reference_tree_attention(query: Tensor, key: Tensor, value: Tensor, prefix: int, visible: Tensor,
                             scale: float) -> Tensor:
    """Plain-PyTorch tree attention.

    Args:
        query: ``[B, Hq, n, D]`` queries of the new tokens.
        key, value: ``[B, Hkv, prefix + n, D]``: the committed prefix, then the new tokens.
        prefix: number of prefix keys, visible to every query.
        visible: ``[B, n, n]`` bool mask among the new tokens.
    Returns:
        ``[B, Hq, n, D]``.
    """
    batch, heads, n, _ = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = torch.cat([visible.new_ones(batch, n, prefix), visible], dim=2).unsqueeze(1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def tree_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[Tensor, None]:
    """The function registered as ``attn_implementation="jetspec_tree"`` (HF's calling convention)."""
    batch: TreeBatch | None = kwargs.get("jetspec")
    if batch is None:
        raise RuntimeError("jetspec: the jetspec_tree attention runs only inside jetspec's own forwards "
                           "(it needs the tree and cache of the round)")
    layer = module.layer_idx
    n = query.shape[2]
    batch.cache.write(layer, batch.start, key, value)
    keys, values = batch.cache.read(layer, batch.start + n)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = reference_tree_attention(query, keys, values, batch.start, batch.visible, scale)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, tree_attention_forward)


@contextlib.contextmanager
def tree_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the tree attention for the duration of the block, then restore its own."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
