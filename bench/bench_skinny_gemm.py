"""skinny_gemm: a decoding step's projections (1-64 rows against Qwen3-8B's weights), against the weight-read floor.

The op streams the [N, K] weight once; its floor is the weight's bytes at the copy bandwidth measured in
the same run (``ceil.copy_gbps``, bytes read + written; a read-only stream can beat it a little), and
"floor/op" is the fraction of that floor reached (the bar: 90%). Peers, timed the same way: the HF
modules' own computation (``F.linear`` on cuBLAS, then the epilogue in torch: ``act_fn(gate) * up`` or
``residual + y``), ``F.linear`` alone, and ``torch.compile`` of the HF expression (rows dynamic, one
compile per projection; ``JETSPEC_BENCH_COMPILE=0`` skips it).

"op ms" launches with programmatic dependent launch (each call starts streaming its weight while the
one before finishes, as consecutive projections of a forward would), "no-PDL ms" without it
(``JETSPEC_PDL=0``: each call waits for the previous one to end before it starts).

Times are medians of CUDA-graph replays of 20 calls (L2 flushed before each replay). Weights smaller than
3x L2 are cycled through several copies, so that back-to-back calls inside a replay read them from
memory, as a decoding step's layers would.
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F

import jetspec  # noqa: F401  (registers the ops)
from jetspec.ops import Epilogue

from .harness import Ceilings, Timer, cold_weights, compile_peers, serial_launches

# Qwen3-8B (hidden 4096, 32 query / 8 kv heads of 128, intermediate 12288): (name, K, N, epilogue)
PROJECTIONS = [
    ("o_proj+res", 4096, 4096, Epilogue.RESIDUAL),
    ("qkv", 4096, 6144, Epilogue.NONE),
    ("gate_up+silu", 4096, 24576, Epilogue.SILU_MUL),
    ("down+res", 12288, 4096, Epilogue.RESIDUAL),
]
ROWS = [1, 8, 16, 32, 64]
REPS = 20


def _hf(epilogue: Epilogue):
    """The HF modules' computation for this epilogue."""
    def linear(x, w, r):
        return F.linear(x, w)

    def silu_mul(x, w, r):
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        return F.silu(gate) * up

    def residual(x, w, r):
        return r + F.linear(x, w)

    return {Epilogue.NONE: linear, Epilogue.SILU_MUL: silu_mul, Epilogue.RESIDUAL: residual}[epilogue]


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    rows_out = []
    compile_peer = compile_peers()
    for name, k, n, epilogue in PROJECTIONS:
        weights = cold_weights(n, k, timer.device)
        weight_bytes = weights[0].numel() * weights[0].element_size()
        floor_ms = weight_bytes / ceil.copy_gbps / 1e6
        n_out = n // 2 if epilogue == Epilogue.SILU_MUL else n
        hf = _hf(epilogue)
        compiled = torch.compile(hf, dynamic=True) if compile_peer else None
        compile_s = None
        for rows in ROWS:
            x = torch.randn(rows, k, device=timer.device).to(torch.bfloat16)
            r = torch.randn(rows, n, device=timer.device).to(torch.bfloat16) if epilogue == Epilogue.RESIDUAL else None
            out = torch.empty(rows, n_out, device=timer.device, dtype=torch.bfloat16)
            cycle = itertools.cycle(weights)

            def op():
                torch.ops.jetspec.skinny_gemm(x, next(cycle), r, int(epilogue), out)

            t_op = timer.graph_ms(op, reps=REPS)
            with serial_launches():  # the same launches without programmatic dependent launch
                t_op_serial = timer.graph_ms(op, reps=REPS)
            t_hf = timer.graph_ms(lambda: hf(x, next(cycle), r), reps=REPS)
            t_linear = timer.graph_ms(lambda: F.linear(x, next(cycle)), reps=REPS)
            t_compiled = None
            if compiled is not None:
                start = time.perf_counter()
                compiled(x, weights[0], r)  # compiles (or recompiles) outside the timing
                torch.cuda.synchronize()
                compile_s = max(compile_s or 0.0, time.perf_counter() - start)
                t_compiled = timer.graph_ms(lambda: compiled(x, next(cycle), r), reps=REPS)
            flops = 2 * rows * n * k
            rows_out.append({
                "projection": name, "k": k, "n": n, "epilogue": epilogue.name.lower(), "rows": rows,
                "weight_bytes": weight_bytes, "weight_copies": len(weights),
                "ms": t_op, "serial_ms": t_op_serial, "torch_ms": t_hf, "linear_ms": t_linear, "compiled_ms": t_compiled,
                "compile_s": compile_s, "speedup": t_hf / t_op,
                "gbps": weight_bytes / t_op / 1e6, "tflops": flops / t_op / 1e9,
                "floor_ms": floor_ms, "of_ceiling": floor_ms / t_op,
            })
        del weights
    return rows_out


COLUMNS = [
    ("projection", "projection", "s"),
    ("rows", "rows", "d"),
    ("ms", "op ms", ".4f"),
    ("serial_ms", "no-PDL ms", ".4f"),
    ("torch_ms", "HF ms", ".4f"),
    ("linear_ms", "linear ms", ".4f"),
    ("compiled_ms", "compiled ms", ".4f"),
    ("speedup", "x HF", ".2f"),
    ("gbps", "GB/s", ".0f"),
    ("tflops", "TFLOP/s", ".0f"),
    ("floor_ms", "floor ms", ".4f"),
    ("of_ceiling", "floor/op", ".1%"),
]
