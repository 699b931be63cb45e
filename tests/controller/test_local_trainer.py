"""GAD trainer with in-process worker groups (trainer.workers=local, no Ray): step order and metrics.

Runs in a spawned process (``run_local``, world size 1) so the process group and Megatron's
model-parallel state it builds never leak into the test session. Both roles live in that one process.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    root = tmp_path_factory.mktemp("gad_local_assets")
    tok = build_tokenizer(str(root / "tok"))
    model = build_tiny_student(str(root / "model"), tok, seed=0, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)
    data = write_dataset(str(root / "data"), n_train=32, n_heldout=8, seed=0)
    return {"model": model, "train": data["train"]}


def _overrides(assets, run_dir):
    return [f"data.train_files=[{assets['train']}]", f"actor_rollout_ref.model.path={assets['model']}",
            "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
            "data.max_prompt_length=16", "data.max_response_length=12", "data.train_batch_size=2",
            "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.temperature=1.0",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.optim.lr=1e-3", "critic.optim.lr=1e-3", "critic.ppo_micro_batch_size_per_gpu=1",
            "actor_rollout_ref.actor.use_kl_loss=true", "critic.fused_loss=torch", "trainer.device=cpu",
            "trainer.workers=local", f"trainer.default_local_dir={run_dir}", "trainer.logger=[jsonl]",
            "data.on_bad_row=skip", "trainer.total_training_steps=3", "trainer.critic_warmup=1",
            "trainer.resume_mode=disable"]


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
    assert got["phases"] == ["gen", "reward", "old_log_prob", "ref", "adv", "update_critic", "update_actor", "save"]
    assert got["after"] != got["before"] and got["opt_bytes"][0] > 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert [m["stage"] for m in rows] == ["warmup", "gad", "gad"]
    assert rows[0]["actor/optimizer_state_bytes"] == 0  # frozen warmup: no actor optimizer yet
    assert {"critic/d_loss", "critic/d_acc", "response_length/mean", "timing_s/gen",
            "timing_s/update_critic"} <= set(rows[0])
    assert {"actor/pg_loss", "actor/kl", "reward/mean", "critic/d_acc", "timing_s/update_actor",
            "timing_s/reward"} <= set(rows[1])
    assert rows[1]["actor/optimizer_state_bytes"] > 0
    assert os.path.isdir(os.path.join(run, "global_step_3", "critic"))


def test_local_workers_need_one_rank_per_role(assets, tmp_path):
    from megatron_gad.config import ConfigError, load_config, validate

    cfg = load_config(None, [*_overrides(assets, str(tmp_path / "r")), "trainer.n_gpus_per_node=2"])
    with pytest.raises(ConfigError, match=r"trainer\.workers=local"):
        validate(cfg)
