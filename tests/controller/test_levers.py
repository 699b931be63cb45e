"""The GAD levers and the joint warmup, end to end on the in-process trainer (trainer.workers=local,
a tiny random student): each changes what it should and nothing else. Their math is tested in
tests/unit/test_levers_math.py."""

from __future__ import annotations

import json
import math
import os

import pytest
from local_setup import local_overrides

pytestmark = pytest.mark.distributed


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _over(assets, run, *extra, steps=3):
    base = [o for o in local_overrides(assets, run, kl=False) if "total_training_steps" not in o]
    return [*base, f"trainer.total_training_steps={steps}", *extra]


def _phases(rank, world, overrides):
    """Each step's phases, and the actor's weights before and after each step."""
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer

    cfg = load_config(None, overrides)
    validate(cfg)
    tr = GADTrainer(cfg)
    out = []
    orig = tr._step

    def step(batch, timer):
        before = tr.actor.weights_fingerprint()
        m = orig(batch, timer)
        out.append({"phases": list(tr.phases), "actor_changed": before != tr.actor.weights_fingerprint()})
        return m

    tr._step = step
    tr.fit()
    final = tr.actor.weights_fingerprint()
    tr.shutdown()
    return out, final


def test_joint_warmup_is_critic_only_for_its_first_steps(assets, tmp_path):
    """warmup.mode=sft, critic_only_steps=1: step 1 trains only the critic (actor unchanged), steps 2-3
    train both (SFT on the teacher responses), step 4 is GAD."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    got, _ = run_local(_phases, 1, _over(assets, run, "trainer.critic_warmup=3", "trainer.warmup.mode=sft",
                                         "trainer.warmup.critic_only_steps=1", steps=4))[0]
    rows = _rows(run)
    assert [r["stage"] for r in rows] == ["warmup", "warmup", "warmup", "gad"]
    assert [("sft" in g["phases"], g["actor_changed"]) for g in got] == [(False, False), (True, True), (True, True),
                                                                       (False, True)]
    assert "actor/sft_loss" not in rows[0] and rows[1]["actor/sft_loss"] > 0
    assert all("update_critic" in g["phases"] for g in got)


def test_bce_loss_bounded_reward_and_validation_before_training(assets, tmp_path):
    """critic.loss_type=bce: a zero-initialised head's first loss is BCE's 2 ln 2 (Bradley-Terry's is
    ln 2); reward.critic_shape=sigmoid_gap: every reward in (0, 1) and the teacher scores are read;
    trainer.val_before_train: a step-0 validation row."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    run_local(_phases, 1, _over(assets, run, "critic.loss_type=bce", "reward.critic_shape=sigmoid_gap",
                                f"data.val_files=[{assets['train']}]", "trainer.test_freq=3",
                                "trainer.val_before_train=true"))
    rows = _rows(run)
    assert rows[0]["step"] == 0 and "val/d_acc" in rows[0] and "stage" not in rows[0]
    train = rows[1:]
    assert train[0]["critic/d_loss"] == pytest.approx(2 * math.log(2), abs=1e-6)
    for r in train[1:]:  # GAD steps
        assert r["stage"] == "gad" and "reward/teacher_score_mean" in r
        assert 0 < r["reward/mean"] < 1 and r["reward/std"] < 0.5


def test_sft_mix_changes_the_update_not_the_policy_loss(assets, tmp_path):
    """actor.sft_loss_coef: the same rollouts and policy loss at the first GAD step (same seeds), the
    teacher NLL logged, and different weights after it."""
    from megatron_gad.parallel.launch import run_local

    runs = {c: str(tmp_path / f"run{c}") for c in ("0", "1")}
    finals = {c: run_local(_phases, 1, _over(assets, runs[c], f"actor_rollout_ref.actor.sft_loss_coef={c}",
                                             steps=2))[0][1] for c in runs}
    plain, mixed = _rows(runs["0"])[1], _rows(runs["1"])[1]
    assert mixed["actor/pg_loss"] == pytest.approx(plain["actor/pg_loss"], rel=1e-6, abs=1e-9)
    assert "actor/sft_mix_loss" not in plain and mixed["actor/sft_mix_loss"] > 0
    assert finals["0"] != finals["1"]


def test_group_filter_drops_groups_without_spread(assets, tmp_path):
    """algorithm.filter_groups with a min_std no group reaches: every group is dropped, so the GAD steps
    leave the actor as it was; the std floor shrinks the advantages (policy loss near 0)."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    got, _ = run_local(_phases, 1, _over(assets, run, "algorithm.filter_groups.enable=true",
                                         "algorithm.filter_groups.min_std=1e9"))[0]
    rows = _rows(run)
    assert [g["actor_changed"] for g in got] == [False, False, False]
    assert [r.get("actor/kept_groups") for r in rows] == [None, 0.0, 0.0]
    assert [r.get("actor/dropped_groups") for r in rows] == [None, 2.0, 2.0]
    run2 = str(tmp_path / "floor")
    run_local(_phases, 1, _over(assets, run2, "algorithm.grpo_std_floor=1e6", steps=2))
    assert abs(_rows(run2)[1]["actor/pg_loss"]) < 1e-5


def test_critic_weight_zero_is_the_checker_only_control(assets, tmp_path):
    """reward.critic_weight=0 with a verifier: the reward is the verifier's alone; the critic still trains."""
    from megatron_gad.parallel.launch import run_local

    run, rf = str(tmp_path / "run"), tmp_path / "rf.py"
    rf.write_text("def check(prompt, response):\n    return float(len(response) % 3)\n")
    run_local(_phases, 1, _over(assets, run, f"custom_reward_function.path={rf}", "custom_reward_function.name=check",
                                "reward.verifier_weight=0.5", "reward.critic_weight=0"))
    for r in _rows(run)[1:]:
        assert r["reward/mean"] == pytest.approx(0.5 * r["reward/verifier_mean"], abs=1e-6)
        assert r["reward/critic_mean"] != 0.0 and "critic/d_loss" in r


