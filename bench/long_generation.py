"""Long generations with the default pair (SmolLM2-135M-Instruct + the shipped head) on the GPU: 10,000 new
tokens in bf16 graph mode and in fp32, checked against greedy decoding.

SmolLM2 has 8,192 positions, fewer than a prompt + 10,000 tokens; its RoPE is computed, not looked up, so
both jetspec and the reference run with ``max_position_embeddings`` raised to 16,384 (the text past 8k is
whatever the model makes of it; the check is only that both decode it alike). The reference is HF's own
greedy decision at every position, from one teacher-forced HF forward over prompt + generated tokens
(``sdpa`` attention, the same dtype): token t must be the argmax of the logits at t - 1. Where it is not,
the first such position and HF's top-1 minus top-2 logit there are recorded (a near-tie flipped by a
different summation order, or a bug). In fp32 the first 1,000 tokens are also compared with
``model.generate`` itself.

    python -m bench.long_generation OUT.json [--new-tokens 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jetspec import SpeculativeGenerator
from jetspec.assets.datasets import load_benchmark
from jetspec.assets.default_model import default_model_dir, load_default_head

POSITIONS = 16384


def teacher_forced_check(model, sequence: torch.Tensor, prompt_len: int) -> dict:
    """Where ``sequence``'s new tokens depart from the argmax of HF's logits over the same sequence."""
    with torch.no_grad():
        logits = model(sequence[:, :-1]).logits[0, prompt_len - 1:].float()
    new = sequence[0, prompt_len:]
    argmax = logits.argmax(-1)
    wrong = (argmax != new).nonzero().flatten().tolist()
    row = {"new_tokens": int(new.numel()), "disagreements": len(wrong)}
    if wrong:
        top = logits[wrong[0]].topk(2).values
        row.update(first_disagreement=wrong[0], hf_top2_gap=float(top[0] - top[1]),
                   gap_of_our_token=float(top[0] - logits[wrong[0], new[wrong[0]]]))
    return row


def run(new_tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    question = load_benchmark("mt-bench", limit=1)[0].text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    rows = []
    for dtype, mode in ((torch.bfloat16, "graph"), (torch.float32, "device")):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").cuda().eval()
        model.config.max_position_embeddings = POSITIONS
        head = load_default_head(dtype=dtype, device="cuda")
        prompt = torch.tensor([ids], device="cuda")
        gen = SpeculativeGenerator(model, head, budget=64, width=8, mode=mode)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = gen.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
        torch.cuda.synchronize()
        row = {"dtype": str(dtype), "mode": mode, "seconds": time.perf_counter() - t0,
               "tau": out.stats.mean_accept_length, "rounds": out.stats.rounds}
        row.update(teacher_forced_check(model, out.sequences, prompt.shape[1]))
        if dtype == torch.float32 and mode == "device":
            hf = model.generate(prompt, do_sample=False, max_new_tokens=1000, min_new_tokens=1000, pad_token_id=0)
            row["identical_to_hf_generate_first_1000"] = hf[0].tolist() == out.sequences[0, :hf.shape[1]].tolist()
        print(row, flush=True)
        rows.append(row)
        del model, head, gen
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--new-tokens", type=int, default=10_000)
    args = parser.parse_args()
    rows = run(args.new_tokens)
    args.out.write_text(json.dumps({"new_tokens": args.new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
