"""A few rms_norm and skinny_gemm shapes for compute-sanitizer, one process, no pytest:

    compute-sanitizer --tool memcheck  python -m bench.sanitize_fused_ops
    compute-sanitizer --tool racecheck python -m bench.sanitize_fused_ops

skinny_gemm: every x-row block count (1, 2, 4, 8 n8 blocks), K split across clusters of several CTAs and
not split, K not a multiple of the 64-element stage, N and the gate/up halves not multiples of the tile,
each epilogue, strided out and residual. rms_norm: rows of 16 to 512 threads, the vector and the scalar
path (odd H, an unaligned pointer), float32, with and without the residual. Each result is checked against
the reference; the exit status is non-zero on a mismatch.
"""

from __future__ import annotations

import math
import sys

import torch

import jetspec  # noqa: F401  (registers the ops)
from jetspec.ops import reference

# (rows, K, N, epilogue, dtype)
GEMMS = [
    (1, 520, 130, 0, torch.bfloat16),  # 9 stages: a cluster of 2, a partial tile
    (7, 4096, 300, 1, torch.bfloat16),  # gate/up halves of 150 rows: 3 tiles, clusters of 8
    (16, 8200, 129, 2, torch.float16),  # K not a multiple of 64, 2 tiles
    (33, 1000, 1000, 2, torch.bfloat16),  # 8 blocks of x rows, 33 of them real
    (64, 256, 4096, 0, torch.bfloat16),  # 32 tiles, K split in 1 or 2
    (64, 4096, 258, 1, torch.float16),
]
# (rows, H, residual, dtype, element offset of x)
NORMS = [
    (5, 4096, True, torch.bfloat16, 0),  # 128 threads a row
    (300, 128, False, torch.bfloat16, 0),  # 16 threads a row, 16 rows a CTA
    (3, 16384, True, torch.float16, 0),  # 512 threads a row
    (4, 13, True, torch.bfloat16, 0),  # scalar path
    (9, 1000, True, torch.bfloat16, 1),  # unaligned: scalar path, 64 threads a row
    (6, 1024, True, torch.float32, 0),
]


def main() -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    failures = 0
    for rows, k, n, epilogue, dtype in GEMMS:
        x = torch.randn(rows, k, generator=g, device="cuda").to(dtype)
        w = (torch.randn(n, k, generator=g, device="cuda") / math.sqrt(k)).to(dtype)
        r = torch.randn(n, rows, generator=g, device="cuda").to(dtype).t() if epilogue == 2 else None  # strided
        n_out = n // 2 if epilogue == 1 else n
        out = torch.full((n_out, rows), float("nan"), device="cuda", dtype=dtype).t()  # strided
        torch.ops.jetspec.skinny_gemm(x, w, r, epilogue, out)
        want = reference.skinny_gemm(x, w, epilogue, r).float()
        err = float((out.float() - want).abs().max() / want.abs().max())
        ok = err < 2e-2
        failures += not ok
        print(f"skinny_gemm R={rows} K={k} N={n} epilogue={epilogue} {dtype}: max rel err {err:.1e} "
              f"{'ok' if ok else 'MISMATCH'}")
    for rows, hidden, with_residual, dtype, offset in NORMS:
        x = torch.randn(rows * hidden + offset, generator=g, device="cuda").to(dtype)[offset:].view(rows, hidden)
        r = torch.randn(rows, hidden, generator=g, device="cuda").to(dtype) if with_residual else None
        w = (1 + torch.randn(hidden, generator=g, device="cuda") / 4).to(dtype)
        out, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        torch.ops.jetspec.rms_norm(x, r, w, 1e-6, out, h)
        want_out, want_h = reference.rms_norm(x, w, 1e-6, r)
        err = float((out.float() - want_out.float()).abs().max() / want_out.float().abs().max())
        ok = err < 2e-2 and torch.equal(h, want_h)
        failures += not ok
        print(f"rms_norm R={rows} H={hidden} residual={with_residual} {dtype} offset={offset}: max rel err {err:.1e} "
              f"{'ok' if ok else 'MISMATCH'}")
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
