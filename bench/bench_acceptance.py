"""Acceptance length and speed of draft heads on the paper's benchmark prompts (issue #6's matrix).

    python -m bench.bench_acceptance --head causal=DIR --head bidirectional=DIR --out OUT
        [--model DIR] [--prompts 50] [--new-tokens 256] [--timed-prompts 2] [--timed-new-tokens N]
        [--budgets ...] [--widths ...] [--dtype bfloat16] [--mode graph]

For every benchmark (MT-Bench, HumanEval, GSM8K, MATH-500, AIME25; the first ``--prompts`` of each,
chat template), the target's greedy continuation is generated once (HF ``generate``, batched), then
every head's rounds for every (budget, width) are replayed from it (:mod:`jetspec.training.acceptance`: equal
to the decoder's rounds), giving tau = tokens committed per round. Width 1 is chain drafting; budget 1
is plain decoding. Speed is measured for real, on the first ``--timed-prompts`` prompts of each
benchmark: the decoder's tokens/s per configuration (and that its output equals HF greedy's) against
HF ``generate`` greedy in the same run (``--timed-new-tokens`` shortens those generations: a timing pass
decodes every configuration, and the driver's eager rounds make that the longest stage). Each timed
configuration is warmed up once first (``mode="graph"`` captures its graph then). ``--dtype`` and
``--mode`` choose the target's precision and the driver's round (``SpeculativeGenerator``'s ``mode``;
default: its own choice). One JSON: ``OUT/acceptance.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetspec import SpeculativeGenerator, load_head
from jetspec.training import replay_acceptance
from jetspec.cli import _encode, _load_target
from jetspec.assets.datasets import load_benchmark
from jetspec.runtime import stop_tokens
from jetspec.training import self_distill

BENCHMARKS = ["mt-bench", "humaneval", "gsm8k", "math-500", "aime25"]


def _greedy(model, prompts: list[list[int]], new_tokens: int, extra: int, eos: set[int]) -> list[tuple[list[int], int]]:
    """Each prompt + its greedy continuation, and the tokens a generation of ``new_tokens`` emits (up to
    its first stop token). Continuations run ``extra`` tokens further so the last round can be replayed."""
    seqs = self_distill(model, prompts, max_new_tokens=new_tokens + extra, batch_size=64, eos_token_id=[],
                        progress=False)
    out = []
    for s in seqs:
        response = s.tokens[s.prompt_len:]
        stop = next((i + 1 for i, t in enumerate(response) if t in eos), len(response))
        out.append((s.tokens, min(new_tokens, stop, len(response) - 1)))
    return out


def _time_generation(fn, device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="target folder (default: the shipped SmolLM2-135M-Instruct)")
    parser.add_argument("--head", action="append", required=True, help="NAME=FOLDER of a draft head (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=50, help="prompts per benchmark (fewer where a set is smaller)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--timed-prompts", type=int, default=2, help="prompts per benchmark decoded for tok/s")
    parser.add_argument("--timed-new-tokens", type=int, help="new tokens of a timed generation (default: --new-tokens)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 512])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--benchmarks", nargs="+", default=BENCHMARKS, choices=BENCHMARKS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--mode", choices=["host", "device", "graph"], help="the driver's round (default: its choice)")
    args = parser.parse_args()

    device = torch.device(args.device)
    timed_tokens = args.timed_new_tokens or args.new_tokens
    model, tokenizer = _load_target(argparse.Namespace(model=args.model, device=args.device, dtype=args.dtype))
    heads = {}
    for item in args.head:
        name, _, folder = item.partition("=")
        heads[name] = load_head(folder, dtype=getattr(torch, args.dtype), device=device)
    depth = max(h.spec.depth for h in heads.values())
    eos = stop_tokens(model, tokenizer.eos_token_id)
    configs = [(b, w) for b in args.budgets for w in args.widths if b > 1 or w == 1]
    results = {"model": args.model or "SmolLM2-135M-Instruct (default)", "dtype": args.dtype, "mode": args.mode,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "new_tokens": args.new_tokens, "timed_new_tokens": timed_tokens,
               "heads": {n: h.config.to_dict() for n, h in heads.items()}, "benchmarks": {}}
    for bench in args.benchmarks:
        prompts = [_encode(tokenizer, p.text, chat=True) for p in load_benchmark(bench)[:args.prompts]]
        sequences = _greedy(model, prompts, args.new_tokens, depth + 1, eos)
        entry = {"prompts": len(prompts), "tau": {}, "timed": {}}
        for name, head in heads.items():
            committed = {c: [] for c in configs}
            for (tokens, emitted), prompt in tqdm(list(zip(sequences, prompts)), desc=f"{bench} / {name}: replay"):
                for config, lengths in replay_acceptance(model, head, tokens, len(prompt), emitted, configs).items():
                    committed[config] += lengths
            entry["tau"][name] = {f"{b}x{w}": sum(v) / max(len(v), 1) for (b, w), v in committed.items()}
        results["benchmarks"][bench] = entry
        _write(args.out, results)  # after every stage: a run cut short by a time limit keeps what it measured
        print(json.dumps({bench: entry["tau"]}, indent=None))
        references = []  # (input ids, HF greedy output, HF seconds) of the timed prompts
        for i, prompt in enumerate(prompts[:args.timed_prompts]):
            ids = torch.tensor([prompt], device=device)
            for _ in range(2 if i == 0 else 1):  # the first call warms up
                hf, seconds = _time_generation(lambda: model.generate(
                    ids, do_sample=False, max_new_tokens=timed_tokens, eos_token_id=sorted(eos),
                    pad_token_id=tokenizer.pad_token_id or 0), device)
            references.append((ids, hf, seconds))
        if not references:
            continue
        entry["timed"]["hf-generate"] = {
            "tok_per_s": sum(hf.shape[1] - ids.shape[1] for ids, hf, _ in references) / sum(s for *_, s in references)}
        runs = [("jetspec-ar", None, 1, 1)] + [(n, h, b, w) for n, h in heads.items() for b, w in configs if b > 1]
        for name, head, budget, width in tqdm(runs, desc=f"{bench}: timed decoding"):
            gen = SpeculativeGenerator(model, head, budget=budget, width=width, mode=args.mode)
            gen.generate(references[0][0], max_new_tokens=timed_tokens, eos_token_id=sorted(eos))  # warm-up
            rows = []
            for ids, hf, _ in references:
                out, seconds = _time_generation(lambda: gen.generate(ids, max_new_tokens=timed_tokens,
                                                                     eos_token_id=sorted(eos)), device)
                rows.append({"tokens": out.stats.new_tokens, "seconds": seconds, "tau": out.stats.mean_accept_length,
                             "same_as_hf": torch.equal(out.sequences, hf)})
            entry["timed"][f"{name}/{budget}x{width}"] = {
                "mode": gen.mode, "tok_per_s": sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows),
                "all_same_as_hf": all(r["same_as_hf"] for r in rows), "rows": rows}
            _write(args.out, results)
    print(f"wrote {args.out / 'acceptance.json'}")


def _write(folder: Path, results: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "acceptance.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
