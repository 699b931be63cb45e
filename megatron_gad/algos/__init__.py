"""GAD algorithms: pure torch, no megatron or ray imports (unit-testable anywhere)."""

from .advantages import (
    compute_grpo_advantages,
    compute_rloo_advantages,
    get_adv_estimator,
    register_adv_estimator,
)
from .discriminator import discriminator_loss, discriminator_loss_paired
from .kl import entropy_from_logits, get_kl_penalty, kl_penalty
from .policy import get_policy_loss, ppo_policy_loss, register_policy_loss
from .ranking import ranking_auc
from .rollout_is import logprob_mismatch, rollout_is_weights
from .sft import sft_loss
from .utils import AGG_MODES, agg_denominator, agg_loss, masked_mean, masked_sum

__all__ = [
    "AGG_MODES",
    "agg_denominator",
    "agg_loss",
    "compute_grpo_advantages",
    "compute_rloo_advantages",
    "discriminator_loss",
    "discriminator_loss_paired",
    "entropy_from_logits",
    "get_adv_estimator",
    "get_kl_penalty",
    "get_policy_loss",
    "kl_penalty",
    "logprob_mismatch",
    "masked_mean",
    "masked_sum",
    "ppo_policy_loss",
    "ranking_auc",
    "register_adv_estimator",
    "register_policy_loss",
    "rollout_is_weights",
    "sft_loss",
]
