"""rms_norm: the decoder layer's residual add + RMSNorm (Qwen3-8B, hidden 4096), against the memory floor.

The op reads x and the residual and writes out and h = x + residual (without a residual: reads x, writes
out); its floor is those bytes at the copy bandwidth measured in the same run (``ceil.copy_gbps``, bytes
read + written), and "floor/op" is the fraction of that floor reached (the bar: 80% for large R). Peers,
timed the same way: the HF modules' eager expression (``residual + x``, then Qwen3RMSNorm's float32
statistics) and ``torch.compile`` of it (rows dynamic; ``JETSPEC_BENCH_COMPILE=0`` skips it). Small R
(a decoding step) is launch-bound: there the number to read is the time, not the fraction.

"op ms" launches with programmatic dependent launch (a call's CTAs start while the previous call ends),
"no-PDL ms" without it (``JETSPEC_PDL=0``). Times are medians of CUDA-graph replays of 20 calls (L2 flushed before each replay; for small R the 20
calls then hit L2, as a decoding step's layers would).
"""

from __future__ import annotations

import time

import torch

import jetspec  # noqa: F401  (registers the ops)

from .harness import Ceilings, Timer, compile_peers, serial_launches

HIDDEN = [4096]
ROWS = [1, 16, 64, 4096, 16384, 65536]
EPS = 1e-6
REPS = 20


def hf_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
    """``residual + x`` then Qwen3RMSNorm.forward, as the HF decoder layer runs them."""
    h = x if residual is None else residual + x
    hidden = h.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + EPS)
    return weight * hidden.to(x.dtype), h


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    rows_out = []
    compiled = torch.compile(hf_norm, dynamic=True) if compile_peers() else None
    for hidden in HIDDEN:
        weight = (1 + torch.randn(hidden, device=timer.device) / 4).to(torch.bfloat16)
        for with_residual in (True, False):
            for rows in ROWS:
                x = torch.randn(rows, hidden, device=timer.device).to(torch.bfloat16)
                r = torch.randn(rows, hidden, device=timer.device).to(torch.bfloat16) if with_residual else None
                out = torch.empty_like(x)
                h = torch.empty_like(x) if with_residual else None
                moved = (4 if with_residual else 2) * x.numel() * x.element_size()
                floor_ms = moved / ceil.copy_gbps / 1e6

                def op():
                    torch.ops.jetspec.rms_norm(x, r, weight, EPS, out, h)

                t_op = timer.graph_ms(op, reps=REPS)
                with serial_launches():  # the same launches without programmatic dependent launch
                    t_op_serial = timer.graph_ms(op, reps=REPS)
                t_hf = timer.graph_ms(lambda: hf_norm(x, r, weight), reps=REPS)
                t_compiled = compile_s = None
                if compiled is not None:
                    start = time.perf_counter()
                    compiled(x, r, weight)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - start
                    t_compiled = timer.graph_ms(lambda: compiled(x, r, weight), reps=REPS)
                rows_out.append({
                    "hidden": hidden, "rows": rows, "residual": with_residual, "bytes": moved,
                    "ms": t_op, "serial_ms": t_op_serial, "torch_ms": t_hf, "compiled_ms": t_compiled, "compile_s": compile_s,
                    "speedup": t_hf / t_op, "speedup_compiled": None if t_compiled is None else t_compiled / t_op,
                    "gbps": moved / t_op / 1e6, "floor_ms": floor_ms, "of_ceiling": floor_ms / t_op,
                })
                del x, r, out, h
    return rows_out


COLUMNS = [
    ("hidden", "H", "d"),
    ("rows", "rows", "d"),
    ("residual", "residual", "d"),
    ("ms", "op ms", ".4f"),
    ("serial_ms", "no-PDL ms", ".4f"),
    ("torch_ms", "HF ms", ".4f"),
    ("compiled_ms", "compiled ms", ".4f"),
    ("speedup", "x HF", ".2f"),
    ("speedup_compiled", "x compiled", ".2f"),
    ("gbps", "GB/s", ".0f"),
    ("floor_ms", "floor ms", ".4f"),
    ("of_ceiling", "floor/op", ".1%"),
]
