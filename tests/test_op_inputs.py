"""Regression tests of the op layer's input handling (issue #23), one group per defect: index sums that
wrap around, tensors on another device, masked keys that leak NaN into tree_attention, aliased outputs,
and build_tree's CPU kernel (C++ now)."""

from __future__ import annotations

import re

import pytest
import torch

from jetspec.ops import build_tree, reference
from jetspec.ops.tree import pack_mask
from conftest import requires_cuda
from trees import visible_from_parents

BIG = 2**63 - 1


# ---- valid calls of every op, small, on one device ------------------------------------------------------


def kv_compact_args(device):
    return {"cache": torch.arange(2 * 16 * 2, dtype=torch.float32).view(1, 2, 16, 2).to(device),
            "accepted": torch.tensor([[0, 2, 3], [0, 1, 5]], device=device),
            "accept_len": torch.tensor([3, 2], device=device), "base": torch.tensor([4, 0], device=device)}


def accept_greedy_args(device):
    return {"tokens": torch.tensor([[1, 2, 3]], device=device), "parents": torch.tensor([[-1, 0, 1]], device=device),
            "target_ids": torch.tensor([[2, 3, 4]], device=device), "num_nodes": torch.tensor([3], device=device),
            "accepted": torch.empty(1, 3, dtype=torch.long, device=device),
            "accept_len": torch.empty(1, dtype=torch.long, device=device),
            "bonus": torch.empty(1, dtype=torch.long, device=device)}


