"""Plots of ``bench_acceptance``'s JSON: tau vs tree budget per benchmark, and speedup vs budget where
the run timed the decoder.

    python -m bench.plot_acceptance RESULTS/acceptance.json [--timed OTHER/acceptance.json] [--out DIR]

Writes ``tau_vs_budget.png`` (one panel per benchmark, a line per head and width; budget 1 is plain
decoding) and, when some benchmark has decoder timings, ``speedup_vs_budget.png`` (tokens/s over HF
``generate``'s in the same run). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLES = {1: ":", 4: "--", 8: "-"}  # line style per width


def _series(table: dict[str, float]) -> dict[int, list[tuple[int, float]]]:
    """``{"BxW": value}`` -> ``{width: [(budget, value), ...]}`` by budget; budget 1 (plain decoding, "1x1")
    starts every width's line."""
    configs = [tuple(map(int, key.split("x"))) for key in table]
    start = [(1, table["1x1"])] if "1x1" in table else []
    return {w: start + sorted((b, table[f"{b}x{w}"]) for b, ww in configs if ww == w and b > 1)
            for w in sorted({w for b, w in configs if b > 1})}


def _panels(plt, benchmarks: dict, value_of, ylabel: str, title: str, path: Path) -> None:
    names = list(benchmarks)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False, sharey=True)
    for ax, bench in zip(axes[0], names):
        for i, (head, table) in enumerate(value_of(benchmarks[bench]).items()):
            for width, points in sorted(_series(table).items()):
                xs, ys = zip(*points)
                ax.plot(xs, ys, STYLES.get(width, "-."), marker="o", ms=3, color=f"C{i}", label=f"{head}, width {width}")
        ax.set_xscale("log", base=2)
        ax.set_title(bench)
        ax.set_xlabel("tree budget (nodes)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _speedups(entry: dict) -> dict[str, dict[str, float]]:
    timed = entry.get("timed", {})
    hf = timed.get("hf-generate", {}).get("tok_per_s")
    out: dict[str, dict[str, float]] = {}
    for key, row in timed.items():
        if "/" not in key or not hf:
            continue
        head, config = key.split("/")
        out.setdefault(head, {})[config] = row["tok_per_s"] / hf
    ar = out.pop("jetspec-ar", {}).get("1x1")
    return {head: ({"1x1": ar, **table} if ar else table) for head, table in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="bench_acceptance's acceptance.json")
    parser.add_argument("--timed", type=Path, help="another acceptance.json to take the timings from")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: the results' folder)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(args.results.read_text())
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    model = results.get("model", "")
    _panels(plt, results["benchmarks"], lambda e: e["tau"], "tau (tokens per target forward)",
            f"acceptance length, greedy, {model}", out / "tau_vs_budget.png")
    timed = json.loads(args.timed.read_text())["benchmarks"] if args.timed else results["benchmarks"]
    with_speed = {b: e for b, e in timed.items() if _speedups(e)}
    if with_speed:
        _panels(plt, with_speed, _speedups, "tokens/s over HF generate", f"speedup, {results.get('device', '')}",
                out / "speedup_vs_budget.png")
    else:
        print("no decoder timings of a head in these results: no speedup plot")


if __name__ == "__main__":
    main()
