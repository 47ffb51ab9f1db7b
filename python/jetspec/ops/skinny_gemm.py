"""``jetspec::skinny_gemm`` (contract: ``cpp/skinny_gemm.cpp``): its typed wrapper, epilogue enum and fake impl."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor

from .library import use_kernel


class Epilogue(enum.IntEnum):
    """The op's ``epilogue`` argument: what is applied to ``y = x @ weight.T`` before it is written."""

    NONE = 0  #: ``y``
    SILU_MUL = 1  #: ``silu(y[..., :N/2]) * y[..., N/2:]``, weight packed as ``[gate; up]``
    RESIDUAL = 2  #: ``y + residual``


def _cuda_kernel_takes(x: Tensor, weight: Tensor) -> bool:
    """Whether the CUDA kernel reads these operands as they are (see the contract). Storage offsets rather
    than data pointers, so that torch.compile can trace it: allocations themselves are 16-byte aligned."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.shape[-1] % 8 != 0:
        return False
    return all(t.stride(-1) == 1 and t.stride(0) % 8 == 0 and t.storage_offset() % 8 == 0 for t in (x, weight))


def skinny_gemm(x: Tensor, weight: Tensor, epilogue: Epilogue | int = Epilogue.NONE,
                residual: Tensor | None = None) -> Tensor:
    """``x @ weight.T`` (float32 accumulation) with ``epilogue`` fused, for the few rows of a decoding step.

    Runs the op where it has a kernel for the arguments: on CUDA, bfloat16/float16 with at most
    ``LIMITS["skinny_gemm"]["cuda"]["rows"]`` rows, K a multiple of 8 and rows 16-byte aligned (``x`` is made
    contiguous if only its layout is in the way). Elsewhere it runs ``torch.nn.functional.linear`` and the
    epilogue in torch, the HF modules' own computation.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]`` nn.Linear weight (no bias), x's dtype; ``[gate; up]`` (``[2I, K]``) for SILU_MUL.
        epilogue: :class:`Epilogue`.
        residual: ``[..., N]`` like the output, for RESIDUAL only.

    Returns:
        ``[..., N]`` (``[..., N/2]`` for SILU_MUL), x's dtype.
    """
    epilogue = int(epilogue)  # a plain int: Epilogue(...) does not trace under torch.compile (torch 2.11)
    if epilogue not in (Epilogue.NONE, Epilogue.SILU_MUL, Epilogue.RESIDUAL):
        raise ValueError(f"jetspec.skinny_gemm: epilogue must be 0 (none), 1 (silu_mul) or 2 (residual), got {epilogue}")
    k, n = x.shape[-1], weight.shape[0]
    n_out = n // 2 if epilogue == Epilogue.SILU_MUL else n
    flat = x.reshape(-1, k)
    rows = flat.shape[0]
    flat_residual = None if residual is None else residual.reshape(rows, n)
    use = use_kernel("skinny_gemm", x.device, rows=rows)
    if use and x.device.type == "cuda":
        if not _cuda_kernel_takes(flat, weight) and _cuda_kernel_takes(flat.contiguous(), weight):
            flat = flat.contiguous()
        use = _cuda_kernel_takes(flat, weight)
    if not use:
        y = F.linear(x, weight)
        if epilogue == Epilogue.SILU_MUL:
            gate, up = y.chunk(2, dim=-1)
            return F.silu(gate) * up
        return residual + y if epilogue == Epilogue.RESIDUAL else y
    out = flat.new_empty((rows, n_out))
    torch.ops.jetspec.skinny_gemm(flat, weight, flat_residual, epilogue, out)
    return out.view(*x.shape[:-1], n_out)


@torch.library.register_fake("jetspec::skinny_gemm")
def _fake(x: Tensor, weight: Tensor, residual: Tensor | None, epilogue: int, out: Tensor) -> None:
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: "jetspec.skinny_gemm: 'x' [R, K] and 'weight' [N, K]")
    n_out = weight.shape[0] // 2 if epilogue == 1 else weight.shape[0]
    torch._check(out.shape == (x.shape[0], n_out) and out.dtype == x.dtype,
                 lambda: "jetspec.skinny_gemm: 'out' must be [R, N] ([R, N / 2] for silu_mul), x's dtype")
    torch._check((residual is not None) == (epilogue == 2),
                 lambda: "jetspec.skinny_gemm: 'residual' with the residual epilogue only")
