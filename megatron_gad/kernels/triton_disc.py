"""Triton kernels: the critic's value head + Bradley-Terry loss, fused, read straight from packed
hidden states.

Import this module only after deciding to use Triton (see disc_loss.resolve_impl): on CPU Triton
runs only when TRITON_INTERPRET=1 was set before `import triton`.

Inputs are the backbone's packed (THD) output ``hidden [T, H]`` (bf16 or fp32) and ``rows [k + P]``,
the packed index of each sequence's last token: the micro-batch's k teachers first, then its P
student samples; student j is paired with teacher ``teacher_of[j]`` (ragged: a micro-batch may
hold parts of groups split by the token budget). The wrapper turns ``teacher_of`` into a CSR
layout (``perm``: students sorted by teacher, ``start [k + 1]``: each teacher's slice of ``perm``)
so that

* forward, one program per teacher: its score, then its students' scores block by block, the pair
  losses and dL/dscore for every row. A teacher's gradient sums over its own students only, so one
  program owns it: no atomics, no second pass. Each gathered row is read once.
* backward, one program per (teacher, H block): dh = dL/dscore * w for its rows (written only at
  the gathered rows of a zero [T, H], which the backbone needs anyway), and a partial dL/dw over
  its rows. The partials [k, H] and [k] are summed in a fixed order afterwards, so dw and db are
  bit-identical run to run (no atomics).

Everything accumulates in fp32; dh is cast to hidden's dtype, dw/db to the head's.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _row_scores(h_ptr, rows, mask_r, w_ptr, H, stride_h, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # [BLOCK_R] fp32 dot products hidden[rows] . w, the H dimension in BLOCK_H slices
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        x = tl.load(h_ptr + rows[:, None] * stride_h + offs_h[None, :],
                    mask=mask_r[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _fused_fwd_kernel(
    h_ptr, rows_ptr, perm_ptr, start_ptr, w_ptr, b_ptr,
    t_out, s_out, ct_out, cs_out, part_out,
    H, stride_h, num_teachers, inv_pairs, reg_w,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # loss = inv_pairs * sum_pairs softplus(s - t) + reg_w * (sum t^2 + sum s^2), reg_w = coef / (k + P)
    i = tl.program_id(0)
    row_t = tl.load(rows_ptr + i)
    acc_t = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        acc_t += tl.load(h_ptr + row_t * stride_h + offs_h, mask=mask_h, other=0.0).to(tl.float32) * w
    t = tl.sum(acc_t, axis=0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr).to(tl.float32)
    t += bias
    p0 = tl.load(start_ptr + i)
    p1 = tl.load(start_ptr + i + 1)
    bt_sum = t * 0.0
    sq_sum = t * t
    g_sum = t * 0.0
    for q0 in range(p0, p1, BLOCK_N):
        q = q0 + tl.arange(0, BLOCK_N)
        mask_q = q < p1
        j = tl.load(perm_ptr + q, mask=mask_q, other=0)  # student index (into s_out / cs_out)
        rows = tl.load(rows_ptr + num_teachers + j, mask=mask_q, other=0)
        s = _row_scores(h_ptr, rows, mask_q, w_ptr, H, stride_h, BLOCK_N, BLOCK_H) + bias
        d = t - s
        e = tl.exp(-tl.abs(d))
        pair_loss = tl.maximum(-d, 0.0) + tl.log(1.0 + e)  # softplus(-d) = -logsigmoid(d), stable
        sig_neg = tl.where(d >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-d)
        g = tl.where(mask_q, -sig_neg * inv_pairs, 0.0)  # dL/dd of each pair
        tl.store(s_out + j, s, mask=mask_q)
        tl.store(cs_out + j, -g + 2.0 * reg_w * s, mask=mask_q)
        bt_sum += tl.sum(tl.where(mask_q, pair_loss, 0.0), axis=0)
        sq_sum += tl.sum(tl.where(mask_q, s * s, 0.0), axis=0)
        g_sum += tl.sum(g, axis=0)
    tl.store(t_out + i, t)
    tl.store(ct_out + i, g_sum + 2.0 * reg_w * t)
    tl.store(part_out + i, bt_sum * inv_pairs + reg_w * sq_sum)


@triton.jit
def _fused_bwd_kernel(
    h_ptr, rows_ptr, perm_ptr, start_ptr, w_ptr, ct_ptr, cs_ptr, gout_ptr,
    dh_ptr, dw_part_ptr, db_part_ptr,
    H, stride_h, stride_dh, num_teachers,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # dL/dh_row = c_row * w and dL/dw = sum_rows c_row * h_row, c = dL/dscore * upstream grad
    i = tl.program_id(0)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    gout = tl.load(gout_ptr).to(tl.float32)
    row_t = tl.load(rows_ptr + i)
    ct = tl.load(ct_ptr + i) * gout
    x = tl.load(h_ptr + row_t * stride_h + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    tl.store(dh_ptr + row_t * stride_dh + offs_h, (ct * w).to(dh_ptr.dtype.element_ty), mask=mask_h)
    dw = ct * x
    db = ct
    p0 = tl.load(start_ptr + i)
    p1 = tl.load(start_ptr + i + 1)
    for q0 in range(p0, p1, BLOCK_N):
        q = q0 + tl.arange(0, BLOCK_N)
        mask_q = q < p1
        j = tl.load(perm_ptr + q, mask=mask_q, other=0)
        rows = tl.load(rows_ptr + num_teachers + j, mask=mask_q, other=0)
        cs = tl.load(cs_ptr + j, mask=mask_q, other=0.0) * gout  # 0 for masked lanes
        m2 = mask_q[:, None] & mask_h[None, :]
        xs = tl.load(h_ptr + rows[:, None] * stride_h + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(dh_ptr + rows[:, None] * stride_dh + offs_h[None, :],
                 (cs[:, None] * w[None, :]).to(dh_ptr.dtype.element_ty), mask=m2)
        dw += tl.sum(cs[:, None] * xs, axis=0)
        db += tl.sum(cs, axis=0)
    tl.store(dw_part_ptr + i * H + offs_h, dw, mask=mask_h)
    if hb == 0:
        tl.store(db_part_ptr + i, db)


BLOCK_N = 16  # students per step: a [16, BLOCK_H] fp32 tile stays in registers


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(H), 128)


def pair_layout(teacher_of: torch.Tensor, num_teachers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher_of [P] -> (perm [P]: student indices grouped by teacher, start [k + 1]: teacher i's
    students are perm[start[i]:start[i+1]]). Device ops only (no host sync)."""
    teacher_of = teacher_of.long()
    perm = torch.argsort(teacher_of, stable=True)  # the identity for pair_micro_batch's layout
    start = torch.searchsorted(teacher_of[perm], torch.arange(num_teachers + 1, device=teacher_of.device))
    return perm, start


