"""`megatron-gad pipeline`: the file's checks, how a stage starts from the previous one, and the
skip / resume / refuse-on-change / --force / --from / USR1 logic, with a stand-in for `train` and
`convert` (a tiny script that writes what they would); the real stages run in
tests/e2e/test_pipeline_run.py. Also `slurm render --pipeline`."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

from megatron_gad.tools import pipeline as pl
from megatron_gad.tools.slurm import Request, render_script

ROOT = Path(__file__).resolve().parents[2]
SEVEN_B = str(ROOT / "configs" / "pipelines" / "qwen2.5-7b.yaml")
ARCH = f"actor_rollout_ref.model.path={ROOT / 'configs' / 'archs' / 'qwen2.5-7b'}"

# Stand-in for `python -m megatron_gad.cli train|convert ...`: writes a complete run checkpoint of
# trainer.total_training_steps (train) or an HF-looking directory (convert), logs its call, and exits
# with $FAKE_RC (75 = "saved on signal") after writing only step 1 when that is set.
FAKE = r'''
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args[0] == "convert":
    os.makedirs(args[3]); open(os.path.join(args[3], "config.json"), "w").write("{}")
    sys.exit(0)
kv = dict(a.split("=", 1) for a in args[2:] if "=" in a)
out, steps = kv["trainer.default_local_dir"], int(kv.get("trainer.total_training_steps", 2))
rc = int(os.environ.get("FAKE_RC", "0"))
start = int(open(os.path.join(out, "latest_checkpointed_iteration.txt")).read()) \
    if os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt")) else 0
for step in range(start + 1, (1 if rc else steps) + 1):
    d = os.path.join(out, f"global_step_{step}")
    os.makedirs(d, exist_ok=True)
    json.dump({"step": step, "resumed_from": start}, open(os.path.join(d, "trainer_state.json"), "w"))
    open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w").write(str(step))
sys.exit(rc)
'''


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(pl, "_cli", lambda *args: [sys.executable, str(script), *args])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = tmp_path / "base.yaml"
    cfg.write_text(f"actor_rollout_ref:\n  model:\n    path: {model}\ntrainer:\n  device: cpu\n"
                   "  total_training_steps: 2\n")
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"""output_dir: {tmp_path / 'out'}
stages:
  - {{name: seqkd, config: base.yaml, overrides: {{trainer.mode: sft, trainer.total_training_steps: 1}}}}
  - {{name: warmup, config: base.yaml, init_from: seqkd, overrides: {{trainer.critic_warmup: 2}}}}
  - {{name: gad, config: base.yaml, init_from: warmup, overrides: ["trainer.total_training_steps=3"]}}
  - {{name: hf, export: gad}}
