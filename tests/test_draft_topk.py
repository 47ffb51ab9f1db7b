import itertools
import math
import random

import pytest
import torch

import jetspec
from jetspec.ops import reference
from jetspec.ops import has_kernel
from conftest import DEVICES, requires_cuda


@pytest.fixture(params=[d for d in DEVICES if has_kernel("draft_topk", torch.device(d))])
def device(request):
    """The devices this build has a draft_topk kernel for (CPU; CUDA once its kernel exists)."""
    return torch.device(request.param)


def run_op(hidden, weight, k, temperature=1.0):
    logprobs = torch.full((*hidden.shape[:2], k), float("nan"), device=hidden.device)  # poisoned
    ids = torch.full((*hidden.shape[:2], k), -7, dtype=torch.long, device=hidden.device)
    torch.ops.jetspec.draft_topk(hidden, weight, temperature, logprobs, ids)
    return logprobs, ids


def assert_topk(logprobs, ids, full, atol=1e-3, gap=2e-4):
    """Checks a top-K answer against ``full`` (the [B, D, V] log-probs of a reference computation), allowing
    for a different float32 summation order: values within ``atol``; ids exact wherever the reference's
    neighbouring values (the (K+1)-th included) are more than ``gap`` apart; each returned id's own
    reference log-prob equal to the value returned with it; ids distinct; values descending, equal values
    by ascending id."""
    k = logprobs.shape[-1]
    full = full.flatten(0, -2).cpu().double()
    logprobs, ids = logprobs.flatten(0, -2).cpu().double(), ids.flatten(0, -2).cpu()
    want = full.sort(dim=-1, descending=True, stable=True)
    torch.testing.assert_close(logprobs, want.values[:, :k], atol=atol, rtol=0)
    torch.testing.assert_close(logprobs, full.gather(1, ids), atol=atol, rtol=0)
    vals = torch.cat([want.values[:, :1] + 1, want.values[:, : k + 1], want.values[:, -1:] - 1], 1)
    apart = (vals[:, 1 : k + 1] - vals[:, 2 : k + 2] > gap) & (vals[:, : k] - vals[:, 1 : k + 1] > gap)
    assert torch.equal(ids[apart], want.indices[:, :k][apart])
    assert all(len(set(row)) == k for row in ids.tolist())
    assert torch.all((logprobs[:, :-1] > logprobs[:, 1:]) | ((logprobs[:, :-1] == logprobs[:, 1:]) & (ids[:, :-1] < ids[:, 1:])))


def reference_log_probs(hidden, weight, temperature=1.0):
    """``log_softmax(hidden @ weight.T / temperature)`` in float32 on the inputs' device."""
    return torch.log_softmax(hidden.float() @ weight.float().T / temperature, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,depth,hidden_size,vocab,k",
                         [(1, 1, 8, 5, 1), (1, 15, 64, 1000, 8), (2, 4, 48, 1531, 32), (1, 3, 16, 7, 7)])
def test_matches_log_softmax_topk(device, dtype, batch, depth, hidden_size, vocab, k, gen):
    hidden = torch.randn(batch, depth, hidden_size, generator=gen).to(device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen).to(device=device, dtype=dtype)
    logprobs, ids = run_op(hidden, weight, k)
    assert_topk(logprobs, ids, reference_log_probs(hidden, weight), atol=1e-4)


def test_temperature_and_ties_rank_by_lower_id(device):
    hidden = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], device=device)
    # rows 1, 3 and 4 tie for the largest logit; rows 0 and 2 tie below them (features 2, 3: zero padding
    # to 16 bytes, which the CUDA kernel reads in)
    weight = torch.tensor([[0.5, 0.0], [2.0, 1.0], [0.5, 3.0], [2.0, -1.0], [2.0, 0.0]])
    weight = torch.nn.functional.pad(weight, (0, 2)).to(device)
    logprobs, ids = run_op(hidden, weight, 4, temperature=0.5)
    assert ids.tolist() == [[[1, 3, 4, 0]]]
    want = torch.log_softmax(torch.tensor([0.5, 2.0, 0.5, 2.0, 2.0]) / 0.5, dim=-1)[[1, 3, 4, 0]]
    torch.testing.assert_close(logprobs.cpu()[0, 0], want)


def test_non_contiguous_hidden_and_strided_weight_rows(device, gen):
    hidden = torch.randn(1, 16, 32, generator=gen).to(device)[:, 1::2]  # slots 1, 3, ... of a block
    big = torch.randn(300, 40, generator=gen).to(device)
    weight = big[::3, :32]  # every third row, the first 32 features: rows strided, features dense
    logprobs, ids = run_op(hidden, weight, 6)
    assert_topk(logprobs, ids, reference_log_probs(hidden, weight), atol=1e-5)


