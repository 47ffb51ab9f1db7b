"""The driver: SpeculativeGenerator is token-identical to HF greedy generate (random heads over a
pairwise matrix of settings, oracle drafters that make rounds commit many tokens), EOS and
max_new_tokens inside a round, streaming, and argument errors raised before any work."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import jetspec
from jetspec.runtime import Drafter, OracleDrafter
from jetspec.heads import DraftHead, head_config_for

# ---------------------------------------------------------------------------------------------
# Tiny random targets (fp32) and the HF reference
# ---------------------------------------------------------------------------------------------

_TARGETS: dict = {}


def qwen3(gqa: bool) -> Qwen3ForCausalLM:
    """GQA: 4 query heads over 2 KV heads, 3 layers, vocab 256; non-GQA: 4/4 heads, 4 layers, vocab 128."""
    key = ("qwen3", gqa)
    if key not in _TARGETS:
        torch.manual_seed(100 + gqa)
        if gqa:
            cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
        else:
            cfg = Qwen3Config(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=12, max_position_embeddings=512)
        for name in ("eos_token_id", "bos_token_id"):
            setattr(cfg, name, None)
        cfg.pad_token_id = 0
        _TARGETS[key] = Qwen3ForCausalLM(cfg).eval()
    return _TARGETS[key]


def llama() -> LlamaForCausalLM:
    if "llama" not in _TARGETS:
        torch.manual_seed(7)
        cfg = LlamaConfig(vocab_size=192, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          eos_token_id=None, bos_token_id=None, pad_token_id=0)
        _TARGETS["llama"] = LlamaForCausalLM(cfg).eval()
    return _TARGETS["llama"]


def hf_greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos=None) -> torch.Tensor:
    """model.generate, greedy; without eos it generates exactly max_new_tokens."""
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                  attention_mask=torch.ones_like(prompt))
    if eos is None:
        kwargs["min_new_tokens"] = max_new_tokens
    else:
        kwargs["eos_token_id"] = eos
    with torch.no_grad():
        return model.generate(prompt, **kwargs)


def random_prompt(model, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size - 1, (1, length), generator=g)


def random_head(model, *, layers: int, block: int, causal: bool, seed: int) -> DraftHead:
    torch.manual_seed(seed)
    cfg = head_config_for(model.config, num_layers=layers, block_size=block, causal=causal,
                          mask_token_id=model.config.vocab_size - 1)
    return DraftHead(cfg).eval()


def check_stats(out, prompt_len: int, max_new_tokens: int, max_accept: int):
    stats = out.stats
    assert stats.prompt_tokens == prompt_len
    assert stats.new_tokens == out.sequences.shape[1] - prompt_len
    assert stats.rounds == len(stats.accept_lengths)
    assert all(1 <= a <= max_accept for a in stats.accept_lengths), stats.accept_lengths
    # every round but the last commits all its tokens; the last may be cut by max_new_tokens
    assert 1 + sum(stats.accept_lengths[:-1]) < max_new_tokens or stats.rounds == 0
    assert 1 + sum(stats.accept_lengths) >= stats.new_tokens


# ---------------------------------------------------------------------------------------------
# Random heads over a pairwise selection of settings
# ---------------------------------------------------------------------------------------------

AXES = dict(budget=[1, 2, 3, 16, 64, 256], width=[1, 2, 8], block=[4, 8, 16], gqa=[True, False],
            causal=[True, False], prompt=[1, 9, 77, 300], layers=[1, 2])

#: (budget, width, block, gqa, causal, prompt length, head layers); every pair of values of every
#: two axes occurs in some case (test_matrix_is_pairwise checks that).
MATRIX = [
    (1, 1, 4, True, True, 1, 1),
    (1, 2, 8, False, False, 9, 2),
    (2, 8, 16, True, True, 77, 2),
    (3, 1, 16, False, False, 300, 1),
    (16, 2, 8, True, True, 300, 1),
    (16, 8, 4, False, False, 1, 2),
    (64, 1, 8, True, False, 77, 1),
    (256, 8, 4, True, True, 9, 1),
    (3, 2, 4, False, True, 77, 2),
    (64, 2, 16, False, True, 1, 2),
    (2, 1, 4, False, False, 300, 2),
    (256, 1, 8, False, False, 1, 2),
    (3, 8, 8, True, True, 1, 1),
    (16, 1, 16, True, False, 9, 1),
    (1, 8, 16, True, True, 300, 1),
    (2, 2, 8, True, False, 1, 1),
    (64, 8, 4, False, True, 9, 2),
    (256, 2, 16, True, False, 77, 1),
    (1, 1, 4, False, False, 77, 2),
    (2, 1, 4, True, True, 9, 2),
    (3, 1, 8, True, False, 9, 1),
    (16, 1, 4, False, True, 77, 1),
    (64, 2, 4, True, True, 300, 1),
    (256, 8, 16, False, True, 300, 2),
    # a few more: the largest trees over long prompts, bidirectional heads with wide trees
    (256, 8, 16, True, False, 300, 2),
    (64, 8, 8, True, False, 77, 2),
    (16, 8, 16, False, False, 9, 1),
    (256, 2, 4, False, False, 1, 1),
    (64, 1, 16, True, True, 1, 2),
    (3, 2, 16, False, True, 300, 1),
    (1, 2, 16, False, True, 9, 1),
    (2, 8, 8, False, True, 77, 1),
]


def test_matrix_is_pairwise():
    names = list(AXES)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        seen = {(case[i], case[j]) for case in MATRIX}
        missing = set(itertools.product(AXES[a], AXES[b])) - seen
        assert not missing, f"pairs of {a} x {b} not covered: {sorted(missing)}"


@pytest.mark.parametrize("case", range(len(MATRIX)))
def test_random_head_is_lossless(case):
    budget, width, block, gqa, causal, prompt_len, layers = MATRIX[case]
    model = qwen3(gqa)
    prompt = random_prompt(model, prompt_len, seed=case)
    new = (24, 36, 48)[case % 3]
    head = random_head(model, layers=layers, block=block, causal=causal, seed=case)
    gen = jetspec.SpeculativeGenerator(model, head, budget=budget, width=width)
    out = gen.generate(prompt, max_new_tokens=new)
    want = hf_greedy(model, prompt, new)
    assert out.sequences.shape == want.shape
    assert out.sequences.tolist() == want.tolist()
    depth = min(block - 1, budget - 1)
    check_stats(out, prompt_len, new, depth + 1)
    if budget == 1:
        assert out.stats.accept_lengths == [1] * (new - 1)


def test_llama_target():
    model = llama()
    prompt = random_prompt(model, 40, seed=1)
    for causal, budget, width in [(True, 32, 4), (False, 128, 8)]:
        head = random_head(model, layers=2, block=8, causal=causal, seed=3)
        out = jetspec.SpeculativeGenerator(model, head, budget=budget, width=width).generate(prompt, max_new_tokens=32)
        assert out.sequences.tolist() == hf_greedy(model, prompt, 32).tolist()
    # and with long accepted paths
    seq = hf_greedy(model, prompt, 32 + 10)[0].tolist()
    oracle = Oracle(seq, 40, depth=6, vocab=192, mode="rank0")
    out = jetspec.SpeculativeGenerator(model, oracle, budget=7, width=1).generate(prompt, max_new_tokens=32)
    assert out.sequences[0].tolist() == seq[:40 + 32]
    assert out.stats.accept_lengths[:-1] == [7] * (len(out.stats.accept_lengths) - 1)


# ---------------------------------------------------------------------------------------------
# Oracle drafters
# ---------------------------------------------------------------------------------------------


class Oracle(Drafter):
    """Knows the target's greedy sequence ``seq`` (prompt + continuation). It counts committed
    positions from the rows ``start``/``extend`` receive, checks that the anchor it is given is the
    next greedy token and (with ``taps``) that the tapped states equal the target's own, and proposes
    per depth ``width`` distinct candidates:

    - ``rank0``: the true token at rank 0 (log-prob -0.05), the rest far below (-3, -3.5, ...);
    - ``rank1``: at some depths the true token at rank 1 below a decoy (-0.5, -0.6), ranks >= 2 at -30;
    - ``noisy``: random descending log-probs, the true token at a random rank or (30%) absent.
    """

    def __init__(self, seq, prompt_len, *, depth, vocab, mode="rank0", taps=(), reference=None, seed=0):
        self.seq, self.prompt_len, self.depth, self.vocab, self.mode = list(seq), prompt_len, depth, vocab, mode
        self.tap_layers = tuple(taps)
        self.reference = reference  # [len(seq), taps * H] tapped states of the whole sequence
        self.g = torch.Generator().manual_seed(seed)
        self.n = None
        self.rows: list[int] = []

    def _check_taps(self, tapped):
        assert tapped.shape[0] == 1
        if self.reference is not None:
            want = self.reference[self.n:self.n + tapped.shape[1]]
            torch.testing.assert_close(tapped[0], want, rtol=1e-4, atol=1e-4)
        else:
            assert tapped.shape[2] == 0

    def start(self, tapped, capacity):
        assert tapped.shape[1] == self.prompt_len
        self.n = 0
        self._check_taps(tapped)
        self.n = self.prompt_len

    def extend(self, tapped):
        self._check_taps(tapped)
        self.rows.append(tapped.shape[1])
        self.n += tapped.shape[1]

    def _others(self, exclude, k):
        perm = torch.randperm(self.vocab, generator=self.g).tolist()
        return [t for t in perm if t != exclude][:k]

    def propose(self, anchor, width):
        assert anchor.shape == (1,)
        assert int(anchor) == self.seq[self.n], "the anchor is not the next greedy token"
        ids = torch.empty(1, self.depth, width, dtype=torch.long)
        lp = torch.empty(1, self.depth, width, dtype=torch.float32)
        for d in range(self.depth):
            true = self.seq[self.n + d + 1]
            row = [true] + self._others(true, width - 1)
            if self.mode == "rank0":
                scores = [-0.05] + [-3.0 - 0.5 * r for r in range(width - 1)]
            elif self.mode == "rank1":
                scores = [-0.5, -0.6] + [-30.0 - r for r in range(width - 2)]
                if width >= 2 and (self.n + d) % 3 != 0:
                    row[0], row[1] = row[1], row[0]
            else:
                scores = sorted((-4 * torch.rand(width, generator=self.g)).tolist(), reverse=True)
                r = int(torch.randint(0, width, (1,), generator=self.g))
                row[0], row[r] = row[r], row[0]
                if float(torch.rand(1, generator=self.g)) < 0.3:  # replace the true token by a new one
                    row[r] = next(t for t in self._others(true, self.vocab) if t not in row)
            ids[0, d] = torch.tensor(row)
            lp[0, d] = torch.tensor(scores)
        return lp, ids


def greedy_sequence(model, prompt, new):
    return hf_greedy(model, prompt, new)[0].tolist()


def chain_depth(budget, width, depth):
    """How deep the rank-0 chain reaches in a best-first tree when it always scores best:
    the chain node at depth i exists iff budget >= (i - 1) * width + 2."""
    return min(depth, budget - 1, (budget - 2) // width + 1)


@pytest.mark.parametrize("depth,width,budget", [(6, 1, 7), (6, 1, 3), (6, 1, 64), (6, 2, 13), (6, 2, 8),
                                                (6, 8, 7), (6, 8, 42), (6, 8, 41), (15, 3, 256), (4, 8, 2),
                                                (9, 2, 5)])
def test_oracle_rounds_commit_the_whole_chain(depth, width, budget):
    model = qwen3(True)
    prompt = random_prompt(model, 20, seed=depth * 100 + width)
    new = 40
    seq = greedy_sequence(model, prompt, new + depth + 2)
    oracle = Oracle(seq, 20, depth=depth, vocab=256, mode="rank0", seed=width)
    out = jetspec.SpeculativeGenerator(model, oracle, budget=budget, width=width).generate(prompt, max_new_tokens=new)
    assert out.sequences[0].tolist() == seq[:20 + new]
    expect = 1 + chain_depth(budget, width, depth)
    assert out.stats.accept_lengths[:-1] == [expect] * (out.stats.rounds - 1)
    assert oracle.rows == out.stats.accept_lengths
    check_stats(out, 20, new, min(depth, budget - 1) + 1)


def test_oracle_full_chain_with_budget_depth_plus_one():
    """Width 1 and budget D + 1: every round commits D + 1 tokens."""
    model = qwen3(False)
    prompt = random_prompt(model, 33, seed=5)
    seq = greedy_sequence(model, prompt, 48 + 10)
    for depth in (1, 3, 7):
        oracle = Oracle(seq, 33, depth=depth, vocab=128)
        out = jetspec.SpeculativeGenerator(model, oracle, budget=depth + 1, width=1).generate(prompt, max_new_tokens=48)
        assert out.sequences[0].tolist() == seq[:33 + 48]
        assert out.stats.accept_lengths[:-1] == [depth + 1] * (out.stats.rounds - 1)


@pytest.mark.parametrize("depth,width,budget", [(5, 2, 64), (4, 8, 128), (3, 3, 40)])
def test_oracle_true_token_below_a_decoy(depth, width, budget):
    """The true token is at rank 1 at some depths; the budget holds every node of rank <= 1, so
    every round still commits D + 1 tokens."""
    model = qwen3(True)
    prompt = random_prompt(model, 15, seed=depth)
    new = 45
    seq = greedy_sequence(model, prompt, new + depth + 2)
    oracle = Oracle(seq, 15, depth=depth, vocab=256, mode="rank1", seed=depth)
    out = jetspec.SpeculativeGenerator(model, oracle, budget=budget, width=width).generate(prompt, max_new_tokens=new)
    assert out.sequences[0].tolist() == seq[:15 + new]
    assert out.stats.accept_lengths[:-1] == [depth + 1] * (out.stats.rounds - 1)


def tapped_reference(model, seq, layers):
    with torch.no_grad():
        hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    return torch.cat([hs[layer + 1][0] for layer in layers], dim=-1)


@pytest.mark.parametrize("budget,width,taps", [(3, 2, (0,)), (16, 2, (1, 0)), (64, 8, (0, 1)), (256, 8, (1,)),
                                               (40, 3, (0, 0))])
def test_noisy_oracle_lossless_and_tapped_states(budget, width, taps):
    """Partly right drafts give accepted paths of every length through every part of the tree; the
    drafter also checks that the tapped states it is fed are the target's, for the accepted nodes."""
    model = qwen3(True)  # 3 layers: taps on layers 0 and 1 are pre-final-norm in HF's hidden_states too
    prompt = random_prompt(model, 25, seed=budget)
    new = 48
    depth = 7
    seq = greedy_sequence(model, prompt, new + depth + 2)
    reference = tapped_reference(model, seq, taps)
    oracle = Oracle(seq, 25, depth=depth, vocab=256, mode="noisy", taps=taps, reference=reference, seed=budget)
    out = jetspec.SpeculativeGenerator(model, oracle, budget=budget, width=width).generate(prompt, max_new_tokens=new)
    assert out.sequences[0].tolist() == seq[:25 + new]
    check_stats(out, 25, new, min(depth, budget - 1) + 1)
    lengths = out.stats.accept_lengths
    assert max(lengths) > (2 if budget > width + 1 else 1) and min(lengths) < max(lengths)
    assert oracle.rows == out.stats.accept_lengths


