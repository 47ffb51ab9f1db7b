"""``jetspec::accept_greedy`` (contract: ``cpp/accept_greedy.cpp``): its typed wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import use_kernel


def accept_greedy(
    tokens: Tensor, parents: Tensor, target_ids: Tensor, num_nodes: Tensor, max_accept: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy acceptance of a verified tree, without a host sync.

    Args:
        tokens, parents, target_ids: ``[batch, N]`` int64 node tokens, parent indices (root: -1) and the
            target's prediction at each node.
        num_nodes: ``[batch]`` int64 nodes in use per row.
        max_accept: capacity of the accepted path (default ``N``); longer matches are cut, losslessly.

    Returns:
        ``(accepted [batch, max_accept], accept_len [batch], bonus [batch])``, all int64.
    """
    m = tokens.shape[-1] if max_accept is None else max_accept
    if not use_kernel("accept_greedy", tokens.device, nodes=tokens.shape[-1]):
        return reference.accept_greedy(tokens, parents, target_ids, num_nodes, m)
    batch = tokens.shape[0]
    accepted = tokens.new_empty((batch, m))
    accept_len = tokens.new_empty((batch,))
    bonus = tokens.new_empty((batch,))
    torch.ops.jetspec.accept_greedy(tokens, parents, target_ids, num_nodes, accepted, accept_len, bonus)
    return accepted, accept_len, bonus


@torch.library.register_fake("jetspec::accept_greedy")
def _fake(tokens: Tensor, parents: Tensor, target_ids: Tensor, num_nodes: Tensor, accepted: Tensor,
          accept_len: Tensor, bonus: Tensor) -> None:
    for name, t in (("tokens", tokens), ("parents", parents), ("target_ids", target_ids)):
        torch._check(t.dtype == torch.long, lambda: f"jetspec.accept_greedy: '{name}' must be int64")
        torch._check(t.shape == tokens.shape, lambda: f"jetspec.accept_greedy: '{name}' shape mismatch")
    torch._check(accepted.dim() == 2 and accepted.shape[0] == tokens.shape[0])
