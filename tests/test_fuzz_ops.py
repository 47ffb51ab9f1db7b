"""Fuzzing of every op against its reference (jetspec.ops.reference), on the CPU and on CUDA when present.

Each case is drawn from its own seed: random valid arguments (dtypes, GQA ratios, strided views, batches,
sizes at and around each limit) must match the reference, and random invalid ones must raise ValueError
before any kernel runs (their outputs untouched). A few checks depend on tensor values the CUDA kernels
cannot read without a host sync: there the call must complete instead (the contract's clamping). Cases
per op and device: env JETSPEC_FUZZ_CASES (default 200). With env JETSPEC_FUZZ_REPORT set, the tally (cases,
valid, invalid, mismatches, unexpected exceptions, invalid calls accepted, the first failures) is written
there as JSON."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from jetspec.ops import LIMITS, reference
from jetspec.ops.tree import pack_mask, words_for
from test_draft_topk import assert_topk, reference_log_probs
from test_op_inputs import assert_matches_with_non_finite
from test_tree_attention import assert_close_rows

CASES = int(os.environ.get("JETSPEC_FUZZ_CASES", "200"))
INT64_MAX = 2**63 - 1
TALLY: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("JETSPEC_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(TALLY, f, indent=1, sort_keys=True)


@dataclass
class Case:
    """One call. expect: "ok" (then `check` compares with the reference, if given) or "raise" (ValueError)."""

    desc: str
    call: Callable[[], None]
    expect: str = "ok"
    check: Callable[[], None] | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)  # must be untouched by a rejected call


def cuda_limit(device, op, name):
    """The CUDA kernel's limit `name` of `op` on `device`, or None (no limit)."""
    return LIMITS.get(op, {}).get(device.type, {}).get(name)


def around(r: random.Random, limit: int) -> int:
    return limit + r.choice((-1, 0, 1))


def other_device(r, device):
    return torch.device("meta") if device.type == "cpu" else torch.device(r.choice(("cpu", "meta")))


def relayout(t: torch.Tensor, r: random.Random, dims: int | None = None) -> torch.Tensor:
    """The values of t in a random layout: contiguous, every other element of a larger buffer along a
    dim, or two dims stored in swapped order; only the first `dims` dims (default all; negative: all but
    that many) change layout."""
    dims = t.dim() if dims is None else (dims if dims >= 0 else t.dim() + dims)
    kind = r.choice(("contiguous", "every_other", "permuted"))
    if dims < 1 or t.numel() == 0 or kind == "contiguous":
        return t.contiguous()
    if kind == "every_other":
        d = r.randrange(dims)
        shape = list(t.shape)
        shape[d] *= 2
        big = torch.empty(shape, dtype=t.dtype, device=t.device)
        view = big.narrow(d, 1, 2 * t.shape[d] - 1)[(slice(None),) * d + (slice(None, None, 2),)]
        view.copy_(t)
        return view
    if dims < 2:
        return t.contiguous()
    a, b = r.sample(range(dims), 2)
    return t.transpose(a, b).contiguous().transpose(a, b)


def poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.is_floating_point() else -7) if t.device.type != "meta" else t


def fuzz(op: str, device: torch.device, make: Callable[[random.Random, torch.Generator, torch.device], Case]):
    tally = {"cases": 0, "valid": 0, "invalid": 0, "mismatches": 0, "unexpected": 0, "accepted_invalid": 0,
             "failures": []}
    TALLY[f"{op}/{device.type}"] = tally
    seeds = random.Random(f"{op}/{device.type}")

    def fail(key, seed, case, what):
        tally[key] += 1
        if len(tally["failures"]) < 10:
            tally["failures"].append(f"seed {seed}: {case.desc}: {what}")

    for _ in range(CASES):
        seed = seeds.randrange(2**32)
        case = make(random.Random(seed), torch.Generator().manual_seed(seed), device)
        tally["cases"] += 1
        tally["valid" if case.expect == "ok" else "invalid"] += 1
        before = [t.clone() for t in case.outputs]
        try:
            case.call()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except ValueError as e:
            if case.expect != "raise":
                fail("unexpected", seed, case, f"ValueError: {e}")
            elif not all(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()))
                         for a, b in zip(before, case.outputs)):
                fail("unexpected", seed, case, "an output was written before the ValueError")
            continue
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            fail("unexpected", seed, case, f"{type(e).__name__}: {e}")
            continue
        if case.expect == "raise":
            fail("accepted_invalid", seed, case, "no ValueError")
        elif case.check is not None:
            try:
                case.check()
            except AssertionError as e:
                fail("mismatches", seed, case, str(e).splitlines()[0] if str(e) else "mismatch")
    problems = tally["mismatches"] + tally["unexpected"] + tally["accepted_invalid"]
    assert problems == 0, json.dumps(tally, indent=1)