def test_depth_argument_limits_rounds():
    model = qwen3(True)
    prompt = random_prompt(model, 10, seed=9)
    seq = greedy_sequence(model, prompt, 40 + 12)
    oracle = Oracle(seq, 10, depth=9, vocab=256)
    out = jetspec.SpeculativeGenerator(model, oracle, budget=64, width=1, depth=3).generate(prompt, max_new_tokens=40)
    assert out.sequences[0].tolist() == seq[:50]
    assert out.stats.accept_lengths[:-1] == [4] * (out.stats.rounds - 1)


# ---------------------------------------------------------------------------------------------
# EOS and max_new_tokens inside a round
# ---------------------------------------------------------------------------------------------


def mid_round_eos(new_tokens, round_len):
    """A token whose first occurrence in the new tokens is strictly inside a round (rounds after the
    prefill's token cover new-token indices 1 + r * round_len .. (r + 1) * round_len)."""
    for j, tok in enumerate(new_tokens):
        if j >= 2 and tok not in new_tokens[:j] and 0 < (j - 1) % round_len < round_len - 1:
            return j, tok
    raise AssertionError("no usable EOS token in this continuation")


@pytest.mark.parametrize("gqa,depth,width", [(True, 5, 1), (False, 7, 3)])
def test_eos_inside_a_round(gqa, depth, width):
    model = qwen3(gqa)
    vocab = model.config.vocab_size
    prompt = random_prompt(model, 12, seed=depth)
    seq = greedy_sequence(model, prompt, 64)
    j, eos = mid_round_eos(seq[12:12 + 50], depth + 1)
    oracle = Oracle(seq, 12, depth=depth, vocab=vocab)
    budget = 1 + depth * width
    gen = jetspec.SpeculativeGenerator(model, oracle, budget=budget, width=width)
    out = gen.generate(prompt, max_new_tokens=50, eos_token_id=eos)
    want = hf_greedy(model, prompt, 50, eos=eos)
    assert want.shape[1] == 12 + j + 1  # HF stops right after the first EOS
    assert out.sequences.tolist() == want.tolist()
    assert out.stats.new_tokens == j + 1
    # the EOS came inside a round that committed depth + 1 tokens, all earlier rounds being full
    assert 0 < (j - 1) % (depth + 1) < depth
    assert out.stats.accept_lengths[:-1] == [depth + 1] * (out.stats.rounds - 1)
    assert out.stats.rounds == (j - 1) // (depth + 1) + 1
    # several EOS ids, one never generated; and EOS as the prefill's token
    out = gen.generate(prompt, max_new_tokens=50, eos_token_id=[vocab - 1, eos])
    assert out.sequences.tolist() == want.tolist()
    out = gen.generate(prompt, max_new_tokens=50, eos_token_id=seq[12])
    assert out.sequences[0].tolist() == seq[:13] and out.stats.rounds == 0
    # ids as numpy / tensor scalars, and the model's own generation config as the default
    for given in (np.int64(eos), torch.tensor(eos), torch.tensor([eos])):
        assert gen.generate(prompt, max_new_tokens=50, eos_token_id=given).sequences.tolist() == want.tolist()
    model.generation_config.eos_token_id = eos
    try:
        assert gen.generate(prompt, max_new_tokens=50).sequences.tolist() == want.tolist()
        assert gen.generate(prompt, max_new_tokens=50, eos_token_id=[]).sequences.shape[1] == 12 + 50
    finally:
        model.generation_config.eos_token_id = None


