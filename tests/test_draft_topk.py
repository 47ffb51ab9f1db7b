import pytest
import torch

import jetspec
from jetspec import reference
from jetspec._ext import has_kernel
from conftest import DEVICES


@pytest.fixture(params=[d for d in DEVICES if has_kernel("draft_topk", torch.device(d))])
def device(request):
    """The devices this build has a draft_topk kernel for (CPU; CUDA once its kernel exists)."""
    return torch.device(request.param)


def run_op(hidden, weight, k, temperature=1.0):
    logprobs = torch.full((*hidden.shape[:2], k), float("nan"), device=hidden.device)  # poisoned
    ids = torch.full((*hidden.shape[:2], k), -7, dtype=torch.long, device=hidden.device)
    torch.ops.jetspec.draft_topk(hidden, weight, temperature, logprobs, ids)
    return logprobs, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,depth,hidden_size,vocab,k",
                         [(1, 1, 8, 5, 1), (1, 15, 64, 1000, 8), (2, 4, 48, 1531, 32), (1, 3, 16, 7, 7)])
def test_matches_log_softmax_topk(device, dtype, batch, depth, hidden_size, vocab, k, gen):
    hidden = torch.randn(batch, depth, hidden_size, generator=gen).to(device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen).to(device=device, dtype=dtype)
    logprobs, ids = run_op(hidden, weight, k)
    want = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1).topk(k, dim=-1)
    torch.testing.assert_close(logprobs, want.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids, want.indices)  # random logits: no ties
    assert torch.all(logprobs[..., :-1] >= logprobs[..., 1:])


def test_temperature_and_ties_rank_by_lower_id(device):
    hidden = torch.tensor([[[1.0, 0.0]]], device=device)
    # rows 1, 3 and 4 tie for the largest logit; rows 0 and 2 tie below them
    weight = torch.tensor([[0.5, 0.0], [2.0, 1.0], [0.5, 3.0], [2.0, -1.0], [2.0, 0.0]], device=device)
    logprobs, ids = run_op(hidden, weight, 4, temperature=0.5)
    assert ids.tolist() == [[[1, 3, 4, 0]]]
    want = torch.log_softmax(torch.tensor([0.5, 2.0, 0.5, 2.0, 2.0]) / 0.5, dim=-1)[[1, 3, 4, 0]]
    torch.testing.assert_close(logprobs.cpu()[0, 0], want)


def test_non_contiguous_hidden_and_strided_weight_rows(device, gen):
    hidden = torch.randn(1, 16, 32, generator=gen).to(device)[:, 1::2]  # slots 1, 3, ... of a block
    big = torch.randn(300, 40, generator=gen).to(device)
    weight = big[::3, :32]  # every third row, the first 32 features: rows strided, features dense
    logprobs, ids = run_op(hidden, weight, 6)
    want = reference.draft_topk(hidden, weight, 6)
    torch.testing.assert_close(logprobs, want[0])
    assert torch.equal(ids, want[1])


def test_wrapper_and_reference_agree(device, gen):
    hidden = torch.randn(2, 5, 24, generator=gen).to(device)
    weight = torch.randn(333, 24, generator=gen).to(device)
    got = jetspec.ops.draft_topk(hidden, weight, 9, temperature=1.3)
    want = reference.draft_topk(hidden, weight, 9, temperature=1.3)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "hidden": a["hidden"].long()}, "'hidden' must be float32, bfloat16 or float16"),
        (lambda a: {**a, "weight": a["weight"].double()}, "'weight' must have dtype Float"),
        (lambda a: {**a, "weight": a["weight"][:, :4]}, "'weight' must have size 8 in dim 1"),
        (lambda a: {**a, "weight": a["weight"].t().contiguous().t()}, "'weight' rows must be dense"),
        (lambda a: {**a, "logprobs": a["logprobs"].double()}, "'logprobs' must have dtype Float"),
        (lambda a: {**a, "ids": a["ids"][..., :2]}, "'ids' must have the shape of 'logprobs'"),
        (lambda a: {**a, "logprobs": a["logprobs"].new_empty(1, 2, 11), "ids": a["ids"].new_empty(1, 2, 11)},
         "K (the outputs' last size) must be in [1, V = 10]"),
        (lambda a: {**a, "temperature": 0.0}, "temperature must be positive"),
    ],
)
def test_bad_arguments_raise_value_error(device, change, message):
    args = {"hidden": torch.randn(1, 2, 8, device=device), "weight": torch.randn(10, 8, device=device),
            "temperature": 1.0, "logprobs": torch.empty(1, 2, 3, device=device),
            "ids": torch.empty(1, 2, 3, dtype=torch.long, device=device)}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        torch.ops.jetspec.draft_topk(**change(args))


def test_opcheck(device, gen):
    hidden = torch.randn(1, 3, 16, generator=gen).to(device)
    weight = torch.randn(50, 16, generator=gen).to(device)
    outs = (torch.empty(1, 3, 4, device=device), torch.empty(1, 3, 4, dtype=torch.long, device=device))
    torch.library.opcheck(torch.ops.jetspec.draft_topk.default, (hidden, weight, 1.0, *outs))
