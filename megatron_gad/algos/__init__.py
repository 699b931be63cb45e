"""GAD algorithms: pure torch, no megatron or ray imports (unit-testable anywhere)."""

from .advantages import (
    compute_grpo_advantages,
    compute_rloo_advantages,
    filter_groups,
    get_adv_estimator,
    register_adv_estimator,
)
from .discriminator import bce_pair_loss, discriminator_loss, discriminator_loss_paired, r1_penalty
from .kl import entropy_from_logits, get_kl_penalty, kl_penalty
from .policy import get_policy_loss, ppo_policy_loss, register_policy_loss
from .ranking import ranking_auc
from .replay import ReplayBuffer, cat_pair_batches
from .reward_shaping import get_critic_shape, mix_rewards, needs_teacher_scores, register_critic_shape
from .rollout_is import logprob_mismatch, rollout_is_weights
from .sft import sft_loss
from .utils import AGG_MODES, agg_denominator, agg_loss, masked_mean, masked_sum

__all__ = [
    "AGG_MODES",
    "ReplayBuffer",
    "agg_denominator",
    "agg_loss",
    "bce_pair_loss",
    "cat_pair_batches",
    "compute_grpo_advantages",
    "compute_rloo_advantages",
    "discriminator_loss",
    "discriminator_loss_paired",
    "entropy_from_logits",
    "filter_groups",
    "get_adv_estimator",
    "get_critic_shape",
    "get_kl_penalty",
    "get_policy_loss",
    "kl_penalty",
    "logprob_mismatch",
    "masked_mean",
    "masked_sum",
    "mix_rewards",
    "needs_teacher_scores",
    "ppo_policy_loss",
    "r1_penalty",
    "ranking_auc",
    "register_adv_estimator",
    "register_critic_shape",
    "register_policy_loss",
    "rollout_is_weights",
    "sft_loss",
]
