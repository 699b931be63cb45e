"""The error contract: every input problem of every command ends with one message naming the file or key
and the fix, exit code 2, and no traceback (``--debug`` / ``MEGATRON_GAD_DEBUG=1`` show it).

``train`` cases run the console script in-process: every one fails in the driver before any worker
starts (path checks in ``controller/preflight.py``, or the data read in ``GADTrainer.__init__``).
Tool cases already in ``test_cli.py`` are not repeated here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

from megatron_gad.tools.tiny_models import CONFIGS, make_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
GOOD = json.dumps({"content": "w5 w6", "teacher_response": "w7"})


_run = run_cli


def _model(root: Path, name: str = "model", tokenizer: bool = True, role: str | None = None) -> str:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    if tokenizer:
        make_tokenizer(str(d), CONFIGS["llama"]["vocab_size"])
    if role:
        (d / "megatron_gad.json").write_text(json.dumps({"role": role, "vocab_divisible_by": 8}))
    return str(d)


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A valid tiny model + data; each case overrides one key to break one thing."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "model": _model(root), "data": _write(root / "train.jsonl", GOOD + "\n" + GOOD + "\n")}
    w["actor_ckpt"] = _model(root, "actor_ckpt", tokenizer=False, role="actor")
    w["critic_ckpt"] = _model(root, "critic_ckpt", tokenizer=False, role="critic")
    w["no_tok"] = _model(root, "no_tok", tokenizer=False)
    (root / "empty_dir").mkdir()
    w["empty_dir"] = str(root / "empty_dir")
    w["file"] = _write(root / "a_file.txt", "x")
    (root / "bad_cfg").mkdir()
    w["bad_cfg"] = str(root / "bad_cfg")
    _write(root / "bad_cfg" / "config.json", "{not json")
    w["empty"] = _write(root / "empty.jsonl", b"")
    w["bad_json"] = _write(root / "bad_json.jsonl", GOOD + "\n{not json\n")
    w["no_col"] = _write(root / "no_col.jsonl", GOOD + "\n" + json.dumps({"content": "w5"}) + "\n")
    w["not_str"] = _write(root / "not_str.jsonl", json.dumps({"content": 3, "teacher_response": "w7"}) + "\n")
    w["bad_utf8"] = _write(root / "bad_utf8.jsonl", GOOD.encode() + b"\n" + b'{"content": "\xff\xfe"}\n')
    w["csv"] = _write(root / "train.csv", "content,teacher_response\nw5,w7\n")
    # a training checkpoint with only the actor (a gad run needs the critic too), and a dir with no state
    step = root / "global_step_3"
    step.mkdir()
    _write(step / "trainer_state.json", json.dumps({"step": 3}))
    os.symlink(w["actor_ckpt"], step / "actor")
    w["half_step"] = str(step)
    w["other_critic"] = _model(root, "other_critic", tokenizer=False, role="critic")
    _write(root / "other_critic" / "config.json", json.dumps(dict(CONFIGS["llama"], hidden_size=64)))
    return w


def _train(world, tmp_path, *overrides: str) -> list[str]:
    base = [f"actor_rollout_ref.model.path={world['model']}", f"data.train_files=[{world['data']}]",
            f"trainer.default_local_dir={tmp_path / 'run'}"]
    return ["train", DEMO, *base, *overrides]


# (overrides with {placeholders} from `world`, substrings the message must contain)
TRAIN_CASES = {
    "unknown_override_key": (["trainer.total_training_step=3"],
                             ["unknown config key 'trainer.total_training_step'", "did you mean"]),
    "bad_value": (["trainer.total_training_steps=many"], ["trainer.total_training_steps", "expected"]),
    "bad_choice": (["trainer.device=tpu"], ["trainer.device"]),
    "cross_field_rule": (["actor_rollout_ref.rollout.n=0"], ["actor_rollout_ref.rollout.n"]),
    "model_missing": (["actor_rollout_ref.model.path=/nonexistent/model"],
                      ["actor_rollout_ref.model.path=/nonexistent/model: no such file or directory",
                       "set actor_rollout_ref.model.path to a Hugging Face model directory"]),
    "model_not_set": (["actor_rollout_ref.model.path=''"], ["actor_rollout_ref.model.path is not set"]),
    "model_is_file": (["actor_rollout_ref.model.path={file}"], ["a_file.txt is a file, not a directory"]),
    "model_not_a_model": (["actor_rollout_ref.model.path={empty_dir}"],
                          ["empty_dir is not a model: it has no config.json", "megatron-gad convert"]),
    "model_config_not_json": (["actor_rollout_ref.model.path={bad_cfg}"],
                              ["bad_cfg/config.json", "cannot read model architecture", "restore that config.json"]),
    "tokenizer_missing": (["actor_rollout_ref.model.path={no_tok}"],
                          ["actor_rollout_ref.model.path=", "no_tok has no tokenizer files", "save_pretrained"]),
    "model_is_critic_ckpt": (["actor_rollout_ref.model.path={critic_ckpt}"],
                             ["is a checkpoint of the 'critic' role", "needs the 'actor' role"]),
    "critic_model_missing": (["critic.model.path=/nonexistent/critic"],
                             ["critic.model.path=/nonexistent/critic: no such file or directory"]),
    "train_files_empty_list": (["data.train_files=[]"], ["data.train_files is empty"]),
    "data_missing": (["data.train_files=[/nonexistent/train.jsonl]"],
                     ["data.train_files=/nonexistent/train.jsonl: no such file or directory"]),
    "data_empty": (["data.train_files=[{empty}]"], ["data.train_files: ", "empty.jsonl is empty"]),
    "data_is_dir": (["data.train_files=[{empty_dir}]"], ["is a directory, not a file"]),
    "val_missing": (["data.val_files=[/nonexistent/val.jsonl]", "trainer.test_freq=1"],
                    ["data.val_files=/nonexistent/val.jsonl: no such file or directory"]),
    "data_malformed_line": (["data.train_files=[{bad_json}]"],
                            ["bad_json.jsonl:2: invalid JSON", "data.on_bad_row=skip"]),
    "data_missing_column": (["data.train_files=[{no_col}]"],
                            ["no_col.jsonl:2: missing key 'teacher_response'", "data.teacher_response_key="]),
    "data_not_string": (["data.train_files=[{not_str}]"], ["not_str.jsonl:1:", "must be a string or a list"]),
    "data_invalid_utf8": (["data.train_files=[{bad_utf8}]"], ["bad_utf8.jsonl:2: invalid UTF-8"]),
    "data_unsupported_type": (["data.train_files=[{csv}]"],
                              ["data.train_files: ", "train.csv is not a .jsonl, .json or .parquet file",
                               "convert it to JSONL"]),
    "init_critic_wrong_role": (["trainer.init_critic_from={actor_ckpt}"],
                               ["trainer.init_critic_from=", "checkpoint of the 'actor' role", "needs the 'critic'"]),
    "init_critic_not_ckpt": (["trainer.init_critic_from={model}"],
                             ["trainer.init_critic_from=", "is not a megatron-gad checkpoint",
                              "convert hf-to-mcore --role critic"]),
    "init_critic_other_model": (["trainer.init_critic_from={other_critic}"],
                                ["is a checkpoint of a different model than actor_rollout_ref.model.path=",
                                 "hidden_size=64 vs 32"]),
    "init_actor_missing": (["trainer.init_actor_from=/nonexistent/ckpt"],
                           ["trainer.init_actor_from=/nonexistent/ckpt does not exist"]),
    "resume_without_checkpoint": (["trainer.resume_from_path={empty_dir}"],
                                  ["trainer.resume_from_path=",
                                   "holds no training checkpoint (no trainer_state.json)"]),
    "resume_missing_role": (["trainer.resume_from_path={half_step}"], ["has no critic checkpoint"]),
    "output_under_a_file": (["trainer.default_local_dir={file}/run"], ["trainer.default_local_dir=",
                                                                       "cannot be created", "a_file.txt is a file"]),
}


def _check(code: int, out: str, err: str, needles: list[str], command: str = "train") -> None:
    assert code == 2, err
    assert err.startswith(f"megatron-gad {command}: error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_input_errors(case, world, tmp_path, capsys):
    overrides, needles = TRAIN_CASES[case]
    code, out, err = _run(_train(world, tmp_path, *(o.format(**world) for o in overrides)), capsys)
    _check(code, out, err, [n.format(**world) for n in needles])
    assert err.count("\n") == 1, err


def test_output_dir_not_writable(world, tmp_path, capsys, monkeypatch):
    """(root ignores permission bits, so the refusal is simulated at os.access.)"""
    run = str(tmp_path / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    code, out, err = _run(_train(world, tmp_path), capsys)
    _check(code, out, err, [f"trainer.default_local_dir={run} is not writable", "choose a directory"])


@pytest.mark.parametrize("text,needles", [
    (None, ["cannot read config file", "No such file or directory", "configs/gad.yaml is a complete example"]),
    ("trainer: [\n", ["is not valid YAML at line", "fix the file"]),
    ("- a\n- b\n", ["holds a YAML list, not a mapping of keys"]),
    ("trainer:\n  total_training_step: 3\n", ["cfg.yaml': unknown config key 'trainer.total_training_step'",
                                              "did you mean 'trainer.total_training_steps'"]),
    ("trainer:\n  save_freq: often\n", ["cfg.yaml': trainer.save_freq: expected"]),
])
def test_config_file_errors(text, needles, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    code, out, err = _run(["train", str(path)], capsys)
    _check(code, out, err, needles)
    assert err.count("\n") == 1, err


def test_demo_config_without_assets(tmp_path, capsys, monkeypatch):
    """First run: the demo config names the command that builds its assets."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["train", DEMO], capsys)
    _check(code, out, err, ["actor_rollout_ref.model.path=outputs/demo/seed0/student",
                            "run `megatron-gad demo --quick --out outputs/demo` first"])
    # with the student in place, the data file is the next thing named
    (tmp_path / "outputs/demo/seed0").mkdir(parents=True)
    _model(tmp_path / "outputs/demo/seed0", "student")
    code, out, err = _run(["train", DEMO], capsys)
    _check(code, out, err, ["data.train_files=outputs/demo/seed0/data/train.jsonl",
                            "megatron-gad demo --quick --out outputs/demo"])


