"""The round with every data-dependent size on the device, so that CUDA can replay it as one graph.

The host-driven round (:mod:`jetspec.spec`) reads each round's accepted length back
to slice the caches and to know where the next round starts. Here that length stays
on the device: the committed length ``n`` is a device counter, the caches are written
at device-computed slots, the attention masks the prefix by ``n`` (the
``tree_attention`` op reads it on the device), every buffer has a fixed shape, and
the round's result (committed tokens and their count) lands in a fixed buffer the
host copies asynchronously. Nothing in :meth:`DeviceRound.step` synchronises with
the host, so one captured CUDA graph replays a whole round: draft, top-K, build,
verify, accept, compact.

Rows past a round's accepted length are still written (fixed shapes): they land in
cache slots at or past the new ``n``, which no later round reads before overwriting.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor

from . import ops
from .cache import KVCache
from .drafter import Drafter
from .target import Target
from .tree import Tree, build_tree, words_for

#: The phases of a round, in order (a CUDA graph per phase gives their times: ``bench/bench_round.py``).
ROUND_PHASES = ("draft", "topk", "build", "verify", "accept", "compact")


class DeviceRound:
    """One sequence's round state on the device, and the round itself.

    Args:
        target: the target model.
        drafter: a drafter with ``on_device`` (e.g. a :class:`~jetspec.drafter.HeadDrafter`), or None for autoregressive rounds (``budget`` 1).
        budget, width, depth: the tree (nodes incl. the root, candidates per depth, deepest depth).
        capacity: cache slots; every round must fit: ``n + budget`` and ``n + block_size`` stay below it.
    """

    def __init__(self, target: Target, drafter: Drafter | None, budget: int, width: int, depth: int,
                 capacity: int) -> None:
        self.target, self.drafter = target, drafter
        self.budget, self.width, self.depth = budget, width, depth
        self.capacity = capacity
        self.cache: KVCache = target.new_cache(1, capacity)
        device = target.device
        self.n = torch.zeros(1, dtype=torch.long, device=device)  # committed length (the anchor not included)
        self.anchor = torch.zeros(1, dtype=torch.long, device=device)  # last committed token, in no cache yet
        # After a round: [count, token 1, ..., token count] = its committed tokens (accepted + bonus).
        self.result = torch.zeros(depth + 2, dtype=torch.long, device=device)
        self.taps = drafter.tap_layers if drafter is not None else ()
        if drafter is None:  # the root alone, every round
            ones = torch.ones(1, 1, dtype=torch.long, device=device)
            self.tree = Tree(tokens=self.anchor.view(1, 1), parents=-ones, depths=ones - 1,
                             positions=self.n.view(1, 1),
                             ancestors=torch.ones(1, 1, words_for(1), dtype=torch.int32, device=device),
                             num_nodes=ones[0])

    # -- between rounds (host) ---------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Run the prompt ``[1, P]``, set ``n`` = P and the anchor; returns the anchor ``[1]`` (on the device)."""
        logits, tapped = self.target.prefill(prompt, self.cache, self.taps)
        if self.drafter is not None:
            self.drafter.start(tapped, self.capacity)
        self.anchor.copy_(logits[:, -1].argmax(-1))
        self.n.fill_(prompt.shape[1])
        return self.anchor

    @contextlib.contextmanager
    def rewound(self) -> Iterator[None]:
        """Rounds run inside the block leave the state as it was: they only write cache slots at or past
        ``n``, and ``n`` and the anchor are restored after them (warm-ups, timing runs)."""
        saved = self.n.clone(), self.anchor.clone()
        try:
            yield
        finally:
            self.n.copy_(saved[0])
            self.anchor.copy_(saved[1])

    # -- CUDA graphs ----------------------------------------------------------------------------

    def capture(self) -> torch.cuda.CUDAGraph:
        """A CUDA graph of one whole round (replay it for each round); the state is left as it was."""
        return self.capture_phases(whole=True)[0][1]

    def capture_phases(self, whole: bool = False) -> list[tuple[str, torch.cuda.CUDAGraph]]:
        """One CUDA graph per phase, to replay in order (a round whose phases can be timed apart), or with
        ``whole`` a single ``("round", graph)``. Warm-up rounds run first (on a side stream, as
        :func:`torch.cuda.graph` asks), :meth:`rewound`, so the prefilled state is unchanged."""
        device = self.n.device
        graphs = []
        with self.rewound():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step()
            torch.cuda.current_stream(device).wait_stream(side)
            for name, run in [("round", self.step)] if whole else self.phases():
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph):
                    run()
                graphs.append((name, graph))
        return graphs

    # -- the round (device only) ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, phase: Callable[[str], ContextManager] = lambda _: contextlib.nullcontext()) -> None:
        """One round; ``phase(name)`` wraps each phase (e.g. to time it)."""
        for name, run in self.phases():
            with phase(name):
                run()

    def phases(self) -> list[tuple[str, Callable[[], None]]]:
        """The round as ``(name, callable)`` pairs, each reading what the previous ones left in ``self``."""
        steps = [("verify", self._verify), ("accept", self._accept), ("compact", self._compact)]
        if self.drafter is None:
            return steps
        return [("draft", self._draft), ("topk", self._topk), ("build", self._build)] + steps

    def _draft(self) -> None:
        self.drafted = self.drafter.draft_at(self.anchor, self.n)

    def _topk(self) -> None:
        self.logprobs, self.ids = self.drafter.candidates_at(self.drafted, self.width)

    def _build(self) -> None:
        self.tree = build_tree(self.logprobs[:, :self.depth], self.ids[:, :self.depth], self.anchor, self.n,
                               self.budget)

    def _verify(self) -> None:
        tree = self.tree
        logits, self.tapped = self.target.forward(tree.tokens, tree.positions, self.cache, None, None, self.taps,
                                                  ancestors=tree.ancestors, prefix_len=self.n)
        self.predicted = logits.argmax(-1)

    def _accept(self) -> None:
        self.accepted, self.accept_len, self.bonus = ops.accept_greedy(
            self.tree.tokens, self.tree.parents, self.predicted, self.tree.num_nodes, max_accept=self.depth + 1)

    def _compact(self) -> None:
        ops.kv_compact(self.cache.planes(), self.accepted, self.accept_len, self.n)
        rank = torch.arange(self.depth + 1, device=self.n.device)
        path = torch.where(rank < self.accept_len.unsqueeze(1), self.accepted, 0)  # [1, depth + 1], padded by the root
        if self.drafter is not None:
            self.drafter.extend_at(self.tapped[0, path[0]].unsqueeze(0), self.n)
        committed = torch.cat([self.tree.tokens[0, path[0, 1:]], self.bonus])
        committed.scatter_(0, self.accept_len - 1, self.bonus)  # the bonus follows the last accepted node
        self.result[0:1].copy_(self.accept_len)
        self.result[1:].copy_(committed)
        self.n += self.accept_len
        self.anchor.copy_(self.bonus)
