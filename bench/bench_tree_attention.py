"""tree_attention on Qwen3-8B attention shapes: 32 query / 8 kv heads, head_dim 128, bf16, one sequence.

Trees are build_tree's (random descending log-probs, depth <= 16, width 8) of N nodes over a committed
prefix; the op reads its keys/values straight from a [S, 8, 128] cache slice and the queries as HF's
transposed projections. Peers in the same run, on the same inputs: torch SDPA with a dense bool mask
(GQA native, and with K/V expanded to 32 heads beforehand: the faster of the two is reported), and
flex_attention compiled with torch.compile and a block mask built from the same tree (the block mask
is built outside the timing). Times are CUDA-graph replays with L2 flushed (harness.Timer).

FLOPs count only visible keys (4 * Hq * d per query-key pair: QK^T and PV); bytes are the K/V rows of
prefix + N keys plus queries and output, read once. Both are reported as fractions of the bf16 matmul
peak and the copy bandwidth measured in this run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import jetspec  # noqa: F401  (registers the ops)
from jetspec.ops import build_tree
from jetspec.ops.tree import ancestor_mask

from .harness import Ceilings, Timer

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
NODES = [16, 64, 128, 256, 512, 1024]
PREFIXES = [1024, 4096, 16384, 32768]
DEPTH, WIDTH = 16, 8


def _tree(nodes: int, g: torch.Generator) -> torch.Tensor:
    """ancestors [1, N, words] of a best-first tree from random per-depth candidates."""
    logprobs = torch.randn(1, DEPTH, WIDTH, generator=g).log_softmax(-1).sort(-1, descending=True).values
    ids = torch.randint(0, 1000, (1, DEPTH, WIDTH), generator=g)
    return build_tree(logprobs, ids, torch.tensor([0]), torch.tensor([0]), nodes).ancestors


def problem(nodes: int, prefix: int, device: torch.device, g: torch.Generator):
    """One shape's inputs and the op call on them: the tree's ancestor bits [1, N, words], the K/V cache
    [2, 1, prefix + N, Hkv, d], the queries [1, Hq, N, d] (the op reads them transposed, as the HF
    projections arrive), the output [1, N, Hq, d], and ``op()`` that fills it."""
    ancestors = _tree(nodes, g).to(device)
    cache = torch.randn(2, 1, prefix + nodes, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    q = torch.randn(1, Q_HEADS, nodes, HEAD_DIM, device=device, dtype=torch.bfloat16)
    query = q.transpose(1, 2)
    prefix_len = torch.tensor([prefix], device=device)
    out = torch.empty(1, nodes, Q_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)

    def op():
        torch.ops.jetspec.tree_attention(query, cache[0], cache[1], prefix_len, ancestors, HEAD_DIM ** -0.5, prefix,
                                         out)

    return ancestors, cache, q, out, op


def _peer_ms(timer: Timer, fn) -> float | None:
    try:
        return timer.graph_ms(fn, reps=10)
    except RuntimeError:  # out of memory or unsupported: a peer that cannot run this shape is reported as "-"
        torch.cuda.empty_cache()
        return None


def run(timer: Timer, ceil: Ceilings) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compile per shape; the default recompile limit would silently drop later shapes to eager.
    torch._dynamo.config.cache_size_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    device, g = timer.device, torch.Generator().manual_seed(0)
    scale = HEAD_DIM ** -0.5
    rows = []
    for prefix in PREFIXES:
        for nodes in NODES:
            keys = prefix + nodes
            ancestors, cache, q, out, op = problem(nodes, prefix, device, g)
            tree = ancestor_mask(ancestors[0], nodes)  # [N, N] bool
            k, v = cache[0].transpose(1, 2).contiguous(), cache[1].transpose(1, 2).contiguous()  # [1, Hkv, T, d]
            mask = torch.cat([torch.ones(nodes, prefix, dtype=torch.bool, device=device), tree], dim=1)[None, None]
            k_wide = k.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
            v_wide = v.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)

            def sdpa_gqa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

            def sdpa_wide():
                return F.scaled_dot_product_attention(q, k_wide, v_wide, attn_mask=mask, scale=scale)

            def tree_mask(b, h, q_idx, kv_idx):
                j = kv_idx - prefix
                return (kv_idx < prefix) | ((j >= 0) & tree[q_idx, j.clamp(0, nodes - 1)])

            block_mask = create_block_mask(tree_mask, 1, None, nodes, keys, device=device)

            def flex_op():
                return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)

            t_op = timer.graph_ms(op, reps=10)
            op()
            want = sdpa_wide().transpose(1, 2)
            visible_pairs = nodes * prefix + int(tree.sum())
            flops = 4 * Q_HEADS * HEAD_DIM * visible_pairs
            bytes_moved = (2 * keys * KV_HEADS + 2 * nodes * Q_HEADS) * HEAD_DIM * 2
            sdpa_times = [t for t in (_peer_ms(timer, sdpa_gqa), _peer_ms(timer, sdpa_wide)) if t is not None]
            row = {
                "nodes": nodes,
                "prefix": prefix,
                "ms": t_op,
                "tflops": flops / t_op / 1e9,
                "gbps": bytes_moved / t_op / 1e6,
                "sdpa_ms": min(sdpa_times) if sdpa_times else None,
                "flex_ms": _peer_ms(timer, flex_op),
                "max_abs_err": float((out.float() - want.float()).abs().max()),
            }
            row["frac_bf16_peak"] = row["tflops"] / ceil.bf16_tflops
            row["frac_copy_bw"] = row["gbps"] / ceil.copy_gbps
            peers = [t for t in (row["sdpa_ms"], row["flex_ms"]) if t is not None]
            row["speedup_vs_flex"] = row["flex_ms"] / t_op if row["flex_ms"] else None
            row["speedup_vs_best_peer"] = min(peers) / t_op if peers else None
            rows.append(row)
            del cache, k, v, k_wide, v_wide, mask, block_mask
            torch.cuda.empty_cache()
    return rows


COLUMNS = [
    ("nodes", "N", "d"),
    ("prefix", "prefix", "d"),
    ("ms", "op ms", ".4f"),
    ("tflops", "TFLOP/s", ".0f"),
    ("frac_bf16_peak", "of bf16 peak", ".1%"),
    ("gbps", "GB/s", ".0f"),
    ("frac_copy_bw", "of copy BW", ".1%"),
    ("sdpa_ms", "sdpa ms", ".4f"),
    ("flex_ms", "flex ms", ".4f"),
    ("speedup_vs_flex", "x vs flex", ".2f"),
    ("speedup_vs_best_peer", "x vs best", ".2f"),
    ("max_abs_err", "max err", ".1e"),
]
