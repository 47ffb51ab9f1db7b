import math
from collections import Counter

import pytest
import torch

import jetspec
from conftest import requires_cuda
from jetspec.ops import reference
from trees import random_parents

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(batch, nodes, vocab, g, dtype=torch.float32, hit=3.0, ties=False, scale=1.0):
    """Random trees and logits in which a node's children often carry its likely tokens, so walks go deep.
    ``ties``: logits on a coarse grid (many equal values, the top-k/top-p boundaries fall inside ties)."""
    tokens = torch.randint(0, vocab, (batch, nodes), generator=g)
    parents = torch.stack([random_parents(nodes, g, max_depth=int(torch.randint(1, 9, (1,), generator=g)))
                           for _ in range(batch)])
    logits = torch.randn(batch, nodes, vocab, generator=g) * scale
    for b in range(batch):
        for i in range(1, nodes):
            if float(torch.rand(1, generator=g)) < 0.5:
                logits[b, parents[b, i], tokens[b, i]] += hit
    if ties:
        logits = (logits * 2).round() / 2
    num_nodes = torch.randint(1, nodes + 1, (batch,), generator=g)
    num_nodes[0] = nodes
    return tokens, parents, logits.to(dtype), num_nodes


def run_op(tokens, parents, logits, num_nodes, temperature, top_k, top_p, seed, offset, m):
    """The raw op with poisoned outputs; returns the outputs and the offset after the call."""
    batch, device = tokens.shape[0], tokens.device
    per_row = lambda v, dt: torch.as_tensor(v, dtype=dt).reshape(-1).expand(batch).contiguous().to(device)
    accepted = torch.full((batch, m), 7, dtype=torch.long, device=device)
    accept_len = torch.full((batch,), 7, dtype=torch.long, device=device)
    bonus = torch.full((batch,), 7, dtype=torch.long, device=device)
    off = torch.tensor([offset], dtype=torch.long, device=device)
    torch.ops.jetspec.accept_sample(tokens.to(device), parents.to(device), logits.to(device), num_nodes.to(device),
                                    per_row(temperature, torch.float32), per_row(top_k, torch.long),
                                    per_row(top_p, torch.float32), torch.tensor([seed], device=device), off,
                                    accepted, accept_len, bonus)
    return (accepted, accept_len, bonus), int(off)


def assert_same(got, want):
    for g_, w in zip(got, want):
        assert torch.equal(g_.cpu(), w.cpu()), (g_, w)


# ---- the uniforms --------------------------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32 10: counter, key -> output.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, want in cases:
        words = reference.philox4x32_10([[c] for c in counter], *key)
        assert tuple(int(w[0]) for w in words) == want


def test_uniforms_are_distinct_and_uniform():
    u = reference.philox_uniforms(seed=5, offset=0, batch=64, nodes=64)
    assert u.shape == (64, 64) and u.dtype == torch.float64
    assert u.unique().numel() == u.numel() and 0 <= u.min() and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u, reference.philox_uniforms(seed=5, offset=1, batch=64, nodes=64))
    assert not torch.equal(u, reference.philox_uniforms(seed=-5, offset=0, batch=64, nodes=64))


def test_qexp_is_close_to_exp():
    x = torch.cat([torch.linspace(-29.9, 0, 20001), torch.tensor([0.0, -1e-30, -0.34657, -0.34658])])
    e = reference._qexp(x.float())
    rel = ((e.double() - x.double().exp()) / x.double().exp()).abs()
    assert float(rel.max()) < 3e-7
    assert float(reference._qexp(torch.tensor([0.0]))) == 1.0
    assert float(reference._qexp(torch.tensor([-30.01]))) == 0.0


# ---- the op against the reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_temperature_zero_is_accept_greedy(device, dtype, ties, gen):
    for nodes, vocab, m in ((1, 5, 1), (16, 7, 16), (64, 3, 4), (255, 50, 255)):
        tokens, parents, logits, num_nodes = make_case(3, nodes, vocab, gen, dtype, ties=ties)
        got, off = run_op(tokens, parents, logits, num_nodes, 0.0, 5, 0.5, 1, 10, m)
        want = jetspec.ops.accept_greedy(tokens.to(device), parents.to(device), logits.to(device).argmax(-1),
                                         num_nodes.to(device), max_accept=m)
        assert_same(got, want)
        assert off == 11


