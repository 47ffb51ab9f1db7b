import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import jetspec
from jetspec.ops import Epilogue, has_kernel, reference
from conftest import DEVICES, requires_cuda

NONE, SILU_MUL, RESIDUAL = int(Epilogue.NONE), int(Epilogue.SILU_MUL), int(Epilogue.RESIDUAL)


@pytest.fixture(params=[d for d in DEVICES if has_kernel("skinny_gemm", torch.device(d))])
def device(request):
    """The devices this build has a skinny_gemm kernel for."""
    return torch.device(request.param)


def make(rows, k, n, dtype, device, gen, epilogue=NONE):
    """x, weight (scaled like a trained layer: outputs of order 1) and the residual the epilogue takes."""
    x = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(max(k, 1))).to(device=device, dtype=dtype)
    r = torch.randn(rows, n, generator=gen).to(device=device, dtype=dtype) if epilogue == RESIDUAL else None
    return x, w, r


def run_op(x, w, r=None, epilogue=NONE):
    n_out = w.shape[0] // 2 if epilogue == SILU_MUL else w.shape[0]
    out = torch.full((x.shape[0], n_out), float("nan"), device=x.device, dtype=x.dtype)  # poisoned
    torch.ops.jetspec.skinny_gemm(x, w, r, epilogue, out)
    return out


def check(got, want, dtype):
    """assert_close with the dtype's tolerance."""
    got, want = got.cpu().float(), want.cpu().float()
    if got.numel() == 0:
        assert got.shape == want.shape
        return
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


ROWS = (1, 2, 3, 7, 16, 33, 64)
# (K, N): multiples of 64 and not, K a multiple of 8 (the CUDA kernel's need) except the last two
SHAPES = [(8, 1), (64, 128), (72, 200), (520, 130), (1024, 8), (256, 1000), (13, 10), (1, 6)]


