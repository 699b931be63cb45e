"""``megatron-gad inspect``: numbers, warnings and advice from a run's files (records written here)."""

from __future__ import annotations

import json
import os

import pytest

from tests.unit.cli_helpers import run_cli


def _write_run(root, d_accs, scores=None, policy="append", diff=1e-6):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "metrics.jsonl"), "w") as f:
        for i, d in enumerate(d_accs):
            stage = "warmup" if i < 2 else "gad"
            rec = {"step": i + 1, "stage": stage, "critic/d_acc": d, "critic/teacher_value_mean": 0.1 * i,
                   "critic/student_value_mean": (scores or [0.0] * len(d_accs))[i], "response_length/mean": 10 + i}
            if stage == "gad":
                rec.update({"reward/mean": 0.01 * i, "rollout/logprob_diff_max": diff})
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 99, "critic/d_a')  # a line cut short by a crash is ignored
    with open(os.path.join(root, "samples.jsonl"), "w") as f:
        f.write(json.dumps({"step": 3, "prompt": "p", "student": "s", "teacher": "t", "student_score": 0.5,
                            "teacher_score": 1.5}) + "\n")
    with open(os.path.join(root, "config.resolved.yaml"), "w") as f:
        f.write(f"critic:\n  eos_policy: {policy}\ntrainer:\n  warmup:\n    until_d_acc: [0.6, 0.7]\n")


def test_saturated_run(tmp_path):
    from megatron_gad.tools.inspect_run import load_run, summarize

    run = str(tmp_path / "run")
    _write_run(run, [0.5, 0.7, 0.97, 0.98, 0.99, 0.99], diff=0.3)
    s = summarize(*load_run(run))
    assert (s["steps"], s["warmup_steps"], s["gad_steps"], s["last_step"]) == (6, 2, 4, 6)
    assert s["d_acc"]["recent_mean"] == pytest.approx((0.97 + 0.98 + 0.99 + 0.99) / 4)
    assert s["d_acc"]["saturated_steps"] == 4 and s["d_acc"]["band"] == [0.6, 0.7]
    assert s["reward"]["slope_per_step"] == pytest.approx(0.01)
    assert s["warnings"][0].startswith("saturated discriminator: d_acc 0.982 over the last 4 steps")
    assert any("rollout/logprob_diff_max reached 0.3" in w for w in s["warnings"])
    assert "algorithm.rollout_is=token" in " ".join(s["advice"])


def test_drift_and_eos_warnings_and_cli(tmp_path, capsys):
    run = str(tmp_path / "run")
    _write_run(run, [0.5, 0.6, 0.7, 0.72, 0.71, 0.7], scores=[0, -1, -2, -4, -6, -8.5], policy="none")
    rc, out, err = run_cli(["inspect", run], capsys)
    assert rc == 0, err
    assert "score drift: the student mean score moved 0.00 -> -8.50" in out
    assert "critic.eos_policy=none" in out
    assert "saturated" not in out and "blind" not in out
    assert "student 's'  score 0.500" in out
    rc, out, _ = run_cli(["inspect", run, "--json"], capsys)
    assert json.loads(out)["scores"]["student"]["last"] == -8.5


def test_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = str(tmp_path / "run")
    _write_run(run, [0.5, 0.6, 0.7, 0.72, 0.71, 0.7])
    rc, _out, err = run_cli(["inspect", run, "--png"], capsys)
    assert rc == 0, err
    assert os.path.getsize(os.path.join(run, "inspect.png")) > 10_000


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    rc, _out, err = run_cli(["inspect", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "no such directory; pass a run's trainer.default_local_dir" in err
    assert "Traceback" not in err


def test_verifier_auc_and_hacking_flags(tmp_path, capsys):
    """A run whose D stopped ranking the verifier's good samples first while its reward rose."""
    from megatron_gad.tools.inspect_run import summarize

    rows = [{"step": i + 1, "stage": "gad", "critic/d_acc": 0.7, "reward/mean": 0.1 * i,
             "critic/verifier_auc": auc, "reward/hacking_warning": float(i >= 4)}
            for i, auc in enumerate([0.8, 0.7, 0.5, 0.45, 0.4, 0.42])]
    s = summarize(rows, [], {}, window=3)
    assert s["verifier_auc"]["recent_mean"] == pytest.approx((0.45 + 0.4 + 0.42) / 3)
    assert (s["verifier_auc"]["first"], s["verifier_auc"]["steps"], s["verifier_auc"]["hacking_warning_steps"]) \
        == (0.8, 6, 2)
    text = " | ".join(s["warnings"])
    assert "critic/verifier_auc 0.42 over the last 3 steps (< 0.55)" in text and "possible reward hacking" in text
    assert "flagged possible reward hacking on 2 steps" in text
    assert "reward.verifier_weight" in " ".join(s["advice"])
    ok = summarize([dict(r, **{"critic/verifier_auc": 0.9, "reward/hacking_warning": 0.0}) for r in rows], [], {})
    assert not any("verifier" in w or "hacking" in w for w in ok["warnings"])
