"""Transformer Engine discriminator head (GPU only, import-guarded): optional, never selected.

Training does not use it: `critic.fused_loss=te` is refused by config validation and
`resolve_impl("auto")` never picks it, because the critic's ValueHead is a plain weight and no
GPU measurement shows this head beating the fused Triton kernel (`triton_disc.py`). It is kept
only as a measured alternative for a GPU check that passes a `TEDiscHead` explicitly
(`disc_head_bt_loss(..., weight=head)`); delete it if such a measurement shows it loses.

TE modules own their weights, so the TE path is a module: `TEDiscHead` holds a TE
Linear (or LayerNormLinear when given pre-norm hidden states) whose real head is row 0.
out_features is padded 1 -> 16 because TE's FP8 GEMMs need both GEMM dims divisible by
16; rows 1..15 stay zero (their gradient is masked). Input rows are padded likewise.
The Bradley-Terry loss on the resulting scores is `algos.discriminator_loss` (O(rows), torch).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

_PAD = 16  # FP8 GEMM alignment


def import_te():
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:  # ImportError, or a CUDA/library load error
        raise RuntimeError(
            "impl='te' needs Transformer Engine (pip install 'megatron-gad[gpu]') on a CUDA machine: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return te


class TEDiscHead(nn.Module):
    """Scalar head hidden -> 1 on TE GEMMs; forward(h [M, H]) -> scores [M] (fp32)."""

    def __init__(self, hidden_size: int, bias: bool = True, prenorm: bool = False,
                 normalization: str = "RMSNorm", eps: float = 1e-5, params_dtype=torch.float32):
        super().__init__()
        te = import_te()
        if prenorm:  # fuse the final norm with the head: only gathered rows are normalised
            self.proj = te.LayerNormLinear(hidden_size, _PAD, bias=bias, eps=eps,
                                           normalization=normalization, params_dtype=params_dtype)
        else:
            self.proj = te.Linear(hidden_size, _PAD, bias=bias, params_dtype=params_dtype)
        with torch.no_grad():
            self.proj.weight[1:].zero_()
            if bias:
                self.proj.bias.zero_()
        row_mask = torch.zeros(_PAD, 1, device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        row_mask[0] = 1
        self.register_buffer("_row_mask", row_mask, persistent=False)
        # padding rows must stay exactly zero: drop their gradient
        self.proj.weight.register_hook(lambda g: g * self._row_mask)
        if bias:
            self.proj.bias.register_hook(lambda g: g * self._row_mask.view(-1))

    @property
    def weight(self) -> Tensor:  # the real [1, H] head, e.g. for checkpoint conversion
        return self.proj.weight[:1]

    def forward(self, h: Tensor) -> Tensor:
        M = h.shape[0]
        pad = (-M) % _PAD
        if pad:
            h = F.pad(h, (0, 0, 0, pad))
        return self.proj(h)[:M, 0].float()


def te_disc_head_bt_loss(h_teacher: Tensor, h_student: Tensor, head: TEDiscHead, n: int,
                         score_reg_coef: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """-> loss, teacher_scores [N], student_scores [N*n] (scores still attached)."""
    from megatron_gad.algos import discriminator_loss

    N = h_teacher.shape[0]
    scores = head(torch.cat([h_teacher, h_student], dim=0))  # one GEMM for both sides
    t, s = scores[:N], scores[N:]
    loss, _ = discriminator_loss(s, t, n, score_reg_coef)
    return loss, t, s
