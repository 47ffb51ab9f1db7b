"""Lossless tree speculative decoding: the round, top to bottom.

Round invariant: the target's cache holds the committed prefix ``x[0:n]``; the last
committed token (the anchor) is in no cache yet; the drafter has the target's
tapped hidden states of ``x[0:n]``.

1. draft: the drafter proposes top-K candidates for depths 1..D after the anchor;
2. build: a best-first tree of ``budget`` nodes rooted at the anchor;
3. verify: one target forward over all nodes (tree attention, positions n + depth);
4. accept: the longest root path agreeing with the target's argmax, plus its bonus;
5. compact: keep the path's K/V at slots n, n+1, ...; feed its hidden states to the
   drafter; the bonus token is the next anchor.

Budget 1 is plain greedy decoding through the same verify path.

Three ways to run the rounds (``mode``): ``"host"`` reads each round's accepted
length back and slices exact-length caches (any dtype, any drafter); ``"device"``
runs :class:`~jetspec.device_round.DeviceRound`, which keeps that length on the
device (fixed shapes, no host sync inside a round) while the host reads each
round's tokens one round behind; ``"graph"`` replays that round from one CUDA graph.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .device_round import DeviceRound
from .drafter import Drafter, HeadDrafter
from .heads import DraftHead
from .target import Target
from .tree import Tree, build_tree, words_for

PHASES = ("prefill", "draft", "topk", "build", "verify", "accept", "compact")
MODES = ("host", "device", "graph")
Mode = Literal["host", "device", "graph"]


@dataclass
class GenerationStats:
    """What one generation did. ``accept_lengths[r]`` is the number of tokens round r committed
    (accepted draft tokens + the bonus token), the paper's acceptance length tau."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall_seconds: float = 0.0

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.phase_seconds.items() if v > 0)
        return (f"{self.new_tokens} tokens in {self.rounds} rounds, tau {self.mean_accept_length:.2f}, "
                f"{self.tokens_per_second:.1f} tok/s ({phases})")


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


