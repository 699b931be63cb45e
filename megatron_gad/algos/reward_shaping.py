"""The actor's reward from the discriminator's scores (pure torch): its shape and its weight beside a
task verifier (``reward.critic_shape``, ``reward.critic_weight``, ``reward.verifier_weight``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

_REGISTRY = Registry("critic reward shape")
register_critic_shape = _REGISTRY.register
get_critic_shape = _REGISTRY.get


@register_critic_shape("score")
def score_reward(student_scores: Tensor, teacher_scores: Tensor | None, n: int) -> Tensor:
    """The paper's reward: D(student), unbounded (GRPO normalises it per group)."""
    return student_scores.float()


@register_critic_shape("sigmoid_gap")
def sigmoid_gap_reward(student_scores: Tensor, teacher_scores: Tensor | None, n: int) -> Tensor:
    """sigmoid(D(student) - D(teacher of its prompt)), in (0, 1): the probability D gives the student of
    beating its teacher. Bounded, so a saturated D's huge score gaps cannot dominate a step, and an
    anchor (0.5 = as good as the teacher) that a raw score lacks (BT is shift-invariant).
    student_scores [N*n] (rows i*n .. i*n+n-1 answer prompt i), teacher_scores [N]."""
    if teacher_scores is None:
        raise ValueError("critic_shape=sigmoid_gap needs the teacher scores of the step's prompts")
    assert student_scores.numel() == teacher_scores.numel() * n, "one teacher score per prompt of n samples"
    gap = student_scores.float() - teacher_scores.float().repeat_interleave(n)
    return torch.sigmoid(gap)


def needs_teacher_scores(shape: str) -> bool:
    return shape != "score"


def mix_rewards(critic: Tensor, critic_weight: float, verifier: Tensor | None = None,
                verifier_weight: float = 0.0) -> Tensor:
    """critic_weight x shaped D + verifier_weight x verifier; critic_weight 0 (with a verifier) is the
    checker-only control: the actor never sees D."""
    out = critic_weight * critic.float()
    if verifier is not None:
        out = out + verifier_weight * verifier.float()
    return out
