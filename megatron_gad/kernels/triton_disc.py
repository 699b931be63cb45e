"""Triton kernels for the fused discriminator head + Bradley-Terry loss.

Import this module only after deciding to use Triton (see disc_loss.resolve_impl): on CPU
Triton runs only when TRITON_INTERPRET=1 was set before `import triton`.

Layout: teacher i owns student rows i*n .. i*n+n-1, so one program per teacher row sees
its whole group -> the teacher gradient (a sum over n students) needs no atomics, and
dL/dweight is written as per-teacher partial rows [N, H] summed afterwards in torch.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _bt_pair_terms(t, s, mask_n, inv_pairs, reg_scale):
    # t: scalar teacher score, s: [BLOCK_N] its student scores (fp32)
    d = t - s
    e = tl.exp(-tl.abs(d))
    loss = tl.maximum(-d, 0.0) + tl.log(1.0 + e)  # softplus(-d) = -logsigmoid(d), stable
    sig_neg = tl.where(d >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-d)
    g = tl.where(mask_n, -sig_neg * inv_pairs, 0.0)  # dL/dd per pair
    loss = tl.where(mask_n, loss, 0.0)
    cs = -g + reg_scale * s  # dL/ds
    ct = tl.sum(g, axis=0) + reg_scale * t  # dL/dt (sum over the group)
    return loss, cs, ct


@triton.jit
def _bt_fwd_kernel(
    ht_ptr, hs_ptr, w_ptr, b_ptr,
    t_out, s_out, loss_out, cs_out, ct_out,
    H, n, stride_t, stride_s, inv_pairs, reg_scale,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0)  # teacher row
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    rows = i * n + offs_n
    acc_t = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        ht = tl.load(ht_ptr + i * stride_t + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        hs = tl.load(
            hs_ptr + rows[:, None] * stride_s + offs_h[None, :],
            mask=mask_n[:, None] & mask_h[None, :], other=0.0,
        ).to(tl.float32)
        acc_t += ht * w
        acc_s += hs * w[None, :]
    t = tl.sum(acc_t, axis=0)
    s = tl.sum(acc_s, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        b = tl.load(b_ptr).to(tl.float32)
        t += b
        s += b
    loss, cs, ct = _bt_pair_terms(t, s, mask_n, inv_pairs, reg_scale)
    tl.store(t_out + i, t)
    tl.store(ct_out + i, ct)
    tl.store(s_out + rows, s, mask=mask_n)
    tl.store(loss_out + rows, loss, mask=mask_n)
    tl.store(cs_out + rows, cs, mask=mask_n)


@triton.jit
def _bt_bwd_kernel(
    ht_ptr, hs_ptr, w_ptr, ct_ptr, cs_ptr,
    dht_ptr, dhs_ptr, dw_part_ptr,
    H, n, stride_t, stride_s,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # ct, cs already multiplied by the upstream grad: dL/dh = c * w, dL/dw = sum c * h
    i = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    rows = i * n + offs_n
    m2 = mask_n[:, None] & mask_h[None, :]
    w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    ct = tl.load(ct_ptr + i)
    cs = tl.load(cs_ptr + rows, mask=mask_n, other=0.0)  # [BLOCK_N]
    ht = tl.load(ht_ptr + i * stride_t + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    hs = tl.load(hs_ptr + rows[:, None] * stride_s + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(dht_ptr + i * H + offs_h, (ct * w).to(dht_ptr.dtype.element_ty), mask=mask_h)
    dhs = cs[:, None] * w[None, :]
    tl.store(dhs_ptr + rows[:, None] * H + offs_h[None, :], dhs.to(dhs_ptr.dtype.element_ty), mask=m2)
    dw = ct * ht + tl.sum(cs[:, None] * hs, axis=0)
    tl.store(dw_part_ptr + i * H + offs_h, dw, mask=mask_h)


@triton.jit
def _bt_scores_kernel(
    t_ptr, s_ptr, loss_out, cs_out, ct_out, n, inv_pairs, reg_scale, BLOCK_N: tl.constexpr
):
    # loss from precomputed scores (the TE path computes the head GEMM itself)
    i = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    rows = i * n + offs_n
    t = tl.load(t_ptr + i).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    loss, cs, ct = _bt_pair_terms(t, s, mask_n, inv_pairs, reg_scale)
    tl.store(loss_out + rows, loss, mask=mask_n)
    tl.store(cs_out + rows, cs, mask=mask_n)
    tl.store(ct_out + i, ct)


def _scales(N: int, n: int, coef: float) -> tuple[float, float]:
    # loss = sum(pair loss) / (N n) + coef * mean(scores^2) over N + N n scores
    return 1.0 / (N * n), 2.0 * coef / (N + N * n)


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(H), 256)


class TritonDiscBT(torch.autograd.Function):
    """(h_teacher [N,H], h_student [N*n,H], weight [1,H], bias [1]|None) -> loss, t [N], s [N*n]."""

    @staticmethod
    def forward(ctx, h_t, h_s, weight, bias, n, coef):
        h_t, h_s = h_t.contiguous(), h_s.contiguous()
        w = weight.reshape(-1).contiguous()
        N, H = h_t.shape
        inv_pairs, reg_scale = _scales(N, n, coef)
        f32 = dict(dtype=torch.float32, device=h_t.device)
        t, ct = torch.empty(N, **f32), torch.empty(N, **f32)
        s, loss_p, cs = (torch.empty(N * n, **f32) for _ in range(3))
        BLOCK_N = triton.next_power_of_2(n)
        _bt_fwd_kernel[(N,)](
            h_t, h_s, w, bias if bias is not None else w,
            t, s, loss_p, cs, ct,
            H, n, h_t.stride(0), h_s.stride(0), inv_pairs, reg_scale,
            HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_H=_block_h(H),
        )
        bt = loss_p.sum() * inv_pairs
        loss = bt + coef * (t.square().sum() + s.square().sum()) / (N + N * n) if coef else bt
        ctx.save_for_backward(h_t, h_s, w, ct, cs)
        ctx.meta = (n, bias is not None, weight.shape, weight.dtype)
        ctx.mark_non_differentiable(t, s)
        return loss, t, s

    @staticmethod
    def backward(ctx, grad_loss, _gt, _gs):
        h_t, h_s, w, ct, cs = ctx.saved_tensors
        n, has_bias, w_shape, w_dtype = ctx.meta
        N, H = h_t.shape
        ct, cs = ct * grad_loss, cs * grad_loss
        dht, dhs = torch.empty_like(h_t), torch.empty_like(h_s)
        dw_part = torch.empty(N, H, dtype=torch.float32, device=h_t.device)
        BLOCK_H = _block_h(H)
        _bt_bwd_kernel[(N, triton.cdiv(H, BLOCK_H))](
            h_t, h_s, w, ct, cs, dht, dhs, dw_part,
            H, n, h_t.stride(0), h_s.stride(0),
            BLOCK_N=triton.next_power_of_2(n), BLOCK_H=BLOCK_H,
        )
        dw = dw_part.sum(0).to(w_dtype).view(w_shape)
        db = (ct.sum() + cs.sum()).view(1).to(w_dtype) if has_bias else None
        return dht, dhs, dw, db, None, None


class TritonBTFromScores(torch.autograd.Function):
    """Bradley-Terry loss on given scores (t [N], s [N*n]) -> scalar loss."""

    @staticmethod
    def forward(ctx, t, s, n, coef):
        N = t.numel()
        inv_pairs, reg_scale = _scales(N, n, coef)
        tf, sf = t.float().contiguous(), s.float().contiguous()
        loss_p, cs, ct = torch.empty_like(sf), torch.empty_like(sf), torch.empty_like(tf)
        _bt_scores_kernel[(N,)](tf, sf, loss_p, cs, ct, n, inv_pairs, reg_scale, BLOCK_N=triton.next_power_of_2(n))
        bt = loss_p.sum() * inv_pairs
        loss = bt + coef * (tf.square().sum() + sf.square().sum()) / (N + N * n) if coef else bt
        ctx.save_for_backward(ct, cs)
        ctx.dtypes = (t.dtype, s.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ct, cs = ctx.saved_tensors
        return (ct * grad_loss).to(ctx.dtypes[0]), (cs * grad_loss).to(ctx.dtypes[1]), None, None