CONFIGS = [  # temperature, top_k, top_p
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 1, 1.0), (0.8, 3, 1.0), (1.0, 0, 0.9), (0.6, 0, 0.5),
    (1.0, 0, 0.0), (0.7, 5, 0.8), (1.3, 1000, 0.95),
]


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_reference(temperature, top_k, top_p, dtype, gen):
    for nodes, vocab, ties in ((24, 40, False), (24, 40, True), (8, 700, False)):
        tokens, parents, logits, num_nodes = make_case(3, nodes, vocab, gen, dtype, ties=ties)
        seed, offset = int(torch.randint(-2**62, 2**62, (1,), generator=gen)), 123
        got, off = run_op(tokens, parents, logits, num_nodes, temperature, top_k, top_p, seed, offset, nodes)
        u = reference.philox_uniforms(seed, offset, 3, nodes)
        want = reference.accept_sample(tokens, parents, logits, num_nodes, temperature, top_k, top_p, u, nodes)
        assert_same(got, want)
        assert off == offset + 1


def test_cpu_matches_reference_per_row_values(gen):
    tokens, parents, logits, num_nodes = make_case(4, 32, 60, gen, torch.bfloat16)
    temperature, top_k, top_p = [0.0, 0.9, 1.2, 0.5], [0, 4, 0, 7], [1.0, 1.0, 0.7, 0.9]
    got, _ = run_op(tokens, parents, logits, num_nodes, temperature, top_k, top_p, 42, 0, 5)
    u = reference.philox_uniforms(42, 0, 4, 32)
    assert_same(got, reference.accept_sample(tokens, parents, logits, num_nodes, torch.tensor(temperature),
                                             torch.tensor(top_k), torch.tensor(top_p), u, 5))


def test_non_finite_logits(device):
    # -inf tokens are never drawn; a NaN or +inf maximum draws the argmax (the first NaN, as torch.argmax).
    tokens, parents = torch.tensor([[0, 1, 2]]), torch.tensor([[-1, 0, 0]])
    logits = torch.tensor([[[0.0, -math.inf, 1.0, -math.inf]] * 3])
    for offset in range(20):
        (accepted, accept_len, bonus), _ = run_op(tokens, parents, logits, torch.tensor([3]), 1.0, 0, 1.0, 3, offset, 3)
        assert bonus.item() in (0, 2) and accept_len.item() in (1, 2)
    for bad, want in ((math.nan, 1), (math.inf, 1)):
        logits = torch.tensor([[[0.0, bad, 1.0, bad]] * 3])
        (_, _, bonus), _ = run_op(tokens, parents, logits, torch.tensor([1]), 1.0, 0, 1.0, 3, 0, 3)
        assert bonus.item() == want


def test_offset_advances_and_changes_the_draws(device, gen):
    tokens, parents, logits, num_nodes = make_case(64, 8, 30, gen, hit=0.0)
    outs = set()
    for offset in range(4):
        (_, _, bonus), off = run_op(tokens, parents, logits, num_nodes, 1.0, 0, 1.0, 9, offset, 8)
        assert off == offset + 1
        outs.add(tuple(bonus.tolist()))
    assert len(outs) == 4


def test_max_accept_caps_the_path(device):
    # A chain whose every node predicts its child for sure: the whole chain up to the cap, then the next token.
    n, vocab = 10, 16
    tokens = torch.arange(n).view(1, n)
    parents = (torch.arange(n) - 1).view(1, n)
    logits = torch.full((1, n, vocab), -1e4)
    logits[0, torch.arange(n), torch.arange(n) + 1] = 0.0
    for m in (1, 4, n):
        (accepted, accept_len, bonus), _ = run_op(tokens, parents, logits, torch.tensor([n]), 1.0, 0, 1.0, 0, 0, m)
        assert accept_len.item() == m and bonus.item() == m and accepted[0].tolist() == list(range(m))


def test_wrapper_broadcasts_and_advances_offset(device, gen):
    tokens, parents, logits, num_nodes = (t.to(device) for t in make_case(3, 16, 20, gen, torch.float16))
    offset = torch.tensor([7], device=device)
    got = jetspec.ops.accept_sample(tokens, parents, logits, num_nodes, 0.8, top_k=torch.tensor(5), top_p=0.9,
                                    seed=11, offset=offset, max_accept=6)
    assert int(offset) == 8
    u = reference.philox_uniforms(11, 7, 3, 16)
    want = reference.accept_sample(tokens.cpu(), parents.cpu(), logits.cpu(), num_nodes.cpu(), 0.8, 5, 0.9, u, 6)
    for g_, w in zip(got, want):
        assert g_.device == tokens.device and torch.equal(g_.cpu(), w)


