"""``jetspec::build_tree`` (contract, argument checks and CPU kernel: ``cpp/build_tree.cpp``): its typed
wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from .library import use_kernel
from .tree import Tree, words_for


@torch.library.register_fake("jetspec::build_tree")
def _fake(topk_logprobs, topk_ids, root_token, base_pos, tokens, parents, depths, positions, ancestors,
          num_nodes) -> None:
    torch._check(topk_logprobs.dim() == 3 and topk_ids.shape == topk_logprobs.shape)
    torch._check(tokens.dim() == 2 and ancestors.dim() == 3)


def build_tree(topk_logprobs: Tensor, topk_ids: Tensor, root_token: Tensor, base_pos: Tensor, budget: int) -> Tree:
    """Build a best-first tree of ``budget`` nodes (root included) from per-depth top-K candidates.

    Runs the device's kernel where it supports these sizes, else the CPU kernel (the outputs come back
    to the inputs' device). The op checks the arguments (ValueError).

    Args:
        topk_logprobs: ``[B, D, K]`` float32 full-vocabulary log-probs, descending along K.
        topk_ids: ``[B, D, K]`` int64 token ids.
        root_token: ``[B]`` int64 anchor tokens.
        base_pos: ``[B]`` int64 position of each root.
        budget: nodes per tree including the root (the output width N).
    """
    device = topk_logprobs.device
    # Sizes only to allocate the outputs: a malformed topk_logprobs (or budget) gets as far as the op,
    # which names it.
    batch, depth, width = (*topk_logprobs.shape, 0, 0, 0)[:3]
    nodes = max(budget, 0)
    on = device if use_kernel("build_tree", device, depth=depth, width=width, nodes=nodes) else torch.device("cpu")
    inputs = (topk_logprobs, topk_ids, root_token, base_pos)
    if all(t.device == device for t in inputs):  # else left where they are, for the op to reject
        inputs = tuple(t.to(on) for t in inputs)
    out = Tree(
        tokens=torch.empty(batch, nodes, dtype=torch.long, device=on),
        parents=torch.empty(batch, nodes, dtype=torch.long, device=on),
        depths=torch.empty(batch, nodes, dtype=torch.long, device=on),
        positions=torch.empty(batch, nodes, dtype=torch.long, device=on),
        ancestors=torch.empty(batch, nodes, words_for(nodes), dtype=torch.int32, device=on),
        num_nodes=torch.empty(batch, dtype=torch.long, device=on),
    )
    torch.ops.jetspec.build_tree(*inputs, *out)
    return out if on == device else Tree(*(t.to(device) for t in out))
