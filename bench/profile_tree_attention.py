"""Where tree_attention's time goes when it splits the prefix: the main kernel and the split combine,
timed separately under the torch profiler (L2 flushed before each call), at a 32k prefix for small trees.

    python -m bench.profile_tree_attention OUT.json
"""

from __future__ import annotations

import json
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import jetspec  # noqa: F401  (registers the ops)

from .bench_tree_attention import problem

PREFIX = 32768
NODES = [16, 64, 128]
CALLS = 20


def kernel_us(nodes: int) -> dict[str, float]:
    """Mean device time (us) of each tree_attention kernel over CALLS calls."""
    _, _, _, _, op = problem(nodes, PREFIX, torch.device("cuda"), torch.Generator().manual_seed(0))
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    op()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            flush.zero_()
            op()
        torch.cuda.synchronize()
    names = ((re.search(r"tree_attention_\w+", e.key), e) for e in prof.key_averages())
    return {name.group(0): e.device_time_total / e.count for name, e in names if name}


def main() -> None:
    results = {str(nodes): kernel_us(nodes) for nodes in NODES}
    for nodes, kernels in results.items():
        print(f"N = {nodes:>4} at {PREFIX}: " + ", ".join(f"{k} {v:.1f} us" for k, v in kernels.items()))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
