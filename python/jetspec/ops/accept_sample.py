"""``jetspec::accept_sample`` (contract: ``cpp/accept_sample.cpp``): its typed wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import use_kernel


def _per_row(value: Tensor | float | int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scalar or per-row value as the op's ``[batch]`` tensor (no host round trip for a device tensor)."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(batch).contiguous()
    return torch.full((batch,), value, dtype=dtype, device=device)


def accept_sample(
    tokens: Tensor,
    parents: Tensor,
    logits: Tensor,
    num_nodes: Tensor,
    temperature: Tensor | float,
    top_k: Tensor | int = 0,
    top_p: Tensor | float = 1.0,
    *,
    seed: Tensor | int,
    offset: Tensor,
    max_accept: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless speculative sampling of a verified tree, without a host sync.

    Args:
        tokens, parents: ``[batch, N]`` int64 node tokens and parent indices (root: -1).
        logits: ``[batch, N, V]`` float32/bfloat16/float16, the target's logits at every node.
        num_nodes: ``[batch]`` int64 nodes in use per row.
        temperature, top_k, top_p: per-row tensors or scalars (0 = greedy; top_k 0 and top_p 1 = off),
            applied in HF ``generate``'s order.
        seed: int64 tensor of one value (or an int, copied to the device: pass a tensor under CUDA graphs).
        offset: int64 tensor of one value on the logits' device, advanced by 1 in place by every call, so
            that calls (and CUDA-graph replays) draw fresh numbers.
        max_accept: capacity of the accepted path (default ``N``).

    Returns:
        ``(accepted [batch, max_accept], accept_len [batch], bonus [batch])``, all int64; the committed
        tokens are ``tokens[accepted[1:accept_len]]`` then ``bonus``.
    """
    batch, nodes = tokens.shape
    m = nodes if max_accept is None else max_accept
    device = tokens.device
    temperature = _per_row(temperature, batch, torch.float32, device)
    top_k = _per_row(top_k, batch, torch.long, device)
    top_p = _per_row(top_p, batch, torch.float32, device)
    if not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.long, device=device)
    if not use_kernel("accept_sample", device, vocab=logits.shape[-1]):
        uniforms = reference.philox_uniforms(int(seed), int(offset), batch, nodes)
        out = reference.accept_sample(tokens, parents, logits, num_nodes, temperature, top_k, top_p, uniforms, m)
        offset.add_(1)
        return out
    accepted = tokens.new_empty((batch, m))
    accept_len = tokens.new_empty((batch,))
    bonus = tokens.new_empty((batch,))
    torch.ops.jetspec.accept_sample(tokens, parents, logits, num_nodes, temperature, top_k, top_p, seed, offset,
                                    accepted, accept_len, bonus)
    return accepted, accept_len, bonus


@torch.library.register_fake("jetspec::accept_sample")
def _fake(tokens: Tensor, parents: Tensor, logits: Tensor, num_nodes: Tensor, temperature: Tensor, top_k: Tensor,
          top_p: Tensor, seed: Tensor, offset: Tensor, accepted: Tensor, accept_len: Tensor, bonus: Tensor) -> None:
    for name, t in (("tokens", tokens), ("parents", parents)):
        torch._check(t.dtype == torch.long, lambda: f"jetspec.accept_sample: '{name}' must be int64")
        torch._check(t.shape == tokens.shape, lambda: f"jetspec.accept_sample: '{name}' shape mismatch")
    torch._check(logits.dim() == 3 and logits.shape[:2] == tokens.shape,
                 lambda: "jetspec.accept_sample: 'logits' must be [batch, N, V]")
    torch._check(temperature.dtype == torch.float32 and top_p.dtype == torch.float32 and top_k.dtype == torch.long)
    torch._check(seed.numel() == 1 and offset.numel() == 1 and offset.dtype == torch.long)
    torch._check(accepted.dim() == 2 and accepted.shape[0] == tokens.shape[0])
