"""Draft-head configuration, as published heads store it.

A head's ``config.json`` is a ``Qwen3Config`` (``model_type: "qwen3"``,
``architectures: ["DFlashDraftModel"]``) describing the head's own decoder layers,
plus top-level ``block_size`` and ``num_target_layers`` and a ``dflash_config``
dict (``causal_head``, ``target_layer_ids``, ``mask_token_id``,
``target_hidden_size``). JetSpec heads set ``causal_head: true``; DFlash heads are
the same architecture with ``causal_head: false`` (bidirectional block).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Qwen3Config

ARCHITECTURE = "DFlashDraftModel"


def attention_shape(config) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of an HF config, with the usual defaults when a key is absent."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The published default tap layers: evenly spaced over [1, L - 3] (one draft layer: the middle)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [int(round(start + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class HeadSpec:
    """The resolved, validated facts of a head config that the code runs on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int  # anchor + (block_size - 1) predicted depths
    causal: bool  # JetSpec (True) or DFlash bidirectional (False)
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    target_hidden_size: int

    @property
    def depth(self) -> int:
        """Tree depths the head predicts in one forward: D = block_size - 1."""
        return self.block_size - 1

    @staticmethod
    def from_config(config: Qwen3Config) -> "HeadSpec":
        def fail(msg: str) -> None:
            raise ValueError(f"jetspec: invalid draft-head config: {msg}")

        extra = getattr(config, "dflash_config", None) or {}
        block_size = getattr(config, "block_size", None) or extra.get("block_size")
        if not isinstance(block_size, int) or block_size < 2:
            fail(f"'block_size' must be an integer >= 2 (anchor + at least one prediction), got {block_size!r}")
        layers = config.num_hidden_layers
        ids = extra.get("target_layer_ids")
        if ids is None:
            num_target_layers = getattr(config, "num_target_layers", None)
            if not isinstance(num_target_layers, int):
                fail("needs 'dflash_config.target_layer_ids' or a top-level 'num_target_layers'")
            ids = build_target_layer_ids(num_target_layers, layers)
        if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            fail(f"'target_layer_ids' must be a non-empty list of layer indices, got {ids!r}")
        mask_token_id = extra.get("mask_token_id")
        if not isinstance(mask_token_id, int) or mask_token_id < 0:
            fail(f"'dflash_config.mask_token_id' must be a token id, got {mask_token_id!r}")
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            fail(f"sliding-window head layers are not supported (layer_types={layer_types})")
        if getattr(config, "attention_bias", False):
            fail("attention biases are not supported (published heads have none)")
        kv_heads, head_dim = attention_shape(config)
        causal = extra.get("causal_head", extra.get("causal", False))
        return HeadSpec(
            hidden_size=config.hidden_size,
            num_layers=layers,
            num_heads=config.num_attention_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            causal=bool(causal),
            target_layer_ids=tuple(ids),
            mask_token_id=mask_token_id,
            target_hidden_size=extra.get("target_hidden_size") or config.hidden_size,
        )


def head_config_for(target_config, *, num_layers: int, block_size: int, causal: bool, mask_token_id: int,
                    target_layer_ids: list[int] | None = None, intermediate_size: int | None = None) -> Qwen3Config:
    """A head config mirroring the target's attention geometry, as published heads do."""
    t = target_config
    ids = target_layer_ids or build_target_layer_ids(t.num_hidden_layers, num_layers)
    kv_heads, head_dim = attention_shape(t)
    config = Qwen3Config(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=intermediate_size or t.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=getattr(t, "hidden_act", "silu"),
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=rope_theta_of(t),
        tie_word_embeddings=False,
        attention_bias=False,
    )
    config.architectures = [ARCHITECTURE]
    config.block_size = block_size
    config.num_target_layers = t.num_hidden_layers
    # Both spellings of the causal flag and of block_size: other runtimes read those.
    config.dflash_config = {
        "causal_head": causal,
        "causal": causal,
        "block_size": block_size,
        "target_layer_ids": list(ids),
        "mask_token_id": mask_token_id,
    }
    return config


def rope_theta_of(config) -> float:
    """RoPE base of an HF config: transformers 5 keeps it in ``rope_parameters``, 4.x in ``rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return getattr(config, "rope_theta", 10000.0)
