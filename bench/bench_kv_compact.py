"""kv_compact on Qwen3-8B cache shapes: one launch for all 36 layers x {K, V}.

Times are L2-cold (flushed before each replay) unless marked hot. Compared in the same run with: an empty kernel (the launch floor), the measured
copy bandwidth (the byte floor), a per-layer torch loop (what a driver without
the op does: one gather + one scatter per plane) and one all-planes torch
advanced-indexing assignment (the best torch peer).
"""

from __future__ import annotations

import torch

import jetspec  # noqa: F401  (registers the ops)

from .harness import Ceilings, Timer

LAYERS, KV_HEADS, HEAD_DIM = 36, 8, 128
PATH_LENGTHS = [1, 2, 4, 8, 16, 32, 1024, 2048, 4096]


def _case(m: int, device: torch.device):
    prefix = 4096
    slots = prefix + 2 * m + 64
    cache = torch.randn(LAYERS * 2, 1, slots, KV_HEADS * HEAD_DIM, dtype=torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(m)
    span = 2 * m
    path = torch.cat([torch.zeros(1, dtype=torch.long), (torch.randperm(span - 1, generator=g)[: m - 1] + 1).sort().values])
    accepted = path.view(1, m).to(device)
    return cache, accepted, torch.tensor([m], device=device), torch.tensor([prefix], device=device)


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    rows = []
    for m in PATH_LENGTHS:
        cache, accepted, accept_len, base = _case(m, timer.device)
        src = (base + accepted[0]).clone()
        dst = (base + torch.arange(m, device=timer.device)).clone()
        moved = int((accepted[0] != torch.arange(m, device=timer.device)).sum())
        bytes_moved = 2 * moved * LAYERS * 2 * KV_HEADS * HEAD_DIM * cache.element_size()  # read + write

        def op():
            torch.ops.jetspec.kv_compact(cache, accepted, accept_len, base)

        def per_layer_loop():
            for p in range(cache.shape[0]):
                cache[p, 0].index_copy_(0, dst, cache[p, 0].index_select(0, src))

        def all_planes_indexing():
            cache[:, 0, dst] = cache[:, 0, src]

        t_op = timer.graph_ms(op)
        row = {
            "path_len": m,
            "bytes": bytes_moved,
            "ms": t_op,
            "ms_l2_hot": timer.graph_ms(op, flush_l2=False),
            "eager_ms": timer.eager_ms(op),
            "vs_empty_kernel": t_op / ceil.empty_kernel_ms,
            "gbps": bytes_moved / t_op / 1e6,
            "frac_copy_bw": bytes_moved / t_op / 1e6 / ceil.copy_gbps,
            "torch_loop_ms": timer.graph_ms(per_layer_loop, reps=4),
            "torch_loop_eager_ms": timer.eager_ms(per_layer_loop, reps=2),
            "torch_indexing_ms": timer.graph_ms(all_planes_indexing),
        }
        row["hot_vs_empty_kernel"] = row["ms_l2_hot"] / ceil.empty_kernel_ms
        # The floor of one launch that moves these bytes: an empty launch plus the bytes at copy bandwidth.
        row["floor_ms"] = ceil.empty_kernel_ms + bytes_moved / ceil.copy_gbps / 1e6
        row["vs_floor"] = t_op / row["floor_ms"]
        row["speedup_vs_loop"] = row["torch_loop_ms"] / t_op
        row["speedup_vs_loop_eager"] = row["torch_loop_eager_ms"] / row["eager_ms"]
        row["speedup_vs_indexing"] = row["torch_indexing_ms"] / t_op
        rows.append(row)
    return rows


COLUMNS = [
    ("path_len", "tokens", "d"),
    ("ms", "op ms", ".4f"),
    ("vs_empty_kernel", "x empty", ".2f"),
    ("ms_l2_hot", "hot ms", ".4f"),
    ("hot_vs_empty_kernel", "hot x empty", ".2f"),
    ("frac_copy_bw", "of copy BW", ".1%"),
    ("vs_floor", "x floor", ".2f"),
    ("eager_ms", "op eager ms", ".4f"),
    ("torch_loop_ms", "loop ms", ".4f"),
    ("speedup_vs_loop", "x vs loop", ".1f"),
    ("torch_loop_eager_ms", "loop eager ms", ".4f"),
    ("speedup_vs_loop_eager", "x vs loop(eager)", ".1f"),
    ("torch_indexing_ms", "indexing ms", ".4f"),
    ("speedup_vs_indexing", "x vs indexing", ".1f"),
]