# ---- kv_compact -----------------------------------------------------------------------------------------


def make_kv_compact(r, g, device) -> Case:
    planes, batch = r.randint(1, 4), r.randint(1, 3)
    row = r.choice([(), (r.randint(1, 5),), (r.randint(1, 3), r.choice((8, 64)))])
    dtype = r.choice([torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int32])
    max_accept = r.choice([r.randint(1, 8), around(r, 64), r.randint(65, 200)])  # the CUDA short/long split
    slots = max_accept + r.randint(0, 40)
    cache = torch.randint(-100, 100, (planes, batch, slots, *row), generator=g).to(dtype)
    accepted = torch.full((batch, max_accept), -1, dtype=torch.long)
    accept_len = torch.tensor([r.randint(0, max_accept) for _ in range(batch)])
    base = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        n = int(accept_len[b])
        span = r.randint(n, slots) if n else r.randint(0, slots)
        base[b] = r.randint(0, slots - span)
        if n:
            accepted[b, :n] = torch.tensor([0] + sorted(r.sample(range(1, span), n - 1)))
    cache = relayout(cache.to(device), r, dims=3)  # the row dims stay dense
    args = {"cache": cache, "accepted": relayout(accepted.to(device), r), "accept_len": accept_len.to(device),
            "base": base.to(device)}

    mutation = r.choice([None] * 6 + ["arg", "arg", "value"])
    expect, desc = "ok", "valid"
    if mutation == "arg":
        desc = r.choice(["accepted int32", "accept_len float", "base 2-D", "batch mismatch", "cache 2-D",
                         "row dims not dense", "device", "alias"])
        expect = "raise"
        if desc == "accepted int32":
            args["accepted"] = args["accepted"].int()
        elif desc == "accept_len float":
            args["accept_len"] = args["accept_len"].float()
        elif desc == "base 2-D":
            args["base"] = args["base"].view(1, -1)
        elif desc == "batch mismatch":
            args["accepted"] = torch.cat([args["accepted"], args["accepted"][:1]])
        elif desc == "cache 2-D":
            args["cache"] = torch.zeros(batch, slots, dtype=dtype, device=device)
        elif desc == "row dims not dense":
            args["cache"] = torch.zeros(planes, batch, slots, 3, 4, dtype=dtype, device=device).transpose(3, 4)
        elif desc == "device":
            name = r.choice(["cache", "accepted", "accept_len", "base"])
            args[name] = args[name].to(other_device(r, device))
            desc += f" ({name})"
        else:
            big = torch.zeros(planes, batch, slots + 1, max_accept, dtype=torch.long, device=device)
            big[0, :, 0] = args["accepted"]
            args["cache"], args["accepted"] = big, big[0, :, 0]
    elif mutation == "value":  # the CPU kernel raises; the CUDA kernel skips what is out of range
        expect = "raise" if device.type == "cpu" else "ok"
        b = r.randrange(batch)
        desc = r.choice(["accept_len > M", "accept_len < 0", "base < 0", "base > S"]
                        + (["offset past the cache", "not increasing"] if max_accept >= 2 else []))
        if desc == "accept_len > M":
            args["accept_len"][b] = max_accept + r.randint(1, 2**40)
        elif desc == "accept_len < 0":
            args["accept_len"][b] = -r.randint(1, 2**40)
        elif desc == "base < 0":
            args["base"][b] = -r.randint(1, 2**62)
        elif desc == "base > S":
            args["base"][b] = slots + r.randint(1, 2**62)
        else:
            start = int(args["base"][b])
            bad = r.choice([INT64_MAX, INT64_MAX - start, 2**32 + 1, 2**62]) if desc.startswith("offset") else 0
            args["accept_len"][b] = 2
            args["accepted"][b, :2] = torch.tensor([0, bad])
            desc += f" ({bad})"
    desc = f"{desc}: planes {planes} batch {batch} slots {slots} row {row} {dtype} M {max_accept}"
    expected = None
    if expect == "ok" and mutation is None:
        expected = args["cache"].clone()
        reference.kv_compact(expected, args["accepted"], args["accept_len"], args["base"])

    def check():
        assert torch.equal(args["cache"], expected), "cache differs from the reference"

    return Case(desc, lambda: torch.ops.jetspec.kv_compact(**args), expect, check if expected is not None else None,
                [args["cache"]] if args["cache"].device.type != "meta" else [])


