"""Static caches the driver owns and the ops write into.

One tensor per cache, laid out ``[layers, 2 (K, V), batch, slots, kv_heads, head_dim]``:
token-major rows, so that one accepted token of one layer is one contiguous row
and ``kv_compact`` moves every layer's rows in a single launch over
``planes = layers * 2``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """A fixed-capacity K/V cache for ``layers`` attention layers."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.data = torch.zeros(layers, 2, batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.capacity = capacity

    def write(self, layer: int, start: int, key: Tensor, value: Tensor) -> None:
        """Store ``[batch, kv_heads, n, head_dim]`` keys and values at slots ``start .. start + n``."""
        n = key.shape[2]
        if start + n > self.capacity:
            raise RuntimeError(f"jetspec: KV cache overflow: slots {start}..{start + n} exceed its capacity "
                               f"{self.capacity}")
        self.data[layer, 0, :, start:start + n] = key.transpose(1, 2)
        self.data[layer, 1, :, start:start + n] = value.transpose(1, 2)

    def scatter(self, layer: int, slots: Tensor, key: Tensor, value: Tensor) -> None:
        """Store ``[batch, kv_heads, n, head_dim]`` keys and values at slots ``slots`` ``[batch, n]`` (int64 on
        the device): no host sync, so a CUDA graph can replay it with slots it computed itself. Slots must lie
        below the capacity (a CUDA device assert otherwise; callers size the cache for every round)."""
        rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)
        self.data[layer, 0, rows, slots] = key.transpose(1, 2)
        self.data[layer, 1, rows, slots] = value.transpose(1, 2)

    def read(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values of slots ``0 .. length`` as ``[batch, kv_heads, length, head_dim]`` views."""
        return (self.data[layer, 0, :, :length].transpose(1, 2), self.data[layer, 1, :, :length].transpose(1, 2))

    def planes(self) -> Tensor:
        """The cache as ``[layers * 2, batch, slots, kv_heads * head_dim]`` for ``kv_compact``."""
        layers, _, batch, slots, heads, dim = self.data.shape
        return self.data.view(layers * 2, batch, slots, heads * dim)