""")

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def run(*overrides, from_stage=None, force=False):
        p = pl.load_pipeline(str(pipe), list(overrides))
        return pl.execute(p, pl.plan(p, from_stage=from_stage, force=force)), p

    return {"run": run, "calls": calls, "pipe": pipe, "out": tmp_path / "out", "model": model}


def test_stages_start_from_the_previous_final_checkpoint_and_complete_ones_are_skipped(fake):
    rc, _ = fake["run"]()
    assert rc == 0
    calls, out = fake["calls"](), fake["out"]
    assert [c[0] for c in calls] == ["train", "train", "train", "convert"]
    warmup, gad, export = calls[1], calls[2], calls[3]
    # after SFT: the student (and so its reference and the discriminator backbone) is the SeqKD actor
    assert f"actor_rollout_ref.model.path={out}/seqkd/global_step_1/actor" in warmup
    assert f"trainer.init_actor_from={out}/warmup/global_step_2/actor" in gad
    assert f"trainer.init_critic_from={out}/warmup/global_step_2/critic" in gad
    assert "trainer.resume_mode=auto" in gad and "trainer.mode=sft" not in warmup
    assert export[2:4] == [f"{out}/gad/global_step_3/actor", f"{out}/hf.partial"]
    assert (out / "hf" / "config.json").is_file() and not (out / "hf.partial").exists()
    markers = {n: pl.read_marker(str(out / n)) for n in ("seqkd", "warmup", "gad", "hf")}
    assert all(m["status"] == "done" for m in markers.values())
    assert markers["gad"]["checkpoint"] == "global_step_3" and markers["gad"]["upstream"] == \
        markers["warmup"]["output_id"]
    mtimes = {d: os.stat(d).st_mtime_ns for d in out.glob("*/global_step_*")}

    rc, _ = fake["run"]()  # everything done: nothing runs, nothing is rewritten
    assert rc == 0 and len(fake["calls"]()) == 4
    assert {d: os.stat(d).st_mtime_ns for d in out.glob("*/global_step_*")} == mtimes
    # run-only keys (nodes, logger, save cadence, Ray address) do not invalidate a stage
    p2 = pl.load_pipeline(str(fake["pipe"]), ["trainer.nnodes=1", "ray.address=10.0.0.1:6379", "trainer.save_freq=7"])
    assert {s.action for s in pl.plan(p2)} == {"skip"}


def test_changed_stage_is_refused_then_forced_and_later_stages_follow(fake):
    assert fake["run"]()[0] == 0
    with pytest.raises(pl.PipelineError) as e:
        fake["run"]("warmup:critic.optim.lr=0.5")
    msg = str(e.value)
    assert "warmup: its settings changed: critic.optim.lr: 1e-06 -> 0.5" in msg
    assert "gad: it starts from stage 'warmup', which must run again" in msg and "hf:" in msg
    assert "seqkd" not in msg and "--force" in msg
    assert len(fake["calls"]()) == 4  # refused before anything ran
    rc, _ = fake["run"]("warmup:critic.optim.lr=0.5", force=True)
    assert rc == 0 and [c[0] for c in fake["calls"]()[4:]] == ["train", "train", "convert"]
    out = fake["out"]
    assert len(list(out.glob("warmup.replaced-*"))) == 1 and len(list(out.glob("hf.replaced-*"))) == 1
    # --from retrains that stage and the later ones even when nothing changed
    rc, _ = fake["run"]("warmup:critic.optim.lr=0.5", from_stage="gad")
    assert rc == 0 and [c[0] for c in fake["calls"]()[7:]] == ["train", "convert"]


def test_stage_saved_on_signal_resumes_and_is_then_done(fake, monkeypatch):
    monkeypatch.setenv("FAKE_RC", "75")  # the first stage saves step 1 and stops, as on USR1
    rc, _ = fake["run"]()
    assert rc == pl.SAVED_ON_SIGNAL_EXIT == 75
    assert pl.read_marker(str(fake["out"] / "seqkd"))["status"] == "running"
    monkeypatch.delenv("FAKE_RC")
    p = pl.load_pipeline(str(fake["pipe"]))
    assert [s.action for s in pl.plan(p)] == ["resume", "run", "run", "run"]
    assert pl.execute(p, pl.plan(p)) == 0
    m = pl.read_marker(str(fake["out"] / "seqkd"))
    assert m["status"] == "done" and m["checkpoint"] == "global_step_1"


def test_usr1_is_passed_to_the_running_stage(tmp_path):
    ready = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib\n"
             "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
             f"pathlib.Path({str(ready)!r}).write_text('1')\n"
             "time.sleep(60)\nsys.exit(0)\n")
    children = pl._Children()

    def send():
        while not ready.exists():
            time.sleep(0.05)
        children.handler(signal.SIGUSR1, None)

    threading.Thread(target=send, daemon=True).start()
    assert children.run([sys.executable, "-c", child]) == 75
    assert children.signals == [signal.SIGUSR1]


@pytest.mark.parametrize("text,message", [
    ("stages: []\n", "non-empty `stages:`"),
    ("output_dir: o\nstages:\n  - {name: a, config: x.yaml, init_from: b}\n", "'b' is not an earlier training stage"),
    ("output_dir: o\nstages:\n  - {name: a, config: x.yaml}\n  - {name: a, export: a}\n", "used twice"),
    ("output_dir: o\nstages:\n  - {name: a, confg: x.yaml}\n", "did you mean 'config'"),
    ("output_dir: o\nstages:\n  - {name: h, export: a}\n", "'a' is not an earlier training stage"),
])
def test_bad_pipeline_files_are_refused(tmp_path, text, message):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(pl.PipelineError, match=message):
        pl.load_pipeline(str(f))


def test_cli_refusals_are_one_line(fake, capsys):
    code, _, err = run_cli(["pipeline", str(fake["pipe"]), "gadd:trainer.seed=3"], capsys)
    assert code == 2 and "no training stage named 'gadd'" in err and "did you mean 'gad'" in err
    code, _, err = run_cli(["pipeline", str(fake["pipe"]), "trainer.default_local_dir=/x"], capsys)
    assert code == 2 and "set by the pipeline" in err and "Traceback" not in err
    code, _, err = run_cli(["pipeline", str(fake["pipe"]), "trainer.init_actor_from=/x"], capsys)
    assert code == 2 and "stage warmup: trainer.init_actor_from is set" in err


def test_7b_pipeline_renders_with_every_stage_checked():
    text = render_script(SEVEN_B, [ARCH], Request(nodes=4, gpus_per_node=8, time="24:00:00"), pipeline=True)
    assert 'python3 -m megatron_gad.cli pipeline "$CONFIG"' in text and '--out "$OUT"' in text
    assert "trainer.default_local_dir" not in text.split("python3 -m megatron_gad.cli pipeline")[1]
    for stage in ("seqkd (sft)", "warmup (gad)", "gad (gad)"):
        assert f"stage {stage}:" in text
    # a stage whose layout the allocation cannot hold names itself
    with pytest.raises(pl.ConfigError, match=r"(?s)stage gad: .*critic.megatron.tensor_model_parallel_size=16 must "
                                             r"divide the model's num_attention_heads=28"):
        render_script(SEVEN_B, [ARCH, "gad:critic.megatron.tensor_model_parallel_size=16"],
                      Request(nodes=4, gpus_per_node=8), pipeline=True)


def test_exit_code_agrees_with_trainer():
    pytest.importorskip("torch")
    from megatron_gad.controller import trainer

    assert trainer.SAVED_ON_SIGNAL_EXIT == pl.SAVED_ON_SIGNAL_EXIT
