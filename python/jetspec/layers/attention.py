"""Tree attention for the target model and the draft head, registered with transformers' attention
interface.

The driver calls the HF model with ``use_cache=False`` and a :class:`TreeBatch` in the ``jetspec``
keyword argument; HF computes q/k/v (projections, norms, RoPE at the positions we give) and calls
:func:`tree_attention_forward` per layer, which writes the new keys/values into our static cache and
attends over the committed prefix (no mask) plus the new tokens under their mask. A causal prefill is
the special case of a chain-shaped mask; one decoding step is a one-node tree. No HF module is patched:
the model's attention implementation is switched to ours only for the duration of each of our forwards
(:func:`use_tree_attention`).

Two kinds of batch: :class:`HostBatch` knows the committed prefix length on the host and reads exactly
that many keys; :class:`DeviceBatch` has it only on the device (a round replayed from a CUDA graph) and
masks the whole cache. Masks that only look back come packed (``ancestors``) and run the
``tree_attention`` op where :func:`jetspec.ops.tree_attention_supports` says it has a kernel; everything
else (fp32 models, bidirectional blocks) runs :func:`jetspec.ops.reference.masked_attention`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from .. import ops
from ..ops.reference import masked_attention, tree_mask
from ..ops.tree import ancestor_mask
from .cache import KVCache

__all__ = ["TreeBatch", "HostBatch", "DeviceBatch", "attend", "use_tree_attention", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "jetspec_tree"


@dataclass(kw_only=True)
class TreeBatch:
    """What the attention layers need to know about the ``n`` tokens being run: the cache they go to,
    where it starts (``prefix_len`` ``[B]`` int64 on the device) and which new tokens each may see, as a
    dense ``visible`` ``[B, n, n]`` bool mask or packed ``ancestors`` ``[B, n, ceil(n / 32)]`` int32 (a mask
    that only looks back; the op takes it), or both."""

    cache: KVCache
    prefix_len: Tensor
    visible: Tensor | None = None
    ancestors: Tensor | None = None

    @property
    def nodes(self) -> int:
        """``n``, the tokens being run."""
        return (self.ancestors if self.ancestors is not None else self.visible).shape[1]

    def dense_visible(self) -> Tensor:
        """``visible``, unpacked from ``ancestors`` on first use when only those were given (the op needs no
        dense mask, so a forward whose layers all take it never builds one)."""
        if self.visible is None:
            self.visible = ancestor_mask(self.ancestors, self.ancestors.shape[1])
        return self.visible

    @property
    def max_prefix(self) -> int:
        """A host upper bound of ``prefix_len`` for the op's work split."""
        raise NotImplementedError

    def store(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Write the new tokens' ``key``/``value`` ``[B, Hkv, n, d]`` into the cache."""
        raise NotImplementedError

    def masked(self, query: Tensor, layer: int, scale: float) -> Tensor:
        """The attention of ``query`` ``[B, Hq, n, d]`` without the op, ``[B, Hq, n, d]``."""
        raise NotImplementedError


@dataclass(kw_only=True)
class HostBatch(TreeBatch):
    """A forward whose prefix length ``start`` is known on the host: it reads exactly the keys it needs."""

    start: int

    @property
    def max_prefix(self) -> int:
        return self.start

    def store(self, layer: int, key: Tensor, value: Tensor) -> None:
        self.cache.write(layer, self.start, key, value)

    def masked(self, query: Tensor, layer: int, scale: float) -> Tensor:
        batch, _, n, _ = query.shape
        keys, values = self.cache.read(layer, self.start + n)
        visible = self.dense_visible()
        mask = torch.cat([visible.new_ones(batch, n, self.start), visible], dim=2).unsqueeze(1)
        return masked_attention(query, keys, values, mask, scale)


@dataclass(kw_only=True)
class DeviceBatch(TreeBatch):
    """A forward that reads nothing from the device on the host (a CUDA graph replays it for any
    ``prefix_len``): keys go to device-computed ``slots`` and the fallback masks the whole cache (O(S))."""

    slots: Tensor | None = field(default=None)  # [B, n] int64: prefix_len + 0..n-1, made on first use

    @property
    def max_prefix(self) -> int:
        return self.cache.capacity - self.nodes

    def new_slots(self) -> Tensor:
        if self.slots is None:
            self.slots = self.prefix_len.unsqueeze(1) + torch.arange(self.nodes, device=self.prefix_len.device)
        return self.slots

    def store(self, layer: int, key: Tensor, value: Tensor) -> None:
        self.cache.scatter(layer, self.new_slots(), key, value)

    def masked(self, query: Tensor, layer: int, scale: float) -> Tensor:
        key_cache, value_cache = self.cache.data[layer, 0], self.cache.data[layer, 1]
        mask = tree_mask(self.prefix_len, self.dense_visible(), key_cache.shape[1]).unsqueeze(1)
        return masked_attention(query, key_cache.transpose(1, 2), value_cache.transpose(1, 2), mask, scale)


def attend(query: Tensor, key: Tensor, value: Tensor, batch: TreeBatch, layer: int, scale: float) -> Tensor:
    """One layer's attention over the cache: store the new ``key``/``value`` ``[B, Hkv, n, d]``, then attend
    ``query`` ``[B, Hq, n, d]`` over the prefix and the new tokens, with the ``tree_attention`` op where it
    takes the batch (packed ``ancestors`` and a kernel for these queries). Returns ``[B, n, Hq, d]``."""
    batch.store(layer, key, value)
    queries = query.transpose(1, 2)
    if batch.ancestors is not None and ops.tree_attention_supports(queries):
        return ops.tree_attention(queries, batch.cache.data[layer, 0], batch.cache.data[layer, 1], batch.prefix_len,
                                  batch.ancestors, scale, max_prefix=batch.max_prefix)
    return batch.masked(query, layer, scale).transpose(1, 2)


def tree_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[Tensor, None]:
    """The function registered as ``attn_implementation="jetspec_tree"`` (HF's calling convention)."""
    batch: TreeBatch | None = kwargs.get("jetspec")
    if batch is None:
        raise RuntimeError("jetspec: the jetspec_tree attention runs only inside jetspec's own forwards "
                           "(it needs the tree and cache of the round)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(query, key, value, batch, module.layer_idx, scale), None


AttentionInterface.register(ATTN_IMPLEMENTATION, tree_attention_forward)


@contextlib.contextmanager
def use_tree_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the tree attention for the duration of the block, then restore its own."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
