"""Training-inference mismatch: how far the rollout engine's log-probs are from the actor's, and
truncated importance-sampling (TIS) weights that correct the policy gradient for it (as verl's
``rollout_is``). Pure torch.

The rollout engine (vLLM, or the native sampler's KV-cache path) samples from pi_rollout; the PPO
ratio is taken against pi_old, the actor's own recomputation. Where the two differ (kernels, bf16,
fused ops), the samples are slightly off-policy: the weight ``pi_old / pi_rollout``, truncated from
above at ``threshold`` to bound the variance, re-weights each token's (``token``) or each sequence's
(``sequence``: the product over its tokens) policy-gradient term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import masked_mean


def logprob_mismatch(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor) -> dict[str, float]:
    """``rollout/logprob_diff_max`` / ``_mean``: |log pi_old - log pi_rollout| over valid tokens."""
    m = mask.bool()
    if not bool(m.any()):
        return {"rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_mean": 0.0}
    diff = (old_log_prob.double() - rollout_log_prob.double()).abs()[m]
    return {"rollout/logprob_diff_max": float(diff.max()), "rollout/logprob_diff_mean": float(diff.mean())}


def rollout_is_weights(old_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor, level: str,
                       threshold: float) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance weights [B, R] (0 at padding) and their metrics."""
    if level not in ("token", "sequence"):
        raise ValueError(f"rollout_is level must be 'token' or 'sequence', got {level!r}")
    maskf = mask.to(old_log_prob.dtype)
    log_ratio = (old_log_prob - rollout_log_prob) * maskf
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(old_log_prob)
    # clamp before exp: a far-off-policy sequence must give the threshold, not inf
    raw = torch.exp(log_ratio.clamp(max=20.0))
    weights = raw.clamp(max=threshold) * maskf
    metrics = {"rollout_is/mean": float(masked_mean(weights, mask)),
               "rollout_is/max": float(raw[mask.bool()].max()) if bool(mask.any()) else 0.0,
               "rollout_is/truncated_frac": float(masked_mean((raw > threshold).to(maskf.dtype), mask))}
    return weights.detach(), metrics
