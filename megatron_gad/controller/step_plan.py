"""Which passes a GAD step can take from another pass's forward (``trainer.lean_step``, issue 22).

* **Rewards from the critic's update.** The critic's update (``CriticWorker.update_critic``) is one
  optimizer step per epoch over the whole batch of teacher/student pairs, so its first forward runs
  with the critic as it was before this step's update: the student scores it computes are exactly
  the rewards a separate ``compute_scores`` pass would give (same sequences, same EOS policy and
  pooling; packed differently, see the test). The step then updates the critic first and reads the
  rewards (and the sample log's teacher scores) from that update.
* **No old log-prob pass on-policy.** With one PPO epoch and one mini-batch the actor's weights at
  the update's forward are those a separate pass would use: the update takes its own log-probs,
  detached, as the old ones (verl does the same), computes the truncated importance weights from
  them, and returns them for ``rollout/logprob_diff_*`` and ``rollout_is/*``.

``trainer.lean_step=false`` keeps the separate passes (today's step; benchmarks compare the two).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from megatron_gad import algos

log = logging.getLogger("megatron_gad")
_said: set[str] = set()


def _once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info("%s", msg)


class LeanPasses(NamedTuple):
    rewards_from_update: bool
    on_policy: bool


def lean_passes(cfg, batch_size: int) -> LeanPasses:
    """The decision for this config and batch size (logged once per distinct decision)."""
    if not cfg.trainer.lean_step or cfg.trainer.mode != "gad":
        return LeanPasses(False, False)
    a = cfg.actor_rollout_ref.actor
    mini = max(1, batch_size // a.ppo_mini_batch_size)
    on_policy = a.ppo_epochs == 1 and mini == 1
    replay = cfg.critic.replay
    if replay.capacity > 0 and replay.groups_per_step > 0:
        # the critic's batch holds past samples too: its scores are not this step's rewards row for row
        _once("GAD step: separate reward pass (critic.replay adds past samples to the critic's update batch)")
        rewards_from_update = False
    else:
        _once("GAD step: rewards read from the critic update's first forward (it precedes the update's "
              "optimizer steps), no separate reward pass")
        rewards_from_update = True
    if on_policy:
        _once("GAD step: one PPO epoch over one mini-batch: the actor update's own log-probs are the old ones "
              "(no old log-prob pass)")
    else:
        _once(f"GAD step: separate old log-prob pass (actor.ppo_epochs={a.ppo_epochs}, {mini} mini-batches: "
              "the update is off-policy after its first optimizer step)")
    return LeanPasses(rewards_from_update, on_policy)


def split_scores(result: dict) -> tuple[dict, dict | None]:
    """A critic update's result -> (its metrics, ``teacher_scores``/``student_scores`` or None)."""
    keys = ("teacher_scores", "student_scores")
    if not all(k in result for k in keys):
        return result, None
    return {k: v for k, v in result.items() if k not in keys}, {k: result[k] for k in keys}


def rollout_checks(cfg, student: dict, old_log_prob, weights: bool = True) -> dict:
    """``rollout/logprob_diff_*`` of the old log-probs against the engine's, and with
    ``algorithm.rollout_is`` the truncated importance weights' metrics; ``weights``: also put the
    weights into ``student`` for the update (the on-policy update computes its own)."""
    metrics = algos.logprob_mismatch(old_log_prob, student["rollout_log_prob"], student["response_mask"])
    a = cfg.algorithm
    if a.rollout_is is not None:
        w, m = algos.rollout_is_weights(old_log_prob, student["rollout_log_prob"], student["response_mask"],
                                        a.rollout_is, a.rollout_is_threshold)
        if weights:
            student["rollout_is_weights"] = w
        metrics.update(m)
    return metrics


def update_actor(actor, cfg, student: dict, num_mini: int, on_policy: bool) -> dict:
    """The actor's update; on-policy its own forward gives the old log-probs (detached), and the
    rollout metrics are computed from them here, as the old log-prob pass would have had them."""
    rollout_lp = student.pop("rollout_log_prob")  # only the on-policy importance weights need it there
    if not on_policy:
        return actor.update_actor(student, num_mini)
    a = cfg.algorithm
    is_cfg = (a.rollout_is, a.rollout_is_threshold) if a.rollout_is is not None else None
    batch = dict(student, rollout_log_prob=rollout_lp) if is_cfg is not None else student
    metrics = actor.update_actor(batch, num_mini, on_policy=True, rollout_is=is_cfg)
    metrics.update(rollout_checks(cfg, dict(student, rollout_log_prob=rollout_lp), metrics.pop("log_prob"),
                                  weights=False))
    return metrics
