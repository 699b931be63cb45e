"""Masked reductions shared by the losses (pure torch)."""

from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    # clamp: an all-masked batch gives 0, not NaN
    mask = mask.to(x.dtype)
    denom = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1.0)


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar (verl's three modes).

    token-mean:          sum over all valid tokens / number of valid tokens
    seq-mean-token-sum:  mean over sequences of each sequence's token sum
    seq-mean-token-mean: mean over sequences of each sequence's token mean
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-sum":
        return masked_sum(loss_mat, mask, dim=-1).mean()
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_mat, mask, dim=-1).mean()
    raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {', '.join(AGG_MODES)}")
