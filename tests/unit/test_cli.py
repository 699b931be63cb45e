"""The ``megatron-gad`` console script: help, argument errors, lazy dispatch, input checks.

Nothing here spawns ranks: every error is caught in the calling process before any launch.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
from cli_helpers import run_cli

from megatron_gad.tools import ToolError
from megatron_gad.tools.tiny_models import CONFIGS

_run = run_cli


def test_top_level_help_lists_commands(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in ("convert", "generate", "logprobs", "score", "train", "demo", "bench"):
        assert name in out


@pytest.mark.parametrize("argv,options", [
    (["convert"], ["hf-to-mcore", "mcore-to-hf"]),
    (["convert", "hf-to-mcore"], ["HF_DIR", "OUT_DIR", "--tp", "--pp", "--role", "--vocab-divisible-by", "--dtype"]),
    (["convert", "mcore-to-hf"], ["CKPT_DIR", "OUT_DIR"]),
    (["generate"], ["MODEL", "--prompt", "--prompt-ids", "--max-new-tokens", "--greedy", "--temperature", "--seed",
                    "--top-k", "--top-p", "--tp", "--pp", "--json", "--chat"]),
    (["logprobs"], ["MODEL", "--data", "--tp", "--pp", "--prompt-key", "--response-key", "--batch-size", "--json"]),
    (["score"], ["CRITIC_CKPT", "--data", "--tp", "--pp", "--prompt-key", "--response-key", "--student-key",
                 "--batch-size", "--json"]),
    (["train"], ["CONFIG", "KEY=VALUE", "--print-config"]),
    (["demo"], ["--seeds", "--out", "--quick"]),
    (["bench"], ["CONFIG", "KEY=VALUE", "--steps", "--stages", "--out", "--save", "--gpu", "--aggregate", "--stage"]),
])
def test_subcommand_help(argv, options, capsys):
    code, out, _ = _run(argv + ["--help"], capsys)
    assert code == 0
    for opt in options:
        assert opt in out, f"{opt} missing from `{' '.join(argv)} --help`"


def test_help_does_not_import_megatron():
    import subprocess

    code = ("import sys; from megatron_gad import cli\n"
            "try:\n    cli.main(['generate', '--help'])\nexcept SystemExit: pass\n"
            "assert 'megatron.core' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv,message", [
    ([], "required"),
    (["convert"], "required"),
    (["convert", "hf-to-mcore", "a"], "OUT_DIR"),
    (["convert", "hf-to-mcore", "a", "b", "--tp", "0"], "must be >= 1"),
    (["convert", "hf-to-mcore", "a", "b", "--tp", "two"], "expected an integer"),
    (["convert", "hf-to-mcore", "a", "b", "--role", "teacher"], "invalid choice"),
    (["generate", "m", "--max-new-tokens", "4"], "one of the arguments --prompt --prompt-ids is required"),
    (["generate", "m", "--prompt", "x", "--prompt-ids", "1", "--max-new-tokens", "4"], "not allowed"),
    (["generate", "m", "--prompt", "x"], "--max-new-tokens"),
    (["generate", "m", "--prompt", "x", "--max-new-tokens", "4", "--greedy", "--temperature", "0.7"], "not allowed"),
    (["logprobs", "m"], "--data"),
    (["score", "m", "--data", "d.jsonl", "--batch-size", "0"], "must be >= 1"),
    (["train", "c.yaml", "trainer.total_training_steps"], "not key=value"),
    (["demo", "--seeds", "0"], "must be >= 1"),
])
def test_bad_arguments(argv, message, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err


@pytest.fixture()
def fake_command(monkeypatch):
    """Install a stand-in module for a command implemented elsewhere; returns the recorded args."""
    calls = []

    def install(module: str, func: str):
        mod = types.ModuleType(module)
        setattr(mod, func, lambda args: calls.append(args) or 0)
        monkeypatch.setitem(sys.modules, module, mod)
        return calls

    return install


def test_train_dispatches_lazily(fake_command, capsys):
    calls = fake_command("megatron_gad.controller.trainer", "main_train")
    code, _, _ = _run(["train", "cfg.yaml", "trainer.total_training_steps=3", "data.train_batch_size=8",
                       "--print-config"], capsys)
    assert code == 0
    (args,) = calls
    assert args.config == "cfg.yaml"
    assert args.overrides == ["trainer.total_training_steps=3", "data.train_batch_size=8"]
    assert args.print_config is True


def test_demo_dispatches_lazily(fake_command, capsys):
    calls = fake_command("megatron_gad.demo.run", "main_demo")
    code, _, _ = _run(["demo", "--seeds", "3", "--out", "/tmp/x", "--quick"], capsys)
    assert code == 0
    (args,) = calls
    assert (args.seeds, args.out, args.quick) == (3, "/tmp/x", True)
    calls.clear()
    _run(["demo"], capsys)
    assert (calls[0].seeds, calls[0].out, calls[0].quick) == (1, "outputs/demo", False)


def _raising(monkeypatch, exc):
    mod = types.ModuleType("megatron_gad.controller.trainer")

    def main_train(args):
        raise exc

    mod.main_train = main_train
    monkeypatch.setitem(sys.modules, "megatron_gad.controller.trainer", mod)


def test_failed_rank_prints_its_traceback_not_the_parents(monkeypatch, capsys):
    from megatron_gad.errors import DistributedRunError

    _raising(monkeypatch, DistributedRunError("distributed run failed:\nrank 1: Traceback ...\nZeroDivisionError"))
    code, _, err = _run(["train", "cfg.yaml"], capsys)
    assert code == 1
    assert err == "megatron-gad train: distributed run failed:\nrank 1: Traceback ...\nZeroDivisionError\n"


def test_other_runtime_errors_keep_their_traceback(monkeypatch, capsys):
    # the type decides, not the text: a bug whose message happens to start like the launcher's is not hidden
    _raising(monkeypatch, RuntimeError("distributed run of something else broke"))
    with pytest.raises(RuntimeError, match="distributed run of something else"):
        _run(["train", "cfg.yaml"], capsys)


# ---------------------------------------------------------------- input checks (no launch)
def _config_dir(tmp_path, name="llama", **overrides) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(CONFIGS["llama"], **overrides)))
    return str(d)


def test_convert_missing_dir(tmp_path, capsys):
    code, _, err = _run(["convert", "hf-to-mcore", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert code == 2
    assert "no such directory" in err and err.startswith("megatron-gad convert: error:")


def test_convert_dir_without_config(tmp_path, capsys):
    code, _, err = _run(["convert", "hf-to-mcore", str(tmp_path), str(tmp_path / "out")], capsys)
    assert code == 2 and "no config.json" in err


def test_convert_unsupported_model_type(tmp_path, capsys):
    d = _config_dir(tmp_path, model_type="gpt2")
    code, _, err = _run(["convert", "hf-to-mcore", d, str(tmp_path / "out")], capsys)
    assert code == 2 and "'gpt2' is not supported" in err


def test_convert_tp_must_divide_heads(tmp_path, capsys):
    d = _config_dir(tmp_path)  # 4 heads, 2 KV heads, ffn 64, 4 layers
    code, _, err = _run(["convert", "hf-to-mcore", d, str(tmp_path / "out"), "--tp", "3"], capsys)
    assert code == 2
    assert "num_attention_heads=4" in err and "num_key_value_heads=2" in err
    code, _, err = _run(["convert", "hf-to-mcore", d, str(tmp_path / "out"), "--tp", "4"], capsys)
    assert "num_key_value_heads=2" in err and "num_attention_heads" not in err
    code, _, err = _run(["convert", "hf-to-mcore", d, str(tmp_path / "out"), "--pp", "3"], capsys)
    assert code == 2 and "num_hidden_layers=4" in err
    code, _, err = _run(["convert", "hf-to-mcore", d, str(tmp_path / "out"), "--tp", "2",
                         "--vocab-divisible-by", "1", ], capsys)  # 96 % 2 == 0: only the weights are missing
    assert code == 2 and "no *.safetensors" in err


def test_convert_vocab_padding_must_divide_tp(tmp_path, capsys):
    d = _config_dir(tmp_path, vocab_size=95, num_attention_heads=2, num_key_value_heads=2, hidden_size=32)
    code, _, err = _run(["convert", "hf-to-mcore", d, str(tmp_path / "out"), "--tp", "2",
                         "--vocab-divisible-by", "1"], capsys)
    assert code == 2 and "padded vocabulary 95" in err


def test_convert_refuses_non_empty_out_dir(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    d = _config_dir(tmp_path)
    save_file({"x": torch.zeros(1)}, f"{d}/model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = _run(["convert", "hf-to-mcore", d, str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = _run(["convert", "hf-to-mcore", d, d], capsys)
    assert code == 2 and "is the input directory" in err


def test_mcore_to_hf_needs_a_checkpoint(tmp_path, capsys):
    d = _config_dir(tmp_path)
    code, _, err = _run(["convert", "mcore-to-hf", d, str(tmp_path / "out")], capsys)
    assert code == 2 and "not a megatron-gad checkpoint" in err


def test_mcore_to_hf_refuses_critic(tmp_path, capsys):
    d = _config_dir(tmp_path)
    (tmp_path / "llama" / "megatron_gad.json").write_text(json.dumps({"role": "critic", "vocab_divisible_by": 128}))
    code, _, err = _run(["convert", "mcore-to-hf", d, str(tmp_path / "out")], capsys)
    assert code == 2 and "critic" in err
    code, _, err = _run(["generate", d, "--prompt-ids", "1 2", "--max-new-tokens", "2"], capsys)
    assert code == 2 and "cannot generate" in err


@pytest.mark.parametrize("extra,message", [
    (["--prompt-ids", "1 x 3"], "must be integers"),
    (["--prompt-ids", "1 2 999"], "must be in [0, 96)"),
    (["--prompt-ids", "1", "--temperature", "0"], "--temperature must be > 0"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "--top-p"),
    (["--prompt-ids", "1", "--top-k", "0"], "--top-k"),
    (["--prompt-ids", "1", "--tp", "3"], "--tp=3 must divide"),
    (["--prompt", "hello"], "cannot load a tokenizer"),
])
def test_generate_input_errors(tmp_path, capsys, extra, message):
    d = _config_dir(tmp_path)
    code, _, err = _run(["generate", d, "--max-new-tokens", "2"] + extra, capsys)
    assert code == 2, err
    assert message in err


def test_tool_error_is_an_exception():
    assert issubclass(ToolError, Exception)


# ---------------------------------------------------------------- logprobs / score: input checks (no launch)
def _model_with_tokenizer(tmp_path, role=None) -> str:
    """config.json + the tiny tokenizer (+ a checkpoint meta of ``role``): enough for every check."""
    from megatron_gad.tools.tiny_models import make_tokenizer

    d = _config_dir(tmp_path, name=f"model_{role}")
    make_tokenizer(d, CONFIGS["llama"]["vocab_size"])
    if role:
        (tmp_path / f"model_{role}" / "megatron_gad.json").write_text(
            json.dumps({"role": role, "vocab_divisible_by": 128}))
    return d


def _data(tmp_path, *lines: str) -> str:
    f = tmp_path / "data.jsonl"
    f.write_text("".join(line + "\n" for line in lines))
    return str(f)


GOOD = json.dumps({"content": "w5 w6", "teacher_response": "w7"})


@pytest.mark.parametrize("command,role,lines,extra,message", [
    ("logprobs", None, None, [], "data.jsonl: no such file"),
    ("score", "critic", None, [], "data.jsonl: no such file"),
    ("logprobs", None, [GOOD, json.dumps({"content": "w5"})], [], "data.jsonl:2: missing key 'teacher_response'"),
    ("logprobs", None, [GOOD], ["--response-key", "answer"], "data.jsonl:1: missing key 'answer'"),
    ("score", "critic", [GOOD, json.dumps({"teacher_response": "w7"})], [], "data.jsonl:2: missing key 'content'"),
    ("logprobs", None, [json.dumps({"content": 3, "teacher_response": "w7"})], [], "must be a string or a list"),
    ("logprobs", None, [GOOD, "{not json"], [], "data.jsonl:2: invalid JSON"),
    ("logprobs", None, [], [], "data.jsonl: no rows"),
    ("score", "critic", [json.dumps({"content": "w5", "teacher_response": "w7", "student_response": 4})], [],
     "'student_response' must be a non-empty string or absent"),
    ("score", "actor", [GOOD], [], "not a critic checkpoint (megatron_gad.json role 'actor'); `score` needs a critic"),
    ("score", None, [GOOD], [], "is not a megatron-gad checkpoint (no megatron_gad.json); `score` needs a critic"),
    ("logprobs", "critic", [GOOD], [], "critic (discriminator) checkpoint; it has a scalar head, not an LM head"),
    ("logprobs", None, [GOOD], ["--tp", "3"], "impossible layout: --tp=3 must divide"),
    ("score", "critic", [GOOD], ["--pp", "3"], "impossible layout"),
])
def test_logprobs_score_input_errors(tmp_path, capsys, command, role, lines, extra, message):
    """Every input problem: exit code 2, one line on stderr, no traceback, nothing on stdout."""
    model = _model_with_tokenizer(tmp_path, role)
    data = _data(tmp_path, *lines) if lines is not None else str(tmp_path / "data.jsonl")
    code, out, err = _run([command, model, "--data", data, *extra], capsys)
    assert code == 2, err
    assert message in err
    assert err.startswith(f"megatron-gad {command}: error:") and err.count("\n") == 1
    assert "Traceback" not in err and out == ""


def test_logprobs_score_tables():
    """The readable output, and the summaries, from fixed results (no model run)."""
    from megatron_gad.tools.logprobs import Rows, logprobs_records, logprobs_table
    from megatron_gad.tools.score import score_records, score_table

    rows = Rows([[5, 6], [7]], {"teacher_response": [[8, 2], [9, 9, 2]], "student_response": [[3, 2], None]})
    records, summary = logprobs_records(rows, "teacher_response", [[-1.0, -2.0], [-0.5, -0.5, -2.0]])
    assert [(r["sum"], r["mean"]) for r in records] == [(-3.0, -1.5), (-3.0, -1.0)]
    assert summary == {"rows": 2, "tokens": 5, "nll_per_token": 1.2, "perplexity": pytest.approx(math.exp(1.2))}
    lines = logprobs_table(records, summary)
    assert len(lines) == 4 and "perplexity 3.320" in lines[-1]

    # teachers in row order, then the students of rows that have one
    records, summary = score_records(rows, "teacher_response", "student_response", [0.5, -1.0, 0.5])
    assert [(r["teacher_score"], r["student_score"]) for r in records] == [(0.5, 0.5), (-1.0, None)]
    assert summary["pairs"] == 1 and summary["d_acc"] == 0.5  # a tie counts half
    assert summary["d_loss"] == pytest.approx(math.log(2))
    lines = score_table(records, summary)
    assert "tie" in lines[1] and "d_acc 0.5000" in lines[-1]
    rows.responses["student_response"] = [None, None]
    _, summary = score_records(rows, "teacher_response", "student_response", [1.0, 2.0])
    assert summary["d_acc"] is None and "no d_acc" in score_table(*score_records(
        rows, "teacher_response", "student_response", [1.0, 2.0]))[-1]


def test_gpu_kinds_match_the_planner():
    from megatron_gad.cli import GPU_KINDS
    from megatron_gad.tools.plan import GPUS

    assert set(GPU_KINDS) == set(GPUS)
