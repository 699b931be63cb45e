"""GAD trainer on Ray (local, CPU): step order, frozen warmup, switch to GAD, resume equality."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("ray_session")]

ray = pytest.importorskip("ray")


def make_cfg(assets, run_dir, *extra):
    from megatron_gad.config import load_config, validate

    cfg = load_config(None, [
        f"data.train_files=[{assets['train']}]", f"actor_rollout_ref.model.path={assets['model']}",
        "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
        "data.max_prompt_length=16", "data.max_response_length=12", "data.train_batch_size=2",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-3", "critic.optim.lr=1e-3", "critic.ppo_micro_batch_size_per_gpu=1",
        "critic.fused_loss=torch", "trainer.device=cpu", f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[jsonl]", "data.on_bad_row=skip", *extra])
    validate(cfg)
    return cfg


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _comparable(m):
    return {k: v for k, v in m.items() if not k.startswith("timing_s/")}


def test_frozen_warmup_then_gad_and_resume(assets, tmp_path):
    from megatron_gad.controller.trainer import GADTrainer

    common = ["trainer.critic_warmup=2", "actor_rollout_ref.actor.use_kl_loss=true", "trainer.save_freq=2"]

    # A: two warmup steps, then stop (as if killed after the step-2 checkpoint).
    run = str(tmp_path / "run")
    tr = GADTrainer(make_cfg(assets, run, "trainer.total_training_steps=2", *common))
    before = tr.actor.weights_fingerprint()
    tr.fit()
    assert tr.phases == ["gen", "update_critic", "save"]  # no reward / log-prob / actor passes
    assert tr.actor.weights_fingerprint() == before  # bit-identical actor
    assert tr.actor.optimizer_state_bytes() == [0]
    tr.shutdown()
    warm = read_metrics(run)
    assert [m["stage"] for m in warm] == ["warmup", "warmup"]
    assert all(m["actor/optimizer_state_bytes"] == 0 for m in warm)
    assert {"critic/d_loss", "critic/d_acc", "critic/student_value_mean", "critic/teacher_value_mean",
            "response_length/mean", "timing_s/step", "timing_s/gen", "timing_s/update_critic"} <= set(warm[0])
    assert warm[0]["critic/d_acc"] == 0.5 and abs(warm[0]["critic/d_loss"] - 0.693147) < 1e-5  # zero head
    assert warm[1]["critic/d_loss"] != warm[0]["critic/d_loss"]  # the discriminator learned

    # B: resume (auto) to step 4: GAD steps update the actor.
    tr = GADTrainer(make_cfg(assets, run, "trainer.total_training_steps=4", *common))
    tr.fit()
    assert tr.phases == ["gen", "update_critic", "ref", "adv", "update_actor", "save"]  # trainer.lean_step
    assert tr.actor.weights_fingerprint() != before
    assert tr.actor.optimizer_state_bytes()[0] > 0
    tr.shutdown()
    resumed = read_metrics(run)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["stage"] for m in resumed] == ["warmup", "warmup", "gad", "gad"]
    assert {"actor/pg_loss", "actor/kl", "reward/mean"} <= set(resumed[2])

    # C: the same 4 steps without interruption give identical metrics (CPU fp32).
    run2 = str(tmp_path / "run2")
    tr = GADTrainer(make_cfg(assets, run2, "trainer.total_training_steps=4", *common))
    tr.fit()
    tr.shutdown()
    straight = read_metrics(run2)
    assert [_comparable(m) for m in straight] == [_comparable(m) for m in resumed]
    assert os.path.isdir(os.path.join(run2, "global_step_4", "critic", "dist"))


def test_sft_warmup_trains_actor_and_critic(assets, tmp_path):
    from megatron_gad.controller.trainer import GADTrainer

    run = str(tmp_path / "run")
    tr = GADTrainer(make_cfg(assets, run, "trainer.total_training_steps=2", "trainer.critic_warmup=2",
                             "trainer.warmup.mode=sft"))
    before = tr.actor.weights_fingerprint()
    tr.fit()
    assert tr.phases == ["gen", "update_critic", "sft", "save"]
    assert tr.actor.weights_fingerprint() != before
    tr.shutdown()
    m = read_metrics(run)
    assert all(x["stage"] == "warmup" for x in m)
    # Step 1's SFT loss is the token-mean NLL of the first batch's teacher responses under the initial
    # weights: recompute it with transformers.
    assert abs(m[0]["actor/sft_loss"] - _hf_teacher_nll(assets, tr.cfg)) < 1e-5


def _hf_teacher_nll(assets, cfg):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gad.data import GADDataset, PromptLoader, build_sequences, collate_prompts

    tok = AutoTokenizer.from_pretrained(assets["model"])
    d = cfg.data
    ds = GADDataset(d.train_files, tok, d.prompt_key, d.teacher_response_key, d.max_prompt_length,
                    d.max_response_length, d.on_bad_row)
    b = collate_prompts(next(PromptLoader(ds, d.train_batch_size, d.shuffle, d.seed)), tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    P = b["prompt_ids"].shape[1]
    ids, mask, pos = build_sequences(b["prompt_ids"], b["prompt_mask"], b["teacher_response"],
                                     b["teacher_response_mask"])
    logits = model(ids, attention_mask=mask, position_ids=pos).logits
    lp = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, b["teacher_response"][..., None])[..., 0]
    mask = b["teacher_response_mask"].float()
    return float(-(lp * mask).sum() / mask.sum())


@pytest.mark.slow
def test_tp2pp2_actor_with_tp2_critic(assets, tmp_path):
    """Different layouts per role: actor TP2xPP2 (DP1), discriminator TP2xPP1 (DP2) on 4 ranks each."""
    from megatron_gad.controller.trainer import GADTrainer

    run = str(tmp_path / "run")
    cfg = make_cfg(assets, run, "trainer.total_training_steps=2", "trainer.critic_warmup=1",
                   "trainer.n_gpus_per_node=4", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
                   "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
                   "critic.megatron.tensor_model_parallel_size=2")
    tr = GADTrainer(cfg)
    assert [lay.dp_size for lay in tr.actor.layouts] == [1] * 4
    assert [lay.dp_size for lay in tr.critic.layouts] == [2] * 4
    tr.fit()
    tr.shutdown()
    m = read_metrics(run)
    assert [x["stage"] for x in m] == ["warmup", "gad"]
    assert m[0]["critic/d_acc"] == 0.5
    assert all(abs(v) < 1e6 for x in m for k, v in x.items() if isinstance(v, float))
    assert "actor/pg_loss" in m[1]


def test_adaptive_warmup_end_and_validation(assets, tmp_path):
    """until_d_acc ends the warmup long before critic_warmup; held-out metrics are logged and
    reproducible."""
    from megatron_gad.controller.trainer import GADTrainer

    run = str(tmp_path / "run")
    heldout = os.path.join(os.path.dirname(assets["train"]), "heldout.jsonl")
    tr = GADTrainer(make_cfg(assets, run, "trainer.total_training_steps=2", "trainer.critic_warmup=10",
                             "trainer.warmup.until_d_acc=[0.5,1.0]", "trainer.warmup.patience=1",
                             f"data.val_files=[{heldout}]", "trainer.test_freq=1"))
    tr.fit()
    again = tr.validate()  # same weights as after step 2, same seeds
    tr.shutdown()
    m = read_metrics(run)
    assert [x["stage"] for x in m] == ["warmup", "gad"]
    assert m[0]["warmup/ended_at_step"] == 1
    assert {"val/d_acc", "val/d_loss", "val/response_length/mean"} <= set(m[1])
    assert again == {k: v for k, v in m[1].items() if k in again}