# ---------------------------------------------------------------- other commands (cases not in test_cli.py)
def _tool_cases(world):
    model, data = world["model"], world["data"]
    return {
        "logprobs_model_missing": (["logprobs", "/nonexistent/m", "--data", data],
                                   "/nonexistent/m: no such directory; pass an existing Hugging Face model"),
        "logprobs_data_is_dir": (["logprobs", model, "--data", world["empty_dir"]], "empty_dir: not a file"),
        "logprobs_invalid_utf8": (["logprobs", model, "--data", world["bad_utf8"]], "bad_utf8.jsonl:2: invalid UTF-8"),
        "logprobs_unsupported_type": (["logprobs", model, "--data", world["csv"]], "unsupported file type"),
        "logprobs_no_tokenizer": (["logprobs", world["no_tok"], "--data", data],
                                  "cannot load a tokenizer (no tokenizer files: none of tokenizer.json"),
        "score_model_is_file": (["score", world["file"], "--data", data], "a_file.txt: not a directory"),
        "generate_not_a_model": (["generate", world["empty_dir"], "--prompt-ids", "1", "--max-new-tokens", "2"],
                                 "has no config.json"),
        "generate_missing": (["generate", "/nonexistent/m", "--prompt-ids", "1", "--max-new-tokens", "2"],
                             "/nonexistent/m: no such directory"),
        "convert_mcore_missing": (["convert", "mcore-to-hf", "/nonexistent/ckpt", str(world["root"] / "o")],
                                  "/nonexistent/ckpt"),
    }


