"""GAD trainer with in-process worker groups (trainer.workers=local, no Ray): step order and metrics.

Runs in a spawned process (``run_local``, world size 1) so the process group and Megatron's
model-parallel state it builds never leak into the test session. Both roles live in that one process.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from local_setup import local_overrides

pytestmark = pytest.mark.distributed


def _overrides(assets, run_dir):
    return local_overrides(assets, run_dir, kl=True)


def _three_steps(rank, world, overrides):
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.local_group import LocalWorkerGroup
    from megatron_gad.controller.trainer import GADTrainer

    cfg = load_config(None, overrides)
    validate(cfg)
    tr = GADTrainer(cfg)
    assert isinstance(tr.actor, LocalWorkerGroup) and isinstance(tr.critic, LocalWorkerGroup)
    before = tr.actor.weights_fingerprint()
    tr.fit()
    out = {"phases": list(tr.phases), "before": before, "after": tr.actor.weights_fingerprint(),
           "opt_bytes": tr.actor.optimizer_state_bytes(), "ray_imported": "ray" in sys.modules}
    tr.shutdown()
    return out


def test_local_workers_run_warmup_then_gad(assets, tmp_path):
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    got = run_local(_three_steps, 1, _overrides(assets, run))[0]
    assert not got["ray_imported"]  # the local path never touches Ray
    # trainer.lean_step (on by default; one PPO epoch, one mini-batch): rewards from the critic's update,
    # no old log-prob pass (tests/controller/test_lean_step.py: the same numbers as the separate passes)
    assert got["phases"] == ["gen", "update_critic", "ref", "adv", "update_actor", "save"]
    assert got["after"] != got["before"] and got["opt_bytes"][0] > 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert [m["stage"] for m in rows] == ["warmup", "gad", "gad"]
    assert rows[0]["actor/optimizer_state_bytes"] == 0  # frozen warmup: no actor optimizer yet
    assert {"critic/d_loss", "critic/d_acc", "response_length/mean", "timing_s/gen",
            "timing_s/update_critic"} <= set(rows[0])
    assert {"actor/pg_loss", "actor/kl", "reward/mean", "critic/d_acc", "timing_s/update_actor",
            "rollout/logprob_diff_max"} <= set(rows[1])
    assert rows[1]["actor/optimizer_state_bytes"] > 0
    # the actor's per-phase device bytes reach the step's metrics: a frozen-warmup step only samples;
    # the reference's weights (on the host by default) come in for its pass only, beside the policy's
    # (no gradient buffers or Adam state before the first update: the same bytes as the reference's)
    assert "memory/actor/update_bytes" not in rows[0] and rows[0]["memory/actor/generate_bytes"] > 0
    m = rows[1]
    assert m["memory/actor/ref_log_prob_bytes"] == 2 * m["memory/actor/generate_bytes"]
    assert m["memory/actor/update_bytes"] == m["memory/actor/idle_bytes"] > m["memory/actor/generate_bytes"]
    assert os.path.isdir(os.path.join(run, "global_step_3", "critic"))


def test_local_workers_need_one_rank_per_role(assets, tmp_path):
    from megatron_gad.config import ConfigError, load_config, validate

    cfg = load_config(None, [*_overrides(assets, str(tmp_path / "r")), "trainer.n_gpus_per_node=2"])
    with pytest.raises(ConfigError, match=r"trainer\.workers=local"):
        validate(cfg)


def _guarded(rank, world, overrides):
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer

    cfg = load_config(None, overrides)
    validate(cfg)
    tr = GADTrainer(cfg)
    prints = []
    orig = tr._step

    def step(batch, timer):  # the critic's weights before and after each step
        before = tr.critic.weights_fingerprint()
        m = orig(batch, timer)
        prints.append((before, tr.critic.weights_fingerprint()))
        return m

    tr._step = step
    tr.fit()
    tr.shutdown()
    return prints


def test_saturation_guard_skips_a_saturated_critic(assets, tmp_path):
    """A critic at d_acc 1.0 in a GAD step is not updated in the next one (evaluated only)."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    guard = ["critic.saturation_guard.enable=true", "critic.saturation_guard.window=1",
             "critic.saturation_guard.upper=0.75", "critic.optim.lr=0.05", "trainer.total_training_steps=4"]
    prints = run_local(_guarded, 1, [o for o in _overrides(assets, run) if "total_training_steps" not in o] + guard)[0]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [m["stage"] for m in rows] == ["warmup", "gad", "gad", "gad"]
    assert "critic/update_skipped" not in rows[0]  # the warmup is never guarded
    for i in range(2, 4):  # a GAD step's decision comes from the previous GAD step's d_acc
        skipped = rows[i - 1]["critic/d_acc"] > 0.75 and rows[i - 1]["stage"] == "gad"
        assert rows[i]["critic/update_skipped"] == float(skipped), rows[i]
        assert (prints[i][0] == prints[i][1]) == skipped  # bit-identical critic weights when skipped
    assert any(r.get("critic/update_skipped") == 1.0 for r in rows), [r["critic/d_acc"] for r in rows]


