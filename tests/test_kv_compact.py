import re

import pytest
import torch

import jetspec
from jetspec.ops import reference
from conftest import requires_cuda
from trees import random_path

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8]


def make_case(planes, batch, slots, row, max_accept, dtype, device, g):
    if dtype.is_floating_point:
        cache = torch.randn(planes, batch, slots, *row, generator=g, dtype=torch.float32).to(dtype)
    else:
        cache = torch.randint(-100, 100, (planes, batch, slots, *row), generator=g).to(dtype)
    accepted = torch.full((batch, max_accept), -1, dtype=torch.long)
    accept_len = torch.randint(0, max_accept + 1, (batch,), generator=g)
    accept_len[0] = max_accept  # at least one full row
    base = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        n = int(accept_len[b])
        span = min(slots, int(torch.randint(n, 2 * n + 8, (1,), generator=g)))
        base[b] = int(torch.randint(0, slots - span + 1, (1,), generator=g))
        accepted[b, :n] = random_path(n, span, g)
    return cache.to(device), accepted.to(device), accept_len.to(device), base.to(device)


def check_against_reference(cache, accepted, accept_len, base):
    expected = cache.clone()
    reference.kv_compact(expected, accepted, accept_len, base)
    torch.ops.jetspec.kv_compact(cache, accepted, accept_len, base)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "planes,batch,slots,row,max_accept",
    [
        (1, 1, 8, (4,), 1),
        (72, 1, 300, (8, 128), 32),  # Qwen3-8B: 36 layers x {K, V}, 8 kv heads x 128
        (6, 3, 200, (2, 64), 17),
        (4, 2, 100, (3,), 5),  # 3-element rows: no 16-byte vectors
        (3, 2, 64, (), 9),  # one element per slot
        (2, 1, 2100, (1, 64), 1024),  # long move
    ],
)
def test_matches_reference(device, dtype, planes, batch, slots, row, max_accept, gen):
    for _ in range(3):
        check_against_reference(*make_case(planes, batch, slots, row, max_accept, dtype, device, gen))


def test_overlapping_ranges_move_in_path_order(device):
    # Destination of row 2 (slot 2) is the source of row 1: must read before it is overwritten.
    cache = torch.arange(10, dtype=torch.float32, device=device).view(1, 1, 10, 1)
    accepted = torch.tensor([[0, 2, 3, 7]], device=device)
    torch.ops.jetspec.kv_compact(cache, accepted, torch.tensor([4], device=device), torch.tensor([0], device=device))
    assert cache.flatten().tolist() == [0, 2, 3, 7, 4, 5, 6, 7, 8, 9]


def test_nothing_moves_for_empty_or_identity_paths(device):
    cache = torch.randn(2, 2, 16, 8, device=device)
    before = cache.clone()
    accepted = torch.tensor([[0, 1, 2], [0, 5, 9]], device=device)
    torch.ops.jetspec.kv_compact(cache, accepted, torch.tensor([3, 0], device=device), torch.tensor([4, 1], device=device))
    assert torch.equal(cache, before)


@pytest.mark.parametrize("layout", ["slot_stride", "planes_after_batch", "strided_indices"])
def test_non_contiguous_inputs(device, layout, gen):
    cache, accepted, accept_len, base = make_case(4, 3, 96, (16,), 9, torch.float32, device, gen)
    if layout == "slot_stride":  # every other slot of a larger buffer
        big = torch.randn(4, 3, 192, 16, generator=gen).to(device)
        big[:, :, ::2] = cache
        cache = big[:, :, ::2]
    elif layout == "planes_after_batch":  # [batch, planes, ...] storage seen as [planes, batch, ...]
        cache = cache.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        wide = torch.full((3, 18), -1, dtype=torch.long, device=device)
        wide[:, ::2] = accepted
        accepted = wide[:, ::2]
    assert not (cache.is_contiguous() and accepted.is_contiguous())
    check_against_reference(cache, accepted, accept_len, base)


