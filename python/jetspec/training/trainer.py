"""Training draft heads by self-distillation from a frozen target.

Data: prompts -> the target's own greedy responses (:func:`self_distill`), so the head
learns the target's distribution, not a dataset's. Training (:class:`HeadTrainer`)
uses exactly the inference layout: for an anchor position a of a sequence, the
block ``[x_a, mask, ..., mask]`` at positions a..a+B-1 sees the projected target
hidden states of positions < a and itself (causally for JetSpec, fully for DFlash);
slot d is trained towards token a+d. Many anchors of one sequence are packed into
one head forward with a block-sparse mask (blocks never see each other).

Two losses: ``"kl"``, the forward KL from the target's temperature-scaled next-token
distribution (the paper's main results), and ``"ce"``, cross-entropy on the target's
greedy tokens. Two depth weightings: ``"uniform"`` (the paper's) and ``"exp"``
(w_d = exp(-(d - 1) / gamma), DFlash's, favouring the early depths that gate all
later acceptance).

The target's tapped states have a few "massive" dimensions (hundreds of times the
median, e.g. SmolLM2's layer-27 dim 17), which make plain AdamW on ``fc`` move the
projected context almost only along them. The trainer therefore learns ``fc`` in
standardized input coordinates, W' = W diag(s) with s the per-feature RMS of the
tapped states measured once on the training data, and folds s back into the
published ``fc.weight`` whenever it hands out the head: inference is unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..heads import DraftHead, load_head, save_head
from ..runtime.target import Target
from .blocks import anchored_blocks
from .distill import TrainingSequence


@dataclass
class TrainConfig:
    loss: Literal["kl", "ce"] = "kl"
    temperature: float = 1.0  # of the KL's teacher and student distributions
    weighting: Literal["uniform", "exp"] = "uniform"
    gamma: float = 7.0  # decay length of the "exp" weighting, in depths
    anchors: int = 64  # blocks drawn per sequence per step
    sequences_per_step: int = 1
    lr: float = 6e-4
    weight_decay: float = 0.0
    warmup: float = 0.04  # fraction of the steps
    grad_clip: float = 1.0
    seed: int = 0
    standardize_inputs: bool = True  # learn fc in per-feature-RMS units of the tapped states (see module doc)

    def __post_init__(self) -> None:
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"jetspec: loss must be 'kl' or 'ce', got {self.loss!r}")
        if self.weighting not in ("uniform", "exp"):
            raise ValueError(f"jetspec: weighting must be 'uniform' or 'exp', got {self.weighting!r}")
        if self.temperature <= 0 or self.gamma <= 0 or self.anchors < 1 or self.lr <= 0 \
                or self.sequences_per_step < 1:
            raise ValueError("jetspec: temperature, gamma and lr must be positive, anchors and sequences_per_step "
                             "at least 1")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"jetspec: warmup is a fraction of the steps in [0, 1), got {self.warmup}")


@dataclass
class StepMetrics:
    loss: float
    accuracy: list[float]  # per depth 1..D: head argmax == target greedy token
    blocks: int


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


class HeadTrainer:
    """Trains ``head`` against the frozen ``model``. The head is moved in place to the target's device
    and kept in fp32 (master weights); bf16 autocast runs its forward on CUDA."""

    def __init__(self, model: nn.Module, head: DraftHead, config: TrainConfig | None = None) -> None:
        self.target = Target(model)
        self.config = config or TrainConfig()
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = head.to(device=self.target.device, dtype=torch.float32).train()
        spec = head.spec
        self.depth_weights = torch.ones(spec.depth, device=self.target.device)
        if self.config.weighting == "exp":
            d = torch.arange(spec.depth, device=self.target.device, dtype=torch.float32)
            self.depth_weights = torch.exp(-d / self.config.gamma)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.config.lr, betas=(0.9, 0.95),
                                           weight_decay=self.config.weight_decay)
        self.state = TrainState()
        # Per-feature scale s of the tapped states; the head's fc holds W' = W diag(s) while training.
        self.input_scale: Tensor | None = None
        self._shuffle: tuple[tuple[int, int] | None, list[int]] = (None, [])  # (epoch, n), that epoch's order

    # -- one step's batch ---------------------------------------------------------------------

    def sequence_loss(self, sequence: TrainingSequence, anchors: Sequence[int] | None = None) -> tuple[Tensor, StepMetrics]:
        """:meth:`batch_loss` of one sequence."""
        return self.batch_loss([sequence], None if anchors is None else [anchors])

    def batch_loss(self, sequences: Sequence[TrainingSequence],
                   anchors: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, StepMetrics]:
        """Loss of the head on blocks anchored in the sequences' responses (random anchors by default).

        The sequences run as one right-padded batch: one teacher forward, one packed head forward
        whose per-sequence block-sparse mask never lets a block see padding or another block."""
        spec, cfg, device = self.head.spec, self.config, self.target.device
        if anchors is None:  # seeded by the step, so that a resumed run draws what an unbroken one would
            rng = random.Random(cfg.seed * 1_000_003 + self.state.step)
            anchors = []
            for seq in sequences:
                candidates = range(seq.prompt_len, len(seq.tokens) - 1)  # every anchor has at least one label
                anchors.append(sorted(rng.sample(candidates, min(cfg.anchors, len(candidates)))))
        if any(not a for a in anchors):
            raise ValueError("jetspec: a training sequence needs a response of at least 2 tokens")
        batch, width = len(sequences), max(len(s.tokens) for s in sequences)
        blocks = max(len(a) for a in anchors)
        lengths = torch.tensor([len(s.tokens) for s in sequences], device=device)
        tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        for b, seq in enumerate(sequences):
            tokens[b, :len(seq.tokens)] = torch.tensor(seq.tokens, device=device)
        # Sequences with fewer anchors repeat their last one; the repeats get no weight.
        real = torch.tensor([[j < len(a) for j in range(blocks)] for a in anchors], device=device)
        anchor_t = torch.tensor([list(a) + [a[-1]] * (blocks - len(a)) for a in anchors], device=device)
        with torch.no_grad():  # right padding is never seen by real tokens under the causal mask
            teacher_logits, tapped = self.target.prefill(tokens, self.target.new_cache(batch, width),
                                                         spec.target_layer_ids)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tapped = tapped.float() if self.input_scale is None else tapped.float() / self.input_scale
            hidden = anchored_blocks(self.head, self.target, tokens, tapped, anchor_t)
            logits = self.target.lm_head(hidden[:, :, 1:]).float()  # slots 1..D: [batch, blocks, D, V]
        offsets = torch.arange(spec.block_size, device=device)
        target_pos = anchor_t[:, :, None] + offsets[1:]  # token a + d
        valid = (target_pos < lengths[:, None, None]) & real[:, :, None]
        target_pos = torch.minimum(target_pos, lengths[:, None, None] - 1)
        labels = tokens.gather(1, target_pos.flatten(1)).view_as(target_pos)
        if cfg.loss == "ce":
            per_slot = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none").view_as(labels)
        else:
            t = cfg.temperature
            rows = teacher_logits.gather(1, (target_pos - 1).flatten(1)[..., None].expand(-1, -1, logits.shape[-1]))
            teacher = torch.log_softmax(rows.view_as(logits).float() / t, dim=-1)
            student = torch.log_softmax(logits / t, dim=-1)
            per_slot = (teacher.exp() * (teacher - student)).sum(-1) * t * t
        weights = self.depth_weights * valid
        loss = (per_slot * weights).sum() / weights.sum()
        correct = (logits.argmax(-1) == labels) & valid
        accuracy = (correct.sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)).tolist()
        return loss, StepMetrics(loss=float(loss.detach()), accuracy=accuracy, blocks=int(real.sum()))

    # -- the loop -----------------------------------------------------------------------------

    def train(self, sequences: Sequence[TrainingSequence], *, steps: int, until: int | None = None,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
              evaluate: Callable[[DraftHead], dict] | None = None, eval_every: int = 0,
              progress: bool = True) -> list[dict]:
        """Train for ``steps`` steps in all, ``sequences_per_step`` sequences per step in a seeded shuffled order.

        A run can be split (e.g. across processes with a time limit): ``until`` stops after that step,
        and a trainer resuming from the checkpoint (:meth:`resume`) continues exactly where it stopped (the
        schedule always spans ``steps``). Returns the history: loss, per-depth accuracy, learning rate,
        and ``evaluate``'s results every ``eval_every`` steps."""
        if not sequences:
            raise ValueError("jetspec: no training sequences")
        if self.config.standardize_inputs and self.input_scale is None and not hasattr(self.head, "hidden_dim_adapter"):
            self.fit_input_scale(sequences)
        schedule = _warmup_cosine(steps, self.config.warmup)
        stop = steps if until is None else min(until, steps)
        bar = tqdm(total=stop, initial=self.state.step, desc="train-head", disable=not progress)
        while self.state.step < stop:
            lr = self.config.lr * schedule(self.state.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, metrics = self.batch_loss(self._step_sequences(sequences))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip))
            self.optimizer.step()
            self.state.step += 1
            record = {"step": self.state.step, "loss": metrics.loss, "accuracy": metrics.accuracy, "lr": lr,
                      "grad_norm": grad_norm}
            if evaluate is not None and eval_every and self.state.step % eval_every == 0:
                record["eval"] = evaluate(self.inference_head())
            self.state.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.loss:.3f}", acc=" ".join(f"{a:.2f}" for a in metrics.accuracy[:3]))
            if checkpoint_dir is not None and checkpoint_every and self.state.step % checkpoint_every == 0:
                self.save(checkpoint_dir)
        bar.close()
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        return self.state.history

    def _step_sequences(self, sequences: Sequence[TrainingSequence]) -> list[TrainingSequence]:
        """This step's sequences: draws ``step * k .. step * k + k - 1`` of a seeded shuffle per epoch."""
        n, k = len(sequences), self.config.sequences_per_step
        picked = []
        for draw in range(self.state.step * k, (self.state.step + 1) * k):
            epoch, index = divmod(draw, n)
            if self._shuffle[0] != (epoch, n):
                order = list(range(n))
                random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
                self._shuffle = ((epoch, n), order)
            picked.append(sequences[self._shuffle[1][index]])
        return picked

    @torch.no_grad()
    def fit_input_scale(self, sequences: Sequence[TrainingSequence], samples: int = 16) -> Tensor:
        """Measure s (the RMS of each tapped feature over the first ``samples`` sequences, leaving out
        position 0, the attention sink) and move ``fc`` into standardized coordinates, W' = W diag(s).
        Not for heads narrower than their target: the shared per-tap adapter before ``fc`` cannot fold s."""
        if self.input_scale is not None:
            raise RuntimeError("jetspec: the input scale is already fitted")
        total, count = None, 0
        for seq in sequences[:samples]:
            tokens = torch.tensor([seq.tokens], device=self.target.device)
            _, tapped = self.target.prefill(tokens, self.target.new_cache(1, tokens.shape[1]),
                                            self.head.spec.target_layer_ids)
            squares = tapped[0, 1:].float().pow(2).sum(0)
            total = squares if total is None else total + squares
            count += tokens.shape[1] - 1
        if not count:
            raise ValueError("jetspec: the input scale needs sequences of at least 2 tokens")
        self.input_scale = (total / count).sqrt().clamp(min=1e-3)
        self.head.fc.weight.mul_(self.input_scale)
        return self.input_scale

    def inference_head(self) -> DraftHead:
        """A copy of the head in the target's dtype and the published coordinates (fc.weight = W' diag(1/s)),
        in eval mode, for evaluation or saving."""
        head = copy.deepcopy(self.head)
        if self.input_scale is not None:
            head.fc.weight.data.div_(self.input_scale)
        return head.to(dtype=self.target.dtype).eval()

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
        """``folder/head`` (published format, the target's dtype) and ``folder/trainer`` (fp32 master
        weights, optimizer moments, step, history) to resume from. Safetensors and JSON only."""
        folder = Path(folder)
        save_head(self.inference_head(), folder / "head", max_shard_bytes=max_shard_bytes)
        save_head(self.head, folder / "trainer" / "master")
        moments = {}
        for i, p in enumerate(self.head.parameters()):
            for key, value in self.optimizer.state.get(p, {}).items():
                moments[f"{i}.{key}"] = value.detach().reshape(-1).float().cpu() if key == "step" else value.cpu()
        save_file(moments, str(folder / "trainer" / "optimizer.safetensors"))
        if self.input_scale is not None:
            save_file({"input_scale": self.input_scale.cpu()}, str(folder / "trainer" / "input_scale.safetensors"))
        (folder / "trainer" / "state.json").write_text(json.dumps(
            {"step": self.state.step, "history": self.state.history, "config": asdict(self.config)}, indent=1))
        return folder

    def resume(self, folder: str | Path) -> None:
        """Continue from :meth:`save`'s ``folder``: master weights, optimizer moments, step, history."""
        folder = Path(folder) / "trainer"
        master = load_head(folder / "master", dtype=torch.float32, device=self.target.device)
        if master.spec != self.head.spec:
            raise ValueError(f"jetspec: the checkpoint at {folder} is a different head ({master.spec})")
        self.head.load_state_dict(master.state_dict())
        moments = load_file(str(folder / "optimizer.safetensors"), device=str(self.target.device))
        for i, p in enumerate(self.head.parameters()):
            entries = {k.split(".", 1)[1]: v for k, v in moments.items() if k.split(".", 1)[0] == str(i)}
            if entries:
                entries["step"] = entries["step"].reshape(()).cpu()
                self.optimizer.state[p] = entries
        scale = folder / "input_scale.safetensors"
        self.input_scale = load_file(str(scale), device=str(self.target.device))["input_scale"] \
            if scale.exists() else None
        state = json.loads((folder / "state.json").read_text())
        self.state = TrainState(step=state["step"], history=state["history"])


def _warmup_cosine(steps: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
