"""The head trainer: its packed training forward is the inference forward, it learns, it resumes."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from jetspec import SpeculativeGenerator, load_head
from jetspec.heads import DraftHead, head_config_for
from jetspec.runtime import HeadDrafter, Target
from jetspec.training import (HeadTrainer, TrainConfig, TrainingSequence, block_mask, evaluate_acceptance,
                              load_sequences, matched_depth, replay_acceptance, save_sequences, self_distill)

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # confident next-token distributions, as a trained model's mostly are
        model.lm_head.weight.mul_(10)
    return model


def new_head(model, causal=True, block=6, seed=0) -> DraftHead:
    torch.manual_seed(seed)
    return DraftHead(head_config_for(model.config, num_layers=1, block_size=block, causal=causal,
                                     mask_token_id=VOCAB - 1))


def greedy(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                         pad_token_id=0)
    return out[0].tolist()


@pytest.fixture(scope="module")
def sequences(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (5, 9, 14)]
    return [TrainingSequence(tokens=greedy(model, p, 24), prompt_len=len(p)) for p in prompts]


def test_block_mask_semantics():
    mask = block_mask([2, 5], context_len=7, block_size=3, causal=True)
    assert mask.shape == (6, 7 + 6)
    # block 0 (anchor 2) sees context rows 0, 1; block 1 (anchor 5) rows 0..4
    assert mask[:3, :7].sum(1).tolist() == [2, 2, 2] and mask[3:, :7].sum(1).tolist() == [5, 5, 5]
    assert mask[:, 7:].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                          [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    bidirectional = block_mask([2, 5], context_len=7, block_size=3, causal=False)
    assert bidirectional[:, 7:].int().tolist() == [[1, 1, 1, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 1, 1]] * 3


@pytest.mark.parametrize("causal", [True, False])
def test_packed_training_forward_is_the_inference_forward(model, sequences, causal):
    """Each packed block's log-probs equal what the drafter proposes from the same context at inference."""
    head = new_head(model, causal=causal)
    trainer = HeadTrainer(model, head, TrainConfig(loss="ce"))
    seq = sequences[2]
    anchors = [seq.prompt_len, seq.prompt_len + 3, len(seq.tokens) - 2]
    spec = head.spec
    target = Target(model)
    tokens = torch.tensor([seq.tokens])
    n = len(seq.tokens)
    _, tapped = target.prefill(tokens, target.new_cache(1, n), spec.target_layer_ids)
    # the training path's logits, recomputed here through the same public pieces
    with torch.no_grad():
        block_pos = (torch.tensor(anchors)[:, None] + torch.arange(spec.block_size)).flatten()[None]
        ids = torch.full_like(block_pos, spec.mask_token_id)
        ids.view(len(anchors), -1)[:, 0] = tokens[0, anchors]
        hidden = head(model.model.embed_tokens(ids), block_pos,
                      head.context_key_values(tapped, torch.arange(n)[None]),
                      block_mask(anchors, n, spec.block_size, causal))
        packed = torch.log_softmax(model.lm_head(hidden.view(len(anchors), spec.block_size, -1)[:, 1:]), -1)
    drafter = HeadDrafter(head, target)
    for j, a in enumerate(anchors):
        drafter.start(tapped[:, :a], capacity=n + spec.block_size)
        logprobs, top = drafter.propose(tokens[0, a:a + 1], width=5)
        want = packed[j].topk(5, dim=-1)
        torch.testing.assert_close(logprobs[0], want.values, atol=1e-5, rtol=1e-5)
        assert torch.equal(top[0], want.indices)
    # and sequence_loss, on the same anchors, is the CE of exactly these log-probs
    loss, metrics = trainer.sequence_loss(seq, anchors)
    targets = torch.tensor([[seq.tokens[a + d] if a + d < n else -100 for d in range(1, spec.block_size)]
                            for a in anchors])
    valid = targets >= 0
    ce = -packed.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(loss.detach(), ce[valid].mean(), atol=1e-5, rtol=1e-5)
    assert metrics.blocks == 3 and len(metrics.accuracy) == spec.depth


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_a_batch_is_its_sequences_pooled(model, sequences, loss):
    """One right-padded batch = each sequence alone, pooled over their valid slots: padding and the
    other sequences' blocks are invisible, and a sequence with fewer anchors adds no weight for its repeats."""
    trainer = HeadTrainer(model, new_head(model, seed=4), TrainConfig(loss=loss))
    anchors = [[5, 7, 20], [9, 30], [14, 15, 16, 36]]  # 36: near the end, fewer than D labels
    alone = [trainer.sequence_loss(s, a) for s, a in zip(sequences, anchors)]
    pooled, metrics = trainer.batch_loss(sequences, anchors)
    depth = trainer.head.spec.depth
    slots = [sum(min(depth, len(s.tokens) - 1 - a) for a in anc) for s, anc in zip(sequences, anchors)]
    expected = sum(float(loss.detach()) * n for (loss, _), n in zip(alone, slots)) / sum(slots)
    assert float(pooled.detach()) == pytest.approx(expected, rel=1e-5)
    assert metrics.blocks == 9


