import math
import re

import pytest
import torch
import torch.nn.functional as F

import jetspec
from jetspec.ops import reference
from jetspec.ops import build_tree
from jetspec.ops.tree import pack_mask
from conftest import requires_cuda
from trees import random_deep_parents, random_parents, visible_from_parents

# Error bounds against the float32 reference: over the whole output, and per output row (so that one
# wrong row cannot hide in a large tensor).
TOLERANCE = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (2e-3, 6e-3)}


def make_trees(batch, nodes, g, max_depth=32):
    """Per-sequence random trees (deep and shallow alternately): packed ancestors and dense masks."""
    visible = torch.stack([
        visible_from_parents(random_deep_parents(nodes, g, max_depth) if b % 2 == 0 else random_parents(nodes, g))
        for b in range(batch)
    ])
    return pack_mask(visible), visible


def make_case(batch, nodes, prefixes, q_heads, kv_heads, dim, dtype, device, g, layers=2, fused_qkv=False):
    """Queries (non-contiguous), caches sliced out of a [L, 2, B, S, H, d] cache, NaN beyond each tree."""
    slots = max(prefixes) + nodes + 7
    data = torch.randn(layers, 2, batch, slots, kv_heads, dim, generator=g).to(dtype)
    prefix_len = torch.tensor(prefixes, dtype=torch.long)
    for b, n in enumerate(prefixes):  # never read: a kernel that loads past the tree would produce NaN
        data[:, :, b, n + nodes:] = float("nan")
    if fused_qkv:  # [B, N, Hq + 2 Hkv, d] projections, queries first
        query = torch.randn(batch, nodes, q_heads + 2 * kv_heads, dim, generator=g).to(dtype)[:, :, :q_heads]
    else:  # HF's [B, Hq, N, d] seen as [B, N, Hq, d]
        query = torch.randn(batch, q_heads, nodes, dim, generator=g).to(dtype).transpose(1, 2)
    ancestors, visible = make_trees(batch, nodes, g)
    data, query = data.to(device), query.to(device)
    key_cache, value_cache = data[layers - 1, 0], data[layers - 1, 1]
    return query, key_cache, value_cache, prefix_len.to(device), ancestors.to(device), visible


def run_op(query, key_cache, value_cache, prefix_len, ancestors, scale=None, max_prefix=None, out=None):
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    max_prefix = key_cache.shape[1] - query.shape[1] if max_prefix is None else max_prefix
    if out is None:
        out = torch.full_like(query, float("nan"), memory_format=torch.contiguous_format)  # poisoned
    torch.ops.jetspec.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, scale, max_prefix, out)
    return out


def dense_sdpa(query, key_cache, value_cache, prefix_len, visible, scale):
    """Independent check: float32 SDPA with a dense mask built from the parents (not from the packed bits)."""
    out = []
    for b, n in enumerate(prefix_len.tolist()):
        nodes = query.shape[1]
        mask = torch.cat([torch.ones(nodes, n, dtype=torch.bool), visible[b]], dim=1).to(query.device)
        q = query[b].float().transpose(0, 1).unsqueeze(0)
        k = key_cache[b, : n + nodes].float().transpose(0, 1).unsqueeze(0)
        v = value_cache[b, : n + nodes].float().transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out.append(o[0].transpose(0, 1))
    return torch.stack(out)


def assert_close_rows(got, want, dtype):
    total, per_row = TOLERANCE[dtype]
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), "non-finite output (an unwritten or wrongly masked element)"
    err = (got - want).norm() / want.norm()
    assert err < total, f"relative error {err:.2e} >= {total}"
    row_err = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-3)
    worst = row_err.flatten().argmax()
    assert row_err.max() < per_row, f"row {tuple(torch.unravel_index(worst, row_err.shape))} error {row_err.max():.2e}"


# ---- CPU reference kernel (runs in CI) ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "nodes,prefixes,q_heads,kv_heads,dim",
    [(1, [0, 5], 4, 1, 64), (7, [3, 0], 8, 8, 64), (33, [40, 9], 8, 2, 128), (64, [1, 63], 4, 4, 64),
     (130, [100, 17], 8, 1, 128), (17, [20, 3], 9, 3, 64)],
)
def test_cpu_matches_dense_sdpa(dtype, nodes, prefixes, q_heads, kv_heads, dim, gen):
    query, key_cache, value_cache, prefix_len, ancestors, visible = make_case(
        2, nodes, prefixes, q_heads, kv_heads, dim, dtype, "cpu", gen, fused_qkv=nodes % 2 == 0)
    scale = 0.7 / math.sqrt(dim)
    got = run_op(query, key_cache, value_cache, prefix_len, ancestors, scale)
    want = dense_sdpa(query, key_cache, value_cache, prefix_len, visible, scale)
    assert_close_rows(got, want, dtype)
    assert torch.allclose(reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, scale), want,
                          atol=1e-5, rtol=1e-5)


