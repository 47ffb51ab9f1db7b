"""Training data by self-distillation: the target's own greedy responses to prompts, so the head learns
the target's distribution, not a dataset's."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.results import stop_tokens

__all__ = ["TrainingSequence", "self_distill", "save_sequences", "load_sequences"]


@dataclass
class TrainingSequence:
    """Prompt tokens followed by the target's greedy response."""

    tokens: list[int]
    prompt_len: int


@torch.no_grad()
def self_distill(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 16,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 progress: bool = True) -> list[TrainingSequence]:
    """The target's greedy responses to ``prompts`` (token ids), batched with left padding, each cut after
    its first stop token (``eos_token_id`` as for :meth:`SpeculativeGenerator.generate`)."""
    device = model.lm_head.weight.device
    eos = stop_tokens(model, eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: dict[int, TrainingSequence] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="self-distillation", disable=not progress):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        # HF generate reads eos None as "the model's eos", so "no stop token" is an id no logit can produce.
        stop = sorted(eos) or [model.lm_head.weight.shape[0]]
        generated = model.generate(ids.to(device), attention_mask=attention.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=stop,
                                   pad_token_id=pad_token_id)[:, width:].tolist()
        for row, i in enumerate(idx):
            response = []
            for token in generated[row]:
                response.append(token)
                if token in eos:
                    break
            results[i] = TrainingSequence(tokens=list(prompts[i]) + response, prompt_len=len(prompts[i]))
    return [results[i] for i in range(len(prompts))]


def save_sequences(sequences: Iterable[TrainingSequence], path: str | Path, append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        for s in sequences:
            f.write(json.dumps(asdict(s)) + "\n")


def load_sequences(path: str | Path) -> list[TrainingSequence]:
    with open(path) as f:
        return [TrainingSequence(**json.loads(line)) for line in f if line.strip()]
