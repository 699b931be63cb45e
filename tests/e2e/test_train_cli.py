"""`megatron-gad train CONFIG overrides...` as a user runs it: a subprocess on the shipped demo config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_cli_on_demo_config(tmp_path):
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    tok = build_tokenizer(str(tmp_path / "tok"))
    model = build_tiny_student(str(tmp_path / "model"), tok, seed=0)
    data = write_dataset(str(tmp_path / "data"), n_train=16, n_heldout=4, seed=0)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_gad.cli", "train", str(ROOT / "configs" / "demo.yaml"),
           f"data.train_files=[{data['train']}]", f"actor_rollout_ref.model.path={model}",
           f"trainer.default_local_dir={run}", "trainer.total_training_steps=3", "trainer.critic_warmup=1"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "# resolved config" in out.stdout and "critic_warmup: 1" in out.stdout
    assert "step 3/3 | stage gad" in out.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["stage"] for r in rows] == ["warmup", "gad", "gad"]
    assert (run / "config.resolved.yaml").is_file()
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (run / "global_step_3" / "actor" / "megatron_gad.json").is_file()

    # a bad override is refused before anything starts, naming the key
    bad = subprocess.run(cmd + ["trainer.critic_warmupp=2"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0
    assert "trainer.critic_warmupp" in bad.stderr and "did you mean 'trainer.critic_warmup'" in bad.stderr