def test_ancestor_bits_of_later_nodes_are_ignored(device, gen):
    query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
        1, 40, [10], 2, 1, 64, torch.float16, device, gen)
    everything = torch.full_like(ancestors, -1)  # all bits set: the mask is then "every node up to me"
    got = run_op(query, key_cache, value_cache, prefix_len, everything)
    chain = pack_mask(torch.ones(40, 40, dtype=torch.bool).tril()).unsqueeze(0).to(device)
    assert torch.equal(got, run_op(query, key_cache, value_cache, prefix_len, chain))


def test_node_that_sees_no_key_gets_zero(device, gen):
    query, key_cache, value_cache, _, ancestors, _ = make_case(1, 3, [0], 2, 2, 64, torch.bfloat16, device, gen)
    ancestors[0, 1] = 0  # node 1 of a tree with no prefix: nothing visible
    got = run_op(query, key_cache, value_cache, torch.tensor([0], device=device), ancestors)
    assert torch.all(got[0, 1] == 0) and torch.isfinite(got).all() and got[0, 0].abs().sum() > 0


def test_wrapper_defaults_and_fallback_agree(device, gen):
    query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
        2, 9, [4, 11], 4, 2, 64, torch.bfloat16, device, gen)
    got = jetspec.ops.tree_attention(query, key_cache, value_cache, prefix_len, ancestors)
    want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, 64 ** -0.5)
    assert got.dtype == query.dtype and got.shape == query.shape
    assert_close_rows(got, want, torch.bfloat16)


def test_real_build_tree_output(device, gen):
    # build_tree's own ancestors, padding rows included: a full depth-2, width-4 tree has 21 of the 40 nodes.
    depth, width, budget = 2, 4, 40
    logits = torch.randn(2, depth, width, generator=gen)
    logprobs = logits.log_softmax(-1).sort(-1, descending=True).values
    tree = build_tree(logprobs, torch.randint(0, 100, (2, depth, width), generator=gen),
                      torch.tensor([1, 2]), torch.tensor([5, 20]), budget)
    query, key_cache, value_cache, _, _, _ = make_case(2, budget, [5, 20], 4, 1, 128, torch.bfloat16, device, gen)
    prefix_len, ancestors = torch.tensor([5, 20], device=device), tree.ancestors.to(device)
    got = run_op(query, key_cache, value_cache, prefix_len, ancestors)
    want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, 128 ** -0.5)
    assert_close_rows(got, want, torch.bfloat16)


