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
    """What the attention layers need to know about the tokens being run.

    Two kinds of forward: the host-driven round knows the prefix length on the host (``start``); the
    device round (:mod:`jetspec.device_round`) leaves ``start`` None and gives ``prefix_len`` alone, so that
    nothing in the forward depends on a host value that changes from round to round (CUDA graphs)."""

    cache: KVCache
    start: int | None  # cache slot of the first new token = length of the committed prefix (None: device round)
    visible: Tensor | None = None  # [batch, n, n] bool: new token i may attend new token j
    ancestors: Tensor | None = None  # [batch, n, ceil(n / 32)] int32: the same mask, packed (trees only)
    prefix_len: Tensor | None = None  # [batch] int64 on the device: the prefix length per row, for the op
    slots: Tensor | None = None  # [batch, n] int64: prefix_len + 0..n-1, made once per forward (device round)

    def dense_visible(self) -> Tensor:
        """``visible``, unpacked from ``ancestors`` on first use when only those were given (the op needs no
        dense mask, so a forward whose layers all take it never builds one)."""
        if self.visible is None:
            self.visible = ancestor_mask(self.ancestors, self.ancestors.shape[1])
        return self.visible

    def new_slots(self, n: int) -> Tensor:
        if self.slots is None:
            self.slots = self.prefix_len.unsqueeze(1) + torch.arange(n, device=self.prefix_len.device)
        return self.slots


def sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA of ``query`` ``[B, Hq, n, D]`` over ``key``/``value`` ``[B, Hkv, T, D]`` (GQA: each kv head serves
    ``Hq / Hkv`` query heads) with a boolean ``mask`` broadcastable to ``[B, Hq, n, T]``."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


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
    batch, _, n, _ = query.shape
    mask = torch.cat([visible.new_ones(batch, n, prefix), visible], dim=2).unsqueeze(1)
    return sdpa(query, key, value, mask, scale)


def masked_tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, prefix_len: Tensor,
                          visible: Tensor, scale: float) -> Tensor:
    """Tree attention over a whole cache ``[B, S, Hkv, D]`` whose new tokens sit at slots ``prefix_len + j``:
    fixed shapes and no host sync (the device round's fallback where the op does not apply; O(S) work).

    ``visible`` ``[B, n, n]`` bool may be any mask among the new tokens (also bidirectional). Returns
    ``[B, Hq, n, D]``."""
    batch, _, n, _ = query.shape
    slots = key_cache.shape[1]
    node = torch.arange(slots, device=query.device) - prefix_len.unsqueeze(1)  # [B, S]: new token at each slot
    tree = visible.gather(2, node.clamp(0, n - 1).unsqueeze(1).expand(batch, n, slots))
    mask = (node < 0).unsqueeze(1) | (tree & (node < n).unsqueeze(1))
    return sdpa(query, key_cache.transpose(1, 2), value_cache.transpose(1, 2), mask.unsqueeze(1), scale)


def cached_tree_attention(query: Tensor, key: Tensor, value: Tensor, batch: TreeBatch, layer: int,
                          scale: float) -> Tensor:
    """The device round's attention of one layer (``batch.start`` None): store the new ``key``/``value``
    ``[B, Hkv, n, D]`` at ``prefix_len + 0..n-1``, then attend ``query`` ``[B, Hq, n, D]`` over the prefix and
    the new tokens: the ``tree_attention`` op where it applies (packed ``ancestors``, i.e. a mask that only
    looks back), else :func:`masked_tree_attention` with the dense mask. Returns ``[B, n, Hq, D]``."""
    n = query.shape[2]
    cache = batch.cache
    cache.scatter(layer, batch.new_slots(n), key, value)
    key_cache, value_cache = cache.data[layer, 0], cache.data[layer, 1]
    if batch.ancestors is not None and op_applies(query):
        return ops.tree_attention(query.transpose(1, 2), key_cache, value_cache, batch.prefix_len, batch.ancestors,
                                  scale, max_prefix=cache.capacity - n)
    return masked_tree_attention(query, key_cache, value_cache, batch.prefix_len, batch.dense_visible(),
                                 scale).transpose(1, 2)


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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if batch.start is None:
        return cached_tree_attention(query, key, value, batch, layer, scale), None
    batch.cache.write(layer, batch.start, key, value)
    if batch.ancestors is not None and op_applies(query):
        out = ops.tree_attention(query.transpose(1, 2), batch.cache.data[layer, 0], batch.cache.data[layer, 1],
                                 batch.prefix_len, batch.ancestors, scale, max_prefix=batch.start)
        return out, None
    keys, values = batch.cache.read(layer, batch.start + n)
    out = reference_tree_attention(query, keys, values, batch.start, batch.dense_visible(), scale)
    return out.transpose(1, 2), None


def op_applies(query: Tensor) -> bool:
    """Whether the ``tree_attention`` op takes these queries ``[B, heads, n, D]`` (given packed ancestor bits)."""
    return (query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in (64, 128)
            and query.shape[2] <= MAX_OP_NODES and has_kernel("tree_attention", query.device))


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
