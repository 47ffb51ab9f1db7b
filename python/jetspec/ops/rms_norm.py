"""``jetspec::rms_norm`` (contract: ``cpp/rms_norm.cpp``): its typed wrapper and fake impl."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .library import use_kernel


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of ``x`` (HF Qwen3RMSNorm / LlamaRMSNorm numerics), with the decoder layer's
    residual add fused in front when ``residual`` is given.

    Where the build has no kernel for these arguments (see :func:`jetspec.ops.supports`; H above
    ``LIMITS["rms_norm"]["cuda"]["hidden"]`` on CUDA) this runs :func:`jetspec.ops.reference.rms_norm`.

    Args:
        x: ``[..., H]`` float32/bfloat16/float16.
        weight: ``[H]``, x's dtype.
        eps: added to the mean square.
        residual: ``[..., H]`` like ``x``, or None.

    Returns:
        ``out`` without ``residual``; ``(out, h)`` with it, ``h = x + residual`` being the residual stream the
        next layer adds to. Both new contiguous tensors of ``x``'s shape.
    """
    hidden = x.shape[-1]
    if not use_kernel("rms_norm", x.device, hidden=hidden):
        out, h = reference.rms_norm(x, weight, eps, residual)
        return out if residual is None else (out, h)
    flat = x.reshape(-1, hidden)
    flat_residual = None if residual is None else residual.reshape(-1, hidden)
    if x.device.type == "cuda":  # the CUDA kernel takes rows whose elements are dense
        flat = flat if flat.stride(-1) == 1 else flat.contiguous()
        if flat_residual is not None and flat_residual.stride(-1) != 1:
            flat_residual = flat_residual.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = flat.new_empty(flat.shape)
    h = None if residual is None else flat.new_empty(flat.shape)
    torch.ops.jetspec.rms_norm(flat, flat_residual, weight, eps, out, h)
    if h is None:
        return out.view(x.shape)
    return out.view(x.shape), h.view(x.shape)


@torch.library.register_fake("jetspec::rms_norm")
def _fake(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out: Tensor,
          residual_out: Tensor | None) -> None:
    torch._check(x.dim() == 2, lambda: "jetspec.rms_norm: 'x' must be 2-D")
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[1], lambda: "jetspec.rms_norm: 'weight' must be [H]")
    for name, t in (("residual", residual), ("out", out), ("residual_out", residual_out)):
        if t is not None:
            torch._check(t.shape == x.shape and t.dtype == x.dtype,
                         lambda: f"jetspec.rms_norm: '{name}' must have the shape and dtype of 'x'")