def bad_arguments(device):
    return {
        "query": torch.zeros(2, 3, 4, 64, dtype=torch.bfloat16, device=device),
        "key_cache": torch.zeros(2, 10, 2, 64, dtype=torch.bfloat16, device=device),
        "value_cache": torch.zeros(2, 10, 2, 64, dtype=torch.bfloat16, device=device),
        "prefix_len": torch.tensor([0, 7], device=device),
        "ancestors": torch.ones(2, 3, 1, dtype=torch.int32, device=device),
        "scale": 0.125,
        "max_prefix": 7,
        "out": torch.zeros(2, 3, 4, 64, dtype=torch.bfloat16, device=device),
    }


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "query": a["query"].float()}, "'query' must be bfloat16 or float16"),
        (lambda a: {**a, "query": a["query"][0]}, "'query' must be 4-D"),
        (lambda a: {**a, "query": a["query"][..., :32]}, "head_dim (the last size of 'query') must be 64 or 128"),
        (lambda a: {**a, "query": a["query"][:, :0], "out": a["out"][:, :0], "ancestors": a["ancestors"][:, :0]},
         "'query' must hold 1 to 1024 tree nodes"),
        (lambda a: {**a, "key_cache": a["key_cache"].half()}, "'key_cache' must have dtype BFloat16"),
        (lambda a: {**a, "value_cache": a["value_cache"][:, :9]}, "'value_cache' must have the shape of 'key_cache'"),
        (lambda a: {**a, "key_cache": a["key_cache"][:1]}, "'key_cache' must have size 2 in dim 0"),
        (lambda a: {**a, "key_cache": a["key_cache"].repeat(1, 1, 2, 1)[:, :, :3],
                    "value_cache": a["value_cache"].repeat(1, 1, 2, 1)[:, :, :3]},
         "the heads of 'query' (4) must be a positive multiple of those of 'key_cache' (3)"),
        (lambda a: {**a, "key_cache": a["key_cache"][:, :2], "value_cache": a["value_cache"][:, :2]},
         "'key_cache' has 2 slots, fewer than the 3 tree nodes"),
        (lambda a: {**a, "out": a["out"].half()}, "'out' must have dtype BFloat16"),
        (lambda a: {**a, "out": a["out"][:, :2]}, "'out' must have the shape of 'query'"),
        (lambda a: {**a, "query": a["query"].transpose(2, 3).contiguous().transpose(2, 3)},
         "the last dim of 'query' must be dense"),
        (lambda a: {**a, "value_cache": a["value_cache"].transpose(2, 3).contiguous().transpose(2, 3)},
         "the last dim of 'value_cache' must be dense"),
        (lambda a: {**a, "prefix_len": a["prefix_len"].int()}, "'prefix_len' must have dtype Long"),
        (lambda a: {**a, "prefix_len": a["prefix_len"][:1]}, "'prefix_len' must have size 2 in dim 0"),
        (lambda a: {**a, "ancestors": a["ancestors"].long()}, "'ancestors' must have dtype Int"),
        (lambda a: {**a, "ancestors": a["ancestors"].repeat(1, 1, 2)}, "'ancestors' must have size 1 in dim 2"),
        (lambda a: {**a, "ancestors": a["ancestors"][:, :2]}, "'ancestors' must have size 3 in dim 1"),
        (lambda a: {**a, "scale": 0.0}, "'scale' must be positive and finite"),
        (lambda a: {**a, "scale": float("nan")}, "'scale' must be positive and finite"),
        (lambda a: {**a, "max_prefix": 8}, "'max_prefix' must be in [0, S - N = 7], got 8"),
        (lambda a: {**a, "max_prefix": -1}, "'max_prefix' must be in [0, S - N = 7], got -1"),
    ],
)
def test_bad_arguments_raise_value_error(device, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.jetspec.tree_attention(**change(bad_arguments(device)))


def test_cpu_rejects_out_of_range_prefix_len():
    args = bad_arguments("cpu")
    with pytest.raises(ValueError, match=re.escape("prefix_len[1] = 8 is outside [0, S - N = 7]")):
        torch.ops.jetspec.tree_attention(**{**args, "prefix_len": torch.tensor([0, 8])})


def test_opcheck(device, gen):
    for dtype, nodes, dim in ((torch.bfloat16, 5, 64), (torch.float16, 33, 128)):
        query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
            2, nodes, [3, 9], 4, 2, dim, dtype, device, gen)
        out = torch.empty(query.shape, dtype=dtype, device=device)
        args = (query, key_cache, value_cache, prefix_len, ancestors, dim ** -0.5, 9, out)
        torch.library.opcheck(torch.ops.jetspec.tree_attention.default, args)


# ---- CUDA kernel ----

NODES = [1, 2, 16, 17, 64, 255, 256, 1024]
PREFIXES = [0, 1, 63, 4096]
# (head_dim, kv heads, query heads per kv head, dtype): every N x prefix pair meets one of these in turn.
VARIANTS = [(128, 2, 4, torch.bfloat16), (64, 1, 8, torch.float16), (128, 3, 1, torch.float16),
            (64, 2, 4, torch.bfloat16), (128, 1, 8, torch.bfloat16), (64, 4, 1, torch.bfloat16),
            (64, 3, 3, torch.bfloat16), (128, 2, 2, torch.float16)]  # SmolLM2's 9 / 3 heads; group 2


@requires_cuda
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("nodes", NODES)
def test_cuda_matches_reference(nodes, prefix, gen):
    dim, kv_heads, group, dtype = VARIANTS[(NODES.index(nodes) + PREFIXES.index(prefix)) % len(VARIANTS)]
    if nodes == 1024:
        kv_heads = 1  # keep the float32 reference small
    prefixes = [prefix, prefix // 2 + 3]
    query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
        2, nodes, prefixes, kv_heads * group, kv_heads, dim, dtype, "cuda", gen, fused_qkv=prefix % 2 == 1)
    want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, dim ** -0.5)
    # The split count follows max_prefix: the loosest bound, the exact one and an underestimate all agree.
    for max_prefix in (key_cache.shape[1] - nodes, max(prefixes), 0):
        got = run_op(query, key_cache, value_cache, prefix_len, ancestors, max_prefix=max_prefix)
        assert_close_rows(got, want, dtype)