def build_tree_args(device, budget=8):
    return {"topk_logprobs": torch.tensor([[[-0.5, -1.0], [-0.2, -3.0]]], device=device),
            "topk_ids": torch.tensor([[[10, 11], [20, 21]]], device=device),
            "root_token": torch.tensor([7], device=device), "base_pos": torch.tensor([3], device=device),
            **{name: torch.empty(1, budget, dtype=torch.long, device=device)
               for name in ("tokens", "parents", "depths", "positions")},
            "ancestors": torch.empty(1, budget, (budget + 31) // 32, dtype=torch.int32, device=device),
            "num_nodes": torch.empty(1, dtype=torch.long, device=device)}


def draft_topk_args(device):
    g = torch.Generator().manual_seed(0)
    return {"hidden": torch.randn(1, 2, 8, generator=g).to(device),
            "weight": torch.randn(10, 8, generator=g).to(device), "temperature": 1.0, "logprobs": torch.empty(1, 2, 3, device=device),
            "ids": torch.empty(1, 2, 3, dtype=torch.long, device=device)}


def tree_attention_args(device):
    g = torch.Generator().manual_seed(0)
    return {"query": torch.randn(1, 3, 2, 64, generator=g).bfloat16().to(device),
            "key_cache": torch.randn(1, 8, 2, 64, generator=g).bfloat16().to(device),
            "value_cache": torch.randn(1, 8, 2, 64, generator=g).bfloat16().to(device),
            "prefix_len": torch.tensor([2], device=device),
            "ancestors": pack_mask(visible_from_parents(torch.tensor([-1, 0, 0])))[None].to(device),
            "scale": 0.125, "max_prefix": 5, "out": torch.empty(1, 3, 2, 64, dtype=torch.bfloat16, device=device)}


ARGS = {"kv_compact": kv_compact_args, "accept_greedy": accept_greedy_args, "build_tree": build_tree_args,
        "draft_topk": draft_topk_args, "tree_attention": tree_attention_args}


def op(name):
    return getattr(torch.ops.jetspec, name).default


def tensor_names(name):
    return [k for k, v in ARGS[name]("cpu").items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", ARGS)
def test_valid_calls_run(device, name):
    op(name)(**ARGS[name](device))


# ---- 1. index sums that wrap around ---------------------------------------------------------------------


@pytest.mark.parametrize("max_accept", [3, 80])  # the CUDA kernel's short and long paths
@pytest.mark.parametrize("base,offset", [(5, BIG), (2**62, 2**62), (3, 2**32 + 1), (-1, 1), (2**40, 1)])
def test_kv_compact_offsets_past_the_cache_are_never_moved(device, base, offset, max_accept):
    """base + offset used to wrap around into range: a wrong slot copied, or a segfault (int8 rows). The
    CPU kernel raises; the CUDA kernel (which cannot raise) moves nothing, also for an offset past 2^32
    that the long path used to truncate to 32 bits."""
    cache = torch.arange(40 * 3, dtype=torch.float32).view(1, 1, 40, 3).to(device)
    before = cache.clone()
    accepted = torch.arange(max_accept).view(1, -1).to(device)
    accepted[0, 1] = offset
    if offset <= max_accept:  # keep the path strictly increasing
        accepted[0, 1:] = torch.arange(offset, offset + max_accept - 1)
    args = (cache, accepted, torch.tensor([2], device=device), torch.tensor([base], device=device))
    if device.type == "cpu":
        with pytest.raises(ValueError, match="outside the cache"):
            torch.ops.jetspec.kv_compact(*args)
    else:
        torch.ops.jetspec.kv_compact(*args)
        torch.cuda.synchronize()
    assert torch.equal(cache, before)


def test_kv_compact_int8_cache_with_a_wrapping_offset_raises():
    cache = torch.zeros(1, 1, 16, 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="outside the cache"):
        torch.ops.jetspec.kv_compact(cache, torch.tensor([[0, BIG]]), torch.tensor([2]), torch.tensor([5]))


def test_build_tree_positions_past_int64_raise():
    args = build_tree_args("cpu")
    args["base_pos"] = torch.tensor([BIG - 1])  # + depth 2
    with pytest.raises(ValueError, match="base_pos"):
        torch.ops.jetspec.build_tree(**args)


@pytest.mark.parametrize("temperature", [1e-50, 1e300])
def test_draft_topk_temperature_outside_float32_raises(device, temperature):
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        torch.ops.jetspec.draft_topk(**{**draft_topk_args(device), "temperature": temperature})


@pytest.mark.parametrize("scale", [1e-50, 1e300])
def test_tree_attention_scale_outside_float32_raises(device, scale):
    with pytest.raises(ValueError, match="'scale' must be positive and finite"):
        torch.ops.jetspec.tree_attention(**{**tree_attention_args(device), "scale": scale})


# ---- 2. tensors on another device -----------------------------------------------------------------------


def moved(args, name, device):
    return {**args, name: args[name].to(device)}


def other_device(device):
    return torch.device("meta") if device.type == "cpu" else torch.device("cpu")


@pytest.mark.parametrize("name", ARGS)
def test_a_tensor_on_another_device_is_rejected_before_any_kernel(device, name):
    """A meta tensor beside CPU ones used to reach the fake impl, which returned with the outputs unwritten
    (garbage num_nodes); a CPU tensor beside CUDA ones must be named too."""
    for arg in tensor_names(name):
        args = moved(ARGS[name](device), arg, other_device(device))
        with pytest.raises(ValueError, match=f"'{arg}' is on|but '{arg}' is on"):
            op(name)(**args)


@pytest.mark.parametrize("name", ARGS)
def test_each_backend_kernel_checks_devices_itself(device, name):
    """A caller can reach a backend's kernel directly (redispatch): it must compare devices too."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU if device.type == "cpu" else torch._C.DispatchKey.CUDA)
    for arg in tensor_names(name)[1:]:
        args = moved(ARGS[name](device), arg, other_device(device))
        with pytest.raises(ValueError, match=f"'{arg}' is on"):
            op(name).redispatch(keys, **args)


def test_build_tree_wrapper_does_not_move_a_stray_input():
    args = build_tree_args("cpu")
    with pytest.raises(ValueError, match="'root_token' is on meta"):
        build_tree(args["topk_logprobs"], args["topk_ids"], args["root_token"].to("meta"), args["base_pos"], 8)


# ---- 3. masked keys in tree_attention -------------------------------------------------------------------


def assert_matches_with_non_finite(got, want, dtype):
    """Non-finite outputs where the reference has them, of the same kind; the rest within tolerance."""
    got, want = got.float().cpu(), want.float().cpu()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(got), kind(want)), f"{kind.__name__} differs"
    finite = want.isfinite()
    tol = {torch.bfloat16: 3e-2, torch.float16: 6e-3}[dtype]
    torch.testing.assert_close(got[finite], want[finite], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nodes,group,prefix", [(3, 1, 5), (9, 4, 70), (40, 4, 200), (200, 1, 3), (300, 2, 1000)])
def test_tree_attention_hidden_keys_contribute_nothing(device, dtype, nodes, group, prefix, monkeypatch):
    """NaN and inf in the K and V rows of tree slots that a node may not see used to turn its output into
    NaN (probability 0 times NaN). Two branches under the root: no node of one sees the other's keys. The
    sizes cover the CUDA kernel's tile kinds, several tree tiles and split keys; both of its copy paths run."""
    g = torch.Generator().manual_seed(nodes)
    half = nodes // 2
    parents = torch.tensor([-1] + [0 if i in (1, half + 1) else i - 1 for i in range(1, nodes)])
    ancestors = pack_mask(visible_from_parents(parents))[None]
    slots = prefix + nodes + 5
    query = torch.randn(1, nodes, 2 * group, 64, generator=g).to(dtype)
    key = torch.randn(1, slots, 2, 64, generator=g).to(dtype)
    value = torch.randn(1, slots, 2, 64, generator=g).to(dtype)
    # The second branch's keys hold NaN, +inf and -inf in V (one kv head) and K (the other).
    for j, bad in zip(range(half + 1, nodes), [float("nan"), float("inf"), -float("inf")] * nodes):
        value[0, prefix + j, j % 2, j % 64] = bad
        key[0, prefix + j, (j + 1) % 2, (3 * j) % 64] = bad
    value[0, prefix + 1, :, 5] = float("nan")  # the first branch's head: seen by that branch only
    args = [t.to(device) for t in (query, key, value, torch.tensor([prefix]), ancestors)]
    want = reference.tree_attention(*args, 0.125)
    assert want[0, 0].isfinite().all() and not want[0, half + 1:].isfinite().all()  # the setup poisons something
    for tma in ("1", "0") if device.type == "cuda" else ("1",):
        monkeypatch.setenv("JETSPEC_TREE_ATTENTION_TMA", tma)
        out = torch.full_like(args[0], float("nan"))
        torch.ops.jetspec.tree_attention(*args, 0.125, prefix, out)
        assert_matches_with_non_finite(out, want, dtype)


def test_tree_attention_a_nan_score_a_node_sees_stays_nan(device):
    """The other side of the rule: a key a node does see with a NaN K makes its output NaN. The CUDA kernel's
    split-key path used to drop it (a NaN row sum gave its split a log-sum-exp of -inf, and the merge's
    fmaxf skips NaN): in a sequence whose tree fits one split, beside a long prefix in another, such a row
    came out 0."""
    g = torch.Generator().manual_seed(5)
    nodes, prefixes = 8, [0, 600]
    ancestors = pack_mask(torch.ones(nodes, nodes, dtype=torch.bool).tril()).expand(2, -1, -1)  # chains
    query = torch.randn(2, nodes, 1, 64, generator=g).half()
    key = torch.randn(2, 610, 1, 64, generator=g).half()
    value = torch.randn(2, 610, 1, 64, generator=g).half()
    key[0, 2, 0, 7] = float("nan")
    args = [t.to(device) for t in (query, key, value, torch.tensor(prefixes), ancestors.contiguous())]
    out = torch.zeros_like(args[0])
    torch.ops.jetspec.tree_attention(*args, 0.125, 600, out)
    assert out[0, 2:].isnan().all() and out[0, :2].isfinite().all() and out[1].isfinite().all()
    assert_matches_with_non_finite(out, reference.tree_attention(*args, 0.125), torch.float16)


# ---- 4. aliased outputs ---------------------------------------------------------------------------------


def aliased(name, device):
    """Calls of an op whose outputs share memory with another argument: (description, args)."""
    args = ARGS[name](device)
    if name == "kv_compact":  # an int64 cache whose first slots hold the index tensors
        cache = torch.zeros(1, 2, 16, 3, dtype=torch.long, device=device)
        cache[0, :, 0] = torch.tensor([0, 1, 2])
        cache[0, :, 1, 0] = 3
        return [("accepted inside cache", {**args, "cache": cache, "accepted": cache[0, :, 0]}),
                ("base inside cache", {**args, "cache": cache, "base": cache[0, :, 1, 0]})]
    if name == "accept_greedy":
        return [("accept_len is bonus", {**args, "bonus": args["accept_len"]}),
                ("accepted is tokens", {**args, "accepted": args["tokens"]}),
                ("bonus inside accepted", {**args, "bonus": args["accepted"][0, 1:2]})]
    if name == "build_tree":
        return [("tokens is parents", {**args, "parents": args["tokens"]}),
                ("positions is base_pos' storage", {**args, "base_pos": args["positions"][:, 0]}),
                ("num_nodes inside depths", {**args, "num_nodes": args["depths"][:, 3]})]
    if name == "draft_topk":
        ids = torch.empty(1, 2, 3, dtype=torch.long, device=device)
        return [("logprobs inside ids", {**args, "ids": ids, "logprobs": ids.view(torch.float32)[..., :3]})]
    return [("out is query", {**args, "out": args["query"]}),
            ("out inside value_cache", {**args, "out": args["value_cache"][:, 3:6]})]


@pytest.mark.parametrize("name", ARGS)
def test_outputs_sharing_memory_are_rejected(device, name):
    for description, args in aliased(name, device):
        with pytest.raises(ValueError, match="shares memory"):
            op(name)(**args)
            pytest.fail(f"accepted: {description}")


def test_expanded_output_is_rejected(device):
    args = accept_greedy_args(device)
    with pytest.raises(ValueError, match="overlaps itself"):
        torch.ops.jetspec.accept_greedy(**{**args, "accepted": args["accepted"][:, :1].expand(1, 3)})


# ---- 5. build_tree's CPU kernel -------------------------------------------------------------------------


def test_build_tree_cpu_kernel_is_registered_from_cpp():
    dump = torch._C._dispatch_dump("jetspec::build_tree")
    cpu = next(line for line in dump.splitlines() if line.startswith("CPU"))
    assert "build_tree.cpp" in cpu, cpu


def test_build_tree_cpu_kernel_takes_sizes_past_the_cuda_limits():
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(2, 40, 40, generator=g) * 4).sort(-1, descending=True).values
    ids = torch.randint(0, 1000, (2, 40, 40), generator=g)
    root, base, budget = torch.tensor([1, 2]), torch.tensor([0, 9]), 1500
    outs = [torch.empty(2, budget, dtype=torch.long) for _ in range(4)]
    outs += [torch.empty(2, budget, (budget + 31) // 32, dtype=torch.int32), torch.empty(2, dtype=torch.long)]
    torch.ops.jetspec.build_tree(lp, ids, root, base, *outs)
    for got, want in zip(outs, reference.build_tree(lp, ids, root, base, budget)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("budget", [0, -3])
def test_build_tree_budget_below_one_raises_from_the_op(budget):
    args = build_tree_args("cpu")
    with pytest.raises(ValueError, match=re.escape("the budget (nodes including the root")):
        build_tree(args["topk_logprobs"], args["topk_ids"], args["root_token"], args["base_pos"], budget)
