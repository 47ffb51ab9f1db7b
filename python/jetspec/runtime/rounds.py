"""The round of lossless tree speculative decoding, in two forms behind one interface.

Round invariant: the target's cache holds the committed prefix ``x[0:n]``; the last committed token
(the anchor) is in no cache yet; the drafter has the target's tapped hidden states of ``x[0:n]``.

1. draft: the drafter proposes top-K candidates for depths 1..D after the anchor;
2. build: a best-first tree of ``budget`` nodes rooted at the anchor (``build_tree``);
3. verify: one target forward over all nodes (tree attention, positions n + depth);
4. accept: the longest root path agreeing with the target's argmax, plus its bonus (``accept_greedy``);
5. compact: keep the path's K/V at slots n, n+1, ... (``kv_compact``); feed its hidden states to the
   drafter; the bonus token is the next anchor.

Budget 1 is plain greedy decoding through the same verify path (a one-node tree, no drafter).

Both forms are driven the same way: :meth:`Round.prefill` a prompt, then :meth:`Round.step` once per
round; after each step ``result`` holds ``[count, token 1, ..., token count]``, the tokens it committed.

- :class:`HostRound` reads each round's accepted length back to the host and attends exactly the
  committed prefix (any dtype, any :class:`~jetspec.runtime.drafters.Drafter`).
- :class:`DeviceRound` keeps that length on the device: the caches are written at device-computed
  slots, the attention masks the prefix by ``n`` (the ``tree_attention`` op reads it on the device), every
  buffer has a fixed shape. Nothing in its :meth:`~Round.step` synchronises with the host, so one
  captured CUDA graph replays a whole round. Rows past a round's accepted length are still written
  (fixed shapes): they land in cache slots at or past the new ``n``, which no later round reads before
  overwriting.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor

from .. import ops
from ..layers.attention import DeviceBatch, HostBatch, TreeBatch
from ..layers.cache import KVCache
from ..ops.tree import root_only
from .budget import TreeShape
from .drafters import Drafter
from .target import Target

__all__ = ["Round", "HostRound", "DeviceRound", "ROUND_PHASES"]

#: The phases of a round, in order (a CUDA graph per phase gives their times: ``bench/bench_round.py``).
ROUND_PHASES = ("draft", "topk", "build", "verify", "accept", "compact")

Phase = Callable[[str], ContextManager]


class Round:
    """One sequence's round state and the round itself.

    Args:
        target: the target model.
        drafter: the drafter, or None for plain decoding (every round's shape then has budget 1).
        depth: the deepest tree depth (the accepted path holds at most ``depth + 1`` nodes).
        widest: the most candidates per depth any round's shape takes (the drafter's top-K).
        capacity: cache slots; every round must fit (``n + budget`` and ``n + block_size`` below it).
    """

    #: whether :meth:`step` has finished on the device when it returns (the host waited for it)
    synchronous: bool

    def __init__(self, target: Target, drafter: Drafter | None, depth: int, widest: int, capacity: int) -> None:
        self.target, self.drafter = target, drafter
        self.depth, self.widest = depth, widest
        self.capacity = capacity
        self.cache: KVCache = target.new_cache(1, capacity)
        device = target.device
        self.n = torch.zeros(1, dtype=torch.long, device=device)  # committed length (the anchor not included)
        self.anchor = torch.zeros(1, dtype=torch.long, device=device)  # last committed token, in no cache yet
        # After a round: [count, token 1, ..., token count] = its committed tokens (accepted + bonus).
        self.result = torch.zeros(depth + 2, dtype=torch.long, device=device)
        # After a drafted round: its draft's top-K log-probs [depth, widest] (what budget="auto" reads).
        self.draft = torch.zeros(depth, widest, dtype=torch.float32, device=device)
        self.taps = drafter.tap_layers if drafter is not None else ()
        self.root = root_only(self.anchor, self.n)  # plain decoding's tree: views of anchor and n

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Run the prompt ``[1, P]``, set ``n`` = P and the anchor; returns the anchor ``[1]`` (on the device)."""
        logits, tapped = self.target.prefill(prompt, self.cache, self.taps)
        if self.drafter is not None:
            self.drafter.start(tapped, self.capacity)
        self.anchor.copy_(logits[:, -1].argmax(-1))
        self.n.fill_(prompt.shape[1])
        return self.anchor

    @torch.no_grad()
    def step(self, shape: TreeShape, phase: Phase = lambda _: contextlib.nullcontext()) -> None:
        """One round of tree ``shape``; ``phase(name)`` wraps each phase (e.g. to time it)."""
        for name, run in self.phases(shape):
            with phase(name):
                run()

    def phases(self, shape: TreeShape) -> list[tuple[str, Callable[[], None]]]:
        """The round as ``(name, callable)`` pairs, each reading what the previous ones left in ``self``."""
        steps = [("verify", self._verify), ("accept", self._accept), ("compact", self._compact)]
        if shape.budget == 1:
            return [("build", self._plain)] + steps
        return self._drafting() + [("build", lambda: self._build(shape))] + steps

    @contextlib.contextmanager
    def rewound(self) -> Iterator[None]:
        """Rounds run inside the block leave the state as it was: they only write cache slots at or past
        ``n``, and ``n``, the anchor and the drafter's own state are restored after them (warm-ups,
        calibration, timing runs)."""
        saved = self.n.clone(), self.anchor.clone(), self._host_state()
        try:
            yield
        finally:
            self.n.copy_(saved[0])
            self.anchor.copy_(saved[1])
            self._restore_host_state(saved[2])

    def _host_state(self) -> object:
        return self.drafter.state() if self.drafter is not None else None

    def _restore_host_state(self, state: object) -> None:
        if self.drafter is not None:
            self.drafter.restore(state)

    # -- the phases ------------------------------------------------------------------------------

    def _drafting(self) -> list[tuple[str, Callable[[], None]]]:
        """The phases that leave ``self.logprobs`` and ``self.ids`` ``[1, depth, widest]``."""
        raise NotImplementedError

    def _batch(self) -> TreeBatch:
        """The verify forward's view of the cache."""
        raise NotImplementedError

    def _plain(self) -> None:
        self.tree = self.root

    def _build(self, shape: TreeShape) -> None:
        self.draft.copy_(self.logprobs[0, :self.depth])
        self.tree = ops.build_tree(self.logprobs[:, :self.depth, :shape.width], self.ids[:, :self.depth, :shape.width],
                                   self.anchor, self.n, shape.budget)

    def _verify(self) -> None:
        logits, self.tapped = self.target.forward(self.tree.tokens, self.tree.positions, self._batch(), self.taps)
        self.predicted = logits.argmax(-1)

    def _accept(self) -> None:
        self.accepted, self.accept_len, self.bonus = ops.accept_greedy(
            self.tree.tokens, self.tree.parents, self.predicted, self.tree.num_nodes, max_accept=self.depth + 1)

    def _compact(self) -> None:
        ops.kv_compact(self.cache.planes(), self.accepted, self.accept_len, self.n)
        rank = torch.arange(self.depth + 1, device=self.n.device)
        path = torch.where(rank < self.accept_len.unsqueeze(1), self.accepted, 0)  # [1, depth + 1], padded by the root
        if self.drafter is not None:
            self._extend_drafter(path)
        committed = torch.cat([self.tree.tokens[0, path[0, 1:]], self.bonus])
        committed.scatter_(0, self.accept_len - 1, self.bonus)  # the bonus follows the last accepted node
        self.result[0:1].copy_(self.accept_len)
        self.result[1:].copy_(committed)
        self.n += self.accept_len
        self.anchor.copy_(self.bonus)

    def _extend_drafter(self, path: Tensor) -> None:
        """Hand the drafter the tapped states of the accepted ``path`` ``[1, depth + 1]`` (root-padded)."""
        raise NotImplementedError