@pytest.mark.filterwarnings("ignore")
def test_fuzz_kv_compact(device):
    fuzz("kv_compact", device, make_kv_compact)


# ---- accept_greedy --------------------------------------------------------------------------------------


def random_tree_parents(r: random.Random, n: int) -> list[int]:
    """Parents in node order: node i extends node i - 1 (chains) or a random earlier node."""
    return [-1] + [i - 1 if r.random() < 0.5 else r.randrange(i) for i in range(1, n)]


def make_accept_greedy(r, g, device) -> Case:
    limit = cuda_limit(device, "accept_greedy", "nodes")
    batch = r.randint(1, 4)
    nodes = r.choice([r.randint(1, 8)] * 3 + [r.randint(9, 300)] * 2 + [around(r, limit or 8192)])
    vocab = r.randint(1, 6)
    tokens = torch.randint(0, vocab, (batch, nodes), generator=g)
    parents = torch.tensor([random_tree_parents(r, nodes) for _ in range(batch)])
    target = torch.randint(0, vocab, (batch, nodes), generator=g)
    num_nodes = torch.tensor([r.randint(1, nodes) for _ in range(batch)])
    max_accept = r.randint(1, nodes + 2)
    ins = {"tokens": tokens, "parents": parents, "target_ids": target, "num_nodes": num_nodes}
    args = {k: relayout(v.to(device), r) for k, v in ins.items()}
    args.update(accepted=torch.empty(batch, max_accept, dtype=torch.long, device=device),
                accept_len=torch.empty(batch, dtype=torch.long, device=device),
                bonus=torch.empty(batch, dtype=torch.long, device=device))
    for name in ("accepted", "accept_len", "bonus"):
        poisoned(args[name])

    expect = "raise" if limit is not None and nodes > limit else "ok"
    mutation = r.choice([None] * 6 + ["arg", "arg", "value"])
    desc = "valid" if expect == "ok" else "past the CUDA node limit"
    if mutation == "arg":
        expect = "raise"
        desc = r.choice(["tokens int32", "parents narrower", "num_nodes 2-D", "no room for the root", "bonus float",
                         "device", "alias", "no nodes"] + (["accepted strided"] if batch * max_accept > 1 else []))
        if desc == "tokens int32":
            args["tokens"] = args["tokens"].int()
        elif desc == "parents narrower":
            args["parents"] = args["parents"][:, : nodes - 1]
        elif desc == "num_nodes 2-D":
            args["num_nodes"] = args["num_nodes"].view(-1, 1)
        elif desc == "no room for the root":
            args["accepted"] = args["accepted"][:, :0]
        elif desc == "bonus float":
            args["bonus"] = args["bonus"].float()
        elif desc == "accepted strided":
            args["accepted"] = torch.empty(batch, 2 * max_accept, dtype=torch.long, device=device)[:, ::2]
        elif desc == "device":
            name = r.choice(list(args))
            args[name] = args[name].to(other_device(r, device))
            desc += f" ({name})"
        elif desc == "alias":
            out, other = r.choice([("bonus", "accept_len"), ("accept_len", "num_nodes"), ("accepted", "tokens")])
            args[out] = args[other]
            desc += f" ({out} is {other})"
        else:
            args["tokens"] = args["tokens"][:, :0]
    elif mutation == "value" and expect == "ok":
        expect = "raise" if device.type == "cpu" else "ok"
        desc = r.choice(["num_nodes 0", "num_nodes > N", "root parent", "parent after node", "negative parent"])
        b = r.randrange(batch)
        if desc == "num_nodes 0":
            args["num_nodes"][b] = 0
        elif desc == "num_nodes > N":
            args["num_nodes"][b] = nodes + r.randint(1, 2**40)
        elif desc == "root parent":
            args["parents"][b, 0] = r.choice([0, 5, -2])
        elif nodes >= 2:
            args["num_nodes"][b] = nodes
            i = r.randrange(1, nodes)
            args["parents"][b, i] = r.choice([i, i + 1, 2**40]) if desc == "parent after node" else -r.randint(1, 2**40)
        else:
            args["num_nodes"][b] = 2
    desc = f"{desc}: batch {batch} nodes {nodes} M {max_accept}"
    outs = [args["accepted"], args["accept_len"], args["bonus"]]

    def check():
        want = reference.accept_greedy(*(ins[k] for k in ("tokens", "parents", "target_ids", "num_nodes")), max_accept)
        for got, w, name in zip(outs, want, ("accepted", "accept_len", "bonus")):
            assert torch.equal(got.cpu(), w), f"{name} differs from the reference"

    return Case(desc, lambda: torch.ops.jetspec.accept_greedy(**args), expect,
                check if mutation is None and expect == "ok" else None, [t for t in outs if t.device.type != "meta"])