@pytest.mark.parametrize("case", ["logprobs_model_missing", "logprobs_data_is_dir", "logprobs_invalid_utf8",
                                  "logprobs_unsupported_type", "logprobs_no_tokenizer", "score_model_is_file",
                                  "generate_not_a_model", "generate_missing", "convert_mcore_missing"])
def test_tool_input_errors(case, world, capsys):
    argv, needle = _tool_cases(world)[case]
    code, out, err = _run(argv, capsys)
    _check(code, out, err, [needle], command=argv[0])
    assert out == ""


def test_demo_out_dir_under_a_file(world, capsys):
    code, out, err = _run(["demo", "--quick", "--out", f"{world['file']}/demo"], capsys)
    _check(code, out, err, ["--out=", "cannot be created", "a_file.txt is a file; choose another directory"],
           command="demo")


# ---------------------------------------------------------------- --debug and the real exit code
def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.yaml")
    for argv in (["--debug", "train", missing], ["train", missing, "--debug"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "Traceback" in err and "ConfigError" in err
        assert err.rstrip().endswith("configs/gad.yaml is a complete example)")
    monkeypatch.setenv("MEGATRON_GAD_DEBUG", "1")
    code, _, err = _run(["train", missing], capsys)
    assert code == 2 and "Traceback" in err
    monkeypatch.setenv("MEGATRON_GAD_DEBUG", "0")
    code, _, err = _run(["train", missing], capsys)
    assert code == 2 and "Traceback" not in err


def test_real_process_exit_code_and_debug(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MEGATRON_GAD_DEBUG="")
    cmd = [sys.executable, "-m", "megatron_gad.cli", "train", DEMO,
           "actor_rollout_ref.model.path=/nonexistent/model"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("megatron-gad train: error: actor_rollout_ref.model.path=/nonexistent/model: no such "
                           "file or directory; set actor_rollout_ref.model.path to a Hugging Face model directory "
                           "(config.json, weights, tokenizer files) or a megatron-gad checkpoint\n")
    proc = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "InputError" in proc.stderr


# ---------------------------------------------------------------- inputs read after the path checks
def _parquet(path: Path, damage: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["w5 w6"] * 50, "teacher_response": ["w7"] * 50}), str(path))
    data = bytearray(path.read_bytes())
    if damage == "truncated":  # a copy cut short: the footer is gone
        data = data[:len(data) // 2]
    else:  # overwritten inside: the footer is intact, the column chunk metadata is not
        data[8:len(data) // 2] = b"\xab" * (len(data) // 2 - 8)
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("damage,reason", [
    ("truncated", "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet "
                  "file."),
    ("overwritten", "Couldn't deserialize thrift: Variable-length int over 10 bytes."),
])
def test_damaged_parquet(damage, reason, world, tmp_path, capsys):
    path = _parquet(tmp_path / "train.parquet", damage)
    code, out, err = _run(_train(world, tmp_path, f"data.train_files=[{path}]"), capsys)
    assert code == 2 and "Traceback" not in err + out
    assert err == (f"megatron-gad train: error: {path}: damaged Parquet file, cannot be read ({reason}); write it "
                   "again (e.g. pandas.DataFrame.to_parquet) or convert it to JSONL\n")


def test_tokenizer_without_eos(world, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "no_eos"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    vocab = {"<pad>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, CONFIGS["llama"]["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>").save_pretrained(str(d))
    code, out, err = _run(_train(world, tmp_path, f"actor_rollout_ref.model.path={d}"), capsys)
    assert code == 2 and "Traceback" not in err + out
    assert err == (f"megatron-gad train: error: {d}: the tokenizer has no EOS token (eos_token is not set); GAD ends "
                   "every teacher response and student sample with it: set \"eos_token\" in the model's "
                   "tokenizer_config.json (or tokenizer.eos_token = '...' then tokenizer.save_pretrained(path)) to "
                   "the token the model ends its answers with\n")
    # the logprobs tool reads the same tokenizer and says the same
    code, out, err = _run(["logprobs", str(d), "--data", world["data"]], capsys)
    assert code == 2 and out == "" and "the tokenizer has no EOS token (eos_token is not set)" in err


def test_wandb_not_installed_at_start(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes "import wandb" raise ImportError
    code, out, err = _run(_train(world, tmp_path, "trainer.logger=[console,wandb]"), capsys)
    assert code == 2 and "Traceback" not in err and out == ""  # before the resolved config is printed
    assert err == ("megatron-gad train: error: trainer.logger includes wandb, but wandb is not installed; pip install "
                   "'megatron-gad[wandb]' (or pip install wandb), or drop wandb from trainer.logger\n")


def test_worker_read_paths(world, tmp_path, caplog):
    """A path only workers read is checked where it is read, with preflight's message plus where; on a Ray
    cluster (ray.address set) the driver leaves a path it cannot see to them."""
    from megatron_gad.config import load_config
    from megatron_gad.controller.group_base import check_worker_paths
    from megatron_gad.controller.preflight import check_paths
    from megatron_gad.errors import InputError

    cfg = load_config(DEMO, [f"actor_rollout_ref.model.path={world['model']}", f"data.train_files=[{world['data']}]",
                             f"trainer.default_local_dir={tmp_path / 'run'}",
                             "trainer.init_critic_from=/nonexistent/critic_ckpt"])
    expected = ("trainer.init_critic_from=/nonexistent/critic_ckpt does not exist; set it to a megatron-gad critic "
                "checkpoint directory, e.g. <trainer.default_local_dir>/global_step_<N>/critic")
    with pytest.raises(InputError) as ei:
        check_paths(cfg)
    assert str(ei.value) == expected
    cluster = load_config(DEMO, [f"actor_rollout_ref.model.path={world['model']}",
                                 f"data.train_files=[{world['data']}]", f"trainer.default_local_dir={tmp_path / 'run'}",
                                 "trainer.init_critic_from=/nonexistent/critic_ckpt", "ray.address=auto"])
    check_paths(cluster)  # left to the workers, with a warning
    assert ("trainer.init_critic_from=/nonexistent/critic_ckpt does not exist on the driver's node; the workers "
            "check it on theirs (ray.address=auto)") in caplog.text
    kwargs = {"config": cluster.critic, "model_path": world["model"], "init_from": "/nonexistent/critic_ckpt"}
    with pytest.raises(InputError) as ei:
        check_worker_paths("critic", kwargs, where="on the critic worker's node 10.0.0.2 (rank 3)")
    assert str(ei.value) == expected + " (checked on the critic worker's node 10.0.0.2 (rank 3))"
    kwargs = {"config": cluster.critic, "model_path": world["no_tok"] + "_missing", "init_from": None}
    with pytest.raises(InputError, match=r"^actor_rollout_ref.model.path=.*no_tok_missing: no such file or directory; "
                                         r"set actor_rollout_ref.model.path to .* \(checked here\)$"):
        check_worker_paths("critic", kwargs, where="here")


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_ray_start_failure_is_one_line(address, monkeypatch):
    """Ray's start-up failures (a bare Exception when the local node times out on an overloaded machine,
    ConnectionError for an unreachable cluster) become a RunFailure naming the setting and what to do."""
    import ray

    from megatron_gad.controller.faults import RayStartError, init_ray
    from megatron_gad.errors import RunFailure

    def fail(**kw):
        assert kw["address"] == address and kw["num_cpus"] == 3
        raise Exception("The current node timed out during startup. This could happen because\n some of the "
                        "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    with pytest.raises(RayStartError) as e:
        init_ray(address, 3)
    msg = str(e.value)
    assert isinstance(e.value, RunFailure) and "\n" not in msg
    assert "The current node timed out during startup. This could happen because some of the raylet" in msg
    if address:
        assert "ray.address=10.0.0.1:6379" in msg and "ray status" in msg
    else:
        assert "a local Ray instance" in msg and "trainer.workers=local" in msg
