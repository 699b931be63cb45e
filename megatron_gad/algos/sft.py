"""Supervised loss on teacher tokens (SFT warmup of the generator)."""

from torch import Tensor

from .utils import agg_loss


def sft_loss(log_probs: Tensor, mask: Tensor, loss_agg_mode: str = "token-mean", denominator: float | None = None,
             horizon: float | None = None) -> tuple[Tensor, dict]:
    """Negative log-likelihood of the teacher tokens; log_probs, mask: [B, T]. ``denominator``/
    ``horizon``: see ``agg_loss``."""
    loss = agg_loss(-log_probs, mask, loss_agg_mode, denominator, horizon)
    return loss, {"sft_loss": loss.detach()}