@pytest.mark.filterwarnings("ignore")
def test_fuzz_accept_greedy(device):
    fuzz("accept_greedy", device, make_accept_greedy)


# ---- build_tree -----------------------------------------------------------------------------------------

TIE_VALUES = [0.0, -0.5, -1.0, -2.0]


def make_build_tree(r, g, device) -> Case:
    limits = {name: cuda_limit(device, "build_tree", name) for name in ("depth", "width", "nodes")}
    batch = r.randint(1, 3)
    big = r.random() < 0.15  # sizes at and around the CUDA limits
    depth = around(r, limits["depth"] or 32) if big and r.random() < 0.5 else r.randint(0, 6)
    width = around(r, limits["width"] or 32) if big and r.random() < 0.5 else r.randint(1, 5)
    budget = around(r, limits["nodes"] or 1024) if big and r.random() < 0.5 else r.randint(1, 60)
    kind = r.choice(["distinct", "ties", "zeros"])
    if kind == "distinct":
        lp = -torch.rand(batch, depth, width, generator=g, dtype=torch.float64) * 8 - 1e-3
    elif kind == "ties":
        lp = torch.tensor(TIE_VALUES, dtype=torch.float64)[torch.randint(0, 4, (batch, depth, width), generator=g)]
    else:
        lp = torch.zeros(batch, depth, width, dtype=torch.float64)
    lp = lp.float().sort(dim=-1, descending=True).values
    ids = torch.randint(0, 50000, (batch, depth, width), generator=g)
    root = torch.randint(0, 50000, (batch,), generator=g)
    base = torch.tensor([r.choice([r.randint(0, 10**6), INT64_MAX - depth, -r.randint(0, 10**6)])
                         for _ in range(batch)])
    args = {"topk_logprobs": relayout(lp.to(device), r), "topk_ids": relayout(ids.to(device), r),
            "root_token": relayout(root.to(device), r), "base_pos": relayout(base.to(device), r)}
    words = words_for(budget)
    for name in ("tokens", "parents", "depths", "positions"):
        args[name] = poisoned(relayout(torch.empty(batch, budget, dtype=torch.long, device=device), r))
    args["ancestors"] = poisoned(relayout(torch.empty(batch, budget, words, dtype=torch.int32, device=device), r))
    args["num_nodes"] = poisoned(relayout(torch.empty(batch, dtype=torch.long, device=device), r))
    outputs = ["tokens", "parents", "depths", "positions", "ancestors", "num_nodes"]

    over = [name for name, size in (("depth", depth), ("width", width), ("nodes", budget))
            if limits[name] is not None and size > limits[name]]
    expect = "raise" if over else "ok"
    mutation = r.choice([None] * 6 + ["arg", "arg", "value"])
    desc = f"past the CUDA limits {over}" if over else f"valid ({kind})"
    if mutation == "arg":
        expect = "raise"
        desc = r.choice(["logprobs float64", "ids int32", "ids shape", "no candidates", "budget 0", "ancestor words",
                         "root_token 2-D", "base_pos batch", "device", "alias"]
                        + (["expanded output"] if batch * budget > 1 else []))
        if desc == "logprobs float64":
            args["topk_logprobs"] = args["topk_logprobs"].double()
        elif desc == "ids int32":
            args["topk_ids"] = args["topk_ids"].int()
        elif desc == "ids shape":
            args["topk_ids"] = args["topk_ids"][:, :, :-1]
        elif desc == "no candidates":
            args["topk_logprobs"], args["topk_ids"] = args["topk_logprobs"][..., :0], args["topk_ids"][..., :0]
        elif desc == "budget 0":
            for name in outputs[:4]:
                args[name] = args[name][:, :0]
            args["ancestors"] = args["ancestors"][:, :0, :0]
        elif desc == "ancestor words":
            args["ancestors"] = torch.zeros(batch, budget, words + 1, dtype=torch.int32, device=device)
        elif desc == "root_token 2-D":
            args["root_token"] = args["root_token"].view(-1, 1)
        elif desc == "base_pos batch":
            args["base_pos"] = args["base_pos"][:-1] if batch > 1 else args["base_pos"].repeat(2)
        elif desc == "device":
            name = r.choice(list(args))
            args[name] = args[name].to(other_device(r, device))
            desc += f" ({name})"
        elif desc == "alias":
            out = r.choice(outputs[:4])
            other = r.choice([n for n in outputs[:4] if n != out] + ["base_pos"])
            if other == "base_pos":
                args["base_pos"] = args[out][:, 0]
            else:
                args[out] = args[other]
            desc += f" ({out} ~ {other})"
        else:
            args["tokens"] = args["tokens"][:1, :1].expand(batch, budget)
    elif mutation == "value" and expect == "ok" and depth > 0:  # the CPU kernel raises; CUDA wraps around
        expect = "raise" if device.type == "cpu" else "ok"
        desc = "base_pos + D past int64"
        args["base_pos"][r.randrange(batch)] = INT64_MAX - r.randint(0, depth - 1)
    desc = f"{desc}: batch {batch} D {depth} K {width} N {budget}"

    def check():
        want = reference.build_tree(lp, ids, root, base, budget)
        for name, w in zip(outputs, want):
            assert torch.equal(args[name].cpu(), w.cpu()), f"{name} differs from the reference"

    return Case(desc, lambda: torch.ops.jetspec.build_tree(**args), expect,
                check if mutation is None and expect == "ok" else None,
                [args[n] for n in outputs if args[n].device.type != "meta"])


