"""The draft head: a few Qwen3-style decoder layers over the target's fused hidden states.

Module paths equal the published checkpoints' tensor names (``layers.{i}.self_attn.q_proj``,
``fc``, ``hidden_norm``, ``norm``, ...). The head owns no embedding and no LM head:
the target's are used at run time.

One forward drafts a whole block: the block ``[anchor, mask, ..., mask]`` (embedded
with the target's ``embed_tokens``) attends, in every layer, to the context (the
target's tapped hidden states of all committed positions, projected once by
``fc`` -> ``hidden_norm`` and turned into each layer's K/V) and to itself, causally
(JetSpec) or bidirectionally (DFlash). Block slot d (d >= 1) predicts depth d.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from ..layers.attention import DeviceBatch, attend
from ..layers.cache import KVCache
from ..ops.reference import masked_attention
from ..ops.tree import pack_mask
from .config import HeadSpec

#: One layer's attention given its block queries and keys/values (see :meth:`HeadAttention.forward`).
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``[B, heads, T, D]`` with ``cos``/``sin`` ``[B, T, D]`` (HF's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class HeadAttention(nn.Module):
    def __init__(self, config: Qwen3Config, spec: HeadSpec) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.num_heads, self.kv_heads, self.head_dim = spec.num_heads, spec.kv_heads, d
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, spec.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, spec.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=False)
        self.q_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)

    def key_value(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """K (normed, rotated) and V of ``x`` ``[B, T, H]``, as ``[B, kv_heads, T, D]``."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        """Block ``x`` ``[B, S, H]``: ``attend(q, k, v)`` takes its queries ``[B, heads, S, D]`` and keys/values
        ``[B, kv_heads, S, D]`` (normed, rotated) to the attention output ``[B, S, heads, D]``, over whatever
        context it holds."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        q = _rotate(q, cos, sin)
        k, v = self.key_value(x, cos, sin)
        return self.o_proj(attend(q, k, v).reshape(b, s, -1))


class HeadLayer(nn.Module):
    def __init__(self, config: Qwen3Config, spec: HeadSpec) -> None:
        super().__init__()
        self.input_layernorm = Qwen3RMSNorm(spec.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = HeadAttention(config, spec)
        self.post_attention_layernorm = Qwen3RMSNorm(spec.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class HiddenDimAdapter(nn.Module):
    """Maps each tapped target state from the target's width to the head's (only when they differ)."""

    def __init__(self, target_hidden: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(target_hidden, hidden, bias=False)

    def forward(self, tapped: Tensor, taps: int) -> Tensor:
        b, t, _ = tapped.shape
        return self.proj(tapped.view(b, t, taps, -1)).view(b, t, -1)


class DraftHead(nn.Module):
    """A JetSpec (causal) or DFlash (bidirectional) draft head."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = HeadSpec.from_config(config)
        taps = len(spec.target_layer_ids)
        self.layers = nn.ModuleList(HeadLayer(config, spec) for _ in range(spec.num_layers))
        self.norm = Qwen3RMSNorm(spec.hidden_size, eps=config.rms_norm_eps)
        self.fc = nn.Linear(taps * spec.hidden_size, spec.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(spec.hidden_size, eps=config.rms_norm_eps)
        if spec.target_hidden_size != spec.hidden_size:
            self.hidden_dim_adapter = HiddenDimAdapter(spec.target_hidden_size, spec.hidden_size)
        # Outside the module tree, so that casting the head to bf16 leaves RoPE's frequencies in fp32.
        self.__dict__["_rotary"] = Qwen3RotaryEmbedding(config=config)
        self._block_masks: tuple[Tensor, Tensor | None] | None = None  # forward_cached's, made once per shape

    def rope(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[B, T, D]`` at ``positions`` ``[B, T]``, in ``x``'s dtype."""
        if self._rotary.inv_freq.device != x.device:
            self._rotary.to(x.device)
        return self._rotary(x, positions)

    def project_context(self, tapped: Tensor) -> Tensor:
        """Fused hidden states ``[B, T, taps * H_target]`` -> context ``[B, T, H]``."""
        if hasattr(self, "hidden_dim_adapter"):
            tapped = self.hidden_dim_adapter(tapped, len(self.spec.target_layer_ids))
        return self.hidden_norm(self.fc(tapped))

    def context_key_values(self, tapped: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's context K/V ``[B, kv_heads, T, D]`` for new context rows at ``positions``.

        The same projected context feeds every layer's k/v projections; it is never a query and
        never passes through the layers, so it is computed once per committed position and cached."""
        context = self.project_context(tapped)
        cos, sin = self.rope(context, positions)
        return [layer.self_attn.key_value(context, cos, sin) for layer in self.layers]

    def forward(self, block: Tensor, positions: Tensor, context: list[tuple[Tensor, Tensor]],
                mask: Tensor | None = None) -> Tensor:
        """Run the block ``[B, S, H]`` (embedded ``[anchor, mask, ...]``) at ``positions`` ``[B, S]``
        over the per-layer context K/V ``[B, kv_heads, T, D]``; returns the final hidden states
        ``[B, S, H]`` (after ``norm``).

        ``mask``: ``[S, T + S]`` bool, which context rows and block slots each slot sees. Default: every
        context row, and the block causally (JetSpec) or entirely (DFlash). Training packs many
        blocks into one call and passes their block-sparse mask here."""
        cos, sin = self.rope(block, positions)
        if mask is None and self.spec.causal:
            s, t = block.shape[1], context[0][0].shape[2]
            mask = torch.ones(s, t + s, dtype=torch.bool, device=block.device).tril(diagonal=t)
        scale = self.spec.head_dim ** -0.5

        def after_context(k_ctx: Tensor, v_ctx: Tensor) -> Attend:
            def over_context(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                out = masked_attention(q, torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2), mask, scale)
                return out.transpose(1, 2)
            return over_context

        return self._layers(block, cos, sin, [after_context(k, v) for k, v in context])

    def forward_cached(self, block: Tensor, positions: Tensor, cache: KVCache, prefix_len: Tensor) -> Tensor:
        """:meth:`forward` with the context K/V in ``cache`` (slot = position) and its length ``prefix_len``
        ``[B]`` on the device: the block's K/V go to the slots of its ``positions`` (``prefix_len + 0..S-1``),
        and nothing depends on a host value that changes between rounds (CUDA graphs)."""
        b, s, _ = block.shape
        masks = self._block_masks
        if masks is None or masks[0].shape != (b, s, s) or masks[0].device != block.device:
            visible = torch.ones(b, s, s, dtype=torch.bool, device=block.device)
            if self.spec.causal:
                visible = visible.tril()
            # The op takes masks that only look back, as packed bits: a causal block is a chain.
            self._block_masks = (visible, pack_mask(visible) if self.spec.causal else None)
        visible, ancestors = self._block_masks
        batch = DeviceBatch(cache=cache, prefix_len=prefix_len, visible=visible, ancestors=ancestors, slots=positions)
        cos, sin = self.rope(block, positions)
        scale = self.spec.head_dim ** -0.5

        def in_layer(layer: int) -> Attend:
            return lambda q, k, v: attend(q, k, v, batch, layer, scale)

        return self._layers(block, cos, sin, [in_layer(i) for i in range(len(self.layers))])

    def _layers(self, x: Tensor, cos: Tensor, sin: Tensor, attends: list[Attend]) -> Tensor:
        for layer, attend_in_layer in zip(self.layers, attends):
            x = layer(x, cos, sin, attend_in_layer)
        return self.norm(x)