def _cases():
    """Every (rows, shape) pair with epilogue and dtype dealt out round-robin."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    pairs = list(itertools.product(ROWS, SHAPES))
    return [(rows, k, n, (NONE, SILU_MUL, RESIDUAL)[i % 3], dtypes[(i // 3) % 3]) for i, (rows, (k, n)) in enumerate(pairs)]


@pytest.mark.parametrize("rows,k,n,epilogue,dtype", _cases())
def test_matches_reference(device, rows, k, n, epilogue, dtype, gen):
    if device.type == "cuda" and (dtype == torch.float32 or k % 8):
        pytest.skip("outside the CUDA kernel's contract (tested below: ValueError)")
    n = n + n % 2 if epilogue == SILU_MUL else n
    x, w, r = make(rows, k, n, dtype, device, gen, epilogue)
    check(run_op(x, w, r, epilogue), reference.skinny_gemm(x, w, epilogue, r), dtype)


@pytest.mark.parametrize("epilogue", [NONE, SILU_MUL, RESIDUAL])
def test_matches_hf_modules(device, epilogue, gen):
    """The epilogues are the HF modules' steps: nn.Linear, Qwen3MLP's act_fn(gate) * up, the residual add."""
    dtype, rows, k, inter = torch.bfloat16, 5, 64, 48
    gate = torch.nn.Linear(k, inter, bias=False).to(device=device, dtype=dtype)
    up = torch.nn.Linear(k, inter, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
    residual = torch.randn(rows, inter, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        if epilogue == SILU_MUL:
            weight, want, r = torch.cat([gate.weight, up.weight]), F.silu(gate(x)) * up(x), None
        elif epilogue == RESIDUAL:
            weight, want, r = gate.weight, residual + gate(x), residual
        else:
            weight, want, r = gate.weight, gate(x), None
    check(run_op(x, weight, r, epilogue), want, dtype)


def test_zero_sizes(device):
    x, w = torch.randn(3, 0, device=device, dtype=torch.bfloat16), torch.randn(10, 0, device=device, dtype=torch.bfloat16)
    assert torch.equal(run_op(x, w), torch.zeros(3, 10, dtype=torch.bfloat16, device=device))  # K = 0: y = 0
    r = torch.randn(3, 10, device=device, dtype=torch.bfloat16)
    assert torch.equal(run_op(x, w, r, RESIDUAL), r)
    empty = dict(device=device, dtype=torch.bfloat16)
    assert run_op(torch.randn(0, 16, **empty), torch.randn(5, 16, **empty)).shape == (0, 5)
    assert run_op(torch.randn(2, 16, **empty), torch.randn(0, 16, **empty), None, SILU_MUL).shape == (2, 0)


def test_strided_operands(device, gen):
    # x and weight rows strided by multiples of 8 elements (slices of wider buffers), out transposed,
    # residual a broadcast row.
    dtype = torch.bfloat16
    x = torch.randn(7, 3, 200, generator=gen).to(device=device, dtype=dtype)[:, 1, 16:136]  # [7, 120]
    w = torch.randn(300, 136, generator=gen).to(device=device, dtype=dtype)[::2, 8:128]  # [150, 120]
    r = torch.randn(1, 150, generator=gen).to(device=device, dtype=dtype).expand(7, 150)
    for epilogue, res, n_out in ((NONE, None, 150), (SILU_MUL, None, 75), (RESIDUAL, r, 150)):
        out = torch.full((n_out, 7), float("nan"), device=device, dtype=dtype).t()
        torch.ops.jetspec.skinny_gemm(x, w, res, epilogue, out)
        check(out, reference.skinny_gemm(x, w, epilogue, res), dtype)


def test_wrapper(device, gen):
    x = torch.randn(2, 3, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(96, 64, generator=gen) / 8).to(device=device, dtype=torch.bfloat16)
    r = torch.randn(2, 3, 96, generator=gen).to(device=device, dtype=torch.bfloat16)
    for epilogue, res in ((Epilogue.NONE, None), (Epilogue.SILU_MUL, None), (Epilogue.RESIDUAL, r)):
        got = jetspec.ops.skinny_gemm(x, w, epilogue, residual=res)
        assert got.shape == (2, 3, 48 if epilogue == Epilogue.SILU_MUL else 96)
        check(got, reference.skinny_gemm(x, w, int(epilogue), res), torch.bfloat16)
    # rows not dense: the wrapper hands the op a contiguous copy (or falls back)
    check(jetspec.ops.skinny_gemm(x.transpose(0, 1), w), reference.skinny_gemm(x.transpose(0, 1), w), torch.bfloat16)


def _args(device):
    return {"x": torch.randn(4, 16, device=device), "weight": torch.randn(10, 16, device=device), "residual": None,
            "epilogue": NONE, "out": torch.empty(4, 10, device=device)}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].long()}, "'x' must be float32, bfloat16 or float16"),
        (lambda a: {**a, "x": a["x"][None]}, "'x' must be 2-D"),
        (lambda a: {**a, "weight": a["weight"].half()}, "'weight' must have dtype Float"),
        (lambda a: {**a, "weight": a["weight"][:, :8]}, "'weight' must have size 16 in dim 1"),
        (lambda a: {**a, "epilogue": 3}, "epilogue must be 0 (none), 1 (silu_mul) or 2 (residual), got 3"),
        (lambda a: {**a, "epilogue": SILU_MUL, "weight": a["weight"][:9], "out": a["out"][:, :4]},
         "the silu_mul epilogue needs an even number of weight rows"),
        (lambda a: {**a, "epilogue": RESIDUAL}, "'residual' must be given with the residual epilogue (2) and only"),
        (lambda a: {**a, "residual": torch.zeros(4, 10, device=a["x"].device)}, "'residual' must be given with"),
        (lambda a: {**a, "epilogue": RESIDUAL, "residual": torch.zeros(4, 9, device=a["x"].device)},
         "'residual' must have size 10 in dim 1"),
        (lambda a: {**a, "epilogue": SILU_MUL}, "'out' must have size 5 in dim 1"),
        (lambda a: {**a, "out": a["out"][:3]}, "'out' must have size 4 in dim 0"),
        (lambda a: {**a, "out": a["out"].half()}, "'out' must have dtype Float"),
        (lambda a: {**a, "out": torch.empty(1, 10, device=a["x"].device).expand(4, 10)}, "output 'out' overlaps itself"),
        (lambda a: {**a, "out": a["weight"].view(-1)[:40].view(4, 10)}, "output 'out' shares memory with 'weight'"),
        (lambda a: (lambda buf: {**a, "x": buf, "out": buf[:, :10]})(torch.zeros(4, 16, device=a["x"].device)),
         "output 'out' shares memory with 'x'"),
        (lambda a: {**a, "epilogue": RESIDUAL, "residual": a["out"]}, "output 'out' shares memory with 'residual'"),
    ],
)
def test_bad_arguments_raise_value_error(device, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.jetspec.skinny_gemm(**change(_args(device)))


@pytest.mark.parametrize("epilogue", [NONE, SILU_MUL, RESIDUAL])
def test_opcheck(device, epilogue, gen):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w, r = make(3, 32, 24, dtype, device, gen, epilogue)
    out = torch.empty(3, 12 if epilogue == SILU_MUL else 24, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.jetspec.skinny_gemm.default, (x, w, r, epilogue, out))


def test_torch_compile_fullgraph(device, gen):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def mlp(x, w):
        return jetspec.ops.skinny_gemm(x, w, Epilogue.SILU_MUL) * 2

    x, w, _ = make(3, 32, 48, dtype, device, gen)
    compiled = torch.compile(mlp, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    check(compiled(x, w), mlp(x, w), dtype)


# ---- the CUDA kernel --------------------------------------------------------------------------------

# Qwen3-8B's projections (K, N, epilogue): o_proj, packed qkv, packed gate/up, down_proj
QWEN3_8B = [(4096, 4096, RESIDUAL), (4096, 6144, NONE), (4096, 24576, SILU_MUL), (12288, 4096, RESIDUAL)]


@requires_cuda
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n,epilogue", QWEN3_8B)
def test_cuda_qwen3_8b_shapes(rows, k, n, epilogue):
    gen = torch.Generator(device="cuda").manual_seed(rows + n + k)
    x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(n, k, generator=gen, device="cuda") / math.sqrt(k)).bfloat16()
    r = torch.randn(rows, n, generator=gen, device="cuda").bfloat16() if epilogue == RESIDUAL else None
    check(run_op(x, w, r, epilogue), reference.skinny_gemm(x, w, epilogue, r), torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("rows", [1, 9, 17, 64])
@pytest.mark.parametrize("k,n", [(8, 3), (64, 1), (4104, 1), (30000, 130), (2048, 129), (512, 70000), (8200, 1000)])
@pytest.mark.parametrize("epilogue", [NONE, SILU_MUL, RESIDUAL])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_split_and_edge_shapes(rows, k, n, epilogue, dtype):
    """K split across clusters of 1 to 8 CTAs (few weight rows, long K), K not a multiple of the 64-element
    stage, N not a multiple of the 128-row tile, gate/up halves not multiples of 64, many tiles."""
    n = n + n % 2 if epilogue == SILU_MUL else n
    gen = torch.Generator(device="cuda").manual_seed(rows * 31 + k + n)
    x = torch.randn(rows, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=gen, device="cuda") / math.sqrt(k)).to(dtype)
    r = torch.randn(rows, n, generator=gen, device="cuda").to(dtype) if epilogue == RESIDUAL else None
    check(run_op(x, w, r, epilogue), reference.skinny_gemm(x, w, epilogue, r), dtype)


@requires_cuda
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": torch.zeros(65, 64, device="cuda", dtype=torch.bfloat16),
                    "out": torch.zeros(65, 40, device="cuda", dtype=torch.bfloat16)},
         "the CUDA kernel supports R <= 64 rows, got 65"),
        (lambda a: {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in a.items()},
         "the CUDA kernel takes bfloat16 or float16, got float32"),
        (lambda a: {**a, "x": a["x"][:, :60], "weight": a["weight"][:, :60]}, "K = 60"),
        (lambda a: {**a, "weight": torch.zeros(40, 68, dtype=torch.bfloat16, device="cuda")[:, :64]},
         "row strides 64 ('x') and 68 ('weight')"),
        (lambda a: {**a, "x": torch.zeros(2 * 64 + 4, dtype=torch.bfloat16, device="cuda")[4:].view(2, 64)},
         "the data 16-byte aligned"),
        (lambda a: {**a, "weight": a["weight"].cpu()}, "'weight' is on cpu but 'x' is on cuda"),
    ],
)
def test_cuda_bad_arguments_raise_value_error(change, message):
    args = {"x": torch.randn(2, 64, device="cuda").bfloat16(), "weight": torch.randn(40, 64, device="cuda").bfloat16(),
            "residual": None, "epilogue": NONE, "out": torch.empty(2, 40, device="cuda", dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.jetspec.skinny_gemm(**change(args))


@requires_cuda
@pytest.mark.parametrize("rows,k", [(65, 64), (200, 64), (3, 60)])
def test_wrapper_falls_back_to_linear(rows, k):
    """Past the kernel's rows (and for K not a multiple of 8) the wrapper runs F.linear and the epilogue."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(96, k, generator=gen, device="cuda") / 8).bfloat16()
    r = torch.randn(rows, 96, generator=gen, device="cuda").bfloat16()
    for epilogue, res in ((Epilogue.NONE, None), (Epilogue.SILU_MUL, None), (Epilogue.RESIDUAL, r)):
        check(jetspec.ops.skinny_gemm(x, w, epilogue, residual=res), reference.skinny_gemm(x, w, int(epilogue), res),
              torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("pdl", ["1", "0"])  # programmatic dependent launch on and off
@pytest.mark.parametrize("rows,k,n,epilogue", [(16, 4096, 4096, RESIDUAL), (64, 4096, 1024, SILU_MUL), (1, 512, 300, NONE)])
def test_cuda_graph_capture(rows, k, n, epilogue, pdl, monkeypatch):
    monkeypatch.setenv("JETSPEC_PDL", pdl)
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(n, k, generator=gen, device="cuda") / math.sqrt(k)).bfloat16()
    r = torch.randn(rows, n, generator=gen, device="cuda").bfloat16() if epilogue == RESIDUAL else None
    out = torch.empty(rows, n // 2 if epilogue == SILU_MUL else n, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.jetspec.skinny_gemm(x, w, r, epilogue, out)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.jetspec.skinny_gemm(x, w, r, epilogue, out)
    for seed in (5, 6):
        x.copy_(torch.randn(rows, k, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run_op(x, w, r, epilogue))  # deterministic: bitwise the eager call


@requires_cuda
@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_cuda_mlp_chain(rows, pdl, monkeypatch):
    """A decoder MLP block, each op reading what the one before wrote (with programmatic dependent launch the
    next kernel starts early and streams its weight, but reads x only after the previous kernel is done):
    eager and graph replays agree bitwise and match the reference chain."""
    monkeypatch.setenv("JETSPEC_PDL", pdl)
    hidden, inter = 1024, 3072
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, hidden, generator=gen, device="cuda").bfloat16()
    residual = torch.randn(rows, hidden, generator=gen, device="cuda").bfloat16()
    norm_w = (1 + torch.randn(hidden, generator=gen, device="cuda") / 4).bfloat16()
    gate_up = (torch.randn(2 * inter, hidden, generator=gen, device="cuda") / math.sqrt(hidden)).bfloat16()
    down = (torch.randn(hidden, inter, generator=gen, device="cuda") / math.sqrt(inter)).bfloat16()
    normed, h = torch.empty_like(x), torch.empty_like(x)
    act = torch.empty(rows, inter, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)

    def block():
        torch.ops.jetspec.rms_norm(x, residual, norm_w, 1e-6, normed, h)
        torch.ops.jetspec.skinny_gemm(normed, gate_up, None, SILU_MUL, act)
        torch.ops.jetspec.skinny_gemm(act, down, h, RESIDUAL, out)

    block()
    eager = out.clone()
    want_normed, want_h = reference.rms_norm(x, norm_w, 1e-6, residual)
    want = reference.skinny_gemm(reference.skinny_gemm(want_normed, gate_up, SILU_MUL), down, RESIDUAL, want_h)
    check(eager, want, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):
            block()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
