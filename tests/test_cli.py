"""The ``jetspec`` command: the README's demo path and the trainer's data resumption, end to end."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

import jetspec
from jetspec import load_head, ops
from jetspec.assets.tiny import write_tiny_model
from jetspec.cli import build_parser, main
from jetspec.heads import DraftHead, head_config_for, save_head

MAX_BUDGET = ops.LIMITS["tree_attention"]["cpu"]["nodes"]


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


def test_auto_budget_calibrates_once_and_says_what_it_chose(tiny, capsys, tmp_path, monkeypatch):
    """generate's default budget is auto: the first run measures the round costs (cached under the cache
    root), calibrate reuses them (--force measures again), and the stats line shows the trees chosen."""
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path))
    argv = ["--model", str(tiny), "--head", str(tiny / "head"), "--dtype", "fp32"]
    assert main(["generate", *argv, "--prompt", "Hello", "--max-new-tokens", "12", "--eos-token-id", "-1"]) == 0
    err = capsys.readouterr().err
    assert "budget auto, width 8, host rounds: 12 tokens" in err and "trees " in err
    cached = list((tmp_path / "calibration").glob("*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(["calibrate", *argv]) == 0
    out = capsys.readouterr().out
    assert "16x4" in out and "x plain decoding" in out and cached[0].stat().st_mtime_ns == stamp
    assert main(["calibrate", *argv, "--force"]) == 0
    assert cached[0].stat().st_mtime_ns != stamp


def test_bench_writes_json_and_rows(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path))
    out = tmp_path / "speed"
    with mock.patch("jetspec.assets.datasets.load_benchmark",
                    lambda name, limit: [mock.Mock(text="Hi"), mock.Mock(text="Tell me more")][:limit]):
        assert main(["bench", "--model", str(tiny), "--head", str(tiny / "head"), "--dtype", "fp32",
                     "--limit", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = json.loads((out / "speed.json").read_text())["rows"]
    configs = [r["config"] for r in rows]
    assert configs[0] == "plain" and configs[-1] == "auto" and "64x8" in configs
    assert all(r["tokens"] == 12 and r["tok_s"] > 0 for r in rows)


def usage_error(capsys, argv: list[str]) -> str:
    """Run ``jetspec ARGV``, expecting argparse's way of refusing it: usage, then one
    ``jetspec <command>: error: ...`` line on stderr, exit status 2 (no traceback: any other
    exception propagates out of main and fails the test). Returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert any(line.startswith(f"usage: jetspec {argv[0]}") for line in lines)  # (after any loading progress)
    assert lines[-1].startswith(f"jetspec {argv[0]}: error: "), captured.err
    assert sum("error:" in line for line in lines) == 1
    return lines[-1]


def test_generate_without_head_needs_budget_one(tiny, capsys):
    assert "--head is required" in usage_error(capsys, ["generate", "--model", str(tiny), "--prompt", "x"])


@pytest.fixture(scope="module")
def other_head(tmp_path_factory, tiny):
    """A head made for a target of another hidden size (64, not the tiny model's 128)."""
    target = Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    head = DraftHead(head_config_for(target, num_layers=1, block_size=8, causal=True, mask_token_id=259))
    return save_head(head, tmp_path_factory.mktemp("other") / "head")


GENERATE_MISTAKES = {
    "budget 0": (["--budget", "0"], "argument --budget"),
    "budget past the op limit": (["--budget", str(MAX_BUDGET + 1)], f"[1, {MAX_BUDGET}]"),
    "width 0": (["--width", "0"], "argument --width"),
    "depth 0": (["--depth", "0"], "argument --depth"),
    "depth past the head's": (["--depth", "100"], "depth must be an integer in [1, 7]"),
    "max-new-tokens 0": (["--max-new-tokens", "0"], "argument --max-new-tokens"),
    "max-new-tokens past the positions": (["--max-new-tokens", "5000"], "4096 positions"),
    "max-new-tokens not a number": (["--max-new-tokens", "lots"], "argument --max-new-tokens"),
    "device of no kind": (["--device", "bogus"], "argument --device: invalid device 'bogus'"),
    "device index past the GPUs": (["--device", "cuda:99"], "argument --device: 'cuda:99'"),
    "device meta": (["--device", "meta"], "argument --device"),
    "head folder missing": (["--head", "{tmp}/no-such-head"], "argument --head: no draft head at"),
    "head folder is the model's": (["--head", "{tiny}"], "argument --head: {tiny}/config.json: invalid draft-head "
                                                          "config: 'block_size'"),
    "head for another hidden size": (["--head", "{other}"], "does not fit the target"),
    "model folder missing": (["--model", "{tmp}/no-such-model"], "argument --model: no model at {tmp}/no-such-model"),
    "model folder without config.json": (["--model", "{tmp}"], "argument --model: no model at {tmp}"),
    "empty raw prompt": (["--prompt", "", "--no-chat-template"], "--prompt is empty"),
}