class FusedDiscBT(torch.autograd.Function):
    """(hidden [..., T, H], weight [1, H] | [H], bias [1] | None, rows [k + P], teacher_of [P], k, coef)
    -> loss (0-d fp32), teacher scores [k], student scores [P] (fp32, not differentiable).

    ``rows`` must be distinct (each sequence's own last token): the backward writes, not adds."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, teacher_of, num_teachers, coef):
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        w = weight.reshape(-1).contiguous()
        rows = rows.to(h2.device, torch.long).contiguous()
        k, P = num_teachers, rows.numel() - num_teachers
        assert P >= 1 and teacher_of.numel() == P, f"{rows.numel()} rows, {k} teachers, {teacher_of.numel()} pairs"
        perm, start = pair_layout(teacher_of.to(h2.device), k)
        f32 = dict(dtype=torch.float32, device=h2.device)
        t, ct, part = (torch.empty(k, **f32) for _ in range(3))
        s, cs = torch.empty(P, **f32), torch.empty(P, **f32)
        inv_pairs, reg_w = 1.0 / P, float(coef) / (k + P)
        _fused_fwd_kernel[(k,)](
            h2, rows, perm, start, w, bias if bias is not None else w,
            t, s, ct, cs, part,
            H, h2.stride(0), k, inv_pairs, reg_w,
            HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_H=_block_h(H),
        )
        ctx.save_for_backward(h2, rows, perm, start, w, ct, cs)
        ctx.meta = (k, hidden.shape, weight.shape, weight.dtype, bias is not None)
        ctx.mark_non_differentiable(t, s)
        return part.sum(), t, s  # fixed-order sum of the k per-teacher partials

    @staticmethod
    def backward(ctx, grad_loss, _grad_t, _grad_s):
        h2, rows, perm, start, w, ct, cs = ctx.saved_tensors
        k, hidden_shape, w_shape, w_dtype, has_bias = ctx.meta
        T, H = h2.shape
        dh = torch.zeros(T, H, dtype=h2.dtype, device=h2.device)
        dw_part = torch.empty(k, H, dtype=torch.float32, device=h2.device)
        db_part = torch.empty(k, dtype=torch.float32, device=h2.device)
        BLOCK_H = _block_h(H)
        _fused_bwd_kernel[(k, triton.cdiv(H, BLOCK_H))](
            h2, rows, perm, start, w, ct, cs, grad_loss.float().contiguous(),
            dh, dw_part, db_part,
            H, h2.stride(0), dh.stride(0), k,
            BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H,
        )
        dw = dw_part.sum(0).to(w_dtype).view(w_shape)
        db = db_part.sum().view(1).to(w_dtype) if has_bias else None
        return dh.view(hidden_shape), dw, db, None, None, None, None
