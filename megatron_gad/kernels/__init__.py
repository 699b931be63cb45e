"""Numerical kernels. Importing this package never imports triton or transformer_engine."""

from .disc_loss import disc_bt_loss_packed, disc_head_bt_loss, disc_head_scores, gather_last_hidden, resolve_impl
from .logprob import vocab_parallel_logprob

__all__ = [
    "disc_bt_loss_packed",
    "disc_head_bt_loss",
    "disc_head_scores",
    "gather_last_hidden",
    "resolve_impl",
    "vocab_parallel_logprob",
]
