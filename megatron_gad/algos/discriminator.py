"""Bradley-Terry discriminator loss for GAD (pure torch, on scores)."""

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss(
    student_scores: Tensor, teacher_scores: Tensor, n: int, score_reg_coef: float = 0.0
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
    return discriminator_loss_paired(student_scores, teacher_scores, teacher_of, score_reg_coef)


def discriminator_loss_paired(
    student_scores: Tensor, teacher_scores: Tensor, teacher_of: Tensor, score_reg_coef: float = 0.0
) -> tuple[Tensor, dict]:
    """`discriminator_loss` with any pairing: student j is paired with teacher ``teacher_of[j]``.

    A critic micro-batch may hold parts of groups split by the token budget, so its teachers have
    different numbers of students. Every scored sequence counts once in the regulariser and in
    ``teacher_value_mean`` (a teacher is not repeated per pair), which is `discriminator_loss`'s
    definition when every teacher has n students.
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
    bt_loss = -F.logsigmoid(diff).mean()
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
        }
    return loss, metrics
