"""The ``jetspec`` command: the README's demo path and the trainer's data resumption, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jetspec import load_head
from jetspec.cli import main
from jetspec.assets.tiny import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_demo_runs_the_ops(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "path [0, 1, 3, 5], bonus token 55" in out and "[0, 1, 2, 3, 4, 5, 6, 8, 10]" in out


def test_generate_streams_exactly_greedy_text(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--head", str(tiny / "head"), "--prompt", "Hello", "--dtype", "fp32",
                 "--max-new-tokens", "24", "--budget", "16", "--width", "4", "--eos-token-id", "-1"]) == 0
    captured = capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    want = model.generate(ids, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                          pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    assert captured.out.rstrip("\n") == tokenizer.decode(want, skip_special_tokens=True)
    assert "budget 16, width 4, host rounds: 24 tokens" in captured.err


def test_generate_without_head_needs_budget_one(tiny):
    with pytest.raises(SystemExit, match="--head is required"):
        main(["generate", "--model", str(tiny), "--prompt", "x"])


def test_train_head_resumes_its_data_and_its_steps(tiny, tmp_path):
    common = ["train-head", "--model", str(tiny), "--out", str(tmp_path), "--held-out", "4", "--eval-prompts", "1",
              "--max-new-tokens", "8", "--block-size", "6", "--anchors", "4", "--eval-new-tokens", "8",
              "--distill-chunk", "3", "--steps", "4"]
    assert main([*common, "--num-prompts", "5", "--until", "2"]) == 0
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 5
    assert json.loads((tmp_path / "trainer" / "state.json").read_text())["step"] == 2
    assert main([*common, "--num-prompts", "7", "--resume"]) == 0  # 2 more prompts, 2 more steps
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    assert len(lines) == 7 and len(set(lines)) == 7
    state = json.loads((tmp_path / "trainer" / "state.json").read_text())
    assert state["step"] == 4 and [r["step"] for r in state["history"]] == [1, 2, 3, 4]
    assert "tau" in json.loads((tmp_path / "final_eval.json").read_text())
    head = load_head(tmp_path / "head")
    assert head.spec.block_size == 6 and head.spec.causal