class EosOracle(OracleDrafter):
    """Proposes the stop token at rank 0 of every depth and the true continuation at rank 1: every tree
    holds EOS nodes at every depth, and the path the target takes runs beside them."""

    def __init__(self, continuation, depth, vocab_size, eos):
        super().__init__(continuation, depth, vocab_size)
        self.eos = eos

    def candidates_at(self, drafted, width):
        logprobs, ids = super().candidates_at(drafted, width - 1)
        eos = torch.full_like(ids[..., :1], self.eos)
        return torch.cat([logprobs[..., :1], logprobs], -1), torch.cat([eos, ids], -1)


@pytest.mark.parametrize("mode", ["host", "device"])
def test_eos_proposed_at_every_depth(mode):
    """#23: stop tokens inside every tree (where the target does not stop, and where it does) change nothing."""
    model = qwen3(True)
    prompt = random_prompt(model, 9, seed=11)
    seq = greedy_sequence(model, prompt, 80)
    j, eos = mid_round_eos(seq[9:9 + 60], 6)
    for stop in ([], eos):  # the drafted EOS is never the target's (no stop), then it is, once
        drafter = EosOracle(seq[9:], depth=5, vocab_size=256, eos=eos)
        gen = jetspec.SpeculativeGenerator(model, drafter, budget=24, width=3, mode=mode)
        out = gen.generate(prompt, max_new_tokens=60, eos_token_id=stop)
        want = hf_greedy(model, prompt, 60, eos=stop if stop != [] else None)
        assert out.sequences.tolist() == want.tolist()
        assert out.stats.mean_accept_length > 1  # the true tokens at rank 1 were accepted past the EOS nodes


