"""The driver's verify forward through the ``tree_attention`` op (bf16/fp16 targets, head_dim 64/128):
every layer takes the op, the forward equals the SDPA reference path, and greedy generation equals
HF ``generate`` on every device the op has a kernel for, up to bf16 rounding ties."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import jetspec
from jetspec import ops
from jetspec.heads import DraftHead, head_config_for
from jetspec.layers import HostBatch
from jetspec.runtime import Target
from jetspec.ops import build_tree
from jetspec.ops.tree import ancestor_mask

from conftest import DEVICES


def qwen3_model(head_dim: int, dtype: torch.dtype, device: torch.device, q_heads: int = 8) -> Qwen3ForCausalLM:
    """``q_heads`` query heads over 2 KV heads, 2 layers, random weights (a scaled LM head spreads the logits)."""
    torch.manual_seed(head_dim)
    cfg = Qwen3Config(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=q_heads, num_key_value_heads=2, head_dim=head_dim,
                      max_position_embeddings=1024,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model.to(device=device, dtype=dtype)


def random_tree(vocab: int, depth: int, width: int, budget: int, anchor: int, base: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(1, depth, width, generator=g).mul(4).cumsum(-1)
    ids = torch.randint(0, vocab, (1, depth, width), generator=g)
    return build_tree(logprobs.to(device), ids.to(device), torch.tensor([anchor], device=device),
                      torch.tensor([base], device=device), budget)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,dtype,budget,prefix", [(64, torch.bfloat16, 1, 17), (128, torch.bfloat16, 48, 300),
                                                          (64, torch.float16, 33, 64), (128, torch.float16, 7, 5)])
def test_verify_forward_takes_the_op_and_equals_the_reference(device, head_dim, dtype, budget, prefix):
    device = torch.device(device)
    target = Target(qwen3_model(head_dim, dtype, device))
    g = torch.Generator().manual_seed(prefix)
    prompt = torch.randint(0, 160, (1, prefix), generator=g).to(device)
    tree = random_tree(160, 6, 4, budget, int(prompt[0, -1]), prefix, device, seed=budget)
    visible = ancestor_mask(tree.ancestors, budget)
    caches = []
    for packed in (True, False):
        cache = target.new_cache(1, prefix + budget + 3)
        target.prefill(prompt, cache)
        with mock.patch.object(ops, "tree_attention", wraps=ops.tree_attention) as spy:
            mask = dict(ancestors=tree.ancestors) if packed else dict(visible=visible)
            batch = HostBatch(cache=cache, prefix_len=tree.positions[:, 0], start=prefix, **mask)
            logits, _ = target.forward(tree.tokens, tree.positions, batch)
        assert spy.call_count == (target.num_layers if packed else 0)
        caches.append((logits.float(), cache.data.float()))
    (op_logits, op_cache), (ref_logits, ref_cache) = caches
    assert torch.equal(op_cache[0], ref_cache[0])  # layer 0 wrote the same K/V rows; later layers see
    torch.testing.assert_close(op_cache, ref_cache, atol=0.05, rtol=0.02)  # attention outputs rounded differently
    torch.testing.assert_close(op_logits, ref_logits, atol=0.1, rtol=0.02)
    differ = op_logits.argmax(-1) != ref_logits.argmax(-1)
    assert all(is_near_tie(row) for row in ref_logits[differ])


def is_near_tie(logits: torch.Tensor) -> bool:
    """Whether the top-2 logits of a row are within bf16 rounding of each other (the last bit decides)."""
    top2 = logits.float().topk(2).values
    return float(top2[0] - top2[1]) <= 2 ** -6 * float(logits.abs().max())


def assert_greedy_up_to_ties(tokens: list[int], hf, prompt_len: int) -> None:
    """``tokens`` equal HF's greedy tokens up to their first difference, which must sit where HF's own
    top-2 logits are within bf16 rounding of each other (a tie that the last bit decides: in bf16 the tree
    forward and an AR step round differently). A wrong attention diverges at a clear margin."""
    expected = hf.sequences[0].tolist()
    assert len(tokens) == len(expected)
    t = next((i for i in range(prompt_len, len(tokens)) if tokens[i] != expected[i]), None)
    assert t is None or is_near_tie(hf.scores[t - prompt_len][0]), f"diverged from HF greedy at a clear margin at {t}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["host", "device", "graph"])
@pytest.mark.parametrize("head_dim,budget,width", [(64, 1, 1), (128, 24, 4), (64, 64, 8), (128, 16, 1)])
def test_generation_through_the_op_is_lossless(device, mode, head_dim, budget, width):
    if mode == "graph" and device == "cpu":
        pytest.skip("CUDA graphs need a CUDA device")
    device = torch.device(device)
    model = qwen3_model(head_dim, torch.bfloat16, device)
    torch.manual_seed(budget)
    head = DraftHead(head_config_for(model.config, num_layers=1, block_size=8, causal=True, mask_token_id=159))
    prompt = torch.randint(0, 159, (1, 21), generator=torch.Generator().manual_seed(head_dim)).to(device)
    new = 40
    with torch.no_grad():
        expected = model.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                  attention_mask=torch.ones_like(prompt), output_scores=True,
                                  return_dict_in_generate=True)
    generator = jetspec.SpeculativeGenerator(model, head if budget > 1 else None, budget=budget, width=width,
                                             mode=mode)
    with mock.patch.object(ops, "tree_attention", wraps=ops.tree_attention) as spy:
        out = generator.generate(prompt, max_new_tokens=new, eos_token_id=[])
    assert_greedy_up_to_ties(out.sequences[0].tolist(), expected, prompt.shape[1])
    if mode == "host":  # every verify layer of every round (device rounds run ahead; graphs replay without Python)
        assert spy.call_count == model.config.num_hidden_layers * out.stats.rounds
    elif mode == "device":  # the head's layers take the op too
        assert spy.call_count >= (model.config.num_hidden_layers + (budget > 1)) * out.stats.rounds


@pytest.mark.parametrize("device", DEVICES)
def test_odd_gqa_group_takes_the_op(device):
    """GQA group 3 (SmolLM2's), whose node rows straddle the kernel's row tiles, verifies through the op too."""
    device = torch.device(device)
    model = qwen3_model(64, torch.bfloat16, device, q_heads=6)
    torch.manual_seed(5)
    head = DraftHead(head_config_for(model.config, num_layers=1, block_size=8, causal=True, mask_token_id=159))
    prompt = torch.randint(0, 159, (1, 15), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        expected = model.generate(prompt, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0,
                                  attention_mask=torch.ones_like(prompt), output_scores=True,
                                  return_dict_in_generate=True)
    generator = jetspec.SpeculativeGenerator(model, head, budget=16, width=4, mode="host")
    with mock.patch.object(ops, "tree_attention", wraps=ops.tree_attention) as spy:
        out = generator.generate(prompt, max_new_tokens=24, eos_token_id=[])
    assert spy.call_count == model.config.num_hidden_layers * out.stats.rounds
    assert_greedy_up_to_ties(out.sequences[0].tolist(), expected, prompt.shape[1])
