"""The ``jetspec`` command line: ``jetspec generate`` and ``jetspec demo``."""

from __future__ import annotations

import argparse
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jetspec import SpeculativeGenerator, load_head

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, DTYPES[args.dtype])
    if args.budget > 1 and args.head is None:
        raise SystemExit("jetspec generate: --head is required for --budget > 1 (use --budget 1 for plain decoding)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    head = load_head(args.head, dtype=dtype, device=device) if args.budget > 1 else None
    generator = SpeculativeGenerator(model, head, budget=args.budget, width=args.width, depth=args.depth,
                                     profile=args.profile)

    if args.chat_template and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    eos = args.eos_token_id if args.eos_token_id is not None else tokenizer.eos_token_id
    stream = generator.stream(ids.to(device), max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    shown = ""
    for _ in stream:
        text = tokenizer.decode(stream.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(stream.tokens, skip_special_tokens=True)[len(shown):])
    print(f"\n[jetspec] budget {args.budget}, width {args.width}: {stream.stats.summary()}", file=sys.stderr)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from jetspec.tiny import write_tiny_model

    folder = write_tiny_model(args.folder)
    print(f"wrote a tiny random Qwen3 target to {folder} and its draft head to {folder / 'head'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run the compiled ops on a small round's worth of data and print what they did."""
    import torch

    import jetspec
    from jetspec import ops

    device = torch.device(args.device)
    print(f"jetspec {jetspec.__version__}: torch {torch.__version__}, CUDA kernels built: {jetspec.WITH_CUDA}, "
          f"device: {device}")
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

    gen = sub.add_parser("generate", help="generate text with tree speculative decoding (greedy, lossless)",
                         description="Stream a greedy continuation of PROMPT; prints a stats line at the end.")
    gen.add_argument("--model", required=True, help="HF model folder (Qwen3, Qwen2, Llama, ...)")
    gen.add_argument("--head", help="draft head folder (published JetSpec/DFlash format)")
    gen.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat-template)")
    gen.add_argument("--budget", type=int, default=64, help="tree nodes per round incl. the root; 1 = plain decoding")
    gen.add_argument("--width", type=int, default=8, help="candidates per depth; 1 = chain drafting")
    gen.add_argument("--depth", type=int, default=None, help="deepest tree depth (default: the head's)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--eos-token-id", type=int, default=None, help="default: the tokenizer's")
    gen.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: bf16 on CUDA, fp32 on CPU")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                     help="tokenize the prompt as raw text")
    gen.add_argument("--profile", action="store_true", help="synchronise around phases for exact phase times")
    gen.set_defaults(func=_generate)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight Qwen3 + head + tokenizer (offline demo)")
    tiny.add_argument("folder", help="where to write the model (its head goes to FOLDER/head)")
    tiny.set_defaults(func=_tiny_model)

    demo = sub.add_parser("demo", help="smoke-test the compiled ops")
    demo.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