class HostRound(Round):
    """The round with the committed length known on the host (one sync per round, in ``compact``)."""

    synchronous = True

    def prefill(self, prompt: Tensor) -> Tensor:
        self.length = prompt.shape[1]  # n, on the host
        return super().prefill(prompt)

    def _drafting(self) -> list[tuple[str, Callable[[], None]]]:
        return [("draft", self._draft)]

    def _draft(self) -> None:
        self.logprobs, self.ids = self.drafter.propose(self.anchor, self.widest)

    def _host_state(self) -> object:
        return self.length, super()._host_state()

    def _restore_host_state(self, state: object) -> None:
        self.length, drafter_state = state
        super()._restore_host_state(drafter_state)

    def _batch(self) -> TreeBatch:
        return HostBatch(cache=self.cache, prefix_len=self.n, start=self.length, ancestors=self.tree.ancestors)

    def _compact(self) -> None:
        super()._compact()
        self.length += int(self.result[0])  # the host needs it for the next round's cache slice

    def _extend_drafter(self, path: Tensor) -> None:
        self.drafter.extend(self.tapped[:, path[0, :int(self.accept_len[0])]])


class DeviceRound(Round):
    """The round with every data-dependent size on the device, so that CUDA can replay it as one graph.
    Its drafter implements the device interface (``Drafter.on_device``)."""

    synchronous = False

    def capture(self, shape: TreeShape) -> torch.cuda.CUDAGraph:
        """A CUDA graph of one whole round of ``shape`` (replay it for each round); the state is left as it was."""
        return self.capture_phases(shape, whole=True)[0][1]

    def capture_phases(self, shape: TreeShape, whole: bool = False) -> list[tuple[str, torch.cuda.CUDAGraph]]:
        """One CUDA graph per phase of a round of ``shape``, to replay in order (a round whose phases can be
        timed apart), or with ``whole`` a single ``("round", graph)``. Warm-up rounds run first (on a side
        stream, as :func:`torch.cuda.graph` asks), :meth:`rewound`, so the prefilled state is unchanged."""
        device = self.n.device
        graphs = []
        with self.rewound():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(shape)
            torch.cuda.current_stream(device).wait_stream(side)
            for name, run in [("round", lambda: self.step(shape))] if whole else self.phases(shape):
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph):
                    run()
                graphs.append((name, graph))
        return graphs

    def _drafting(self) -> list[tuple[str, Callable[[], None]]]:
        return [("draft", self._draft), ("topk", self._topk)]

    def _draft(self) -> None:
        self.drafted = self.drafter.draft_at(self.anchor, self.n)

    def _topk(self) -> None:
        self.logprobs, self.ids = self.drafter.candidates_at(self.drafted, self.widest)

    def _batch(self) -> TreeBatch:
        return DeviceBatch(cache=self.cache, prefix_len=self.n, ancestors=self.tree.ancestors)

    def _extend_drafter(self, path: Tensor) -> None:
        self.drafter.extend_at(self.tapped[0, path[0]].unsqueeze(0), self.n)