class SpeculativeGenerator:
    """Greedy generation with tree speculative decoding; output identical to greedy decoding.

    Args:
        model: an HF decoder-only ``*ForCausalLM`` (Qwen3, Qwen2, Llama, ...).
        drafter: a :class:`~jetspec.heads.DraftHead` (JetSpec or DFlash; moved in place to the target's
            device and dtype), any :class:`Drafter`, or None for plain autoregressive decoding (then
            ``budget`` must be 1).
        budget: tree nodes per round, root included (1 = autoregressive).
        width: candidates per depth (1 = chain drafting).
        depth: deepest tree depth (default: the drafter's, i.e. the head's block size - 1).
        profile: synchronise the device around phases so ``phase_seconds`` are exact (slower; not with
            ``mode="graph"``, whose phases run inside one graph: ``bench/bench_round.py`` times them).
        mode: ``"host"``, ``"device"`` or ``"graph"`` (module docstring). Default: ``"graph"`` for a bf16/fp16
            target on CUDA with a draft head (or none), else ``"host"``. The device modes take a
            :class:`~jetspec.heads.DraftHead`, a drafter with ``on_device``, or None.
    """

    def __init__(self, model: nn.Module, drafter: DraftHead | Drafter | None = None, *, budget: int = 64,
                 width: int = 8, depth: int | None = None, profile: bool = False, mode: Mode | None = None) -> None:
        self.target = Target(model)
        if isinstance(drafter, DraftHead):
            drafter = HeadDrafter(drafter, self.target)
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"jetspec: budget (tree nodes incl. the root) must be an integer >= 1, got {budget!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"jetspec: width (candidates per depth) must be an integer >= 1, got {width!r}")
        if budget > 1 and drafter is None:
            raise ValueError("jetspec: a budget above 1 needs a drafter (a draft head)")
        max_depth = drafter.depth if drafter is not None else 0
        if depth is not None and not (isinstance(depth, int) and 1 <= depth <= max_depth):
            raise ValueError(f"jetspec: depth must be an integer in [1, {max_depth}] for this drafter, got {depth!r}")
        self.drafter = drafter if budget > 1 else None
        self.budget = budget
        self.width = width
        self.depth = min(depth or max_depth, budget - 1)
        self.profile = profile
        self.mode = self._pick_mode(mode)
        # mode "device"/"graph": the round (reused while its capacity fits), its graph, and the head cache the
        # graph was captured with (a drafter given a new cache needs a new graph)
        self._round: tuple[DeviceRound, torch.cuda.CUDAGraph | None, object] | None = None

    def _pick_mode(self, mode: Mode | None) -> Mode:
        on_device = self.drafter is None or self.drafter.on_device
        cuda = self.target.device.type == "cuda"
        if mode is None:
            half = self.target.dtype in (torch.float16, torch.bfloat16)
            return "graph" if cuda and half and on_device and not self.profile else "host"
        if mode not in MODES:
            raise ValueError(f"jetspec: mode must be one of {MODES}, got {mode!r}")
        if mode != "host" and not on_device:
            raise ValueError(f"jetspec: mode {mode!r} needs a drafter that runs on the device (a DraftHead) or "
                             f"none; {type(self.drafter).__name__} runs with mode='host'")
        if mode == "graph" and self.profile:
            raise ValueError("jetspec: profile times phases by synchronising between them, which a graph replay "
                             "cannot; use mode='device' (bench/bench_round.py times graphed phases)")
        if mode == "graph" and not cuda:
            raise ValueError(f"jetspec: mode 'graph' needs the target on a CUDA device, not {self.target.device}")
        return mode

    # -- public API --------------------------------------------------------------------------

    def generate(self, input_ids: Tensor, max_new_tokens: int = 128,
                 eos_token_id: int | Sequence[int] | None = None) -> GenerationOutput:
        """Like ``model.generate(input_ids, do_sample=False, max_new_tokens=...)``, token for token.

        ``eos_token_id``: an id or a list of ids to stop after (the stop token is kept, as HF does);
        None means the model's ``generation_config.eos_token_id``; ``[]`` never stops early."""
        stream = self.stream(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        for _ in stream:
            pass
        prompt = self._prompt(input_ids)
        new = torch.tensor([stream.tokens], dtype=torch.long, device=prompt.device)
        return GenerationOutput(sequences=torch.cat([prompt, new], dim=1), stats=stream.stats)

    def stream(self, input_ids: Tensor, max_new_tokens: int = 128,
               eos_token_id: int | Sequence[int] | None = None) -> TokenStream:
        """Iterate over the tokens committed by each round (the first item is the prefill's token)."""
        prompt = self._prompt(input_ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"jetspec: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        eos = stop_tokens(self.target.model, eos_token_id)
        # Positions used: the prompt's, then n + depth for a round that starts with n committed tokens in
        # the cache, where n <= prompt + max_new_tokens - 2 (a round runs only while a token is still owed).
        limit = self.target.max_positions
        furthest = max(prompt.shape[1] - 1, prompt.shape[1] + max_new_tokens - 2 + self.depth)
        if limit is not None and furthest >= limit:
            raise ValueError(f"jetspec: prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) with tree depth "
                             f"{self.depth} needs position {furthest}, past the model's {limit} positions")
        stats = GenerationStats(prompt_tokens=prompt.shape[1])
        run = self._run if self.mode == "host" else self._run_on_device
        return TokenStream(run(prompt, max_new_tokens, eos, stats), stats)

    # -- the loop ------------------------------------------------------------------------------

    def _prompt(self, input_ids: Tensor) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.long:
            raise ValueError("jetspec: input_ids must be an int64 tensor of token ids")
        prompt = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"jetspec: input_ids must be [1, prompt_len] with prompt_len >= 1, got "
                             f"{tuple(input_ids.shape)}")
        if prompt.shape[0] != 1:
            raise NotImplementedError("jetspec: the driver decodes one sequence at a time (batch 1); the ops take "
                                      "batches already")
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.target.vocab_size:
            raise ValueError(f"jetspec: input_ids must lie in [0, {self.target.vocab_size})")
        return prompt.to(self.target.device)

    def _run(self, prompt: Tensor, max_new_tokens: int, eos: set[int], stats: GenerationStats) -> Iterator[list[int]]:
        start = time.perf_counter()
        target, drafter = self.target, self.drafter
        taps = drafter.tap_layers if drafter is not None else ()
        length = prompt.shape[1]
        cache = target.new_cache(1, length + max_new_tokens + self.budget)
        emit = _Emitter(eos, max_new_tokens)

        with self._phase("prefill", stats):
            logits, tapped = target.prefill(prompt, cache, taps)
            anchor = logits[:, -1].argmax(-1)
            if drafter is not None:
                drafter.start(tapped, cache.capacity)
        out, done = emit([int(anchor)])
        self._account(stats, start, out, committed=None)
        yield out

        n = length
        while not done:
            tree = self._draft_tree(anchor, n, stats)
            with self._phase("verify", stats):
                logits, tapped = target.forward(tree.tokens, tree.positions, cache, n, None, taps,
                                                ancestors=tree.ancestors, prefix_len=tree.positions[:, 0])
                predicted = logits.argmax(-1)
            with self._phase("accept", stats):
                accepted, accept_len, bonus = ops.accept_greedy(
                    tree.tokens, tree.parents, predicted, tree.num_nodes, max_accept=self.depth + 1)
            with self._phase("compact", stats):
                ops.kv_compact(cache.planes(), accepted, accept_len, torch.tensor([n], device=prompt.device))
                path_len = int(accept_len[0])  # the host needs the committed tokens to stream them
                path = accepted[0, :path_len]
                if drafter is not None:
                    drafter.extend(tapped[:, path])
            out, done = emit(tree.tokens[0, path[1:]].tolist() + [int(bonus[0])])
            n += path_len
            anchor = bonus
            self._account(stats, start, out, committed=path_len)
            yield out

    def _run_on_device(self, prompt: Tensor, max_new_tokens: int, eos: set[int],
                       stats: GenerationStats) -> Iterator[list[int]]:
        """The rounds of :class:`DeviceRound` (replayed from a CUDA graph in mode "graph"). The host queues
        the next round before it waits for the tokens of the last, unless that one may end the generation."""
        start = time.perf_counter()
        emit = _Emitter(eos, max_new_tokens)
        with self._phase("prefill", stats):
            rounds, graph = self._device_round(prompt, max_new_tokens)
        out, done = emit([int(rounds.anchor)])
        self._account(stats, start, out, committed=None)
        yield out

        results = _Results(rounds.result)

        def launch() -> None:
            if graph is not None:
                graph.replay()
            else:
                rounds.step(lambda name: self._phase(name, stats))
            results.push()

        launch()
        while not done:
            # Another round is never wasted work while the rounds in flight cannot reach max_new_tokens.
            if len(results) < 2 and emit.count + (self.depth + 1) * len(results) < max_new_tokens:
                launch()
            committed = results.pop()
            out, done = emit(committed)
            self._account(stats, start, out, committed=len(committed))
            yield out
            if not done and not len(results):
                launch()

    def _device_round(self, prompt: Tensor, max_new_tokens: int) -> tuple[DeviceRound, torch.cuda.CUDAGraph | None]:
        """Prefill into the device round whose capacity bucket fits this generation (made, and in mode "graph"
        captured, on first use; reused after). Capacity: the prompt, the new tokens, and the slots two rounds
        in flight may write past them, rounded up to a power of two (one graph serves many lengths)."""
        block = self.drafter.depth + 1 if self.drafter is not None else 1  # a head's block: anchor + depths
        need = prompt.shape[1] + max_new_tokens + 2 * (self.budget + block + self.depth + 2)
        capacity = max(1024, 1 << (need - 1).bit_length())
        if self._round is None or self._round[0].capacity != capacity:
            self._round = None  # free the old caches and graph first
            self._round = (DeviceRound(self.target, self.drafter, self.budget, self.width, self.depth, capacity),
                           None, None)
        rounds, graph, captured_with = self._round
        rounds.prefill(prompt)
        context = getattr(self.drafter, "context", None)
        if self.mode == "graph" and (graph is None or captured_with is not context):
            graph = rounds.capture()
            self._round = (rounds, graph, context)
        return rounds, graph

    def _draft_tree(self, anchor: Tensor, n: int, stats: GenerationStats) -> Tree:
        base = torch.tensor([n], device=anchor.device)
        if self.drafter is None:  # budget 1: the root alone
            ones = torch.ones(1, 1, dtype=torch.long, device=anchor.device)
            return Tree(tokens=anchor.view(1, 1), parents=-ones, depths=ones - 1, positions=base.view(1, 1),
                        ancestors=torch.ones(1, 1, words_for(1), dtype=torch.int32, device=anchor.device),
                        num_nodes=ones[0])
        with self._phase("draft", stats):
            logprobs, ids = self.drafter.propose(anchor, self.width)
        with self._phase("build", stats):
            return build_tree(logprobs[:, :self.depth], ids[:, :self.depth], anchor, base, self.budget)

    def _account(self, stats: GenerationStats, start: float, out: list[int], committed: int | None) -> None:
        stats.new_tokens += len(out)
        if committed is not None:
            stats.rounds += 1
            stats.accept_lengths.append(committed)
        stats.wall_seconds = time.perf_counter() - start

    @contextlib.contextmanager
    def _phase(self, name: str, stats: GenerationStats) -> Iterator[None]:
        if self.profile and self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)
        t0 = time.perf_counter()
        yield
        if self.profile and self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)
        stats.phase_seconds[name] += time.perf_counter() - t0


class _Emitter:
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


class _Results:
    """Device round results (``[count, tokens...]``) copied to the host without blocking, oldest first:
    two pinned buffers, so that the host reads one round while the next one runs."""

    def __init__(self, result: Tensor) -> None:
        self.result = result
        cuda = result.device.type == "cuda"
        self.buffers = [torch.empty(result.shape, dtype=result.dtype, pin_memory=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.pending: deque[int] = deque()
        self.next = 0

    def __len__(self) -> int:
        return len(self.pending)

    def push(self) -> None:
        """Queue a copy of the round just launched."""
        i, self.next = self.next, 1 - self.next
        self.buffers[i].copy_(self.result, non_blocking=True)
        if self.events[i] is not None:
            self.events[i].record()
        self.pending.append(i)

    def pop(self) -> list[int]:
        """The committed tokens of the oldest round queued (waits for it)."""
        i = self.pending.popleft()
        if self.events[i] is not None:
            self.events[i].synchronize()
        result = self.buffers[i]
        return result[1:1 + int(result[0])].tolist()

