"""Layers the target and the draft head run on top of the ops: the static KV cache and tree attention."""

from .attention import DeviceBatch, HostBatch, TreeBatch, attend, use_tree_attention
from .cache import KVCache

__all__ = ["DeviceBatch", "HostBatch", "KVCache", "TreeBatch", "attend", "use_tree_attention"]
