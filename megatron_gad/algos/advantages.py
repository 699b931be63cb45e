"""Outcome advantage estimators over groups of n samples per prompt."""

import torch
from torch import Tensor

from .registry import Registry

_REGISTRY = Registry("advantage estimator")
register_adv_estimator = _REGISTRY.register
get_adv_estimator = _REGISTRY.get


def _grouped(rewards: Tensor, n: int) -> Tensor:
    assert rewards.dim() == 1 and rewards.numel() % n == 0, f"{rewards.numel()} rewards not divisible by n={n}"
    return rewards.float().view(-1, n)  # [N, n]


@register_adv_estimator("grpo")
def compute_grpo_advantages(
    rewards: Tensor, response_mask: Tensor, n: int, norm_by_std: bool = True, eps: float = 1e-6,
    std_floor: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """GRPO: (r - mean_group) / (max(std_group, std_floor) + eps), broadcast over response tokens.

    rewards: [N*n] (consecutive blocks of n share a prompt); response_mask: [N*n, T].
    n == 1 has no group baseline: advantage 0. ``std_floor`` (``algorithm.grpo_std_floor``; 0 = plain
    GRPO): a group whose rewards barely differ keeps small advantages instead of unit-size ones.
    """
    r = _grouped(rewards, n)  # [N, n]
    if n == 1:
        adv = torch.zeros_like(r)
    else:
        adv = r - r.mean(dim=1, keepdim=True)
        if norm_by_std:
            # unbiased std like verl; equal rewards -> 0 / eps = 0, no NaN
            adv = adv / (r.std(dim=1, keepdim=True).clamp(min=std_floor) + eps)
    adv = adv.reshape(-1, 1) * response_mask.to(adv.dtype)  # [N*n, T]
    return adv, adv


@register_adv_estimator("rloo")
def compute_rloo_advantages(rewards: Tensor, response_mask: Tensor, n: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """RLOO: r_i - mean of the other n-1 rewards of its group. n == 1 -> 0."""
    r = _grouped(rewards, n)
    if n == 1:
        adv = torch.zeros_like(r)
    else:
        loo_mean = (r.sum(dim=1, keepdim=True) - r) / (n - 1)
        adv = r - loo_mean
    adv = adv.reshape(-1, 1) * response_mask.to(adv.dtype)
    return adv, adv


def filter_groups(rewards: Tensor, n: int, min_std: float = 0.0, multiple: int = 1) -> Tensor:
    """DAPO's group filter without resampling: a bool [N] keeping the prompts whose n rewards have a
    spread (unbiased std > ``min_std``); a group with equal rewards has zero GRPO advantage and would
    only dilute the token-mean loss. ``multiple``: the kept count is rounded up to a multiple of it
    (the actor's data-parallel size) by keeping back the dropped groups of largest spread; nothing is
    kept when no group has a spread (the step then skips the actor update)."""
    std = _grouped(rewards, n).std(dim=1) if n > 1 else torch.zeros(rewards.numel())
    keep = std > min_std
    k = int(keep.sum())
    short = (-k) % multiple if k else 0
    if short:
        dropped = torch.nonzero(~keep).flatten()
        order = dropped[torch.argsort(std[dropped], descending=True, stable=True)]
        keep[order[:short]] = True
    return keep
