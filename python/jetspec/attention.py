"""Tree attention for the target model, registered with transformers' attention interface.

The driver calls the HF model with ``use_cache=False`` and a :class:`TreeBatch`
in the ``jetspec`` keyword argument; HF computes q/k/v (projections, norms,
RoPE at the positions we give) and calls :func:`tree_attention_forward` per
layer, which writes the new keys/values into our static cache and attends over
the committed prefix (no mask) plus the new tokens under their ancestor mask. A
causal prefill is the special case of a chain-shaped mask; one AR step is a
one-node tree. No HF module is patched: the model's attention implementation
is switched to ours only for the duration of each of our forwards.

Trees that come with packed ancestor bits run the ``jetspec.tree_attention`` op
where it applies (bf16/fp16, head_dim 64 or 128, at most 1024 nodes, a kernel for the
device; any GQA group); everything else (prefills, fp32 models) runs the SDPA reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from . import ops
from ._ext import has_kernel
from .cache import KVCache
from .tree import ancestor_mask

ATTN_IMPLEMENTATION = "jetspec_tree"
MAX_OP_NODES = 1024  # the tree_attention op's limit (cpp/tree_attention.cpp)


@dataclass
class TreeBatch:
    """What the attention layers need to know about the tokens being run."""

    cache: KVCache
    start: int  # cache slot of the first new token = length of the committed prefix
    visible: Tensor | None = None  # [batch, n, n] bool: new token i may attend new token j
    ancestors: Tensor | None = None  # [batch, n, ceil(n / 32)] int32: the same mask, packed (trees only)
    prefix_len: Tensor | None = None  # [batch] int64 on the device: ``start`` per row, for the op

    def dense_visible(self) -> Tensor:
        """``visible``, unpacked from ``ancestors`` on first use when only those were given (the op needs no
        dense mask, so a forward whose layers all take it never builds one)."""
        if self.visible is None:
            self.visible = ancestor_mask(self.ancestors, self.ancestors.shape[1])
        return self.visible


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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _op_applies(batch, query):
        out = ops.tree_attention(query.transpose(1, 2), batch.cache.data[layer, 0], batch.cache.data[layer, 1],
                                 batch.prefix_len, batch.ancestors, scale, max_prefix=batch.start)
        return out, None
    keys, values = batch.cache.read(layer, batch.start + n)
    out = reference_tree_attention(query, keys, values, batch.start, batch.dense_visible(), scale)
    return out.transpose(1, 2), None


def _op_applies(batch: TreeBatch, query: Tensor) -> bool:
    return (batch.ancestors is not None and query.dtype in (torch.bfloat16, torch.float16)
            and query.shape[-1] in (64, 128) and query.shape[2] <= MAX_OP_NODES
            and has_kernel("tree_attention", query.device))


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