# ---- argument checks -----------------------------------------------------------------------------------------

def _args(device, dtype=torch.float32):
    return {
        "tokens": torch.tensor([[1, 2, 3]], device=device),
        "parents": torch.tensor([[-1, 0, 1]], device=device),
        "logits": torch.randn(1, 3, 5, device=device).to(dtype),
        "num_nodes": torch.tensor([3], device=device),
        "temperature": torch.tensor([1.0], device=device),
        "top_k": torch.tensor([0], device=device),
        "top_p": torch.tensor([1.0], device=device),
        "seed": torch.tensor([1], device=device),
        "offset": torch.tensor([0], device=device),
        "accepted": torch.empty(1, 3, dtype=torch.long, device=device),
        "accept_len": torch.empty(1, dtype=torch.long, device=device),
        "bonus": torch.empty(1, dtype=torch.long, device=device),
    }


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("tokens", lambda t, a: t.int(), "'tokens' must have dtype Long"),
        ("logits", lambda t, a: t.double(), "'logits' must be float32, bfloat16 or float16"),
        ("logits", lambda t, a: t[:, :2], "'logits' must have size 3 in dim 1"),
        ("logits", lambda t, a: t[:, :, :0], "vocabulary"),
        ("parents", lambda t, a: t[:, :2], "'parents' must have size 3 in dim 1"),
        ("temperature", lambda t, a: t.double(), "'temperature' must have dtype Float"),
        ("top_k", lambda t, a: t.float(), "'top_k' must have dtype Long"),
        ("top_p", lambda t, a: t.repeat(2), "'top_p' must have size 1 in dim 0"),
        ("seed", lambda t, a: t.repeat(2), "'seed' must hold one value"),
        ("offset", lambda t, a: t.int(), "'offset' must have dtype Long"),
        ("num_nodes", lambda t, a: t.view(1, 1), "'num_nodes' must be 1-D"),
        ("accepted", lambda t, a: t[:, :0], "'accepted' needs room for the root"),
        ("accepted", lambda t, a: torch.empty(1, 6, dtype=torch.long, device=t.device)[:, ::2], "must be contiguous"),
        ("bonus", lambda t, a: a["accept_len"], "'bonus' must not overlap 'accept_len'"),
        ("offset", lambda t, a: a["seed"], "'offset' must not overlap 'seed'"),
        ("accept_len", lambda t, a: a["num_nodes"], "'accept_len' must not overlap 'num_nodes'"),
        ("accepted", lambda t, a: a["tokens"], "'accepted' must not overlap 'tokens'"),
    ],
)
def test_bad_arguments_raise_value_error(device, field, value, message):
    args = _args(device)
    args[field] = value(args[field], args)
    with pytest.raises(ValueError, match=message):
        torch.ops.jetspec.accept_sample(**args)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("field", ["logits", "seed", "offset", "bonus"])
def test_mixed_devices_raise_value_error(field):
    args = _args("cuda")
    args[field] = args[field].cpu()
    with pytest.raises(ValueError, match=f"'{field}' is on cpu"):
        torch.ops.jetspec.accept_sample(**args)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -0.5, "temperature"), ("temperature", math.nan, "temperature"),
        ("temperature", math.inf, "temperature"), ("top_k", -1, "top_k"), ("top_p", 1.5, "top_p"),
        ("top_p", math.nan, "top_p"), ("offset", -1, "offset"), ("offset", 2**32 - 1, "offset"),
        ("num_nodes", 4, "outside"), ("parents", [0, 0, 1], "must be -1"), ("parents", [-1, 0, 2], r"must be in \[0, 2\)"),
    ],
)
def test_cpu_rejects_bad_values(field, value, message):
    args = _args("cpu")
    args[field] = torch.tensor([value], dtype=args[field].dtype) if field != "parents" else torch.tensor([value])
    with pytest.raises(ValueError, match=message):
        torch.ops.jetspec.accept_sample(**args)


