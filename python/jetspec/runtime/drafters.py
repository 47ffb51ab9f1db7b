"""Drafters: what proposes the per-depth candidates a round's tree is built from.

The driver needs three things of a drafter: take the target's tapped hidden
states of committed positions (``start`` for the prompt, ``extend`` after each
round), and ``propose`` top-K candidates per depth for the next block given the
anchor. :class:`HeadDrafter` does this with a JetSpec/DFlash draft head; tests
plug in oracles through the same interface.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from .. import ops
from ..heads import DraftHead, check_head_fits_target
from ..layers.cache import KVCache
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

    #: committed positions the drafter has taken on the host (its own bookkeeping; 0 if it keeps none)
    length: int = 0

    def state(self) -> object:
        """What :meth:`restore` needs to undo rounds run after it (calibration and warm-up rounds): the
        drafter's host-side position; rows it wrote past it are overwritten later."""
        return self.length

    def restore(self, state: object) -> None:
        """Return to :meth:`state`'s ``state``."""
        self.length = state

    # The device round (jetspec.runtime.rounds.DeviceRound) keeps the committed length on the device as
    # ``length`` ``[B]`` int64 and calls these instead of extend/propose; nothing in them may read a device
    # value back, so that a CUDA graph can replay them. A drafter that has them sets ``on_device``.

    #: whether the drafter implements draft_at, candidates_at and extend_at
    on_device: bool = False

    def draft_at(self, anchor: Tensor, length: Tensor) -> Tensor:
        """The first half of :meth:`propose` after ``length`` committed positions (for a head: its forward);
        returns what :meth:`candidates_at` takes."""
        raise NotImplementedError(f"{type(self).__name__} does not run in a device round")

    def candidates_at(self, drafted: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """The second half of :meth:`propose`: top-``width`` log-probs and ids ``[B, depth, width]``."""
        raise NotImplementedError(f"{type(self).__name__} does not run in a device round")

    def extend_at(self, tapped: Tensor, length: Tensor) -> None:
        """:meth:`extend` with rows ``tapped`` ``[B, T, taps * H]`` for positions ``length + 0..T-1``; the
        round then advances its length by the rows that count (the rest are overwritten later)."""
        raise NotImplementedError(f"{type(self).__name__} does not run in a device round")


class HeadDrafter(Drafter):
    """Drafting with a draft head: one head forward per round, its context K/V cached."""

    on_device = True

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
        context = self.context
        # The same memory for every sequence of one capacity: a captured round keeps pointing at it.
        if context is None or context.capacity != capacity or context.data.shape[2] != tapped.shape[0]:
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
        positions = torch.arange(self.length, self.length + spec.block_size, device=anchor.device)
        context = [self.context.read(layer, self.length) for layer in range(spec.num_layers)]
        hidden = self.head(self._block(anchor), positions.expand(anchor.shape[0], -1), context)
        return candidates(self.target, hidden[:, 1:], width)

    @torch.no_grad()
    def extend_at(self, tapped: Tensor, length: Tensor) -> None:
        positions = length.unsqueeze(1) + torch.arange(tapped.shape[1], device=tapped.device)
        for layer, (k, v) in enumerate(self.head.context_key_values(tapped, positions)):
            self.context.scatter(layer, positions, k, v)

    @torch.no_grad()
    def draft_at(self, anchor: Tensor, length: Tensor) -> Tensor:
        """The head's hidden states ``[B, depth, H]`` of depths 1..depth over the first ``length`` context slots."""
        positions = length.unsqueeze(1) + torch.arange(self.head.spec.block_size, device=anchor.device)
        return self.head.forward_cached(self._block(anchor), positions, self.context, length)[:, 1:]

    def candidates_at(self, drafted: Tensor, width: int) -> tuple[Tensor, Tensor]:
        return candidates(self.target, drafted, width)

    def _block(self, anchor: Tensor) -> Tensor:
        """The embedded block ``[anchor, mask, ..., mask]`` ``[B, S, H]``."""
        spec = self.head.spec
        ids = torch.full((anchor.shape[0], spec.block_size), spec.mask_token_id, dtype=torch.long,
                         device=anchor.device)
        ids[:, 0] = anchor
        return self.target.embed_tokens(ids)


def candidates(target: Target, hidden: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Top-``width`` full-vocabulary log-probs (float32, descending) and ids of the target's LM head
    over the head's hidden states ``[B, D, H]``: the fused ``draft_topk`` op where the build has it."""
    lm_head = target.lm_head
    k = min(width, lm_head.weight.shape[0])
    if getattr(lm_head, "bias", None) is None and ops.supports("draft_topk", hidden.device, k=k):
        return ops.draft_topk(hidden, lm_head.weight, k)
    # No fused kernel for this device: the LM head in the model's dtype, then the top-K.
    return torch.log_softmax(lm_head(hidden).float(), dim=-1).topk(k, dim=-1)


class OracleDrafter(Drafter):
    """Proposes a known continuation (e.g. the target's own greedy output) at rank 0 of every depth,
    with ``width - 1`` other tokens below it: the upper bound on acceptance for a given depth
    (every full round commits depth + 1 tokens). For tests and benchmarks of the rest of a round;
    it runs in device rounds too (the continuation is indexed on the device).

    With ``accuracy`` p < 1 each depth's rank-0 token is the true one with probability p, independently
    (else a token no candidate of that depth equals), and its log-prob says so (``log p``): a head whose
    confidence is exact, for measuring ``budget="auto"``. Its draws come from torch's generator on the
    device, so a CUDA graph replay draws new ones."""

    on_device = True

    def __init__(self, continuation: Sequence[int], depth: int, vocab_size: int, accuracy: float = 1.0) -> None:
        if not 0 < accuracy <= 1:
            raise ValueError(f"jetspec: the oracle's accuracy must be in (0, 1], got {accuracy}")
        self.continuation = torch.tensor(list(continuation), dtype=torch.long)
        self.depth = depth
        self.vocab_size = vocab_size
        self.accuracy = accuracy
        self.prompt_length = self.length = 0
        self._prompt_length = torch.zeros(1, dtype=torch.long)  # on the device: graphs replay for any prompt

    def start(self, tapped: Tensor, capacity: int) -> None:
        self.prompt_length = self.length = tapped.shape[1]
        self.continuation = self.continuation.to(tapped.device)
        self._prompt_length = self._prompt_length.to(tapped.device)
        self._prompt_length.fill_(self.prompt_length)

    def extend(self, tapped: Tensor) -> None:
        self.length += tapped.shape[1]

    def propose(self, anchor: Tensor, width: int) -> tuple[Tensor, Tensor]:
        return self.candidates_at(self.draft_at(anchor, torch.tensor([self.length], device=anchor.device)), width)

    def draft_at(self, anchor: Tensor, length: Tensor) -> Tensor:
        # The anchor is continuation[k] with k = committed positions since the prompt; depth d proposes
        # continuation[k + d] (0 past its end).
        index = (length - self._prompt_length).unsqueeze(1) + torch.arange(1, self.depth + 1, device=length.device)
        last = self.continuation.shape[0] - 1
        true = torch.where(index <= last, self.continuation[index.clamp(max=last)], 0)
        if self.accuracy == 1:
            return true
        wrong = torch.rand(true.shape, device=true.device) >= self.accuracy
        return torch.where(wrong, (true + self.vocab_size // 2) % self.vocab_size, true)

    def candidates_at(self, drafted: Tensor, width: int) -> tuple[Tensor, Tensor]:
        ranks = torch.arange(width, device=drafted.device)
        ids = (drafted.unsqueeze(-1) + ranks) % self.vocab_size
        logprobs = (ranks * -10.0 + (ranks == 0) * math.log(self.accuracy)).float().expand(*ids.shape)
        return logprobs.contiguous(), ids

    def extend_at(self, tapped: Tensor, length: Tensor) -> None:
        pass
