"""A tiny, random-weight Qwen3 target with a matching JetSpec head and a byte-level tokenizer,
written to disk in the usual HF layout: for trying the whole pipeline offline in seconds.
Its text is gibberish (random weights); its decoding is still exactly greedy."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from ..heads import DraftHead, head_config_for, save_head

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) plus ChatML specials: needs no training data."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def write_tiny_model(folder: str | Path, *, seed: int = 0, causal: bool = True) -> Path:
    """Write ``folder`` (target + tokenizer) and ``folder/head`` (draft head)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    config = Qwen3Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head_config = head_config_for(config, num_layers=1, block_size=8, causal=causal,
                                  mask_token_id=tokenizer.convert_tokens_to_ids("<|mask|>"))
    save_head(DraftHead(head_config), folder / "head")
    return folder
