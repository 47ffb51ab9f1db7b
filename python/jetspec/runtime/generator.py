"""The driver: :class:`SpeculativeGenerator` runs the rounds of :mod:`jetspec.runtime.rounds` and streams
what they commit.

Three ways to run the rounds (``mode``): ``"host"`` runs :class:`~jetspec.runtime.rounds.HostRound`
(any dtype, any drafter); ``"device"`` runs :class:`~jetspec.runtime.rounds.DeviceRound`, which keeps the
committed length on the device (no host sync inside a round) while the host reads each round's tokens
one round behind; ``"graph"`` replays that round from one CUDA graph.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..heads import DraftHead
from ..settings import cache_root
from .budget import (CANDIDATE_BUDGETS, CANDIDATE_WIDTHS, BudgetChooser, CostTable, TreeShape, calibrate,
                     calibration_key, candidate_shapes, device_name)
from .drafters import Drafter, HeadDrafter
from .results import Emitter, GenerationOutput, GenerationStats, Results, TokenStream, stop_tokens
from .rounds import DeviceRound, HostRound, Round
from .target import Target

__all__ = ["SpeculativeGenerator", "MODES"]

MODES = ("host", "device", "graph")
#: The most tree nodes a round verifies: the ``tree_attention`` op's limit, the same on every device.
MAX_BUDGET: int = ops.LIMITS["tree_attention"]["cpu"]["nodes"]
Mode = Literal["host", "device", "graph"]


class SpeculativeGenerator:
    """Greedy generation with tree speculative decoding; output identical to greedy decoding.

    Args:
        model: an HF decoder-only ``*ForCausalLM`` (Qwen3, Qwen2, Llama, ...).
        drafter: a :class:`~jetspec.heads.DraftHead` (JetSpec or DFlash; moved in place to the target's
            device and dtype), any :class:`Drafter`, or None for plain autoregressive decoding.
        budget: tree nodes per round, root included (1 = plain decoding), or ``"auto"`` (the default):
            each round picks its tree among :data:`~jetspec.runtime.budget.CANDIDATE_BUDGETS` from the
            round's measured cost and the draft's confidence (:mod:`jetspec.runtime.budget`); the costs are
            measured on first use and cached per device, model shape, dtype and mode (:meth:`calibrate`).
        width: candidates per depth (1 = chain drafting); default 8, or with ``budget="auto"`` chosen among
            :data:`~jetspec.runtime.budget.CANDIDATE_WIDTHS`.
        depth: deepest tree depth (default: the drafter's, i.e. the head's block size - 1).
        profile: synchronise the device around phases so ``phase_seconds`` are exact (slower; not with
            ``mode="graph"``, whose phases run inside one graph: ``bench/bench_round.py`` times them).
        mode: ``"host"``, ``"device"`` or ``"graph"`` (module docstring). Default: ``"graph"`` for a bf16/fp16
            target on CUDA with a draft head (or none), else ``"host"``. The device modes take a
            :class:`~jetspec.heads.DraftHead`, a drafter with ``on_device``, or None.
        calibration_dir: where cost calibrations are cached (default: ``<cache root>/calibration``, the cache
            root being ``$JETSPEC_CACHE`` or ``~/.cache/jetspec``).
    """

    def __init__(self, model: nn.Module, drafter: DraftHead | Drafter | None = None, *,
                 budget: int | Literal["auto"] = "auto", width: int | None = None, depth: int | None = None,
                 profile: bool = False, mode: Mode | None = None, calibration_dir: str | Path | None = None) -> None:
        self.target = Target(model)
        if isinstance(drafter, DraftHead):
            drafter = HeadDrafter(drafter, self.target)
        auto = budget == "auto"
        if not auto and (not _is_int(budget) or not 1 <= budget <= MAX_BUDGET):
            raise ValueError(f"jetspec: budget (tree nodes incl. the root) must be 'auto' or an integer in "
                             f"[1, {MAX_BUDGET}] (the ops' node limit), got {budget!r}")
        if width is not None and (not _is_int(width) or width < 1):
            raise ValueError(f"jetspec: width (candidates per depth) must be an integer >= 1, got {width!r}")
        if not auto and budget > 1 and drafter is None:
            raise ValueError("jetspec: a budget above 1 needs a drafter (a draft head)")
        max_depth = drafter.depth if drafter is not None else 0
        if depth is not None and not (_is_int(depth) and 1 <= depth <= max_depth):
            raise ValueError(f"jetspec: depth must be an integer in [1, {max_depth}] for this drafter, got {depth!r}")
        if drafter is None or budget == 1:
            self.shapes = [TreeShape(1, 1)]
        elif auto:
            self.shapes = candidate_shapes(CANDIDATE_BUDGETS, (width,) if width else CANDIDATE_WIDTHS,
                                           depth or max_depth)
        else:
            self.shapes = [TreeShape(budget, width or 8)]
        largest = max(s.budget for s in self.shapes)
        self.drafter = drafter if largest > 1 else None
        self.budget, self.auto = budget, auto and len(self.shapes) > 1
        self.width = max(s.width for s in self.shapes)
        self.depth = min(depth or max_depth, largest - 1)
        self.profile = profile
        self.mode = self._pick_mode(mode)
        self.calibration_dir = Path(calibration_dir) if calibration_dir is not None else cache_root() / "calibration"
        self.costs: dict[TreeShape, float] | None = None  # budget="auto": seconds per round of each shape
        # mode "device"/"graph": the round (reused while its capacity fits), its graphs per tree shape, and
        # the head cache they were captured with (a drafter given a new cache needs new graphs)
        self._device_round: tuple[DeviceRound, dict[TreeShape, torch.cuda.CUDAGraph], object] | None = None

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
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"jetspec: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        eos = stop_tokens(self.target.model, eos_token_id)
        # What plain decoding refuses: a kept token past the model's last position. Tree nodes deeper than
        # that near the limit are still verified (RoPE is computed, not looked up), but what they decide
        # lies past max_new_tokens and is never emitted: the token at position p comes from the logits at
        # p - 1, which attend only positions <= p - 1.
        limit = self.target.max_positions
        if limit is not None and prompt.shape[1] + max_new_tokens > limit:
            raise ValueError(f"jetspec: prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) is past the "
                             f"model's {limit} positions")
        stats = GenerationStats(prompt_tokens=prompt.shape[1])
        return TokenStream(self._run(prompt, max_new_tokens, eos, stats), stats)

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
        """Prefill, then step rounds and emit what they commit. A round that does not wait for the device
        (device and graph modes) is queued before the host reads the tokens of the last one, unless that
        one may end the generation."""
        start = time.perf_counter()
        emit = Emitter(eos, max_new_tokens)
        with self._phase("prefill", stats):
            chooser = BudgetChooser(self.calibrate(), self.depth) if self.auto else None
            rounds, graphs = self._round(prompt.shape[1] + max_new_tokens)
            rounds.prefill(prompt)
        out, done = emit([int(rounds.anchor)])
        self._account(stats, start, out, committed=None)
        yield out

        # The draft's log-probs come back only for the chooser (a copy fewer per round otherwise).
        results = Results(rounds.result, rounds.draft) if chooser is not None else Results(rounds.result)
        launched: deque[TreeShape] = deque()
        in_flight = 1 if rounds.synchronous else 2

        def launch() -> None:
            shape = chooser.choose() if chooser is not None else self.shapes[0]
            if graphs:
                graphs[shape].replay()
            else:
                rounds.step(shape, lambda name: self._phase(name, stats))
            results.push()
            launched.append(shape)

        launch()
        while not done:
            # Another round is never wasted work while the rounds in flight cannot reach max_new_tokens.
            if len(results) < in_flight and emit.count + (self.depth + 1) * len(results) < max_new_tokens:
                launch()
            result, *draft = results.pop()
            shape = launched.popleft()
            committed = result[1:1 + int(result[0])].tolist()
            if chooser is not None:
                chooser.observe(shape, draft[0].tolist() if shape.budget > 1 else None, len(committed))
            stats.trees.append(str(shape))
            out, done = emit(committed)
            self._account(stats, start, out, committed=len(committed))
            yield out
            if not done and not len(results):
                launch()

    def _round(self, tokens: int) -> tuple[Round, dict[TreeShape, torch.cuda.CUDAGraph]]:
        """A round for a generation of ``tokens`` positions, and in mode "graph" its CUDA graph per tree shape
        (captured on the first prefill). Mode "host": a round whose cache fits this generation exactly.
        Otherwise the device round whose capacity bucket fits it (made on first use, reused after): the
        tokens and the slots two rounds in flight may write past them, rounded up to a power of two (one
        set of graphs serves many lengths)."""
        largest = max(s.budget for s in self.shapes)
        if self.mode == "host":
            return HostRound(self.target, self.drafter, self.depth, self.width, tokens + largest), {}
        block = self.drafter.depth + 1 if self.drafter is not None else 1  # a head's block: anchor + depths
        need = tokens + 2 * (largest + block + self.depth + 2)
        capacity = max(1024, 1 << (need - 1).bit_length())
        if self._device_round is None or self._device_round[0].capacity != capacity:
            self._device_round = None  # free the old caches and graphs first
            self._device_round = (DeviceRound(self.target, self.drafter, self.depth, self.width, capacity), {}, None)
        rounds, graphs, captured_with = self._device_round
        context = getattr(self.drafter, "context", None)
        if self.mode == "graph" and (not graphs or captured_with is not context):
            # Graphs replay a prefilled state's buffers: capture them after a prefill (of any prompt).
            rounds.prefill(self._calibration_prompt())
            context = getattr(self.drafter, "context", None)
            graphs = {shape: rounds.capture(shape) for shape in self.shapes}
            self._device_round = (rounds, graphs, context)
        return rounds, graphs

    # -- budget="auto" --------------------------------------------------------------------------

    def calibrate(self, force: bool = False, progress: bool = True) -> dict[TreeShape, float]:
        """Seconds per round of each tree shape ``budget="auto"`` chooses among, in this generator's mode:
        read from the cache, or measured (a few rounds of each shape, on a fixed 128-token prompt) and
        cached; ``force`` measures again."""
        about = self._calibration_facts()
        table = CostTable(self.calibration_dir, calibration_key(about))
        costs = None if force else (self.costs or table.load())
        if costs is None or not set(self.shapes) <= set(costs):
            rounds, graphs = self._round(128 + 1)
            rounds.prefill(self._calibration_prompt())

            def one_round(shape: TreeShape) -> Callable[[], None]:
                def run() -> None:
                    with rounds.rewound():
                        graphs[shape].replay() if graphs else rounds.step(shape)
                return run

            costs = calibrate(one_round, self.shapes, self.target.device, progress=progress)
            table.save(costs, about)
        self.costs = costs
        return costs

    def _calibration_prompt(self) -> Tensor:
        return (torch.arange(128, device=self.target.device) * 7919 % self.target.vocab_size).view(1, -1)

    def _calibration_facts(self) -> dict:
        config = self.target.config
        head = getattr(getattr(self.drafter, "head", None), "spec", None)
        return {
            "device": device_name(self.target.device), "dtype": str(self.target.dtype), "mode": self.mode,
            "model": {k: getattr(config, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                              "intermediate_size", "num_attention_heads",
                                                              "num_key_value_heads", "vocab_size")},
            "head": None if head is None else [head.num_layers, head.hidden_size, head.block_size],
            "drafter": type(self.drafter).__name__, "depth": self.depth,
            "torch": torch.__version__, "jetspec_with_cuda": ops.WITH_CUDA,
        }

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


def _is_int(value: object) -> bool:
    """An integer argument: an int, not a bool (``width=True`` is a mistake, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