@pytest.mark.parametrize("loss,weighting", [("kl", "uniform"), ("ce", "uniform"), ("kl", "exp")])
def test_training_reduces_the_loss_and_raises_acceptance(model, sequences, loss, weighting):
    head = new_head(model, seed=1)
    cfg = TrainConfig(loss=loss, weighting=weighting, anchors=16, lr=3e-3, warmup=0.1)
    trainer = HeadTrainer(model, head, cfg)
    before, _ = trainer.sequence_loss(sequences[0], anchors=list(range(5, 20)))
    prompts = [s.tokens[:s.prompt_len] for s in sequences]
    tau_before = evaluate_acceptance(model, trainer.inference_head(), prompts, budget=16, width=2,
                                     max_new_tokens=20)["tau"]
    history = trainer.train(sequences, steps=60, progress=False)
    after, _ = trainer.sequence_loss(sequences[0], anchors=list(range(5, 20)))
    assert float(after.detach()) < 0.5 * float(before.detach())
    assert len(history) == 60 and history[-1]["step"] == 60
    assert history[0]["lr"] < history[5]["lr"] and history[-1]["lr"] < history[10]["lr"]  # warmup, then decay
    tau_after = evaluate_acceptance(model, trainer.inference_head(), prompts, budget=16, width=2,
                                    max_new_tokens=20)["tau"]
    assert tau_after > tau_before + 0.5  # memorised continuations are accepted


@pytest.mark.parametrize("per_step", [1, 2])
def test_resume_continues_exactly(model, sequences, tmp_path, per_step):
    cfg = TrainConfig(anchors=8, lr=2e-3, sequences_per_step=per_step)
    straight = HeadTrainer(model, new_head(model, seed=2), cfg)
    straight.train(sequences, steps=6, progress=False)

    first = HeadTrainer(model, new_head(model, seed=2), cfg)
    first.train(sequences, steps=6, until=4, checkpoint_dir=tmp_path / "ckpt", progress=False)
    second = HeadTrainer(model, new_head(model, seed=9), cfg)  # different init: resume must overwrite it
    second.resume(tmp_path / "ckpt")
    assert second.state.step == 4 and len(second.state.history) == 4
    second.train(sequences, steps=6, progress=False)
    for (name, a), b in zip(straight.head.state_dict().items(), second.head.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    shipped = load_head(tmp_path / "ckpt" / "head")  # the published-format head of that checkpoint
    assert shipped.spec == first.head.spec and next(shipped.parameters()).dtype == torch.float32


def test_standardized_fc_is_folded_into_the_published_head(model, sequences):
    """The trainer learns fc in per-feature-RMS units; the head it hands out computes the same loss on raw
    tapped states (the fold is exact), and measuring the scale twice is refused."""
    trainer = HeadTrainer(model, new_head(model, seed=4), TrainConfig(anchors=8, lr=2e-3))
    trainer.train(sequences, steps=2, progress=False)
    scale = trainer.input_scale
    assert scale is not None and scale.shape == (len(trainer.head.spec.target_layer_ids) * model.config.hidden_size,)
    published = trainer.inference_head()
    torch.testing.assert_close(published.fc.weight, trainer.head.fc.weight / scale)
    plain = HeadTrainer(model, published, TrainConfig(anchors=8, standardize_inputs=False))
    seq = sequences[0]
    anchors = list(range(seq.prompt_len, seq.prompt_len + 5))
    torch.testing.assert_close(trainer.sequence_loss(seq, anchors)[0], plain.sequence_loss(seq, anchors)[0])
    with pytest.raises(RuntimeError, match="already fitted"):
        trainer.fit_input_scale(sequences)


def test_resume_rejects_another_head(model, sequences, tmp_path):
    trainer = HeadTrainer(model, new_head(model, block=6), TrainConfig(anchors=4))
    trainer.train(sequences, steps=1, checkpoint_dir=tmp_path, progress=False)
    other = HeadTrainer(model, new_head(model, block=4), TrainConfig(anchors=4))
    with pytest.raises(ValueError, match="different head"):
        other.resume(tmp_path)


def test_self_distill_is_the_target_greedy_output(model, tmp_path):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in (3, 8, 5, 12)]
    data = self_distill(model, prompts, max_new_tokens=10, batch_size=3, progress=False)
    for prompt, seq in zip(prompts, data):
        assert seq.prompt_len == len(prompt) and seq.tokens == greedy(model, prompt, 10)
    save_sequences(data, tmp_path / "data.jsonl")
    assert load_sequences(tmp_path / "data.jsonl") == data
    eos = data[0].tokens[len(prompts[0]) + 2]
    stopped = self_distill(model, prompts[:1], max_new_tokens=10, eos_token_id=eos, progress=False)[0]
    assert stopped.tokens[-1] == eos and len(stopped.tokens) <= len(prompts[0]) + 3
    # [] means no stop token at all, even where the model's generation config names one.
    model.generation_config.eos_token_id = eos
    try:
        unstopped = self_distill(model, prompts[:1], max_new_tokens=10, eos_token_id=[], progress=False)[0]
    finally:
        model.generation_config.eos_token_id = None
    assert unstopped.tokens == data[0].tokens


