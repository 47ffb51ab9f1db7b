"""Benchmark entry point: ``python -m bench.run --out bench/results/<name> [--only kv_compact]``.

Measures the device ceilings once, runs each selected benchmark, writes one
JSON per benchmark under ``--out`` and prints a table of each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import (bench_accept_greedy, bench_accept_sample, bench_budget, bench_build_tree, bench_draft_topk, bench_e2e, bench_kv_compact, bench_round,
               bench_rms_norm, bench_skinny_gemm, bench_tree_attention)
from .harness import Ceilings, Timer, device_info, print_table, write_results

BENCHMARKS = {"accept_greedy": bench_accept_greedy, "accept_sample": bench_accept_sample, "budget": bench_budget, "build_tree": bench_build_tree, "draft_topk": bench_draft_topk, "e2e": bench_e2e,
              "kv_compact": bench_kv_compact, "rms_norm": bench_rms_norm, "round": bench_round,
              "skinny_gemm": bench_skinny_gemm, "tree_attention": bench_tree_attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these benchmarks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a CUDA device")
    device = torch.device("cuda")
    timer = Timer(device)
    ceil = Ceilings.measure(timer)
    info = device_info(device)
    print(f"device: {info}\nceilings: copy {ceil.copy_gbps:.0f} GB/s, empty kernel {ceil.empty_kernel_ms * 1e3:.2f} us, "
          f"bf16 matmul {ceil.bf16_tflops:.0f} TFLOP/s")
    for name in args.only or sorted(BENCHMARKS):
        module = BENCHMARKS[name]
        rows = module.run(timer, ceil)
        path = write_results(args.out, name, {"device": info, "ceilings": ceil.as_dict(), "rows": rows})
        print_table(f"{name} ({path})", rows, module.COLUMNS)


if __name__ == "__main__":
    main()
