"""PPO-clip policy loss (with dual-clip) for the actor."""

import torch
from torch import Tensor

from .registry import Registry
from .utils import agg_loss, masked_mean

_REGISTRY = Registry("policy loss")
register_policy_loss = _REGISTRY.register
get_policy_loss = _REGISTRY.get


@register_policy_loss("ppo")
@register_policy_loss("vanilla")
def ppo_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    denominator: float | None = None,
    horizon: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clipped surrogate; all inputs [B, T]. ``denominator``/``horizon``: see ``agg_loss`` (a
    micro-batch's share of a mini-batch loss). ``is_weights`` [B, T]: truncated importance weights for
    the rollout engine's mismatch (``algos.rollout_is``), multiplied into each token's loss.

    Dual clip: for A < 0 the loss is capped at -A * clip_ratio_c, so a huge ratio on a
    bad token cannot blow up the update.
    """
    assert clip_ratio_c > 1.0, f"clip_ratio_c must be > 1, got {clip_ratio_c}"
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)  # clamp keeps exp finite
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_cap = -advantages * clip_ratio_c
    loss_dual = torch.minimum(loss_ppo, loss_cap)
    neg = advantages < 0
    pg_losses = torch.where(neg, loss_dual, loss_ppo)
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, denominator, horizon)
    with torch.no_grad():
        metrics = {
            "pg_loss": pg_loss.detach(),
            "pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
            "pg_clipfrac_lower": masked_mean(((loss_ppo > loss_cap) & neg).float(), response_mask),
        }
    return pg_loss, metrics
