"""A few tree_attention shapes for compute-sanitizer, one process, no pytest:

    compute-sanitizer --tool memcheck  python -m bench.sanitize_tree_attention
    compute-sanitizer --tool racecheck python -m bench.sanitize_tree_attention
    compute-sanitizer --tool initcheck python -m bench.sanitize_tree_attention
    compute-sanitizer --tool synccheck python -m bench.sanitize_tree_attention

(with JETSPEC_TREE_ATTENTION_TMA=0 in the environment, the warpgroup blocks' cp.async path instead of
the copy engine).

The shapes cover every block shape (decode, short tree, large tree), both head dims and dtypes, split
and unsplit key ranges, a prefix that is not a multiple of the key tile, zero prefix, GQA 1/3/4/8 and
cache slices with slots past the tree (never to be read). Each result is checked against the float32
reference; the exit status is non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch

import jetspec  # noqa: F401  (registers the ops)
from jetspec.ops import reference
from jetspec.ops import build_tree

# (nodes, prefix_len per sequence, kv heads, query heads per kv head, head_dim, dtype, max_prefix)
SHAPES = [
    (1, [777, 5], 2, 4, 128, torch.bfloat16, None),  # decode: 16-row blocks, many splits
    (16, [1000, 63], 2, 4, 64, torch.float16, None),  # short tree: 64-row blocks
    (17, [0, 1], 1, 8, 128, torch.bfloat16, 0),  # one key tile, no split
    (100, [300, 129], 2, 4, 128, torch.float16, None),  # 128-row blocks (warp-specialised on sm_90a), split
    (33, [500, 77], 2, 3, 128, torch.float16, None),  # GQA 3: node rows straddle the 128-row blocks
    (256, [2000, 70], 1, 8, 64, torch.bfloat16, 0),  # 128-row blocks, no split
    (64, [4096, 3000], 8, 1, 128, torch.bfloat16, 4096),  # no GQA
]


def main() -> int:
    g = torch.Generator().manual_seed(0)
    failures = 0
    for nodes, prefixes, kv_heads, group, dim, dtype, max_prefix in SHAPES:
        batch, slots = len(prefixes), max(prefixes) + nodes + 40
        cache = torch.randn(3, 2, batch, slots, kv_heads, dim, generator=g).to(dtype).cuda()
        query = torch.randn(batch, kv_heads * group, nodes, dim, generator=g).to(dtype).cuda().transpose(1, 2)
        logprobs = torch.randn(batch, 8, 4, generator=g).log_softmax(-1).sort(-1, descending=True).values
        tree = build_tree(logprobs, torch.randint(0, 99, (batch, 8, 4), generator=g), torch.zeros(batch, dtype=torch.long),
                          torch.zeros(batch, dtype=torch.long), nodes)
        ancestors, prefix_len = tree.ancestors.cuda(), torch.tensor(prefixes).cuda()
        out = torch.full(query.shape, float("nan"), dtype=dtype, device="cuda")
        bound = slots - nodes if max_prefix is None else max_prefix
        torch.ops.jetspec.tree_attention(query, cache[1, 0], cache[1, 1], prefix_len, ancestors, dim ** -0.5, bound, out)
        want = reference.tree_attention(query, cache[1, 0], cache[1, 1], prefix_len, ancestors, dim ** -0.5)
        err = float((out.float() - want).norm() / want.norm())
        ok = err < (1e-2 if dtype == torch.bfloat16 else 2e-3)
        failures += not ok
        print(f"N={nodes} prefix={prefixes} heads={kv_heads}x{group} d={dim} {dtype}: rel err {err:.1e} "
              f"{'ok' if ok else 'MISMATCH'}")
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
