"""`megatron-gad pipeline configs/pipelines/tiny-cpu.yaml` as a user runs it: SeqKD (1 SFT step) ->
warmup -> GAD -> HF export, each stage a real `train` / `convert` subprocess on CPU.

The first run is cut short in the GAD stage (a NaN loss injected at its second actor update with
trainer.max_nonfinite_steps=1 stops the stage after its step-1 checkpoint, exit 3, as a crash would);
the second run skips SeqKD and warmup (their checkpoints are not rewritten), resumes GAD from step 1
and exports; a third run does nothing. The exported model, loaded by `transformers`, gives the
log-probs the Megatron actor checkpoint gives (`megatron-gad logprobs`, the trainer's own pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "pipelines" / "tiny-cpu.yaml"

pytestmark = pytest.mark.slow


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
            and "global_step_" in str(p)}


def test_tiny_pipeline_resumes_stage_by_stage_and_exports(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "controller"))
    from local_setup import build_assets

    assets = build_assets(str(tmp_path / "assets"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_gad.cli", "pipeline", str(TINY),
           f"actor_rollout_ref.model.path={assets['model']}", f"data.train_files=[{assets['train']}]",
           "gad:trainer.max_nonfinite_steps=1", "--out", str(out)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")

    def run(extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(env, **(extra_env or {})),
                              cwd=tmp_path)

    first = run({"MEGATRON_GAD_INJECT_NAN": "actor:1"})  # the GAD stage's 2nd actor update is NaN
    assert first.returncode == 3, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stage 1/4 seqkd: done" in first.stdout and "stage 2/4 warmup: done" in first.stdout
    assert "stage 3/4 gad: failed with exit code 3" in first.stdout
    gad_marker = json.loads((out / "gad" / "pipeline_stage.json").read_text())
    assert gad_marker["status"] == "running" and (out / "gad" / "global_step_1").is_dir()
    assert not (out / "gad" / "global_step_2").exists() and not (out / "hf").exists()
    before = _mtimes(out)

    second = run()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "stage 1/4 seqkd: done (global_step_1); skipped" in log
    assert "stage 2/4 warmup: done (global_step_2); skipped" in log
    assert f"resumed from {out / 'gad' / 'global_step_1'} at step 1" in log
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing retrained or rewritten
    rows = [json.loads(line) for line in (out / "gad" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "gad"][-1] == 2
    assert json.loads((out / "gad" / "pipeline_stage.json").read_text())["output_id"] == gad_marker["output_id"]

    third = run()
    assert third.returncode == 0 and third.stdout.count("; skipped") == 4, third.stdout[-2000:]
    assert _mtimes(out) == after

    # the export equals the GAD checkpoint: transformers on the HF directory vs the Megatron actor pass
    lp = subprocess.run([sys.executable, "-m", "megatron_gad.cli", "logprobs", str(out / "gad" / "global_step_2" /
                         "actor"), "--data", assets["train"], "--batch-size", "4", "--json"],
                        capture_output=True, text=True, timeout=600, env=env)
    assert lp.returncode == 0, lp.stderr[-3000:]
    records = [json.loads(line) for line in lp.stdout.splitlines() if line.strip()][:-1][:4]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    for r in records:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(r["prompt_ids"])
        ref = [logp[p + t - 1, tok].item() for t, tok in enumerate(r["response_ids"])]
        assert r["logprobs"] == pytest.approx(ref, abs=1e-4)