def test_opcheck(device, gen):
    for batch, nodes, vocab in ((1, 1, 3), (2, 33, 17)):
        tokens, parents, logits, num_nodes = (t.to(device) for t in make_case(batch, nodes, vocab, gen, torch.bfloat16))
        args = (tokens, parents, logits, num_nodes, torch.full((batch,), 0.7, device=device),
                torch.full((batch,), 3, device=device), torch.full((batch,), 0.9, device=device),
                torch.tensor([3], device=device), torch.tensor([0], device=device),
                torch.empty(batch, nodes, dtype=torch.long, device=device),
                torch.empty(batch, dtype=torch.long, device=device), torch.empty(batch, dtype=torch.long, device=device))
        torch.library.opcheck(torch.ops.jetspec.accept_sample.default, args)


# ---- CUDA against CPU ------------------------------------------------------------------------------------------

GPU_CASES = [  # batch, nodes, vocab, temperature, top_k, top_p, ties, logit scale
    (1, 64, 151936, 1.0, 0, 1.0, False, 3.0),      # plain sampling, 8-CTA clusters
    (1, 64, 151936, 0.6, 20, 0.95, False, 3.0),   # Qwen3's defaults: the top-k finish
    (2, 32, 151936, 0.7, 0, 0.8, False, 3.0),      # top-p radix select
    (2, 32, 151936, 1.0, 2000, 1.0, False, 3.0),   # top-k beyond the finish's capacity
    (2, 32, 50000, 1.0, 300, 0.9, True, 1.0),      # ties at the top-k and top-p boundaries
    (2, 32, 50000, 1.0, 0, 0.9, True, 0.25),       # a flat distribution: top-p to its last level
    (3, 16, 50001, 2.0, 7, 1.0, False, 3.0),       # odd vocabulary: scalar loads
    (3, 16, 40000, 1.0, 0, 0.0, False, 3.0),       # top_p 0: the top token(s)
    (64, 16, 32000, 0.9, 50, 0.9, False, 3.0),     # a batch: fewer CTAs per row
    (5, 16, 1, 1.0, 0, 0.5, False, 1.0),           # V = 1
    (4, 256, 1000, 0.0, 0, 1.0, True, 1.0),        # greedy
]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,nodes,vocab,temperature,top_k,top_p,ties,scale", GPU_CASES)
def test_cuda_matches_cpu(dtype, batch, nodes, vocab, temperature, top_k, top_p, ties, scale):
    g = torch.Generator().manual_seed(vocab + nodes + batch)
    tokens, parents, logits, num_nodes = make_case(batch, nodes, vocab, g, dtype, hit=6.0, ties=ties, scale=scale)
    for offset in (0, 1, 2):
        cpu, cpu_off = run_op(tokens, parents, logits, num_nodes, temperature, top_k, top_p, 77, offset, nodes)
        gpu, gpu_off = run_op(*(t.cuda() for t in (tokens, parents, logits, num_nodes)), temperature, top_k, top_p,
                              77, offset, nodes)
        assert_same(gpu, cpu)
        assert gpu_off == cpu_off == offset + 1


@requires_cuda
@pytest.mark.gpu
def test_cuda_strided_logits_match_cpu():
    g = torch.Generator().manual_seed(3)
    tokens, parents, logits, num_nodes = make_case(2, 16, 30001, g, torch.bfloat16, hit=6.0)
    wide = torch.zeros(2, 16, 30003, dtype=torch.bfloat16)
    wide[..., 1:-1] = logits
    for view in (wide.cuda()[..., 1:-1], logits.cuda().transpose(0, 1).contiguous().transpose(0, 1)):
        cpu, _ = run_op(tokens, parents, logits, num_nodes, 0.9, 40, 0.9, 5, 0, 16)
        gpu, _ = run_op(tokens.cuda(), parents.cuda(), view, num_nodes.cuda(), 0.9, 40, 0.9, 5, 0, 16)
        assert_same(gpu, cpu)


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    g = torch.Generator().manual_seed(5)
    tokens, parents, logits, num_nodes = (t.cuda() for t in make_case(2, 64, 151936, g, torch.bfloat16, hit=6.0, scale=3.0))
    seed, offset = torch.tensor([99], device="cuda"), torch.tensor([40], device="cuda")
    temperature, top_k, top_p = (torch.tensor(v, device="cuda") for v in ([1.0, 0.6], [0, 20], [1.0, 0.95]))

    def call():
        return jetspec.ops.accept_sample(tokens, parents, logits, num_nodes, temperature, top_k, top_p, seed=seed,
                                         offset=offset, max_accept=8)

    eager = [[t.clone() for t in call()] for _ in range(3)]
    offset.fill_(40)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = call()
    offset.fill_(40)
    for want in eager:
        graph.replay()
        assert_same(outs, want)
    assert int(offset) == 43
    assert len({tuple(e[2].tolist()) for e in eager}) > 1 or len({tuple(e[1].tolist()) for e in eager}) > 1


