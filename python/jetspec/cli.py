"""The ``jetspec`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """Run the compiled ops on a small round's worth of data and print what they did."""
    import torch

    import jetspec
    from jetspec import ops

    device = torch.device(args.device)
    print(f"jetspec {jetspec.__version__}: torch {torch.__version__}, CUDA kernels built: {jetspec.WITH_CUDA}, device: {device}")
    # A 7-node tree over a 5-token prefix: root 0 -> {1, 2}, 1 -> {3, 4}, 3 -> {5}, 2 -> {6}.
    tokens = torch.tensor([[11, 21, 22, 31, 32, 41, 33]], device=device)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 3, 2]], device=device)
    target = torch.tensor([[21, 31, 0, 41, 0, 55, 0]], device=device)  # target agrees along 0 -> 1 -> 3 -> 5
    accepted, accept_len, bonus = ops.accept_greedy(tokens, parents, target, torch.tensor([7], device=device))
    n = int(accept_len[0])
    print(f"accept_greedy: path {accepted[0, :n].tolist()}, bonus token {int(bonus[0])}")
    layers, prefix = 4, 5
    cache = torch.arange(layers * 2 * (prefix + 7), dtype=torch.float32, device=device).view(layers * 2, 1, prefix + 7, 1)
    ops.kv_compact(cache, accepted, accept_len, torch.tensor([prefix], device=device))
    print(f"kv_compact: layer 0 K slots after compaction {cache[0, 0, :prefix + n, 0].long().tolist()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetspec", description="Lossless tree speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="smoke-test the compiled ops")
    demo.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
