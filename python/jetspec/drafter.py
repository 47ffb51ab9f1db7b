"""Drafters: what proposes the per-depth candidates a round's tree is built from.

The driver needs three things of a drafter: take the target's tapped hidden
states of committed positions (``start`` for the prompt, ``extend`` after each
round), and ``propose`` top-K candidates per depth for the next block given the
anchor. :class:`HeadDrafter` does this with a JetSpec/DFlash draft head; tests
plug in oracles through the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from . import ops
from ._ext import has_kernel
from .cache import KVCache
from .heads import DraftHead, check_head_fits_target
from .target import Target


class Drafter(ABC):
    #: deepest tree depth one proposal covers
    depth: int
    #: target layers whose outputs the drafter consumes (concatenated in this order)
    tap_layers: tuple[int, ...] = ()

    @abstractmethod
    def start(self, tapped: Tensor, capacity: int) -> None:
        """Begin a sequence whose prompt has these tapped states ``[B, P, taps * H]`` (``taps`` may be 0)."""

    @abstractmethod
    def extend(self, tapped: Tensor) -> None:
        """Append the tapped states of newly committed positions ``[B, T, taps * H]``."""

    @abstractmethod
    def propose(self, anchor: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Top-``width`` candidates for depths 1..depth after ``anchor`` ``[B]``:
        full-vocabulary log-probs ``[B, depth, width]`` float32 (descending) and ids int64."""


class HeadDrafter(Drafter):
    """Drafting with a draft head: one head forward per round, its context K/V cached."""

    def __init__(self, head: DraftHead, target: Target) -> None:
        check_head_fits_target(head, target.config)
        self.head = head.to(device=target.device, dtype=target.dtype)
        self.target = target
        self.depth = head.spec.depth
        self.tap_layers = head.spec.target_layer_ids
        self.context: KVCache | None = None
        self.length = 0

    def start(self, tapped: Tensor, capacity: int) -> None:
        spec = self.head.spec
        self.context = KVCache(spec.num_layers, tapped.shape[0], capacity, spec.kv_heads, spec.head_dim,
                               self.target.dtype, self.target.device)
        self.length = 0
        self.extend(tapped)

    @torch.no_grad()
    def extend(self, tapped: Tensor) -> None:
        rows = tapped.shape[1]
        positions = torch.arange(self.length, self.length + rows, device=tapped.device).expand(tapped.shape[0], -1)
        for layer, (k, v) in enumerate(self.head.context_key_values(tapped, positions)):
            self.context.write(layer, self.length, k, v)
        self.length += rows

    @torch.no_grad()
    def propose(self, anchor: Tensor, width: int) -> tuple[Tensor, Tensor]:
        spec = self.head.spec
        batch = anchor.shape[0]
        ids = torch.full((batch, spec.block_size), spec.mask_token_id, dtype=torch.long, device=anchor.device)
        ids[:, 0] = anchor
        positions = torch.arange(self.length, self.length + spec.block_size, device=anchor.device).expand(batch, -1)
        context = [self.context.read(layer, self.length) for layer in range(spec.num_layers)]
        hidden = self.head(self.target.embed_tokens(ids), positions, context)
        return candidates(self.target, hidden[:, 1:], width)


def candidates(target: Target, hidden: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Top-``width`` full-vocabulary log-probs (float32, descending) and ids of the target's LM head
    over the head's hidden states ``[B, D, H]``: the fused ``draft_topk`` op where the build has it."""
    lm_head = target.lm_head
    k = min(width, lm_head.weight.shape[0])
    if getattr(lm_head, "bias", None) is None and has_kernel("draft_topk", hidden.device):
        return ops.draft_topk(hidden, lm_head.weight, k)
    # No fused kernel for this device: the LM head in the model's dtype, then the top-K.
    return torch.log_softmax(lm_head(hidden).float(), dim=-1).topk(k, dim=-1)


class OracleDrafter(Drafter):
    """Proposes a known continuation (e.g. the target's own greedy output) at rank 0 of every depth,
    with ``width - 1`` other tokens below it: the upper bound on acceptance for a given depth
    (every full round commits depth + 1 tokens). For tests and benchmarks of the rest of a round."""

    def __init__(self, continuation: Sequence[int], depth: int, vocab_size: int) -> None:
        self.continuation = list(continuation)
        self.depth = depth
        self.vocab_size = vocab_size
        self.prompt_length = self.length = 0

    def start(self, tapped: Tensor, capacity: int) -> None:
        self.prompt_length = self.length = tapped.shape[1]

    def extend(self, tapped: Tensor) -> None:
        self.length += tapped.shape[1]

    def propose(self, anchor: Tensor, width: int) -> tuple[Tensor, Tensor]:
        # The anchor is continuation[k] with k = committed positions since the prompt.
        k = self.length - self.prompt_length
        ids = torch.empty(1, self.depth, width, dtype=torch.long)
        for d in range(self.depth):
            true = self.continuation[k + d + 1] if k + d + 1 < len(self.continuation) else 0
            ids[0, d] = (true + torch.arange(width)) % self.vocab_size
        logprobs = -torch.arange(width, dtype=torch.float32).expand(1, self.depth, width) * 10.0
        return logprobs.to(anchor.device), ids.to(anchor.device)
