"""``megatron-gad bench`` on the CPU with the tiny models: 2 steps of warmup + gad with in-process
workers (trainer.workers=local), run as the console script in its own process (the process group it
joins stays there). The report's token counts are checked against the batches replayed from the data
pipeline and the trainer's own response-length metric; times, FLOP rates and MFU for sanity only
(no timed assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from local_setup import local_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def _replayed_batches(overrides: list[str], steps: int) -> list[dict]:
    """The prompt and teacher-response masks of the first ``steps`` batches, from the data pipeline."""
    from transformers import AutoTokenizer

    from megatron_gad.config import load_config
    from megatron_gad.data import GADDataset, PromptLoader, collate_prompts

    d = load_config(None, overrides).data
    tok = AutoTokenizer.from_pretrained(load_config(None, overrides).actor_rollout_ref.model.path)
    ds = GADDataset(d.train_files, tok, d.prompt_key, d.teacher_response_key, d.max_prompt_length,
                    d.max_response_length, d.on_bad_row)
    loader = PromptLoader(ds, d.train_batch_size, d.shuffle, d.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [collate_prompts(next(loader), pad) for _ in range(steps)]


def test_bench_cpu_warmup_and_gad(assets, tmp_path):
    overrides = local_overrides(assets, str(tmp_path / "ignored"), kl=True)
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = os.path.join(ROOT, "configs", "demo.yaml")
    proc = subprocess.run([sys.executable, "-m", "megatron_gad.cli", "bench", config, *overrides, "--steps", "2",
                           "--stages", "warmup,gad", "--out", str(out), "--name", "r"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "r.json").read_text())
    md = (out / "r.md").read_text()
    assert not (out / "r_run" / "global_step_4").exists()  # no checkpoint unless --save

    # what aggregation needs
    assert report["schema"] == "megatron-gad-bench/1" and report["config_name"] == "demo"
    assert report["world_size"] == 1 and report["nodes"] == 1 and report["gpus_per_node"] == 1
    assert report["stages"] == ["warmup", "gad"] and report["steps_per_stage"] == 2
    assert report["torch_version"] and report["device"]["kind"] == "cpu" and "git_commit" in report
    assert report["peak"]["source"] == "probe" and report["peak"]["flops_per_s"] > 0

    res = report["results"]
    assert res["warmup"]["measured_steps"] == [2] and res["gad"]["measured_steps"] == [4]  # step 1 of each out
    assert set(res["warmup"]["phases"]) == {"gen", "update_critic"}
    assert set(res["gad"]["phases"]) == {"gen", "ref", "adv", "update_critic", "update_actor"}  # lean_step
    for stage in ("warmup", "gad"):
        s = res[stage]
        assert s["step_seconds"] > 0 and all(p["seconds"] > 0 for p in s["phases"].values())
        assert sum(p["seconds"] for p in s["phases"].values()) <= s["step_seconds"]
        assert 0 < s["mfu"] <= 1 and s["mfu"] <= s["hfu"] <= 1
        assert s["tokens_per_s_per_device"] > 0 and s["model_tflops_per_device"] > 0
        assert s["memory_bytes"]["critic"]["update_critic"] > 0  # the critic's memory/critic/... metric
        assert f"| {stage} |" in md
    assert report["weight_sync"]["syncs"] == 0  # native rollout: nothing to sync

    # tokens: B prompts x n samples; prompts from the replayed batches, responses from the trainer's metric
    rows = [json.loads(line) for line in (out / "r_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["warmup", "warmup", "gad", "gad"]
    n = 2
    batches = _replayed_batches(overrides, 4)
    per_step = {r["step"]: r for r in report["per_step"]}
    for row, batch in zip(rows, batches):
        B = batch["prompt_mask"].shape[0]
        prompt = n * int(batch["prompt_mask"].sum())
        response = round(row["response_length/mean"] * B * n)
        teacher = int(batch["prompt_mask"].sum() + batch["teacher_response_mask"].sum())
        assert per_step[row["step"]]["tokens"] == {"sample_prompt": prompt, "sample_response": response,
                                                   "teacher_sequence": teacher, "step": prompt + response}
    assert res["gad"]["tokens_per_step"]["step"] == per_step[4]["tokens"]["step"]
