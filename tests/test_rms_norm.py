import itertools

import pytest
import torch

import jetspec
from jetspec.ops import has_kernel, reference
from conftest import DEVICES, requires_cuda

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: residual given, residual_out given
MODES = [(False, False), (True, False), (True, True), (False, True)]


@pytest.fixture(params=[d for d in DEVICES if has_kernel("rms_norm", torch.device(d))])
def device(request):
    """The devices this build has an rms_norm kernel for."""
    return torch.device(request.param)


def run_op(x, weight, eps, residual=None, with_residual_out=None):
    """The op on fresh outputs poisoned with NaN; returns (out, residual_out or None)."""
    with_residual_out = residual is not None if with_residual_out is None else with_residual_out
    out = torch.full_like(x, float("nan"))
    h = torch.full_like(x, float("nan")) if with_residual_out else None
    torch.ops.jetspec.rms_norm(x, residual, weight, eps, out, h)
    return out, h


def assert_close(got, want):
    """Equal up to the float32 summation order of the mean square."""
    got, want = got.cpu(), want.cpu()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # normed may round the other way (one ulp), and weight * normed rounds again: two ulps, relative
        rtol = 2**-6 if got.dtype == torch.bfloat16 else 2**-9
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-3)


def make(rows, hidden, dtype, device, gen, residual=True):
    x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    r = (torch.randn(rows, hidden, generator=gen) * 2).to(device=device, dtype=dtype) if residual else None
    w = (1 + torch.randn(hidden, generator=gen) / 4).to(device=device, dtype=dtype)
    return x, r, w


def _cases():
    """rows x hidden x the four residual modes, dtypes dealt out round-robin."""
    grid = list(itertools.product((0, 1, 2, 3, 7, 16, 33, 64), (1, 7, 8, 128, 1000, 4096), MODES))
    return [(*case, DTYPES[i % len(DTYPES)]) for i, case in enumerate(grid)]


@pytest.mark.parametrize("rows,hidden,mode,dtype", _cases())
def test_matches_reference(device, rows, hidden, mode, dtype, gen):
    with_residual, with_residual_out = mode
    x, r, w = make(rows, hidden, dtype, device, gen, residual=with_residual)
    out, h = run_op(x, w, 1e-6, r, with_residual_out)
    want_out, want_h = reference.rms_norm(x, w, 1e-6, r)
    assert_close(out, want_out)
    if with_residual_out:
        assert torch.equal(h, want_h)  # one rounded addition: exact on every device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_hf_modules(device, dtype, gen):
    modeling = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    norm = modeling.Qwen3RMSNorm(256, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(256, generator=gen) / 4)
    x, r, _ = make(9, 256, dtype, device, gen)
    with torch.no_grad():
        h = r + x  # the decoder layer's residual add
        want = norm(h)
    out, got_h = run_op(x, norm.weight.detach(), 1e-6, r)
    assert torch.equal(got_h, h)
    if device.type == "cpu":
        assert torch.equal(out, want)
    else:
        assert_close(out, want)


def test_eps_and_zero_rows(device):
    # A zero row normalises to 0 * rsqrt(eps) = 0; eps = 0 makes it 0 * inf = NaN, as the HF module does.
    x = torch.zeros(2, 16, device=device, dtype=torch.bfloat16)
    w = torch.ones(16, device=device, dtype=torch.bfloat16)
    assert torch.equal(run_op(x, w, 1e-5)[0], x)
    assert torch.isnan(run_op(x, w, 0.0)[0]).all()
    x = torch.full((1, 4), 3.0, device=device)
    out, _ = run_op(x, torch.ones(4, device=device), 16.0)  # mean square 9: 3 / sqrt(9 + 16) = 0.6
    torch.testing.assert_close(out.cpu(), torch.full((1, 4), 0.6))