# ---- statistics: the committed sequence is distributed as sampling token by token --------------------------------

# root 0; children of 0: tokens 1, 2, 3, 3 (nodes 1, 2, 3, 8: node 8 shadows node 3); node 1: tokens 0, 4
# (nodes 4, 5); node 2: token 1 (node 6); node 4: token 5 (node 7, at depth 3: with max_accept 3 it is never
# entered, its parent's draw is the bonus).
STAT_TOKENS = [9, 1, 2, 3, 0, 4, 1, 5, 3]
STAT_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4, 0]
STAT_VOCAB, STAT_MAX_ACCEPT, STAT_DRAWS = 10, 3, 20000


def stat_logits():
    g = torch.Generator().manual_seed(2024)
    logits = torch.randn(len(STAT_TOKENS), STAT_VOCAB, generator=g) * 1.5
    for i, p in enumerate(STAT_PARENTS[1:], 1):  # make the tree's tokens likely, so deep paths are frequent
        logits[p, STAT_TOKENS[i]] += 1.5
    return logits


def processed(logits, temperature, top_k, top_p):
    """HF's temperature / top-k / top-p processing and softmax, exactly (float64, no ties in these logits)."""
    z = logits.double() / temperature
    if 0 < top_k < z.numel():
        z = torch.where(z >= z.topk(top_k).values[-1], z, -math.inf)
    probs = z.softmax(-1)
    if top_p < 1:
        order = probs.argsort(descending=True)
        above = torch.cat([torch.zeros(1, dtype=probs.dtype), probs[order].cumsum(0)[:-1]])
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order] = above < top_p
        probs = torch.where(keep, probs, 0)
        probs = probs / probs.sum()
    return probs.tolist()


def exact_distribution(logits, temperature, top_k, top_p):
    """P(committed sequence) by enumerating the walk: {(accepted tokens..., bonus): probability}."""
    children = [{} for _ in STAT_TOKENS]
    for i, p in enumerate(STAT_PARENTS[1:], 1):
        children[p][STAT_TOKENS[i]] = i
    dist = {}

    def walk(node, prefix, prob, depth):
        for y, py in enumerate(processed(logits[node], temperature, top_k, top_p)):
            if py == 0:
                continue
            if depth < STAT_MAX_ACCEPT and y in children[node]:
                walk(children[node][y], prefix + (y,), prob * py, depth + 1)
            else:
                dist[prefix + (y,)] = dist.get(prefix + (y,), 0.0) + prob * py

    walk(0, (), 1.0, 1)
    return dist


