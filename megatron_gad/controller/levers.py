"""The trainer's side of the optional GAD levers (issue 23; their math is in ``megatron_gad.algos``),
kept out of the step loop so it stays readable. All are off by default:

* ``reward.critic_shape`` / ``reward.critic_weight``: the actor's reward from D (``algos.reward_shaping``);
* ``algorithm.filter_groups``: prompts whose rewards have no spread leave the actor's batch
  (``algos.filter_groups``); ``algorithm.grpo_std_floor`` acts inside the advantage estimator;
* ``actor.sft_loss_coef``: the step's teacher responses ride along to the actor's update (``sft_*`` keys,
  ``ActorWorker._sft_companion``), whose loss adds coef x their NLL in the same optimizer step;
* ``critic.replay``: past student groups join the critic's update batch (``algos.ReplayBuffer``), never
  the actor's;
* ``trainer.best_checkpoint``: the checkpoint of the best validation metric, copied to ``<run>/best``.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_gad import algos
from megatron_gad.controller.samples import teacher_rows


def critic_reward(trainer, batch: dict, scores: torch.Tensor,
                  teacher_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """D's part of the reward [B*n]: D(student) shaped by ``reward.critic_shape`` (sigmoid_gap scores
    the step's teacher responses too, with the critic in the same state: ``teacher_scores`` when the
    critic update's own forward gave them with ``scores``, else a scoring pass now, before the update),
    times ``reward.critic_weight`` unless a verifier mixes it in (``HybridReward`` applies both weights)."""
    r = trainer.cfg.reward
    metrics: dict = {}
    teacher = None
    if algos.needs_teacher_scores(r.critic_shape):
        teacher = teacher_scores if teacher_scores is not None else \
            trainer.critic.compute_scores(teacher_rows(batch), side="teacher")["scores"]
        metrics["reward/teacher_score_mean"] = float(teacher.float().mean())
    shaped = algos.get_critic_shape(r.critic_shape)(scores, teacher, trainer.n)
    if trainer.hybrid is None:
        shaped = algos.mix_rewards(shaped, r.critic_weight)
    return shaped, metrics


def actor_batch(trainer, batch: dict, student: dict, rewards: torch.Tensor) -> tuple[dict, int, dict]:
    """The actor's update batch, its number of prompts (0: nothing to learn from, skip the update) and
    metrics: groups without reward spread dropped (``algorithm.filter_groups``), the teacher responses
    attached for the SFT mix (``actor.sft_loss_coef``)."""
    cfg, n = trainer.cfg, trainer.n
    prompts = batch["prompt_ids"].shape[0]
    metrics: dict = {}
    fg = cfg.algorithm.filter_groups
    if fg.enable:
        keep = algos.filter_groups(rewards, n, fg.min_std, trainer.actor.dp_size)
        rows = keep.repeat_interleave(n)
        student = {k: v[rows] for k, v in student.items()}
        metrics["actor/kept_groups"] = float(keep.sum())
        metrics["actor/dropped_groups"] = float((~keep).sum())
        prompts = int(keep.sum())
    if cfg.actor_rollout_ref.actor.sft_loss_coef > 0 and prompts:
        student = dict(student, sft_prompt_ids=batch["prompt_ids"], sft_prompt_mask=batch["prompt_mask"],
                       sft_responses=batch["teacher_response"], sft_response_mask=batch["teacher_response_mask"])
    return student, prompts, metrics


def critic_pairs(trainer, pairs: dict) -> tuple[dict, dict]:
    """The critic's update batch: this step's pairs plus replayed past groups (``critic.replay``); this
    step's groups are stored afterwards, so a step never replays itself."""
    buf = getattr(trainer, "replay", None)
    if buf is None:
        r = trainer.cfg.critic.replay
        buf = trainer.replay = algos.ReplayBuffer(r.capacity, r.groups_per_step, trainer.cfg.trainer.seed)
    if not buf.enabled:
        return pairs, {}
    mixed, k = buf.mix(pairs, trainer.pad_id)
    buf.add(pairs)
    return mixed, {"critic/replayed_groups": float(k)}


BEST_DIR, BEST_INFO = "best", "best.json"


def better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def keep_best(trainer, metrics: dict, saved: bool) -> dict:
    """After a validation: when ``trainer.best_checkpoint.metric`` improved, this step's checkpoint
    (saved now unless ``saved``) is copied to ``<run>/best`` with ``best.json`` (step, metric, value);
    the previous best is replaced only once the copy is complete. The best value so far is read back
    from ``best.json``, so a resumed run keeps comparing against it."""
    bc = trainer.cfg.trainer.best_checkpoint
    if bc.metric is None or bc.metric not in metrics:
        return {}
    best_dir = os.path.join(trainer.run_dir, BEST_DIR)
    info_path = os.path.join(best_dir, BEST_INFO)
    best = None
    if os.path.isfile(info_path):
        with open(info_path) as f:
            best = json.load(f)["value"]
    value = float(metrics[bc.metric])
    if not better(value, best, bc.mode):
        return {}
    src = trainer.save() if not saved else os.path.join(trainer.run_dir, f"global_step_{trainer.step}")
    tmp = best_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    with open(os.path.join(tmp, BEST_INFO), "w") as f:
        json.dump({"step": trainer.step, "metric": bc.metric, "value": value}, f)
    old = best_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(best_dir):
        os.replace(best_dir, old)
    os.replace(tmp, best_dir)
    shutil.rmtree(old, ignore_errors=True)
    return {"best_checkpoint/step": float(trainer.step), "best_checkpoint/value": value}