@pytest.mark.filterwarnings("ignore")
def test_fuzz_build_tree(device):
    fuzz("build_tree", device, make_build_tree)


# ---- draft_topk -----------------------------------------------------------------------------------------


def make_draft_topk(r, g, device) -> Case:
    limit = cuda_limit(device, "draft_topk", "k")
    dtype = r.choice([torch.float32, torch.bfloat16, torch.float16])
    batch, depth = r.randint(1, 3), r.randint(1, 5)
    size = r.choice([8, 16, 64, 128, 0, r.randint(1, 40)])
    vocab = r.choice([r.randint(1, 50), r.randint(51, 3000)])
    k = min(vocab, r.choice([r.randint(1, 8), around(r, limit or 32)]))
    temperature = r.uniform(0.3, 2.0)
    hidden = (torch.randn(batch, depth, size, generator=g) * 2).to(dtype)
    weight = (torch.randn(vocab, size, generator=g) / max(size, 1) ** 0.5).to(dtype)
    if r.random() < 0.2:  # exact ties: small integers
        hidden = torch.randint(-2, 3, (batch, depth, size), generator=g).to(dtype)
        weight = torch.randint(-2, 3, (vocab, size), generator=g).to(dtype)
    args = {"hidden": relayout(hidden.to(device), r, dims=-1),
            "weight": relayout(weight.to(device), r, dims=-1), "temperature": temperature,
            "logprobs": poisoned(relayout(torch.empty(batch, depth, k, device=device), r)),
            "ids": poisoned(relayout(torch.empty(batch, depth, k, dtype=torch.long, device=device), r))}

    # The CUDA kernel's own limits: K, and 16-byte pieces of weight rows.
    es = weight.element_size()
    pieces = size == 0 or (size * es % 16 == 0 and args["weight"].data_ptr() % 16 == 0
                           and (vocab == 1 or args["weight"].stride(0) * es % 16 == 0))
    expect = "raise" if device.type == "cuda" and (k > limit or not pieces) else "ok"
    mutation = r.choice([None] * 6 + ["arg", "arg"])
    desc = "valid" if expect == "ok" else "past the CUDA kernel's limits"
    if mutation == "arg":
        expect = "raise"
        desc = r.choice(["hidden int", "weight dtype", "weight H", "weight rows not dense", "logprobs float64",
                         "ids shape", "K 0", "K > V", "temperature", "device", "alias"])
        if desc == "hidden int":
            args["hidden"] = args["hidden"].long()
        elif desc == "weight dtype":
            args["weight"] = args["weight"].double()
        elif desc == "weight H":
            args["weight"] = torch.zeros(vocab, size + 1, dtype=dtype, device=device)
        elif desc == "weight rows not dense":  # every other feature
            args["weight"] = torch.zeros(vocab, 2 * size + 1, dtype=dtype, device=device)[:, ::2][:, :size]
        elif desc == "logprobs float64":
            args["logprobs"] = args["logprobs"].double()
        elif desc == "ids shape":
            args["ids"] = torch.empty(batch, depth, k + 1, dtype=torch.long, device=device)
        elif desc in ("K 0", "K > V"):
            n = 0 if desc == "K 0" else vocab + 1
            args["logprobs"] = torch.empty(batch, depth, n, device=device)
            args["ids"] = torch.empty(batch, depth, n, dtype=torch.long, device=device)
        elif desc == "temperature":
            args["temperature"] = r.choice([0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e39])
            desc += f" {args['temperature']}"
        elif desc == "device":
            name = r.choice(["hidden", "weight", "logprobs", "ids"])
            args[name] = args[name].to(other_device(r, device))
            desc += f" ({name})"
        else:
            buf = torch.empty(batch * depth * k, dtype=torch.long, device=device)
            args["ids"] = buf.view(batch, depth, k)
            args["logprobs"] = buf.view(torch.float32)[: batch * depth * k].view(batch, depth, k)
    desc = f"{desc}: {dtype} B {batch} D {depth} H {size} V {vocab} K {k}"

    def check():
        full = reference_log_probs(hidden, weight, temperature)
        assert_topk(args["logprobs"], args["ids"], full, atol=1e-3)
        want = reference.draft_topk(hidden, weight, k, temperature)
        torch.testing.assert_close(args["logprobs"].cpu(), want[0], atol=1e-3, rtol=0)

    return Case(desc, lambda: torch.ops.jetspec.draft_topk(**args), expect,
                check if mutation is None and expect == "ok" else None,
                [args[n] for n in ("logprobs", "ids") if args[n].device.type != "meta"])