def _fit(rank, world, overrides):
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer

    cfg = load_config(None, overrides)
    validate(cfg)
    tr = GADTrainer(cfg)
    tr.fit()
    items = [tr.dataset[i] for i in range(len(tr.dataset))]
    tr.shutdown()
    return [(tr.tokenizer.decode(it["prompt_ids"], skip_special_tokens=True),
             tr.tokenizer.decode(it["teacher_response_ids"], skip_special_tokens=True)) for it in items]


def test_samples_jsonl_every_step(assets, tmp_path):
    """trainer.sample_log_freq=1: each step logs both prompts of its batch, the teacher text as the data
    has it, and the zero-initialised head scores 0.0 exactly at step 1 (before any update)."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    pairs = set(run_local(_fit, 1, [*_overrides(assets, run), "trainer.sample_log_freq=1"])[0])
    with open(os.path.join(run, "samples.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 1, 2, 2, 3, 3]
    for r in rows:
        assert (r["prompt"], r["teacher"]) in pairs
        assert r["teacher_eos"] is True and r["teacher_len"] >= 1 and 1 <= r["student_len"] <= 12
    assert [(r["student_score"], r["teacher_score"]) for r in rows[:2]] == [(0.0, 0.0), (0.0, 0.0)]
    assert any(r["teacher_score"] != 0.0 for r in rows[2:])  # the critic learned after step 1


def test_hybrid_reward_mixes_a_verifier(assets, tmp_path):
    """custom_reward_function: the verifier sees each sample's raw prompt (as in the data file) and its
    decoded response; the actor's reward is D + weight * verifier; critic/verifier_auc is logged."""
    from megatron_gad.parallel.launch import run_local

    run, calls = str(tmp_path / "run"), tmp_path / "calls.jsonl"
    rf = tmp_path / "rf.py"
    rf.write_text("import json\n"
                  "def check(prompt, response):\n"
                  f"    with open({str(calls)!r}, 'a') as f:\n"
                  "        f.write(json.dumps([prompt, response]) + '\\n')\n"
                  "    return float(len(response))\n")
    over = [*_overrides(assets, run), f"custom_reward_function.path={rf}", "custom_reward_function.name=check",
            "reward.verifier_weight=0.25"]
    run_local(_fit, 1, over)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(assets["train"]) as f:
        prompts = {json.loads(line)["content"] for line in f if line.strip()}
    with open(calls) as f:
        seen = [json.loads(line) for line in f]
    assert len(seen) == 2 * 2 * 2  # 2 GAD steps x 2 prompts x n=2 (the warmup has no reward pass)
    assert {p for p, _ in seen} <= prompts
    assert "reward/verifier_mean" not in rows[0]  # frozen warmup
    for r in rows[1:]:
        assert r["reward/verifier_mean"] >= 0 and 0.0 <= r.get("critic/verifier_auc", 0.5) <= 1.0
        assert r["reward/mean"] == pytest.approx(r["reward/critic_mean"] + 0.25 * r["reward/verifier_mean"], abs=1e-5)
    lengths = [len(resp) for _, resp in seen[:4]]
    assert rows[1]["reward/verifier_mean"] == pytest.approx(sum(lengths) / 4)
