"""``jetspec::build_tree`` (contract: ``cpp/build_tree.cpp``): its typed wrapper, fake impl and CPU kernel
(the float64 heap of :func:`jetspec.ops.reference.build_tree`, which the CUDA kernel matches bit for bit)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import use_kernel
from .tree import Tree, words_for


def _check(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, budget: int) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"jetspec.build_tree: {msg}")

    if topk_logprobs.dtype != torch.float32:
        fail(f"'topk_logprobs' must have dtype float32, got {topk_logprobs.dtype}")
    if topk_ids.dtype != torch.long:
        fail(f"'topk_ids' must have dtype int64, got {topk_ids.dtype}")
    if topk_logprobs.dim() != 3 or topk_ids.shape != topk_logprobs.shape:
        fail(f"'topk_logprobs' and 'topk_ids' must both be [batch, depth, width], got {tuple(topk_logprobs.shape)} "
             f"and {tuple(topk_ids.shape)}")
    batch, _, width = topk_logprobs.shape
    if width < 1:
        fail("the candidate width K must be at least 1")
    for name, t in (("root_token", root_token), ("base_pos", base_pos)):
        if t.dtype != torch.long or t.shape != (batch,):
            fail(f"'{name}' must be int64 of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("topk_ids", topk_ids), ("root_token", root_token), ("base_pos", base_pos)):
        if t.device != topk_logprobs.device:
            fail(f"'{name}' is on {t.device} but 'topk_logprobs' is on {topk_logprobs.device}")
    if budget < 1:
        fail(f"the budget (nodes including the root) must be at least 1, got {budget}")


def _check_outputs(batch, budget, tokens, parents, depths, positions, ancestors, num_nodes) -> None:
    for name, t in (("tokens", tokens), ("parents", parents), ("depths", depths), ("positions", positions)):
        if t.dtype != torch.long or t.shape != (batch, budget):
            raise ValueError(f"jetspec.build_tree: '{name}' must be int64 [{batch}, {budget}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if ancestors.dtype != torch.int32 or ancestors.shape != (batch, budget, words_for(budget)):
        raise ValueError(f"jetspec.build_tree: 'ancestors' must be int32 [{batch}, {budget}, {words_for(budget)}], "
                         f"got {ancestors.dtype} {tuple(ancestors.shape)}")
    if num_nodes.dtype != torch.long or num_nodes.shape != (batch,):
        raise ValueError(f"jetspec.build_tree: 'num_nodes' must be int64 [{batch}]")


@torch.library.impl("jetspec::build_tree", "CPU")
def _build_tree_cpu(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, tokens: Tensor,
                    parents: Tensor, depths: Tensor, positions: Tensor, ancestors: Tensor, num_nodes: Tensor) -> None:
    budget = tokens.shape[1]
    _check(topk_logprobs, topk_ids, root_token, base_pos, budget)
    _check_outputs(topk_logprobs.shape[0], budget, tokens, parents, depths, positions, ancestors, num_nodes)
    for out, value in zip((tokens, parents, depths, positions, ancestors, num_nodes),
                          reference.build_tree(topk_logprobs, topk_ids, root_token, base_pos, budget)):
        out.copy_(value)


@torch.library.register_fake("jetspec::build_tree")
def _fake(topk_logprobs, topk_ids, root_token, base_pos, tokens, parents, depths, positions, ancestors,
          num_nodes) -> None:
    torch._check(topk_logprobs.dim() == 3 and topk_ids.shape == topk_logprobs.shape)
    torch._check(tokens.dim() == 2 and ancestors.dim() == 3)


def build_tree(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, budget: int) -> Tree:
    """Build a best-first tree of ``budget`` nodes (root included) from per-depth top-K candidates.

    Args:
        topk_logprobs: ``[B, D, K]`` float32 full-vocabulary log-probs, descending along K.
        topk_ids: ``[B, D, K]`` int64 token ids.
        root_token: ``[B]`` int64 anchor tokens.
        base_pos: ``[B]`` int64 position of each root.
        budget: nodes per tree including the root (the output width N).
    """
    _check(topk_logprobs, topk_ids, root_token, base_pos, budget)
    device = topk_logprobs.device
    _, depth, width = topk_logprobs.shape
    on = device if use_kernel("build_tree", device, depth=depth, width=width, nodes=budget) else torch.device("cpu")
    batch = topk_logprobs.shape[0]
    out = Tree(
        tokens=torch.empty(batch, budget, dtype=torch.long, device=on),
        parents=torch.empty(batch, budget, dtype=torch.long, device=on),
        depths=torch.empty(batch, budget, dtype=torch.long, device=on),
        positions=torch.empty(batch, budget, dtype=torch.long, device=on),
        ancestors=torch.empty(batch, budget, words_for(budget), dtype=torch.int32, device=on),
        num_nodes=torch.empty(batch, dtype=torch.long, device=on),
    )
    torch.ops.jetspec.build_tree(topk_logprobs.to(on), topk_ids.to(on), root_token.to(on), base_pos.to(on), *out)
    return out if on == device else Tree(*(t.to(device) for t in out))
