"""Masked reductions shared by the losses (pure torch)."""

from __future__ import annotations

from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    # clamp: an all-masked batch gives 0, not NaN
    mask = mask.to(x.dtype)
    denom = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1.0)


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {', '.join(AGG_MODES)}")


def agg_denominator(mask: Tensor, mode: str, horizon: float | None = None) -> float:
    """What ``mode`` divides by, counted on ``mask`` [B, T]: valid tokens (token-mean), sequences
    (seq-mean-*), or sequences x ``horizon`` (seq-mean-token-sum-norm; default: T). Summed over every
    micro-batch and data-parallel rank of a mini-batch, it is the denominator that makes the sum of
    the micro-batches' :func:`agg_loss` values equal the loss of the whole mini-batch at once."""
    _check_mode(mode)
    if mode == "token-mean":
        return float(mask.sum())
    seqs = float(mask.shape[0])
    if mode == "seq-mean-token-sum-norm":
        return seqs * float(horizon if horizon is not None else mask.shape[-1])
    return seqs


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", denominator: float | None = None,
             horizon: float | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar (verl's modes).

    token-mean:              sum over all valid tokens / number of valid tokens
    seq-mean-token-sum:      mean over sequences of each sequence's token sum
    seq-mean-token-mean:     mean over sequences of each sequence's token mean
    seq-mean-token-sum-norm: sum over sequences of each sequence's token sum / (sequences x horizon)
                             (Dr. GRPO: a constant length normaliser, ``horizon`` = the maximum
                             response length; default T)

    ``denominator`` (see :func:`agg_denominator`) replaces the count taken on this ``mask``: with the
    count of a whole mini-batch (all micro-batches, all data-parallel ranks) the result is this
    micro-batch's exact share of the mini-batch loss, so short micro-batches are not over-weighted.
    """
    _check_mode(mode)
    if mode == "token-mean":
        num = masked_sum(loss_mat, mask)
    elif mode == "seq-mean-token-mean":
        num = masked_mean(loss_mat, mask, dim=-1).sum()
    else:
        num = masked_sum(loss_mat, mask, dim=-1).sum()
    denom = denominator if denominator is not None else agg_denominator(mask, mode, horizon)
    return num / max(float(denom), 1.0)