def test_strided_rows(device, gen):
    # Rows of each tensor strided (slices of wider buffers), 16-byte aligned (the CUDA vector path) or not.
    for offset, width in ((0, 264), (1, 259)):
        big = torch.randn(5, 3, width, generator=gen).to(device=device, dtype=torch.bfloat16)
        x, r = big[:, 0, offset:offset + 200], big[:, 2, offset:offset + 200]  # inputs may share a buffer
        w = (1 + torch.randn(200, generator=gen) / 4).to(device=device, dtype=torch.bfloat16)
        outs = [torch.full((5, width), float("nan"), device=device, dtype=torch.bfloat16) for _ in range(2)]
        out, h = (o[:, offset:offset + 200] for o in outs)
        torch.ops.jetspec.rms_norm(x, r, w, 1e-6, out, h)
        want_out, want_h = reference.rms_norm(x, w, 1e-6, r)
        assert_close(out, want_out)
        assert torch.equal(h, want_h)
        for o in outs:
            assert torch.isnan(o[:, :offset]).all() and torch.isnan(o[:, offset + 200:]).all()


def test_cpu_takes_any_strides(gen):
    x = torch.randn(32, 6, generator=gen).t()  # [6, 32], elements of a row 6 apart
    w = torch.randn(32, generator=gen)
    out = torch.empty(32, 6).t()
    torch.ops.jetspec.rms_norm(x, None, w, 1e-6, out, None)
    assert_close(out, reference.rms_norm(x, w, 1e-6)[0])


def test_wrapper(device, gen):
    x = torch.randn(2, 3, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    r = torch.randn(2, 3, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(64, generator=gen).to(device=device, dtype=torch.bfloat16)
    out, h = jetspec.ops.rms_norm(x, w, 1e-6, residual=r)
    want_out, want_h = reference.rms_norm(x, w, 1e-6, r)
    assert out.shape == h.shape == x.shape
    assert_close(out, want_out)
    assert torch.equal(h, want_h)
    assert_close(jetspec.ops.rms_norm(x.transpose(0, 1), w, 1e-6), reference.rms_norm(x.transpose(0, 1), w, 1e-6)[0])


def _args(device):
    return {"x": torch.randn(4, 16, device=device), "residual": torch.randn(4, 16, device=device),
            "weight": torch.randn(16, device=device), "eps": 1e-6, "out": torch.empty(4, 16, device=device),
            "residual_out": torch.empty(4, 16, device=device)}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].long()}, "'x' must be float32, bfloat16 or float16"),
        (lambda a: {**a, "x": a["x"][None]}, "'x' must be 2-D"),
        (lambda a: {**a, "residual": a["residual"].double()}, "'residual' must have dtype Float"),
        (lambda a: {**a, "residual": a["residual"][:3]}, "'residual' must have the shape of 'x' [4, 16]"),
        (lambda a: {**a, "weight": a["weight"][:8]}, "'weight' must have size 16 in dim 0"),
        (lambda a: {**a, "weight": a["weight"].half()}, "'weight' must have dtype Float"),
        (lambda a: {**a, "eps": -1e-6}, "eps must be finite and >= 0 in float32"),
        (lambda a: {**a, "eps": float("nan")}, "eps must be finite and >= 0 in float32"),
        (lambda a: {**a, "eps": 1e300}, "eps must be finite and >= 0 in float32"),
        (lambda a: {**a, "out": a["out"].bfloat16()}, "'out' must have dtype Float"),
        (lambda a: {**a, "out": a["out"][:, :8]}, "'out' must have the shape of 'x'"),
        (lambda a: {**a, "residual_out": a["residual_out"].t()}, "'residual_out' must have the shape of 'x'"),
        (lambda a: {**a, "out": a["x"]}, "output 'out' shares memory with 'x'"),
        (lambda a: {**a, "residual_out": a["residual"]}, "output 'residual_out' shares memory with 'residual'"),
        (lambda a: {**a, "residual_out": a["out"]}, "output 'out' shares memory with 'residual_out'"),
        (lambda a: {**a, "out": torch.empty(1, 16, device=a["x"].device).expand(4, 16)}, "output 'out' overlaps itself"),
    ],
)
def test_bad_arguments_raise_value_error(device, change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        torch.ops.jetspec.rms_norm(**change(_args(device)))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, with_residual, dtype, gen):
    x, r, w = make(5, 24, dtype, device, gen, residual=with_residual)
    out, h = torch.empty_like(x), torch.empty_like(x) if with_residual else None
    torch.library.opcheck(torch.ops.jetspec.rms_norm.default, (x, r, w, 1e-6, out, h))