@pytest.mark.parametrize("new", [23, 2, 1, 7])
def test_max_new_tokens_inside_a_round(new):
    model = qwen3(True)
    prompt = random_prompt(model, 8, seed=new)
    depth = 4  # rounds commit 5; 23 = 1 + 4 * 5 + 2
    seq = greedy_sequence(model, prompt, new + depth + 2)
    oracle = Oracle(seq, 8, depth=depth, vocab=256)
    out = jetspec.SpeculativeGenerator(model, oracle, budget=20, width=2).generate(prompt, max_new_tokens=new)
    assert out.sequences.shape == (1, 8 + new)
    assert out.sequences.tolist() == hf_greedy(model, prompt, new).tolist()
    assert out.stats.new_tokens == new
    assert out.stats.rounds == -(-(new - 1) // (depth + 1))
    assert out.stats.accept_lengths[:-1] == [depth + 1] * (out.stats.rounds - 1)


# ---------------------------------------------------------------------------------------------
# stream()
# ---------------------------------------------------------------------------------------------


def test_stream_yields_the_rounds():
    model = qwen3(False)
    prompt = random_prompt(model, 30, seed=3)
    seq = greedy_sequence(model, prompt, 40 + 8)
    gen = jetspec.SpeculativeGenerator(model, Oracle(seq, 30, depth=5, vocab=128, mode="noisy", seed=3),
                                       budget=32, width=4)
    stream = gen.stream(prompt, max_new_tokens=40)
    chunks = list(stream)
    assert len(chunks[0]) == 1  # the prefill's token
    flat = [t for c in chunks for t in c]
    assert flat == seq[30:70] == stream.tokens
    assert [len(c) for c in chunks[1:-1]] == stream.stats.accept_lengths[:-1]
    assert stream.stats.new_tokens == 40
    # generate() on a fresh oracle gives the same tokens
    gen = jetspec.SpeculativeGenerator(model, Oracle(seq, 30, depth=5, vocab=128, mode="noisy", seed=3),
                                       budget=32, width=4)
    assert gen.generate(prompt, max_new_tokens=40).sequences[0, 30:].tolist() == flat
    # a head-drafted stream, and a 1-D prompt
    head = random_head(model, layers=1, block=8, causal=True, seed=0)
    gen = jetspec.SpeculativeGenerator(model, head, budget=16, width=2)
    chunks = list(gen.stream(prompt[0], max_new_tokens=20))
    assert len(chunks[0]) == 1
    assert [t for c in chunks for t in c] == seq[30:50]


# ---------------------------------------------------------------------------------------------
# Errors, before any work
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def counted():
    """The GQA target with a counter of its forwards."""
    model = qwen3(True)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    yield model, calls
    handle.remove()


def test_constructor_errors(counted):
    model, calls = counted
    head = random_head(model, layers=1, block=8, causal=True, seed=0)
    for kwargs, match in [(dict(budget=0), "budget"), (dict(budget=-1), "budget"), (dict(budget=2.0), "budget"),
                          (dict(budget=1025), "budget"), (dict(budget=10 ** 6), "budget"), (dict(budget=True), "budget"),
                          (dict(width=0), "width"), (dict(width=True), "width"), (dict(depth=8), "depth"),
                          (dict(depth=0), "depth"), (dict(depth=True), "depth")]:
        with pytest.raises(ValueError, match=match):
            jetspec.SpeculativeGenerator(model, head, **kwargs)
    with pytest.raises(ValueError, match="drafter"):
        jetspec.SpeculativeGenerator(model, None, budget=2)
    jetspec.SpeculativeGenerator(model, head, depth=7)  # the head's own depth is fine
    with pytest.raises(TypeError):
        jetspec.SpeculativeGenerator(torch.nn.Linear(2, 2), head)
    assert not calls


def test_generate_errors(counted):
    model, calls = counted
    head = random_head(model, layers=1, block=8, causal=True, seed=0)
    gen = jetspec.SpeculativeGenerator(model, head, budget=16, width=2)
    prompt = random_prompt(model, 10, seed=0)
    cases = [
        (dict(input_ids=prompt, max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(input_ids=prompt, max_new_tokens=-5), ValueError, "max_new_tokens"),
        (dict(input_ids=prompt.float()), ValueError, "int64"),
        (dict(input_ids=prompt.int()), ValueError, "int64"),
        (dict(input_ids=prompt.tolist()), ValueError, "input_ids"),
        (dict(input_ids=prompt.repeat(2, 1)), NotImplementedError, "batch"),
        (dict(input_ids=torch.tensor([[1, 256]])), ValueError, "input_ids"),
        (dict(input_ids=torch.tensor([[-1, 2]])), ValueError, "input_ids"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids"),
        (dict(input_ids=prompt, max_new_tokens=503), ValueError, "position"),
        (dict(input_ids=prompt, max_new_tokens=True), ValueError, "max_new_tokens"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            gen.stream(**kwargs)  # raised by the call, not on the first next()
        with pytest.raises(exc, match=match):
            gen.generate(**kwargs)
    assert not calls


@pytest.mark.parametrize("mode", ["host", "device"])
def test_position_limit_boundary(mode):
    """Refused is only what plain decoding refuses (a kept token past the last position); near the limit a
    round's deep nodes sit past it, and what they decide is never emitted."""
    model = qwen3(True)
    limit = model.config.max_position_embeddings  # 512
    head = random_head(model, layers=1, block=8, causal=True, seed=0)
    prompt = random_prompt(model, limit - 20, seed=1)
    want = hf_greedy(model, prompt, 20)
    oracle = OracleDrafter(want[0, prompt.shape[1]:].tolist(), depth=7, vocab_size=model.config.vocab_size)
    for drafter in (head, oracle):  # the oracle's rounds commit whole chains up to the last position
        gen = jetspec.SpeculativeGenerator(model, drafter, budget=16, width=2, mode=mode)
        assert gen.generate(prompt, max_new_tokens=20).sequences.tolist() == want.tolist()
        with pytest.raises(ValueError, match="positions"):
            gen.generate(prompt, max_new_tokens=21)
    plain = jetspec.SpeculativeGenerator(model, None, budget=1, mode=mode)
    full = random_prompt(model, limit - 1, seed=2)
    assert plain.generate(full, max_new_tokens=1).sequences.shape[1] == limit
    with pytest.raises(ValueError, match="positions"):
        plain.generate(full, max_new_tokens=2)
    with pytest.raises(ValueError, match="positions"):
        plain.generate(random_prompt(model, limit + 1, seed=2), max_new_tokens=1)