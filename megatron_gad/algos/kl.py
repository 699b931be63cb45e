"""Per-token KL estimators between the actor and the reference policy."""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

_KL_KINDS = ("k1", "kl", "abs", "mse", "k2", "low_var_kl", "k3")


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs, [B, T] -> [B, T]."""
    if kind not in _KL_KINDS:
        raise ValueError(f"unknown kl penalty {kind!r}; known: {', '.join(_KL_KINDS)}")
    diff = log_prob - ref_log_prob
    if kind in ("k1", "kl"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("mse", "k2"):
        return 0.5 * diff.square()
    # k3 (Schulman): r - log r - 1 with r = ref/pi >= 0; clamps guard exp overflow
    log_r = (-diff).clamp(-20.0, 20.0)
    return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)


def get_kl_penalty(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in _KL_KINDS:
        raise ValueError(f"unknown kl penalty {name!r}; known: {', '.join(_KL_KINDS)}")
    return partial(kl_penalty, kind=name)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(x) - sum(p * x)."""
    # shift by the max so lse - E[x] does not cancel catastrophically for large logits
    logits = logits.float()
    logits = logits - logits.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse)
    # -inf logits (masked vocab) have p = 0; avoid 0 * -inf = NaN
    px = torch.where(p > 0, p * logits, torch.zeros_like(p))
    return lse.squeeze(-1) - px.sum(dim=-1)
