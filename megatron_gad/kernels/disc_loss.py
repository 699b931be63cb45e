"""The critic's value head + Bradley-Terry loss, applied only to each sequence's last token.

The scalar head never runs on all T tokens, only on the gathered last-token rows; the loss has
`megatron_gad.algos.discriminator_loss_paired` semantics. Implementations ("impl"):

* "torch": autograd reference and fallback (gather, head, loss);
* "triton": one fused forward and one backward kernel (`triton_disc.py`) that read the last-token
  rows straight from the packed hidden states; chosen by "auto" wherever Triton can run;
* "te": a Transformer Engine head module (`te_disc.py`), only when a caller passes a `TEDiscHead`
  as ``weight``. Never chosen by "auto" and refused as `critic.fused_loss` (TE_HEAD_NOT_USED).
"""

import functools
import importlib.util
import logging
import os

import torch
from torch import Tensor

from megatron_gad.algos import discriminator_loss, discriminator_loss_paired

logger = logging.getLogger("megatron_gad")
_IMPLS = ("auto", "torch", "triton", "te")
_logged: set = set()

TE_HEAD_NOT_USED = (
    "critic.fused_loss=te: the Transformer Engine value head is not used in training (no GPU measurement "
    "shows it beats the fused Triton kernel, and the critic's ValueHead is not a TE module); use "
    "critic.fused_loss=auto (the fused Triton kernel where Triton runs, else torch), triton or torch"
)


@functools.cache
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


def _device_type(device) -> str:
    if device is None:  # the device training will use
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _triton_available(device=None) -> bool:
    return _has_module("triton") and (_device_type(device) == "cuda" or _triton_interpret())


def _log_once(msg: str):
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def resolve_impl(requested: str = "auto", device=None) -> str:
    """The implementation that runs for tensors on ``device`` (None: CUDA if available, else CPU).

    auto -> triton (a CUDA tensor, or TRITON_INTERPRET=1) > torch; never "te": the TE head needs a
    `TEDiscHead` module that training does not build, so auto must not pick it. An explicit
    "triton" or "te" that cannot run raises here, before any model work.
    """
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
        if not _triton_available(device):
            raise RuntimeError("impl='triton' needs the triton package and CUDA tensors, or TRITON_INTERPRET=1 "
                               f"set before triton is imported (triton={_has_module('triton')}, "
                               f"device={_device_type(device)})")
        return "triton"
    if _triton_available(device):
        return "triton"
    _log_once("disc loss: Triton cannot run here (no CUDA device or no triton), using the torch implementation")
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
    # a row-wise product + sum, not a GEMV: a CPU GEMV computes the remainder rows of its 4-row
    # blocks another way, so two identical rows scored in one call could differ in the last bit
    # (the "same tokens, same score" guarantee asks for bitwise equality)
    s = (h.to(dtype) * weight.to(dtype).reshape(-1)).sum(-1)
    return s + bias.to(dtype) if bias is not None else s