def chi2_sf(x, dof):
    try:
        from scipy.stats import chi2
        return float(chi2.sf(x, dof))
    except ImportError:  # regularized upper incomplete gamma Q(dof/2, x/2)
        a, x = dof / 2, x / 2
        if x < a + 1:
            term = total = 1 / a
            for n in range(1, 1000):
                term *= x / (a + n)
                total += term
            return 1 - total * math.exp(-x + a * math.log(x) - math.lgamma(a))
        b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)
        h = d
        for i in range(1, 1000):
            an = -i * (i - a)
            b += 2
            d = 1 / (an * d + b)
            c = b + an / c
            h *= d * c
        return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi_square_p(samples, dist):
    """Pearson's chi-square goodness of fit of the sequences in ``samples``; cells expected below 5 pooled."""
    n = len(samples)
    counts = Counter(samples)
    assert set(counts) <= set(dist), f"impossible sequences drawn: {set(counts) - set(dist)}"
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for seq, p in dist.items():
        if n * p >= 5:
            cells.append((counts.get(seq, 0), n * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(seq, 0), pooled_exp + n * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return chi2_sf(stat, len(cells) - 1)


def committed(tokens, accepted, accept_len, bonus):
    tok = tokens[0].tolist()
    return [tuple(tok[j] for j in row[1:length]) + (y,)
            for row, length, y in zip(accepted.tolist(), accept_len.tolist(), bonus.tolist())]


STAT_CONFIGS = [(0.5, 0, 1.0), (1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 3, 1.0), (0.5, 0, 0.95), (1.0, 0, 0.8),
                (0.5, 5, 0.95), (1.0, 4, 0.9)]


@pytest.mark.parametrize("temperature,top_k,top_p", STAT_CONFIGS)
def test_committed_sequence_distribution(device, temperature, top_k, top_p):
    logits = stat_logits()
    rows = STAT_DRAWS
    tokens = torch.tensor([STAT_TOKENS]).expand(rows, -1).contiguous()
    parents = torch.tensor([STAT_PARENTS]).expand(rows, -1).contiguous()
    (accepted, accept_len, bonus), _ = run_op(tokens, parents, logits.expand(rows, -1, -1).contiguous(),
                                              torch.full((rows,), len(STAT_TOKENS)), temperature, top_k, top_p,
                                              seed=31337, offset=0, m=STAT_MAX_ACCEPT)
    samples = committed(tokens, accepted, accept_len, bonus)
    dist = exact_distribution(logits, temperature, top_k, top_p)
    assert abs(sum(dist.values()) - 1) < 1e-9
    assert chi_square_p(samples, dist) > 1e-3


def wrong_sampler(logits, temperature, top_k, top_p, draws, g):
    """A broken acceptance rule: step into a node's first child whenever its token has nonzero probability,
    otherwise sample as the walk does."""
    children = [[] for _ in STAT_TOKENS]
    for i, p in enumerate(STAT_PARENTS[1:], 1):
        children[p].append(i)
    probs = [torch.tensor(processed(logits[i], temperature, top_k, top_p)) for i in range(len(STAT_TOKENS))]
    samples = []
    for _ in range(draws):
        node, seq = 0, ()
        while True:
            y = int(torch.multinomial(probs[node], 1, generator=g))
            first = children[node][0] if children[node] else None
            if len(seq) + 1 < STAT_MAX_ACCEPT and first is not None and probs[node][STAT_TOKENS[first]] > 0:
                node, seq = first, seq + (STAT_TOKENS[first],)
                continue
            match = [c for c in children[node] if STAT_TOKENS[c] == y]
            if len(seq) + 1 < STAT_MAX_ACCEPT and match:
                node, seq = match[-1], seq + (y,)
                continue
            samples.append(seq + (y,))
            break
    return samples


@pytest.mark.parametrize("temperature,top_k,top_p", STAT_CONFIGS)
def test_wrong_sampler_fails_the_statistics(temperature, top_k, top_p):
    logits = stat_logits()
    samples = wrong_sampler(logits, temperature, top_k, top_p, STAT_DRAWS, torch.Generator().manual_seed(1))
    dist = {**exact_distribution(logits, temperature, top_k, top_p)}
    for seq in set(samples) - set(dist):  # sequences the right walk never commits
        dist[seq] = 0.0
    assert chi_square_p(samples, {k: max(v, 1e-12) for k, v in dist.items()}) < 1e-3


@requires_cuda
@pytest.mark.gpu
def test_committed_sequence_distribution_cuda_clusters():
    # A vocabulary large enough for 8-CTA clusters (few rows a call), background tokens far below the tree's.
    vocab, rows, calls = 40000, 8, STAT_DRAWS // 8
    small = stat_logits()
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(len(STAT_TOKENS), vocab, generator=g) - 9.0
    logits[:, :STAT_VOCAB] = small
    tokens = torch.tensor([STAT_TOKENS], device="cuda").expand(rows, -1).contiguous()
    parents = torch.tensor([STAT_PARENTS], device="cuda").expand(rows, -1).contiguous()
    batch_logits = logits.cuda().expand(rows, -1, -1).contiguous()
    offset = torch.tensor([0], device="cuda")
    samples = []
    for _ in range(calls):
        out = jetspec.ops.accept_sample(tokens, parents, batch_logits, torch.full((rows,), len(STAT_TOKENS), device="cuda"),
                                        1.0, seed=5, offset=offset, max_accept=STAT_MAX_ACCEPT)
        samples += committed(tokens.cpu(), *(t.cpu() for t in out))
    dist = exact_distribution(logits, 1.0, 0, 1.0)
    assert chi_square_p(samples, dist) > 1e-3