@requires_cuda
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_head_dims_groups_dtypes(dim, group, dtype, gen):
    for nodes, prefixes in ((3, [100, 0]), (40, [700, 1500])):
        query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
            2, nodes, prefixes, 2 * group, 2, dim, dtype, "cuda", gen)
        want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, 0.1)
        assert_close_rows(run_op(query, key_cache, value_cache, prefix_len, ancestors, scale=0.1), want, dtype)


@requires_cuda
@pytest.mark.parametrize("nodes,group", [(16, 4), (64, 4), (255, 1)])
def test_cuda_without_the_copy_engine(nodes, group, gen, monkeypatch):
    """The cp.async copies the warpgroup blocks fall back to where the driver cannot describe a cache view."""
    monkeypatch.setenv("JETSPEC_TREE_ATTENTION_TMA", "0")
    query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
        2, nodes, [1000, 37], 2 * group, 2, 128, torch.bfloat16, "cuda", gen)
    want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, 128 ** -0.5)
    assert_close_rows(run_op(query, key_cache, value_cache, prefix_len, ancestors), want, torch.bfloat16)


@requires_cuda
def test_cuda_strided_output(gen):
    query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
        2, 20, [300, 5], 8, 2, 128, torch.bfloat16, "cuda", gen)
    big = torch.full((2, 20, 12, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = big[:, :, 2:10]  # 8 of 12 heads: strided, not contiguous
    run_op(query, key_cache, value_cache, prefix_len, ancestors, out=out)
    want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, 128 ** -0.5)
    assert_close_rows(out, want, torch.bfloat16)
    assert big[:, :, :2].isnan().all() and big[:, :, 10:].isnan().all()  # nothing written outside 'out'


@requires_cuda
def test_cuda_graph_replay_follows_prefix_len_on_the_device(gen):
    query, key_cache, value_cache, prefix_len, ancestors, _ = make_case(
        1, 16, [2000], 8, 2, 128, torch.bfloat16, "cuda", gen)
    key_cache.nan_to_num_(0.0)  # every slot may be read at some prefix_len below
    value_cache.nan_to_num_(0.0)
    out = torch.empty(query.shape, dtype=query.dtype, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        run_op(query, key_cache, value_cache, prefix_len, ancestors, max_prefix=2000, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_op(query, key_cache, value_cache, prefix_len, ancestors, max_prefix=2000, out=out)
    for n in (2000, 1, 777, 0):
        prefix_len.fill_(n)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.tree_attention(query, key_cache, value_cache, prefix_len, ancestors, 128 ** -0.5)
        assert_close_rows(out, want, torch.bfloat16)


@requires_cuda
def test_cuda_clamps_out_of_range_prefix_len_instead_of_faulting(gen):
    query, key_cache, value_cache, _, ancestors, _ = make_case(1, 8, [50], 4, 1, 64, torch.float16, "cuda", gen)
    key_cache.nan_to_num_(0.0)
    value_cache.nan_to_num_(0.0)
    slots = key_cache.shape[1]
    for bad, clamped in ((10**9, slots - 8), (-5, 0)):
        got = run_op(query, key_cache, value_cache, torch.tensor([bad], device="cuda"), ancestors)
        torch.cuda.synchronize()
        want = run_op(query, key_cache, value_cache, torch.tensor([clamped], device="cuda"), ancestors)
        assert torch.equal(got, want)


@requires_cuda
def test_cuda_rejects_misaligned_layouts():
    args = bad_arguments("cuda")
    odd = torch.zeros(2, 10, 2, 65, dtype=torch.bfloat16, device="cuda")[..., 1:]  # rows start 2 bytes in
    with pytest.raises(ValueError, match="CUDA needs 'key_cache' 16-byte aligned"):
        torch.ops.jetspec.tree_attention(**{**args, "key_cache": odd})
    with pytest.raises(ValueError, match="'prefix_len' is on cpu"):
        torch.ops.jetspec.tree_attention(**{**args, "prefix_len": torch.tensor([0, 7])})