@pytest.mark.filterwarnings("ignore")
def test_fuzz_draft_topk(device):
    fuzz("draft_topk", device, make_draft_topk)


# ---- tree_attention -------------------------------------------------------------------------------------


def ancestor_words(r: random.Random, batch: int, nodes: int, g: torch.Generator) -> torch.Tensor:
    """Packed ancestor rows of random trees, or random bits (any bits are valid: later nodes' are ignored)."""
    if r.random() < 0.2:
        return torch.randint(-(2**31), 2**31, (batch, nodes, words_for(nodes)), generator=g, dtype=torch.int64).int()
    rows = []
    for _ in range(batch):
        visible = torch.zeros(nodes, nodes, dtype=torch.bool)
        for i, p in enumerate(random_tree_parents(r, nodes)):
            if p >= 0:
                visible[i] = visible[p]
            visible[i, i] = True
        rows.append(pack_mask(visible))
    return torch.stack(rows)


def make_tree_attention(r, g, device) -> Case:
    limit = cuda_limit(device, "tree_attention", "nodes") or 1024
    dtype = r.choice([torch.bfloat16, torch.float16])
    dim = r.choice([64, 128])
    # Shapes: decoding-sized trees, larger trees (the CUDA kernel's 64- and 128-row blocks), long prefixes
    # (split keys), and trees at the node limit; the float32 reference bounds their size.
    shape = r.choices(["small", "medium", "long", "limit"], weights=[12, 6, 1, 1])[0]
    batch = {"small": r.randint(1, 3), "medium": r.randint(1, 2)}.get(shape, 1)
    nodes = {"small": r.randint(1, 20), "medium": r.randint(21, 130), "long": r.randint(1, 64)}.get(shape)
    nodes = around(r, limit) if nodes is None else nodes
    kv_heads = {"small": r.randint(1, 3), "medium": r.randint(1, 2)}.get(shape, 1)
    group = r.choice({"small": [1, 2, 3, 4, 8], "medium": [1, 2, 4], "long": [1, 4]}.get(shape, [1]))
    top = {"small": 64, "medium": 300, "long": 3000}.get(shape, 64)
    prefixes = [r.choice([0, r.randint(0, top)]) for _ in range(batch)]
    slots = max(prefixes) + max(nodes, 1) + r.randint(0, 9)
    layers = r.randint(1, 2)
    data = torch.randn(layers, 2, batch, slots, kv_heads, dim, generator=g).to(dtype)
    for b, n in enumerate(prefixes):  # never read
        data[:, :, b, n + nodes:] = float("nan")
    poison = nodes > 1 and r.random() < 0.25  # NaN / inf in tree keys some nodes may not see
    if poison:
        for _ in range(r.randint(1, 4)):
            b, j, h = r.randrange(batch), r.randrange(1, nodes), r.randrange(kv_heads)
            # K or V: never both of one (slot, head), where a -inf score would meet a non-finite value (the
            # reference's 0 times inf is NaN; the CUDA kernel adds the value of a key it sees as is)
            which = r.choice((0, 1))
            slot = data[layers - 1, :, b, prefixes[b] + j, h]  # [2, d]
            slot[1 - which] = slot[1 - which].nan_to_num(0.0, 0.0, 0.0)
            slot[which, r.randrange(dim)] = r.choice([float("nan"), float("inf"), -float("inf")])
    q_heads = kv_heads * group
    query = (torch.randn(batch, nodes, q_heads, dim, generator=g)).to(dtype)
    ancestors = ancestor_words(r, batch, nodes, g)
    data = data.to(device)
    key, value = data[layers - 1, 0], data[layers - 1, 1]
    if r.random() < 0.2:  # a view the CUDA kernel cannot read in 16-byte pieces (the CPU kernel can)
        wide = torch.zeros(batch, slots, kv_heads, dim + 1, dtype=dtype, device=device)
        wide[..., 1:] = key
        key = wide[..., 1:]
    args = {"query": relayout(query.to(device), r, dims=-1), "key_cache": key, "value_cache": value,
            "prefix_len": torch.tensor(prefixes, device=device), "ancestors": relayout(ancestors.to(device), r),
            "scale": r.uniform(0.05, 0.2), "max_prefix": r.randint(max(prefixes), slots - nodes),
            "out": poisoned(relayout(torch.empty(batch, nodes, q_heads, dim, dtype=dtype, device=device), r,
                                     dims=-1))}
    aligned = all(t.data_ptr() % 16 == 0 and all(t.size(d) == 1 or t.stride(d) % 8 == 0 for d in range(3))
                  for t in (args["query"], args["key_cache"], args["value_cache"], args["out"]))
    expect = "raise" if (device.type == "cuda" and not aligned) or nodes > limit else "ok"
    mutation = r.choice([None] * 6 + ["arg", "arg", "value"])
    desc = "valid" if expect == "ok" else "misaligned for CUDA or past the node limit"
    if mutation == "arg":
        expect = "raise"
        desc = r.choice(["query float32", "query 3-D", "head_dim 32", "no nodes", "key dtype", "value shape",
                         "key batch", "heads", "slots < N", "out dtype", "out shape", "query last dim", "prefix int32",
                         "prefix shape", "ancestors dtype", "ancestor words", "scale", "max_prefix", "device",
                         "alias"])
        if desc == "query float32":
            args["query"] = args["query"].float()
        elif desc == "query 3-D":
            args["query"] = args["query"][0]
        elif desc == "head_dim 32":
            args.update(query=args["query"][..., :32], out=args["out"][..., :32])
        elif desc == "no nodes":
            args.update(query=args["query"][:, :0], out=args["out"][:, :0], ancestors=args["ancestors"][:, :0, :0])
        elif desc == "key dtype":
            args["key_cache"] = args["key_cache"].float()
        elif desc == "value shape":
            args["value_cache"] = args["value_cache"][:, :-1]
        elif desc == "key batch":
            args["key_cache"] = torch.cat([args["key_cache"], args["key_cache"][:1]])
        elif desc == "heads":  # q_heads is no multiple of q_heads + 1
            extra = torch.zeros(batch, slots, q_heads + 1, dim, dtype=dtype, device=device)
            args.update(key_cache=extra, value_cache=extra.clone())
        elif desc == "slots < N":
            args.update(key_cache=args["key_cache"][:, : nodes - 1], value_cache=args["value_cache"][:, : nodes - 1])
        elif desc == "out dtype":
            args["out"] = args["out"].float()
        elif desc == "out shape":
            args["out"] = torch.empty(batch, nodes + 1, q_heads, dim, dtype=dtype, device=device)
        elif desc == "query last dim":
            args["query"] = torch.zeros(batch, nodes, q_heads, 2 * dim, dtype=dtype, device=device)[..., ::2]
        elif desc == "prefix int32":
            args["prefix_len"] = args["prefix_len"].int()
        elif desc == "prefix shape":
            args["prefix_len"] = args["prefix_len"].view(-1, 1)
        elif desc == "ancestors dtype":
            args["ancestors"] = args["ancestors"].long()
        elif desc == "ancestor words":
            args["ancestors"] = torch.zeros(batch, nodes, words_for(nodes) + 1, dtype=torch.int32, device=device)
        elif desc == "scale":
            args["scale"] = r.choice([0.0, -0.1, float("nan"), float("inf"), 1e-50, 1e300])
            desc += f" {args['scale']}"
        elif desc == "max_prefix":
            args["max_prefix"] = r.choice([-1, slots - nodes + 1, -(2**62), 2**62])
        elif desc == "device":
            name = r.choice(["query", "key_cache", "value_cache", "prefix_len", "ancestors", "out"])
            args[name] = args[name].to(other_device(r, device))
            desc += f" ({name})"
        else:  # out is query, or slots of value_cache where it has the shape of query
            args["out"] = args["value_cache"][:, :nodes] if group == 1 and r.random() < 0.5 else args["query"]
    elif mutation == "value" and expect == "ok":  # the CPU kernel raises; the CUDA kernel clamps
        expect = "raise" if device.type == "cpu" else "ok"
        desc = "prefix_len out of range"
        args["prefix_len"][r.randrange(batch)] = r.choice([-1, slots - nodes + 1, -(2**62), 2**62])
    desc = f"{desc}: {dtype} B {batch} N {nodes} d {dim} Hkv {kv_heads} G {group} prefixes {prefixes} S {slots}" + (
        " poisoned" if poison else "")

    def check():
        want = reference.tree_attention(query.to(device), key, value, args["prefix_len"], args["ancestors"],
                                        args["scale"])
        if poison or want.norm() == 0:  # non-finite values, or nothing visible: no relative error
            assert_matches_with_non_finite(args["out"], want, dtype)
        else:
            assert_close_rows(args["out"], want, dtype)

    return Case(desc, lambda: torch.ops.jetspec.tree_attention(**args), expect,
                check if mutation is None and expect == "ok" else None,
                [args["out"]] if args["out"].device.type != "meta" else [])


@pytest.mark.filterwarnings("ignore")
def test_fuzz_tree_attention(device):
    fuzz("tree_attention", device, make_tree_attention)
