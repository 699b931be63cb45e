"""The GAD levers and the joint warmup, end to end on the in-process trainer (trainer.workers=local,
a tiny random student): each changes what it should and nothing else. Their math is tested in
tests/unit/test_levers_math.py."""

from __future__ import annotations

import json
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
    tr.shutdown()
    return out


def test_joint_warmup_is_critic_only_for_its_first_steps(assets, tmp_path):
    """warmup.mode=sft, critic_only_steps=1: step 1 trains only the critic (actor unchanged), steps 2-3
    train both (SFT on the teacher responses), step 4 is GAD."""
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    got = run_local(_phases, 1, _over(assets, run, "trainer.critic_warmup=3", "trainer.warmup.mode=sft",
                                      "trainer.warmup.critic_only_steps=1", steps=4))[0]
    rows = _rows(run)
    assert [r["stage"] for r in rows] == ["warmup", "warmup", "warmup", "gad"]
    assert [("sft" in g["phases"], g["actor_changed"]) for g in got] == [(False, False), (True, True), (True, True),
                                                                       (False, True)]
    assert "actor/sft_loss" not in rows[0] and rows[1]["actor/sft_loss"] > 0
    assert all("update_critic" in g["phases"] for g in got)