def pooled_head_scores(hidden: Tensor, last: Tensor, lengths: Tensor, weight: Tensor,
                       bias: Tensor | None = None) -> Tensor:
    """Mean-pooled scores (``critic.score_pooling: mean``): for each sequence, the mean over its last
    ``lengths[i]`` tokens (its response; ending at packed index ``last[i]``) of ``h_t @ w``, plus the
    bias. Equal to the head applied to the mean hidden state (the head is linear), but computed on
    per-token scalars: a [M, L_max] grid of scores instead of a [M, L_max, H] one, and every row
    summed in the same order, so identical segments get bitwise-identical scores. A sequence with
    no response token (``lengths`` 0) is scored at its last token.

    hidden [T, H] or [1, T, H] (packed), last / lengths [M] -> scores [M] (>= fp32)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    last = last.to(h.device).long()
    n = lengths.to(h.device).long().clamp(min=1)
    width = int(n.max())
    offs = torch.arange(width, device=h.device)
    valid = offs[None] < n[:, None]  # [M, L_max]
    idx = (last - n + 1)[:, None] + offs[None]
    tok = disc_head_scores(h.index_select(0, idx[valid]), weight)  # [N_valid]
    s = tok.new_zeros(valid.shape).masked_scatter(valid, tok).sum(-1) / n.to(tok.dtype)
    return s + bias.to(s.dtype) if bias is not None else s


def sequence_scores(hidden: Tensor, rows: Tensor, weight: Tensor, bias: Tensor | None = None,
                    pool_len: Tensor | None = None) -> Tensor:
    """D of each packed sequence: the head at its last token (``rows``: packed index of each
    sequence's last token), or with ``pool_len`` the mean over its last ``pool_len`` tokens
    (:func:`pooled_head_scores`). hidden [T, H] or [1, T, H] -> [len(rows)] (>= fp32)."""
    if pool_len is not None:
        return pooled_head_scores(hidden, rows, pool_len, weight, bias)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))
    return disc_head_scores(h, weight, bias)


def disc_bt_loss_packed(
    hidden: Tensor,
    rows: Tensor,
    num_teachers: int,
    teacher_of: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    impl: str = "auto",
    score_reg_coef: float = 0.0,
    pool_len: Tensor | None = None,
    **controls,
) -> tuple[Tensor, dict, Tensor, Tensor]:
    """Head + Bradley-Terry loss read from packed (THD) hidden states.

    hidden [T, H] or [1, T, H] (the critic's GPTModel output); rows [k + P]: packed index of each
    sequence's last token (`engine/packing.py:last_token_indices`), the k teachers first, then the
    P students; teacher_of [P]: the teacher (0..k-1) of each student; weight [1, H], bias [1] | None.
    Returns loss, metrics (0-d tensors, see `algos.discriminator_loss_paired`), teacher scores [k]
    and student scores [P] (detached, fp32). The hidden gradient is zero except at ``rows``.
    ``controls``: the pair-loss controls of ``algos.discriminator.pair_loss`` (torch path only: the
    fused kernel computes plain Bradley-Terry, and refuses rather than silently ignore them).
    ``pool_len`` [k + P]: score each sequence by the mean over its last ``pool_len`` tokens (its
    response, :func:`pooled_head_scores`) instead of its last token (torch path only, likewise).
    """
    k = int(num_teachers)
    assert rows.dim() == 1 and teacher_of.dim() == 1 and rows.numel() == k + teacher_of.numel(), (
        f"rows {tuple(rows.shape)} must be {k} teachers + {teacher_of.numel()} students"
    )
    if impl == "te":  # the value head here is a plain weight tensor, never a TE module
        raise ValueError(TE_HEAD_NOT_USED)
    if pool_len is not None:  # the kernel reads each sequence's last token only
        if impl == "triton":
            raise ValueError("the fused Triton disc loss scores the last token only; mean pooling needs impl='torch'")
        impl = "torch"
    impl = resolve_impl(impl, hidden.device)
    if impl == "triton":
        from .triton_disc import FusedDiscBT

        plain = {"temperature": 1.0, "label_smoothing": 0.0, "margin": 0.0, "loss_type": "bt", "swap": None}
        if any(controls.get(key, v) is not v and controls.get(key, v) != v for key, v in plain.items()):
            raise ValueError(f"the fused Triton disc loss computes plain Bradley-Terry; got controls {controls}")
        loss, t, s = FusedDiscBT.apply(hidden, weight, bias, rows, teacher_of, k, float(score_reg_coef))
        with torch.no_grad():  # metrics from the scores: O(P), the reference's definitions
            _, metrics = discriminator_loss_paired(s, t, teacher_of, score_reg_coef)
        return loss, metrics, t, s
    scores = sequence_scores(hidden, rows, weight, bias, pool_len)  # both sides in one call: dw accumulates in fp32
    t, s = scores[:k], scores[k:]
    loss, metrics = discriminator_loss_paired(s, t, teacher_of, score_reg_coef, **controls)
    return loss, metrics, t.detach(), s.detach()


def disc_head_bt_loss(
    h_teacher: Tensor,
    h_student: Tensor,
    weight,
    bias: Tensor | None,
    n: int,
    impl: str = "auto",
    score_reg_coef: float = 0.0,
) -> tuple[Tensor, dict, Tensor, Tensor]:
    """Head + Bradley-Terry loss on already gathered rows (whole groups of n).

    h_teacher [N, H], h_student [N*n, H] (student j of teacher i is row i*n + j)
    weight [1, H] and bias [1] | None; or a `te_disc.TEDiscHead` as weight (then impl "te" or "auto")
    returns loss, metrics (0-d tensors, see algos.discriminator_loss),
            teacher_scores [N], student_scores [N*n] (detached, fp32)
    """
    N, H = h_teacher.shape
    assert h_student.shape == (N * n, H), f"h_student {tuple(h_student.shape)} != ({N}*{n}, {H})"
    if not isinstance(weight, Tensor):  # a TEDiscHead owns its weights: only the TE path can use it
        if impl not in ("auto", "te"):
            raise ValueError(f"impl={impl!r} needs a weight tensor, got {type(weight).__name__}")
        from .te_disc import te_disc_head_bt_loss

        resolve_impl("te")  # a clear error without CUDA + TE
        loss, t, s = te_disc_head_bt_loss(h_teacher, h_student, weight, n, score_reg_coef)
        with torch.no_grad():
            _, metrics = discriminator_loss(s, t, n, score_reg_coef)
        return loss, metrics, t.detach(), s.detach()
    if impl == "te":
        raise ValueError("impl='te' needs a te_disc.TEDiscHead as `weight` (TE modules own their weights)")
    impl = resolve_impl(impl, h_teacher.device)
    if impl == "torch":
        # cast the head once: two casts would round each side's dw to a bf16 weight's dtype before summing
        dtype = torch.promote_types(weight.dtype, torch.float32)
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        t = disc_head_scores(h_teacher, weight, bias)
        s = disc_head_scores(h_student, weight, bias)
        loss, metrics = discriminator_loss(s, t, n, score_reg_coef)
        return loss, metrics, t.detach(), s.detach()
    # the fused kernel reads rows of one tensor: stack the two sides (a copy; the critic uses
    # disc_bt_loss_packed on the backbone's output directly)
    rows = torch.arange(N + N * n, device=h_teacher.device)
    teacher_of = torch.arange(N, device=h_teacher.device).repeat_interleave(n)
    return disc_bt_loss_packed(torch.cat([h_teacher, h_student]), rows, N, teacher_of, weight, bias,
                               impl="triton", score_reg_coef=score_reg_coef)