def test_best_checkpoint_is_the_best_validation_step(assets, tmp_path):
    """trainer.best_checkpoint (metric val/d_loss, min): <run>/best is a byte copy of the checkpoint of
    the step whose validation was best so far, saved at that step although save_freq never fires."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    run_local(_phases, 1, _over(assets, run, f"data.val_files=[{assets['train']}]", "trainer.test_freq=1",
                                "trainer.best_checkpoint.metric=val/d_loss", "trainer.best_checkpoint.mode=min",
                                "trainer.save_freq=-1", steps=4))
    rows = _rows(run)
    losses = [r["val/d_loss"] for r in rows]
    best = min(range(4), key=lambda i: losses[i]) + 1  # the first of equal minima (strict improvement)
    with open(os.path.join(run, "best", "best.json")) as f:
        info = json.load(f)
    assert (info["step"], info["metric"]) == (best, "val/d_loss") and info["value"] == pytest.approx(losses[best - 1])
    def tree(root):  # every file under root: relative path -> bytes
        out = {}
        for d, _, files in os.walk(root):
            for f in files:
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
        return out

    for role in ("actor", "critic"):
        got = tree(os.path.join(run, "best", role))
        assert got and got == tree(os.path.join(run, f"global_step_{best}", role))
    improved = [i + 1 for i in range(4) if losses[i] < min(losses[:i], default=float("inf"))]
    assert [r["step"] for r in rows if "best_checkpoint/step" in r] == improved


def _groups(responses, mask, n):
    """Each prompt group's samples as tuples of their valid token ids."""
    r, m = responses.reshape(-1, n, responses.shape[-1]), mask.reshape(-1, n, mask.shape[-1]).bool()
    return [tuple(tuple(r[g, j][m[g, j]].tolist()) for j in range(n)) for g in range(r.shape[0])]


def _capture(rank, world, overrides):
    """Per step: the prompt groups of the critic's update batch and of the actor's."""
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer

    cfg = load_config(None, overrides)
    validate(cfg)
    tr = GADTrainer(cfg)
    seen = {"critic": [], "actor": []}
    upd_c, upd_a = tr.critic.update_critic, tr.actor.update_actor

    def critic(pairs, n, *a, **kw):
        seen["critic"].append(_groups(pairs["responses"], pairs["response_mask"], n))
        return upd_c(pairs, n, *a, **kw)

    def actor(batch, num_mini, **kw):
        seen["actor"].append(_groups(batch["responses"], batch["response_mask"], tr.n))
        return upd_a(batch, num_mini, **kw)

    tr.critic.update_critic, tr.actor.update_actor = critic, actor
    tr.fit()
    tr.shutdown()
    return seen


def test_replay_reaches_the_critic_not_the_actor(assets, tmp_path):
    """critic.replay: from step 2 the critic's batch holds this step's 2 groups and 2 past ones (the
    samples of earlier steps, token for token); the actor's batch holds this step's samples only."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    seen = run_local(_capture, 1, _over(assets, run, "critic.replay.capacity=4", "critic.replay.groups_per_step=2"))[0]
    critic, actor = seen["critic"], seen["actor"]
    assert [len(c) for c in critic] == [2, 4, 4]
    assert [r.get("critic/replayed_groups") for r in _rows(run)] == [0.0, 2.0, 2.0]
    assert sorted(critic[1][2:]) == sorted(critic[0])  # step 2 replays step 1's groups (the only ones stored)
    assert set(critic[2][2:]) <= set(critic[0] + critic[1][:2])  # step 3: drawn from steps 1-2
    assert actor == [critic[1][:2], critic[2][:2]]  # the actor: this step's groups, nothing replayed


def test_r1_penalty_trains_the_critic_by_double_backward(assets, tmp_path):
    """critic.r1_coef: the penalty is logged in every update; at step 1 the zero-initialised head has
    dD/de = 0, so the penalty is exactly 0 and the update equals the plain one; after it the penalty is
    positive and the critic's weights leave the plain run's."""
    from megatron_gad.parallel.launch import run_local

    runs = {c: str(tmp_path / f"r1_{c}") for c in ("0", "10")}
    for c, run in runs.items():
        run_local(_phases, 1, _over(assets, run, f"critic.r1_coef={c}", "critic.optim.lr=0.05", steps=3))
    plain, r1 = _rows(runs["0"]), _rows(runs["10"])
    assert r1[0]["critic/r1_penalty"] == 0.0 and "critic/r1_penalty" not in plain[0]
    assert r1[1]["critic/d_loss"] == pytest.approx(plain[1]["critic/d_loss"], rel=1e-6)  # same weights after step 1
    assert r1[1]["critic/r1_penalty"] > 0 and r1[2]["critic/r1_penalty"] > 0
    assert r1[2]["critic/d_loss"] != pytest.approx(plain[2]["critic/d_loss"], rel=1e-6)  # step 2's update differed