def test_stacked_layer_cache_view(device, gen):
    # The driver's layout: one [layers, 2, batch, slots, kv_heads, head_dim] tensor, flattened to planes.
    kv = torch.randn(5, 2, 1, 64, 2, 32, generator=gen).to(device)
    planes = kv.view(10, 1, 64, 2, 32)
    accepted = torch.tensor([[0, 3, 4, 9]], device=device)
    expected = kv.clone()
    expected[:, :, 0, 20:24] = kv[:, :, 0, 20 + accepted[0]].clone()
    torch.ops.jetspec.kv_compact(planes, accepted, torch.tensor([4], device=device), torch.tensor([20], device=device))
    assert torch.equal(kv, expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "accepted": a["accepted"].int()}, "'accepted' must have dtype Long"),
        (lambda a: {**a, "accept_len": a["accept_len"].float()}, "'accept_len' must have dtype Long"),
        (lambda a: {**a, "base": a["base"].view(1, 2)}, "'base' must be 1-D"),
        (lambda a: {**a, "accepted": a["accepted"][:1]}, "'accepted' must have size 2 in dim 0"),
        (lambda a: {**a, "cache": a["cache"][0, 0, 0]}, "'cache' must be [planes, batch, slots, *row]"),
        (lambda a: {**a, "cache": a["cache"].transpose(3, 4)}, "row dims (3..) of 'cache' must be dense"),
    ],
)
def test_bad_arguments_raise_value_error(device, change, message):
    args = {
        "cache": torch.zeros(2, 2, 8, 4, 4, device=device),
        "accepted": torch.tensor([[0, 1], [0, 2]], device=device),
        "accept_len": torch.tensor([2, 2], device=device),
        "base": torch.tensor([0, 0], device=device),
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.jetspec.kv_compact(**change(args))


@requires_cuda
def test_index_tensors_on_another_device_are_rejected():
    with pytest.raises(ValueError, match="'accepted' is on cpu"):
        torch.ops.jetspec.kv_compact(
            torch.zeros(1, 1, 4, 2, device="cuda"),
            torch.tensor([[0]]),
            torch.tensor([1], device="cuda"),
            torch.tensor([0], device="cuda"),
        )


@pytest.mark.parametrize(
    "accepted,message",
    [([0, 2, 2], "strictly increasing"), ([1, 0, 3], "strictly increasing"), ([0, 1, 40], "outside the cache")],
)
def test_cpu_rejects_paths_that_break_the_contract(accepted, message):
    cache = torch.zeros(1, 1, 16, 2)
    with pytest.raises(ValueError, match=message):
        torch.ops.jetspec.kv_compact(cache, torch.tensor([accepted]), torch.tensor([3]), torch.tensor([0]))


@requires_cuda
def test_cuda_skips_out_of_range_slots_instead_of_faulting():
    cache = torch.randn(2, 1, 16, 8, device="cuda")
    expected = cache.clone()
    expected[:, 0, 1] = cache[:, 0, 3]
    accepted = torch.tensor([[0, 3, 1000]], device="cuda")
    torch.ops.jetspec.kv_compact(cache, accepted, torch.tensor([3], device="cuda"), torch.tensor([0], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(cache, expected)


def test_wrapper_moves_rows(device, gen):
    cache, accepted, accept_len, base = make_case(3, 2, 50, (8,), 6, torch.float32, device, gen)
    expected = cache.clone()
    reference.kv_compact(expected, accepted, accept_len, base)
    jetspec.ops.kv_compact(cache, accepted, accept_len, base)
    assert torch.equal(cache, expected)


def test_opcheck(device, gen):
    samples = [make_case(4, 2, 64, (8,), 7, torch.float16, device, gen), make_case(2, 1, 16, (), 3, torch.float32, device, gen)]
    for args in samples:
        torch.library.opcheck(torch.ops.jetspec.kv_compact.default, args)