def test_torch_compile_fullgraph(device, gen):
    def norm(x, r, w):
        out, h = torch.empty_like(x), torch.empty_like(x)
        torch.ops.jetspec.rms_norm(x, r, w, 1e-6, out, h)
        return out * 2, h

    x, r, w = make(3, 32, torch.float32, device, gen)
    compiled = torch.compile(norm, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    got, want = compiled(x, r, w), norm(x, r, w)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ---- the CUDA kernel --------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("rows", [1, 5, 64, 1000, 4099])
@pytest.mark.parametrize("hidden", [128, 1024, 4096, 5120, 8192, 16384, 4100, 13])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_kernel(rows, hidden, dtype):
    """Every block shape (16 to 1024 threads a row), both the vector and the scalar path (H = 4100, 13)."""
    gen = torch.Generator().manual_seed(rows * 7 + hidden)
    x, r, w = make(rows, hidden, dtype, "cpu", gen)
    want_out, want_h = run_op(x, w, 1e-6, r)
    out, h = run_op(x.cuda(), w.cuda(), 1e-6, r.cuda())
    assert_close(out, want_out)
    assert torch.equal(h.cpu(), want_h)


@requires_cuda
def test_cuda_float32_and_unaligned_pointers(gen):
    x, r, w = make(33, 1024, torch.float32, "cuda", gen)
    assert_close(run_op(x, w, 1e-5, r)[0], reference.rms_norm(x, w, 1e-5, r)[0])
    # one element past 16-byte alignment: the scalar path
    buf = torch.randn(33 * 1024 + 1, generator=gen).to("cuda", torch.bfloat16)
    x = buf[1:].view(33, 1024)
    w = torch.randn(1024, generator=gen).to("cuda", torch.bfloat16)
    assert_close(run_op(x, w, 1e-5)[0], reference.rms_norm(x, w, 1e-5)[0])


@requires_cuda
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": torch.zeros(16, 4, device="cuda").t()}, "the elements of each row of 'x' dense"),
        (lambda a: {**a, "out": torch.zeros(16, 4, device="cuda").t()}, "the elements of each row of 'out' dense"),
        (lambda a: {**a, "x": torch.zeros(4, 16400, device="cuda"), "residual": None, "residual_out": None,
                    "weight": torch.ones(16400, device="cuda"), "out": torch.zeros(4, 16400, device="cuda")},
         "the CUDA kernel supports H <= 16384, got 16400"),
        (lambda a: {**a, "weight": a["weight"].cpu()}, "'weight' is on cpu but 'x' is on cuda"),
    ],
)
def test_cuda_bad_arguments_raise_value_error(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.jetspec.rms_norm(**change(_args("cuda")))


@requires_cuda
def test_wrapper_takes_the_reference_past_the_kernels_hidden(gen):
    x, r, w = make(3, 16400, torch.bfloat16, "cuda", gen)
    out, h = jetspec.ops.rms_norm(x, w, 1e-6, residual=r)
    want_out, want_h = reference.rms_norm(x, w, 1e-6, r)
    assert torch.equal(out, want_out) and torch.equal(h, want_h)


@requires_cuda
@pytest.mark.parametrize("pdl", ["1", "0"])  # programmatic dependent launch on and off
@pytest.mark.parametrize("rows,hidden", [(7, 4096), (300, 128), (2, 13)])
def test_cuda_graph_capture(rows, hidden, pdl, gen, monkeypatch):
    monkeypatch.setenv("JETSPEC_PDL", pdl)
    x, r, w = make(rows, hidden, torch.bfloat16, "cuda", gen)
    out, h = torch.empty_like(x), torch.empty_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.jetspec.rms_norm(x, r, w, 1e-6, out, h)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.jetspec.rms_norm(x, r, w, 1e-6, out, h)
    for seed in (5, 6):
        x2, r2, _ = make(rows, hidden, torch.bfloat16, "cuda", torch.Generator().manual_seed(seed))
        x.copy_(x2), r.copy_(r2)
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_h = run_op(x, w, 1e-6, r)  # eager, same kernel: bitwise equal
        assert torch.equal(out, want_out) and torch.equal(h, want_h)
