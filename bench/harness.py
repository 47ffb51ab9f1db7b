"""Timing and device ceilings shared by every benchmark.

Every kernel time is the median over many runs of a CUDA graph that replays
the call ``reps`` times back to back (so host dispatch is out of the number),
with the L2 cache flushed before each replay (so repeated runs do not measure
the cache). Ceilings are measured in the same process, never taken from a
datasheet.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timer:
    device: torch.device
    iters: int = 30
    _flush: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)

    def graph_ms(self, fn: Callable[[], object], reps: int = 100, flush_l2: bool = True) -> float:
        """Median GPU time of one call of ``fn``, from graph replays of ``reps`` calls (the replay's own
        launch cost is spread over them: compare only times taken with similar ``reps``).

        ``flush_l2=False`` keeps what the previous replay left in L2: the state a decoding
        round leaves for small moves, whose rows the verify forward has just written."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph: lazy init, autotuning
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        return self._median(graph.replay, flush_l2) / reps

    def eager_ms(self, fn: Callable[[], object], reps: int = 20) -> float:
        """Median time per call of ``fn`` issued from Python, host dispatch included."""
        for _ in range(3):
            fn()

        def run() -> None:
            for _ in range(reps):
                fn()

        return self._median(run) / reps

    def _median(self, run: Callable[[], object], flush_l2: bool = True) -> float:
        run()
        times = []
        for _ in range(self.iters):
            if flush_l2:
                self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


@dataclass
class Ceilings:
    """What this device was measured to do, in this run."""

    copy_gbps: float  # device-to-device copy, bytes read + bytes written
    empty_kernel_ms: float  # one empty kernel, replayed from a graph
    bf16_tflops: float  # a large bf16 matmul (cuBLAS): the tensor-core peak a kernel can be held to

    @staticmethod
    def measure(timer: Timer) -> "Ceilings":
        # Eager, not graphed: inside a graph a device-to-device copy may become a copy-engine node,
        # which is slower than the SM copy kernel a real program gets.
        n = 1 << 29
        src = torch.randn(n, device=timer.device)
        dst = torch.empty_like(src)
        copy_ms = timer.eager_ms(lambda: dst.copy_(src), reps=3)
        del src, dst
        m = 8192
        a, b = (torch.randn(m, m, device=timer.device, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        mm_ms = timer.graph_ms(lambda: torch.mm(a, b, out=c), reps=10)
        return Ceilings(copy_gbps=2 * 4 * n / copy_ms / 1e6, empty_kernel_ms=timer.graph_ms(_empty_kernel()),
                        bf16_tflops=2 * m**3 / mm_ms / 1e9)

    def as_dict(self) -> dict:
        return {"copy_gbps": self.copy_gbps, "empty_kernel_ms": self.empty_kernel_ms, "bf16_tflops": self.bf16_tflops}


def _empty_kernel() -> Callable[[], object]:
    """A kernel that does nothing (Triton), or the smallest torch kernel where Triton is missing."""
    try:
        import triton

        @triton.jit
        def empty():
            pass

        return lambda: empty[(1,)]()
    except ImportError:  # pragma: no cover
        one = torch.empty(1, device="cuda")
        return lambda: one.fill_(0)


def device_info(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return {
        "name": p.name,
        "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def write_results(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    print(f"\n{title}")
    headers = [h for _, h, _ in columns]
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def cold_weights(rows: int, cols: int, device: torch.device) -> list[torch.Tensor]:
    """A random bf16 ``[rows, cols]`` weight (seeded by its shape) and enough copies of it that cycling
    through them misses L2: every timed call streams its weight from HBM, as a forward does."""
    g = torch.Generator(device=device).manual_seed(rows + cols)
    weight = (torch.randn(rows, cols, generator=g, device=device) / math.sqrt(cols)).to(torch.bfloat16)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(1, math.ceil(3 * l2 / (weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(copies - 1)]


@contextlib.contextmanager
def serial_launches():
    """JETSPEC_PDL=0 inside (the ops read it at every launch): the kernels launched without programmatic
    dependent launch, for comparison."""
    before = os.environ.get("JETSPEC_PDL")
    os.environ["JETSPEC_PDL"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["JETSPEC_PDL"]
        else:
            os.environ["JETSPEC_PDL"] = before


def compile_peers() -> bool:
    """Whether to time torch.compile peers (slow to build): unless JETSPEC_BENCH_COMPILE=0."""
    return os.environ.get("JETSPEC_BENCH_COMPILE", "1") != "0"