@pytest.mark.parametrize("extra,want", GENERATE_MISTAKES.values(), ids=GENERATE_MISTAKES.keys())
def test_generate_reports_user_mistakes_as_usage_errors(tiny, other_head, tmp_path, capsys, extra, want):
    fill = dict(tmp=tmp_path, tiny=tiny, other=other_head)
    argv = ["generate", "--model", str(tiny), "--head", str(tiny / "head"), "--prompt", "Hello", "--dtype", "fp32",
            "--max-new-tokens", "4", *[a.format(**fill) for a in extra]]
    line = usage_error(capsys, argv)
    assert want.format(**fill) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("extra,want", [(["--device", "cuda"], "argument --device: 'cuda': no CUDA device"),
                                        (["--mode", "graph"], "mode 'graph' needs the target on a CUDA device")])
def test_generate_without_a_gpu(tiny, capsys, extra, want):
    argv = ["generate", "--model", str(tiny), "--head", str(tiny / "head"), "--prompt", "Hello", *extra]
    assert want in usage_error(capsys, argv)


def test_generate_keeps_tracebacks_for_internal_errors(tiny, monkeypatch):
    """Only the library's own errors about its arguments become usage errors; a bug still raises."""
    class Broken:
        def __init__(self, *args, **kwargs):
            raise ValueError("an internal failure, not about the user's arguments")

    monkeypatch.setattr(jetspec, "SpeculativeGenerator", Broken)
    with pytest.raises(ValueError, match="internal failure"):
        main(["generate", "--model", str(tiny), "--head", str(tiny / "head"), "--prompt", "Hello"])


def test_usage_error_from_the_command_line(tiny):
    """The installed entry point's view: exit status 2 and one error line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "jetspec.cli", "generate", "--model", str(tiny), "--head",
                           str(tiny / "head"), "--prompt", "Hello", "--depth", "100", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("jetspec generate: error: depth must be")


TRAIN_MISTAKES = {
    "steps 0": (["--steps", "0"], "argument --steps: must be an integer >= 1"),
    "lr negative": (["--lr=-1e-4"], "argument --lr: must be a positive number"),
    "gamma 0": (["--gamma", "0"], "argument --gamma: must be a positive number"),
    "block size 1": (["--block-size", "1"], "argument --block-size: must be an integer >= 2"),
    "eval budget past the op limit": (["--eval-budget", str(MAX_BUDGET + 1)], "argument --eval-budget"),
    "held-out negative": (["--held-out", "-1"], "argument --held-out"),
    "held-out past the data set": (["--held-out", "100000000"], "argument --held-out: there are only"),
    "eval-new-tokens past the positions": (["--eval-new-tokens", "5000"], "4096 positions"),
    "device of no kind": (["--device", "bogus"], "argument --device"),
    "model folder missing": (["--model", "{tmp}/no-such-model"], "argument --model: no model at"),
    "out is a file": (["--out", "{tiny}/config.json"], "argument --out"),
}


@pytest.mark.parametrize("extra,want", TRAIN_MISTAKES.values(), ids=TRAIN_MISTAKES.keys())
def test_train_head_reports_user_mistakes_as_usage_errors(tiny, tmp_path, capsys, extra, want):
    fill = dict(tmp=tmp_path, tiny=tiny)
    # A run that would be short were the mistake let through (later options win).
    argv = ["train-head", "--model", str(tiny), "--out", str(tmp_path / "out"), "--num-prompts", "2", "--held-out", "1",
            "--eval-prompts", "1", "--max-new-tokens", "4", "--eval-new-tokens", "4", "--block-size", "4",
            "--anchors", "2", "--steps", "1", *[a.format(**fill) for a in extra]]
    assert want in usage_error(capsys, argv)


def test_train_head_resume_of_another_head_is_a_usage_error(tiny, tmp_path, capsys):
    config = AutoModelForCausalLM.from_pretrained(tiny).config
    save_head(DraftHead(head_config_for(config, num_layers=1, block_size=4, causal=True, mask_token_id=259)),
              tmp_path / "trainer" / "master")
    line = usage_error(capsys, ["train-head", "--model", str(tiny), "--out", str(tmp_path), "--num-prompts", "2",
                                "--held-out", "1", "--eval-prompts", "1", "--max-new-tokens", "4",
                                "--block-size", "6", "--steps", "1", "--resume"])
    assert "is a different head" in line


def test_every_option_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"generate", "calibrate", "bench", "train-head", "tiny-model", "demo"}
    for name, sub in commands.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help and action.help.strip(), f"jetspec {name} {action.option_strings or action.dest}"
        sub.format_help()  # every %(default)s expands


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