def test_wrapper_and_reference_agree(device, gen):
    hidden = torch.randn(2, 5, 24, generator=gen).to(device)
    weight = torch.randn(333, 24, generator=gen).to(device)
    got = jetspec.ops.draft_topk(hidden, weight, 9, temperature=1.3)
    assert_topk(*got, reference_log_probs(hidden, weight, 1.3), atol=1e-5)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, gen):
    hidden = torch.randn(1, 3, 16, generator=gen).to(device, dtype)
    weight = torch.randn(50, 16, generator=gen).to(device, dtype)
    outs = (torch.empty(1, 3, 4, device=device), torch.empty(1, 3, 4, dtype=torch.long, device=device))
    torch.library.opcheck(torch.ops.jetspec.draft_topk.default, (hidden, weight, 1.0, *outs))


def test_h_zero_matches_reference(device):
    hidden, weight = torch.empty(1, 2, 0, device=device), torch.empty(10, 0, device=device)
    logprobs, ids = run_op(hidden, weight, 3)
    torch.testing.assert_close(logprobs, torch.full_like(logprobs, -math.log(10)))
    assert ids.tolist() == [[[0, 1, 2]] * 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_ties_rank_by_lower_id(device, dtype, temperature):
    # Small integers: every logit is exact in every dtype and summation order, so ties are exact ties.
    g = torch.Generator().manual_seed(7)
    vocab, size = 3001, 64  # not a multiple of the CUDA kernel's 128-row tile
    rows = torch.randint(-2, 3, (5, size), generator=g).float()  # 5 rows -> at most 5 distinct logits < K
    weight = rows[torch.randint(0, 5, (vocab,), generator=g)]
    # the best row of each hidden row appears only at a few ids far apart (different CUDA CTAs)
    hidden = torch.randint(-2, 3, (2, 3, size), generator=g).float()
    weight[[17, 1500, 2999]] = 3.0 * hidden[0, 0].sign()
    logprobs, ids = run_op(hidden.to(device, dtype), weight.to(device, dtype), 32, temperature)
    full = torch.log_softmax(hidden.double() @ weight.double().T / temperature, dim=-1)
    want = full.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(ids.cpu(), want.indices[..., :32])
    assert ids[0, 0, :3].tolist() == [17, 1500, 2999]
    torch.testing.assert_close(logprobs.cpu().double(), want.values[..., :32], atol=1e-5, rtol=0)


# ---- the CUDA kernel --------------------------------------------------------------------------------

ROWS = {1: (1, 1), 5: (1, 5), 16: (2, 8), 33: (3, 11), 64: (4, 16)}


def _random_cases():
    """Every (rows, vocab) pair of the issue's grid with H, K, temperature and dtype dealt out evenly in a
    seeded random order, plus Qwen3-8B's LM head (the headline shape) at 16 and 64 rows."""
    rng = random.Random(5)
    pairs = list(itertools.product(ROWS, (1, 7, 1000, 32001, 151936)))

    def deal(values):
        dealt = [values[i % len(values)] for i in range(len(pairs))]
        rng.shuffle(dealt)
        return dealt

    dtypes = (torch.bfloat16, torch.bfloat16, torch.float16, torch.float32)
    cases = [(rows, vocab, size, min(k, vocab), t, dtype) for (rows, vocab), size, k, t, dtype
             in zip(pairs, deal((64, 576, 4096)), deal((1, 8, 32)), deal((1.0, 0.7)), deal(dtypes))]
    return cases + [(16, 151936, 4096, 32, 1.0, torch.bfloat16), (64, 151936, 4096, 8, 0.7, torch.bfloat16)]


def lm_head_case(rows, vocab, size, dtype, seed):
    """Hidden states and an LM-head weight scaled like a trained one (logits of order 1), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    batch, depth = ROWS.get(rows, (1, rows))
    hidden = torch.randn(batch, depth, size, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(vocab, size, generator=g, device="cuda") / math.sqrt(size)).to(dtype)
    return hidden, weight


@requires_cuda
@pytest.mark.parametrize("rows,vocab,size,k,temperature,dtype", _random_cases())
def test_cuda_random_shapes(rows, vocab, size, k, temperature, dtype):
    hidden, weight = lm_head_case(rows, vocab, size, dtype, seed=rows * vocab + size)
    logprobs, ids = run_op(hidden, weight, k, temperature)
    assert_topk(logprobs, ids, reference_log_probs(hidden, weight, temperature))
    if rows * vocab * size <= 2e9:  # the CPU reference kernel, where it is quick
        want = run_op(hidden.cpu(), weight.cpu(), k, temperature)
        assert_topk(logprobs, ids, reference_log_probs(hidden.cpu(), weight.cpu(), temperature))
        torch.testing.assert_close(logprobs.cpu(), want[0], atol=1e-3, rtol=0)


@requires_cuda
@pytest.mark.parametrize("batch,depth", [(2, 40), (1, 129)])  # more rows than one launch takes (64)
def test_cuda_many_rows(batch, depth):
    hidden, weight = lm_head_case(batch * depth, 5000, 256, torch.bfloat16, seed=3)
    hidden = hidden.view(batch, depth, -1)
    logprobs, ids = run_op(hidden, weight, 16, 0.7)
    assert_topk(logprobs, ids, reference_log_probs(hidden, weight, 0.7))


@requires_cuda
def test_cuda_strided_inputs_and_outputs():
    hidden, weight = lm_head_case(16, 4000, 200, torch.bfloat16, seed=11)
    hidden = hidden.view(1, 16, 200)
    big = torch.zeros(3 * 4000, 216, device="cuda", dtype=torch.bfloat16)
    strided_weight = big[::3, :200]  # row stride 648 elements: the 16-byte pieces still line up
    strided_weight.copy_(weight)
    wide = torch.zeros(1, 17, 204, device="cuda", dtype=torch.bfloat16)
    strided_hidden = wide[:, 1:, :200]  # rows 408 bytes apart: the op copies them
    strided_hidden.copy_(hidden)
    logprobs = torch.empty(1, 8, 16, device="cuda").transpose(1, 2)  # [1, 16, 8], not contiguous
    ids = torch.empty(1, 8, 16, dtype=torch.long, device="cuda").transpose(1, 2)
    torch.ops.jetspec.draft_topk(strided_hidden, strided_weight, 1.0, logprobs, ids)
    assert_topk(logprobs, ids, reference_log_probs(hidden, weight))


@requires_cuda
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "logprobs": a["logprobs"].new_empty(1, 2, 33), "ids": a["ids"].new_empty(1, 2, 33)},
         "the CUDA kernel supports K <= 32, got 33"),
        (lambda a: {**a, "hidden": a["hidden"][..., :60], "weight": a["weight"][:, :60]},
         "H and the row stride must be multiples of 8 (4 for float32)"),
        (lambda a: {**a, "weight": torch.zeros(40, 68, dtype=torch.bfloat16, device="cuda")[:, :64]},
         "got H = 64, row stride 68"),
        (lambda a: {**a, "weight": torch.zeros(40 * 64 + 4, dtype=torch.bfloat16, device="cuda")[4:].view(40, 64)},
         "the data 16-byte aligned"),
        (lambda a: {**a, "weight": a["weight"].cpu()}, "'weight' is on cpu but 'hidden' is on cuda"),
    ],
)
def test_cuda_bad_arguments_raise_value_error(change, message):
    args = {"hidden": torch.randn(1, 2, 64, device="cuda").bfloat16(),
            "weight": torch.randn(40, 64, device="cuda").bfloat16(), "temperature": 1.0,
            "logprobs": torch.empty(1, 2, 3, device="cuda"), "ids": torch.empty(1, 2, 3, dtype=torch.long, device="cuda")}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.jetspec.draft_topk(**change(args))


@requires_cuda
def test_wrapper_takes_the_reference_past_the_kernels_k():
    hidden, weight = lm_head_case(4, 500, 64, torch.bfloat16, seed=2)
    logprobs, ids = jetspec.ops.draft_topk(hidden, weight, 40)
    assert_topk(logprobs, ids, reference_log_probs(hidden, weight))


@requires_cuda
def test_cuda_graph_capture():
    hidden, weight = lm_head_case(16, 32001, 512, torch.bfloat16, seed=4)
    logprobs = torch.empty(2, 8, 8, device="cuda")
    ids = torch.empty(2, 8, 8, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.jetspec.draft_topk(hidden, weight, 1.0, logprobs, ids)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.jetspec.draft_topk(hidden, weight, 1.0, logprobs, ids)
    for seed in (5, 6):
        hidden.copy_(lm_head_case(16, 1, 512, torch.bfloat16, seed)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert_topk(logprobs, ids, reference_log_probs(hidden, weight))


def test_torch_compile_fullgraph(device, gen):
    def top4(hidden, weight):
        logprobs = hidden.new_empty((*hidden.shape[:2], 4), dtype=torch.float32)
        ids = hidden.new_empty((*hidden.shape[:2], 4), dtype=torch.long)
        torch.ops.jetspec.draft_topk(hidden, weight, 0.7, logprobs, ids)
        return logprobs.exp(), ids

    hidden = torch.randn(2, 3, 16, generator=gen).to(device)
    weight = torch.randn(50, 16, generator=gen).to(device)
    # Inductor on the CPU compiles C++ (tens of seconds on a small machine); aot_eager traces the same graph.
    compiled = torch.compile(top4, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    got, want = compiled(hidden, weight), top4(hidden, weight)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
