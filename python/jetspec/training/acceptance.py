"""Acceptance lengths of a draft head without running the decoder: teacher-forced replay.

Greedy speculative decoding is lossless, so what it commits is the target's greedy continuation
``y``, known in advance. A round anchored at position n (anchor ``y[n]``, the target's states of
``y[:n]`` committed) drafts from the same context a single causal target forward over ``y`` computes
at rows < n, and it commits 1 + the length of the longest tree path spelling ``y[n+1], y[n+2], ...``.
So one target forward and one packed head forward over every anchor give every possible round's
outcome, for every (budget, width) at once; the rounds then chain n -> n + committed, as the decoder's do.

It is exact up to float rounding: the decoder computes the same states in pieces (prefill, then one
tree per round), whose rounding differs from one causal forward's; a draft's top-K can differ only at
near-ties (tests check equality with :class:`~jetspec.SpeculativeGenerator` in fp32).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..heads import DraftHead, check_head_fits_target
from ..runtime.drafters import candidates
from ..runtime.generator import SpeculativeGenerator
from ..runtime.target import Target
from .blocks import anchored_blocks

__all__ = ["replay_acceptance", "matched_depth", "evaluate_acceptance"]


def matched_depth(tokens: Tensor, parents: Tensor, depths: Tensor, num_nodes: Tensor, truth: Tensor) -> Tensor:
    """``[A]`` depth of the deepest node of each tree whose root path spells ``truth[a, 1:]``.

    ``tokens/parents/depths`` ``[A, N]`` as :func:`~jetspec.ops.build_tree` returns them; ``truth``
    ``[A, D + 1]``: the true continuation after each root (-1 where unknown, matching nothing)."""
    real = torch.arange(tokens.shape[1], device=tokens.device) < num_nodes[:, None]
    expected = truth.gather(1, depths.clamp(max=truth.shape[1] - 1))
    agrees = real & (tokens == expected) & (depths < truth.shape[1])
    matched = torch.zeros_like(agrees)
    matched[:, 0] = True
    for d in range(1, truth.shape[1]):  # a node's parent is one level up, settled by the previous pass
        matched |= agrees & (depths == d) & matched.gather(1, parents.clamp(min=0))
    return torch.where(matched, depths, torch.zeros_like(depths)).amax(1)


@torch.no_grad()
def replay_acceptance(model: nn.Module, head: DraftHead, tokens: Sequence[int], prompt_len: int, new_tokens: int,
                      configs: Sequence[tuple[int, int]], depth: int | None = None) -> dict[tuple[int, int], list[int]]:
    """Per (budget, width) in ``configs``: the tokens each round commits when decoding ``new_tokens``
    tokens after ``tokens[:prompt_len]`` (``GenerationStats.accept_lengths`` of the same generation).

    ``tokens``: the prompt followed by the target's greedy continuation; it should extend ``depth``
    tokens past ``prompt_len + new_tokens`` (positions past its end match nothing). ``depth``: as for
    :class:`~jetspec.SpeculativeGenerator` (default: the head's)."""
    target = Target(model)
    check_head_fits_target(head, target.config)
    head = head.to(device=target.device, dtype=target.dtype)
    spec = head.spec
    max_depth = min(depth or spec.depth, spec.depth)
    if not 1 <= prompt_len < len(tokens) or new_tokens < 1 or prompt_len + new_tokens > len(tokens):
        raise ValueError(f"jetspec: need 1 <= prompt_len < len(tokens) and prompt_len + new_tokens <= len(tokens); "
                         f"got prompt_len {prompt_len}, new_tokens {new_tokens}, {len(tokens)} tokens")
    seq = torch.tensor([list(tokens)], device=target.device)
    _, tapped = target.prefill(seq, target.new_cache(1, seq.shape[1]), spec.target_layer_ids)
    # Anchors a = prompt_len .. prompt_len + new_tokens - 2: the last token is owed by the round before.
    anchors = torch.arange(prompt_len, prompt_len + max(new_tokens - 1, 1), device=target.device)
    hidden = anchored_blocks(head, target, seq, tapped, anchors[None])[0]  # [A, block, H]
    widest = max(width for _, width in configs)
    logprobs, ids = candidates(target, hidden[:, 1:], widest)
    padded = torch.cat([seq[0], seq.new_full((max_depth + 1,), -1)])
    truth = padded[anchors[:, None] + torch.arange(max_depth + 1, device=target.device)]  # [A, D + 1]
    rounds = {}
    for budget, width in configs:
        d = min(max_depth, budget - 1)
        if d == 0:  # budget 1: plain decoding commits one token per round
            committed = torch.ones_like(anchors)
        else:
            tree = ops.build_tree(logprobs[:, :d, :width].contiguous(), ids[:, :d, :width].contiguous(), truth[:, 0],
                              anchors, budget)
            committed = 1 + matched_depth(tree.tokens, tree.parents, tree.depths, tree.num_nodes, truth[:, :d + 1])
        rounds[(budget, width)] = _chain(committed.tolist(), new_tokens)
    return rounds


def _chain(committed: list[int], new_tokens: int) -> list[int]:
    """Follow the rounds: the one anchored at offset k commits ``committed[k]`` tokens, the next is anchored
    that many positions later; the prefill emitted the first token, rounds run while tokens are owed."""
    lengths, offset = [], 0
    while 1 + offset < new_tokens:  # tokens emitted so far: the prefill's + every round's
        lengths.append(committed[offset])
        offset += committed[offset]
    return lengths


def evaluate_acceptance(model: nn.Module, head: DraftHead, prompts: Sequence[Sequence[int]], *, budget: int = 64,
                        width: int = 8, max_new_tokens: int = 64, eos_token_id=None) -> dict:
    """Mean acceptance length (tokens committed per round) of ``head`` over ``prompts``."""
    gen = SpeculativeGenerator(model, head, budget=budget, width=width)
    lengths: list[int] = []
    device = model.lm_head.weight.device
    for prompt in prompts:
        out = gen.generate(torch.tensor([list(prompt)], device=device), max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id)
        lengths += out.stats.accept_lengths
    return {"tau": sum(lengths) / max(len(lengths), 1), "rounds": len(lengths)}
