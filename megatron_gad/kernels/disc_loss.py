"""Fused discriminator head + Bradley-Terry loss on the last pipeline stage.

The scalar head is applied only to the gathered last-token rows ([B, H]), never to all
S*B tokens; the loss has `megatron_gad.algos.discriminator_loss` semantics. Three
implementations: "torch" (autograd reference and fallback), "triton" (fused kernels),
"te" (Transformer Engine head module + Triton loss, GPU only).
"""

import importlib.util
import logging
import os

import torch
from torch import Tensor

from megatron_gad.algos import discriminator_loss

logger = logging.getLogger("megatron_gad")
_IMPLS = ("auto", "torch", "triton", "te")
_logged: set = set()


def _has_module(name: str) -> bool:
    # find_spec does not import: importing triton before TRITON_INTERPRET is set would stick
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _te_available() -> bool:
    return torch.cuda.is_available() and _has_module("transformer_engine")


def _triton_available() -> bool:
    return _has_module("triton") and (torch.cuda.is_available() or _triton_interpret())


def _log_once(msg: str):
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def resolve_impl(requested: str = "auto") -> str:
    """auto -> te (TE + CUDA) > triton (CUDA or TRITON_INTERPRET=1) > torch."""
    if requested not in _IMPLS:
        raise ValueError(f"unknown disc loss impl {requested!r}; known: {', '.join(_IMPLS)}")
    if requested == "torch":
        return "torch"
    if requested == "te":
        if not _te_available():
            raise RuntimeError("impl='te' needs a CUDA GPU and transformer_engine "
                               f"(cuda={torch.cuda.is_available()}, te={_has_module('transformer_engine')})")
        return "te"
    if requested == "triton":
        if not _triton_available():
            raise RuntimeError("impl='triton' needs the triton package and a CUDA GPU, or TRITON_INTERPRET=1 "
                               f"set before triton is imported (triton={_has_module('triton')}, "
                               f"cuda={torch.cuda.is_available()})")
        return "triton"
    if _te_available():
        return "te"
    if _triton_available():
        if torch.cuda.is_available():
            _log_once("disc loss: Transformer Engine not available, using the Triton kernel")
        return "triton"
    _log_once("disc loss: no CUDA Triton/TE available, using the torch implementation")
    return "torch"


class _GatherLast(torch.autograd.Function):
    # Backward writes B rows into a zero [S, B, H] (one row per column: no accumulation,
    # unlike advanced indexing's accumulate path). The dense zero grad is what the backbone needs.
    @staticmethod
    def forward(ctx, hidden, last_index):
        cols = torch.arange(hidden.shape[1], device=hidden.device)
        ctx.save_for_backward(last_index, cols)
        ctx.shape = hidden.shape
        return hidden[last_index, cols]

    @staticmethod
    def backward(ctx, grad_rows):
        last_index, cols = ctx.saved_tensors
        grad = grad_rows.new_zeros(ctx.shape)
        grad[last_index, cols] = grad_rows
        return grad, None


def gather_last_hidden(hidden: Tensor, last_index: Tensor) -> Tensor:
    """hidden [S, B, H] (sequence-first), last_index [B] -> [B, H] rows at each last valid token.

    The caller gives the index, so left and right padding both work.
    """
    _S, B, _H = hidden.shape
    assert last_index.shape == (B,), f"last_index {tuple(last_index.shape)} vs batch {B}"
    return _GatherLast.apply(hidden, last_index.long())


def disc_head_scores(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Scores of gathered rows: h [M, H] @ weight[1, H]^T + bias -> [M] (>= fp32; for rewards)."""
    if not isinstance(weight, Tensor):  # a TEDiscHead
        return weight(h)
    dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 scores from bf16 hidden
    s = h.to(dtype) @ weight.to(dtype).reshape(-1)
    return s + bias.to(dtype) if bias is not None else s


def disc_head_bt_loss(
    h_teacher: Tensor,
    h_student: Tensor,
    weight,
    bias: Tensor | None,
    n: int,
    impl: str = "auto",
    score_reg_coef: float = 0.0,
) -> tuple[Tensor, dict, Tensor, Tensor]:
    """Head + Bradley-Terry loss on gathered rows.

    h_teacher [N, H], h_student [N*n, H] (student j of teacher i is row i*n + j)
    weight [1, H] and bias [1] | None; or, for impl="te", a `te_disc.TEDiscHead` as weight
    returns loss, metrics (0-d tensors, see algos.discriminator_loss),
            teacher_scores [N], student_scores [N*n] (detached, fp32)
    """
    N, H = h_teacher.shape
    assert h_student.shape == (N * n, H), f"h_student {tuple(h_student.shape)} != ({N}*{n}, {H})"
    requested = impl
    impl = resolve_impl(requested)
    if not isinstance(weight, Tensor):
        impl = "te"  # a TEDiscHead owns its weights: only the TE path can use it
    elif impl == "te":
        if requested == "te":
            raise RuntimeError("impl='te' needs a te_disc.TEDiscHead as `weight` (TE modules own their weights)")
        _log_once("disc loss: plain weight tensor given, using the Triton kernel instead of TE")
        impl = "triton"
    if impl == "triton" and h_teacher.device.type == "cpu" and not _triton_interpret():
        raise RuntimeError("Triton disc loss on CPU tensors needs TRITON_INTERPRET=1")

    if impl == "torch":
        t = disc_head_scores(h_teacher, weight, bias)
        s = disc_head_scores(h_student, weight, bias)
        loss, metrics = discriminator_loss(s, t, n, score_reg_coef)
        return loss, metrics, t.detach(), s.detach()

    if impl == "triton":
        from .triton_disc import TritonDiscBT

        loss, t, s = TritonDiscBT.apply(h_teacher, h_student, weight, bias, n, float(score_reg_coef))
    else:
        from .te_disc import te_disc_head_bt_loss

        loss, t, s = te_disc_head_bt_loss(h_teacher, h_student, weight, n, score_reg_coef)
        t, s = t.detach(), s.detach()
    # metrics from the (detached) scores: O(N*n), same definitions as the reference
    with torch.no_grad():
        _, metrics = discriminator_loss(s, t, n, score_reg_coef)
    return loss, metrics, t, s
