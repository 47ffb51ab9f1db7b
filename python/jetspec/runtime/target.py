"""The target model: any HF decoder-only causal LM that uses transformers' attention
interface (Qwen3, Qwen2, Llama, ...), run over our static cache with tree attention."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..heads.config import attention_shape
from ..layers.attention import HostBatch, TreeBatch, use_tree_attention
from ..layers.cache import KVCache


class Target:
    """Wraps an HF ``*ForCausalLM``; exposes its geometry and one forward over new tokens."""

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens") \
                or not hasattr(model, "lm_head"):
            raise TypeError(
                f"jetspec: the target must be an HF decoder-only *ForCausalLM with .model.layers, "
                f".model.embed_tokens and .lm_head; got {type(model).__name__}"
            )
        cfg = model.config
        self.model = model
        self.config = cfg
        self.num_layers: int = cfg.num_hidden_layers
        self.hidden_size: int = cfg.hidden_size
        self.vocab_size: int = cfg.vocab_size
        self.num_heads: int = cfg.num_attention_heads
        self.kv_heads, self.head_dim = attention_shape(cfg)
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None)
        layer_types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise NotImplementedError("jetspec: targets with sliding-window attention layers are not supported yet")

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.model.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.num_layers, batch, capacity, self.kv_heads, self.head_dim, self.dtype, self.device)

    def prefill(self, tokens: Tensor, cache: KVCache, tap_layers: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """:meth:`forward` over whole sequences ``[B, n]`` from slot 0: causal, at positions 0..n-1."""
        batch, n = tokens.shape
        visible = torch.ones(batch, n, n, dtype=torch.bool, device=tokens.device).tril()
        positions = torch.arange(n, device=tokens.device).expand(batch, -1)
        prefix = torch.zeros(batch, dtype=torch.long, device=tokens.device)
        return self.forward(tokens, positions, HostBatch(cache=cache, prefix_len=prefix, start=0, visible=visible),
                            tap_layers)

    @torch.no_grad()
    def forward(self, tokens: Tensor, positions: Tensor, batch: TreeBatch,
                tap_layers: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """Run ``tokens`` ``[B, n]`` at ``positions`` ``[B, n]`` over ``batch``'s cache: their K/V land in the
        slots after its prefix, and token i attends the prefix and the new tokens its mask allows.

        Returns:
            logits ``[B, n, V]`` and the outputs of the ``tap_layers`` decoder layers concatenated along
            features, ``[B, n, len(tap_layers) * H]`` (``[B, n, 0]`` when none are tapped).
        """
        tapped: dict[int, Tensor] = {}
        hooks = [self.model.model.layers[layer].register_forward_hook(_tap_into(tapped, layer))
                 for layer in set(tap_layers)]
        try:
            with use_tree_attention(self.model):
                out = self.model(input_ids=tokens, position_ids=positions, use_cache=False, jetspec=batch)
        finally:
            for hook in hooks:
                hook.remove()
        if not tap_layers:
            return out.logits, out.logits.new_empty(*tokens.shape, 0)
        return out.logits, torch.cat([tapped[layer] for layer in tap_layers], dim=-1)


def _tap_into(store: dict[int, Tensor], layer: int):
    """A forward hook keeping a decoder layer's output (the residual stream after that layer)."""

    def hook(module: nn.Module, args, output) -> None:
        store[layer] = output[0] if isinstance(output, tuple) else output

    return hook