@pytest.mark.parametrize("bad", [dict(loss="mse"), dict(weighting="linear"), dict(gamma=0), dict(anchors=0),
                                 dict(warmup=1.5)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.fixture(scope="module")
def trained_head(model, sequences):
    trainer = HeadTrainer(model, new_head(model, seed=1), TrainConfig(anchors=16, lr=3e-3, warmup=0.1))
    trainer.train(sequences, steps=60, progress=False)
    return trainer.inference_head()


def test_matched_depth_follows_the_true_path_only():
    # root 0 -> {1: 'a', 2: 'b'}, 1 -> {3: 'c'}, 2 -> {4: 'c'}, 3 -> {5: 'd'}; node 6 is padding.
    tokens = torch.tensor([[9, 1, 2, 3, 3, 4, 0]])
    parents = torch.tensor([[-1, 0, 0, 1, 2, 3, -1]])
    depths = torch.tensor([[0, 1, 1, 2, 2, 3, 0]])
    num_nodes = torch.tensor([6])
    assert matched_depth(tokens, parents, depths, num_nodes, torch.tensor([[9, 1, 3, 4]])).tolist() == [3]
    assert matched_depth(tokens, parents, depths, num_nodes, torch.tensor([[9, 2, 3, 4]])).tolist() == [2]  # 'b c'
    assert matched_depth(tokens, parents, depths, num_nodes, torch.tensor([[9, 1, 3, -1]])).tolist() == [2]
    assert matched_depth(tokens, parents, depths, num_nodes, torch.tensor([[9, 5, 3, 4]])).tolist() == [0]
    assert matched_depth(tokens, parents, depths, num_nodes, torch.tensor([[9, 1]])).tolist() == [1]  # D = 1


def test_replay_gives_the_decoders_rounds(model, sequences, trained_head):
    """Teacher-forced replay = the rounds SpeculativeGenerator really runs, for every budget and width."""
    configs = [(1, 1), (2, 1), (4, 1), (6, 1), (8, 2), (16, 2), (32, 4), (64, 8)]
    depth = trained_head.spec.depth
    longest = 0
    for seq in sequences:  # each is its prompt + 24 greedy tokens
        new = len(seq.tokens) - seq.prompt_len - depth - 1
        prompt = torch.tensor([seq.tokens[:seq.prompt_len]])
        replayed = replay_acceptance(model, trained_head, seq.tokens, seq.prompt_len, new, configs)
        for budget, width in configs:
            gen = SpeculativeGenerator(model, trained_head if budget > 1 else None, budget=budget, width=width)
            decoded = gen.generate(prompt, max_new_tokens=new, eos_token_id=[]).stats.accept_lengths
            assert replayed[(budget, width)] == decoded, (budget, width)
            longest = max(longest, *decoded)
    assert longest > 2  # the trained head gets multi-token rounds accepted: the comparison has teeth


def test_replay_rejects_bad_lengths(model, sequences, trained_head):
    seq = sequences[0]
    with pytest.raises(ValueError, match="prompt_len"):
        replay_acceptance(model, trained_head, seq.tokens, seq.prompt_len, len(seq.tokens), [(4, 2)])
    with pytest.raises(ValueError, match="prompt_len"):
        replay_acceptance(model, trained_head, seq.tokens, 0, 4, [(4, 2)])
