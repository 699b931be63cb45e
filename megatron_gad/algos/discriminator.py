"""Bradley-Terry discriminator loss for GAD (pure torch, on scores)."""

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss(
    student_scores: Tensor, teacher_scores: Tensor, n: int, score_reg_coef: float = 0.0, **controls
) -> tuple[Tensor, dict]:
    """-logsigmoid(D(teacher) - D(student)), averaged over the N*n pairs.

    student_scores: [N*n], samples i*n .. i*n+n-1 belong to prompt i
    teacher_scores: [N], one teacher response per prompt
    score_reg_coef: optional coef * mean(s^2) over all N + N*n scores, keeps scores
        from drifting (BT is shift-invariant); 0 = off.
    """
    assert student_scores.dim() == 1 and teacher_scores.dim() == 1, "scores must be 1-D"
    assert student_scores.numel() == teacher_scores.numel() * n, (
        f"expected {teacher_scores.numel()} * {n} student scores, got {student_scores.numel()}"
    )
    teacher_of = torch.arange(teacher_scores.numel(), device=teacher_scores.device).repeat_interleave(n)
    return discriminator_loss_paired(student_scores, teacher_scores, teacher_of, score_reg_coef, **controls)


def pair_loss(diff: Tensor, temperature: float = 1.0, label_smoothing: float = 0.0, margin: float = 0.0,
              loss_type: str = "bt", swap: Tensor | None = None) -> Tensor:
    """Per-pair loss of the score gap ``diff`` = D(teacher) - D(student), the saturation controls
    included (all off by default, which is plain Bradley-Terry ``-logsigmoid(diff)``):

    * ``swap`` [pairs] bool: teacher and student exchanged, label flipped (augmentation): the pair's
      gap enters as ``-diff``, so D is asked to rank the "teacher" (really the student) first;
    * ``margin`` m: the gap must exceed m (``diff - m``);
    * ``temperature`` tau: ``(diff - m) / tau`` (tau > 1 softens a saturated D's gradients' collapse);
    * ``loss_type``: ``bt`` = ``-logsigmoid(z)``, with ``label_smoothing`` eps =
      ``-(1-eps) logsigmoid(z) - eps logsigmoid(-z)`` (the target probability is 1-eps, not 1);
      ``hinge`` = ``relu(1 - z)`` (no gradient once a pair is separated by the margin).
    """
    if loss_type not in ("bt", "hinge"):
        raise ValueError(f"pair_loss takes loss_type 'bt' or 'hinge' (bce scores each side: bce_pair_loss), "
                         f"got {loss_type!r}")
    d = torch.where(swap, -diff, diff) if swap is not None else diff
    z = (d - margin) / temperature
    if loss_type == "hinge":
        return F.relu(1.0 - z)
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def bce_pair_loss(teacher: Tensor, student: Tensor, temperature: float = 1.0, label_smoothing: float = 0.0,
                  swap: Tensor | None = None) -> Tensor:
    """The paper's binary cross-entropy ablation, per pair: D is a classifier on each sequence alone,
    ``-log s(t) - log(1 - s(s))`` = ``softplus(-t) + softplus(s)`` with ``t``, ``s`` the teacher's and
    the student's scores over ``temperature``. Averaged over pairs it is the usual GAN loss
    E_teacher[-log s(D)] + E_student[-log(1 - s(D))] (every teacher is in n pairs, every student in one).
    ``label_smoothing`` eps: targets 1-eps / eps; ``swap``: the pair's sides exchanged (labels flipped)."""
    t, s = teacher / temperature, student / temperature
    if swap is not None:
        t, s = torch.where(swap, s, t), torch.where(swap, t, s)
    loss = F.softplus(-t) + F.softplus(s)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (F.softplus(t) + F.softplus(-s))
    return loss


def discriminator_loss_paired(
    student_scores: Tensor, teacher_scores: Tensor, teacher_of: Tensor, score_reg_coef: float = 0.0,
    **controls,
) -> tuple[Tensor, dict]:
    """`discriminator_loss` with any pairing: student j is paired with teacher ``teacher_of[j]``.

    A critic micro-batch may hold parts of groups split by the token budget, so its teachers have
    different numbers of students. Every scored sequence counts once in the regulariser and in
    ``teacher_value_mean`` (a teacher is not repeated per pair), which is `discriminator_loss`'s
    definition when every teacher has n students. ``controls``: see :func:`pair_loss`; ``d_loss``
    is the loss with them, ``d_acc`` always the plain share of pairs ranked teacher-first.
    """
    assert student_scores.dim() == 1 and teacher_scores.dim() == 1, "scores must be 1-D"
    assert teacher_of.shape == student_scores.shape, (
        f"teacher_of {tuple(teacher_of.shape)} vs student scores {tuple(student_scores.shape)}"
    )
    # at least fp32 (bf16 scores), float64 kept for gradient checks
    dtype = torch.promote_types(student_scores.dtype, torch.float32)
    s, t0 = student_scores.to(dtype), teacher_scores.to(dtype)
    t = t0.index_select(0, teacher_of.to(t0.device).long())  # [pairs], paired with s
    diff = t - s
    if controls.get("loss_type") == "bce":  # each side scored alone (margin is refused by validation)
        c = {k: v for k, v in controls.items() if k in ("temperature", "label_smoothing", "swap")}
        bt_loss = bce_pair_loss(t, s, **c).mean()
    else:
        bt_loss = pair_loss(diff, **controls).mean()
    score_reg = score_reg_coef * torch.cat([t0, s]).pow(2).mean()
    loss = bt_loss + score_reg if score_reg_coef else bt_loss
    with torch.no_grad():
        metrics = {
            "d_loss": bt_loss.detach(),
            # exact ties count half: a blind (e.g. zero-initialised) head reports 0.5, not 0
            "d_acc": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(),
            "student_value_mean": s.mean(),
            "teacher_value_mean": t0.mean(),
            "score_gap": t0.mean() - s.mean(),
            "score_reg": score_reg.detach(),
            "score_diff_mean": diff.mean(),
            "teacher_value_std": t0.std(unbiased=False),
            "student_value_std": s.std(unbiased=False),
            "overlap": (s > t0.mean()).float().mean(),  # students scored above the mean teacher
        }
    return loss, metrics


def r1_penalty(teacher_scores: Tensor, embeddings: Tensor, coef: float, denominator: float) -> Tensor:
    """R1 gradient penalty (Mescheder et al. 2018) on the discriminator's input embeddings: coef / 2 x
    the squared norm of d(sum of teacher scores) / d(embeddings), summed over every token, over
    ``denominator`` (the teachers it averages over). Scored sequences do not attend across each other
    (packed), so each teacher's gradient lives on its own tokens and the sum is the sum of per-teacher
    squared norms. ``create_graph``: the penalty's own gradient reaches D's weights (double backward)."""
    (grad,) = torch.autograd.grad(teacher_scores.sum(), embeddings, create_graph=True)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))  # >= fp32 (bf16 embeddings), fp64 kept
    return 0.5 * coef * grad.pow(2).sum() / max(float(denominator), 1.0)
