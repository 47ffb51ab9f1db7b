"""What a generation hands back: its statistics and output, the token stream, and the two helpers of
the driver loop (cutting rounds at a stop token or the token limit; reading device results one round
behind)."""

from __future__ import annotations

import numbers
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["PHASES", "GenerationStats", "GenerationOutput", "TokenStream", "stop_tokens", "Emitter", "Results"]

PHASES = ("prefill", "draft", "topk", "build", "verify", "accept", "compact")


@dataclass
class GenerationStats:
    """What one generation did. ``accept_lengths[r]`` is the number of tokens round r committed
    (accepted draft tokens + the bonus token), the paper's acceptance length tau."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    #: the tree of each round as "budget x width" (plain decoding: "1"), e.g. for budget="auto"
    trees: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall_seconds: float = 0.0

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def tree_histogram(self) -> dict[str, int]:
        """Rounds per tree shape, most used first."""
        return dict(Counter(self.trees).most_common())

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.phase_seconds.items() if v > 0)
        trees = ", ".join(f"{tree}: {count}" for tree, count in self.tree_histogram().items())
        return (f"{self.new_tokens} tokens in {self.rounds} rounds, tau {self.mean_accept_length:.2f}, "
                f"{self.tokens_per_second:.1f} tok/s (trees {trees}; {phases})")


@dataclass
class GenerationOutput:
    sequences: Tensor  # [1, prompt + new] int64, like model.generate
    stats: GenerationStats


def stop_tokens(model: nn.Module, eos_token_id) -> set[int]:
    """The ids generation stops after: ``eos_token_id`` as given (an id, ids, a tensor; [] for none),
    or, when it is None, the model's ``generation_config.eos_token_id`` (as HF ``generate`` does)."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    if not all(isinstance(i, numbers.Integral) for i in ids):
        raise ValueError(f"jetspec: eos_token_id must be a token id or a list of ids, got {eos_token_id!r}")
    return {int(i) for i in ids}


class TokenStream:
    """Iterates over the tokens each round commits; ``stats`` and ``tokens`` fill in as it runs."""

    def __init__(self, rounds: Iterator[list[int]], stats: GenerationStats) -> None:
        self._rounds = rounds
        self.stats = stats
        self.tokens: list[int] = []

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> list[int]:
        new = next(self._rounds)
        self.tokens.extend(new)
        return new


class Emitter:
    """Counts the tokens handed out and cuts a round's tokens after a stop token or max_new_tokens."""

    def __init__(self, eos: set[int], max_new_tokens: int) -> None:
        self.eos, self.max_new_tokens = eos, max_new_tokens
        self.count = 0

    def __call__(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The tokens to emit, and whether generation is done."""
        out = []
        for token in tokens:
            out.append(token)
            self.count += 1
            if token in self.eos or self.count == self.max_new_tokens:
                return out, True
        return out, False


class Results:
    """A round's outputs (device tensors every round rewrites, e.g. ``[count, tokens...]``) copied to the
    host without blocking, oldest first: two sets of pinned buffers, so that the host reads one round's
    while the next round runs."""

    def __init__(self, *outputs: Tensor) -> None:
        self.outputs = outputs
        cuda = outputs[0].device.type == "cuda"
        self.buffers = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in outputs] for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.pending: deque[int] = deque()
        self.next = 0

    def __len__(self) -> int:
        return len(self.pending)

    def push(self) -> None:
        """Queue a copy of the round just launched."""
        i, self.next = self.next, 1 - self.next
        for buffer, output in zip(self.buffers[i], self.outputs):
            buffer.copy_(output, non_blocking=True)
        if self.events[i] is not None:
            self.events[i].record()
        self.pending.append(i)

    def pop(self) -> list[Tensor]:
        """Host copies of the outputs of the oldest round queued (waits for it)."""
        i = self.pending.popleft()
        if self.events[i] is not None:
            self.events[i].synchronize()
        return [buffer.clone() for buffer in self.buffers[i]]
