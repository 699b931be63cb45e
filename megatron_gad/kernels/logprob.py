"""Vocab-parallel, chunked log-prob (+ entropy) of target tokens.

Each TP rank holds logits[..., V_local] for global ids [vocab_start, vocab_start + V_local).
The full-vocabulary softmax is never materialised: per chunk of tokens we reduce
max / sum-exp / target-logit / sum(exp * logit) across ranks, keep O(T) statistics for
backward, and recompute the softmax chunk by chunk there.

Memory: forward keeps lse [T] (+ entropy [T]); extra peak is O(chunk * V_local) plus the
gradient buffer, which `inplace_backward=True` writes into the logits' own storage.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def _world(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _n_valid(v_local: int, vocab_start: int, vocab_size) -> int:
    """Local columns that are real tokens (the rest is vocab padding)."""
    if vocab_size is None:
        return v_local
    return max(0, min(v_local, vocab_size - vocab_start))


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, n_valid, chunk_size, compute_entropy, inplace_backward):
        # logits: [T, V_local], target: [T] global ids
        T, _V = logits.shape
        multi = _world(group) > 1
        lse = torch.empty(T, dtype=torch.float32, device=logits.device)
        log_prob = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if compute_entropy else None
        local_t = target - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)  # this rank holds the target column
        local_t = local_t.clamp(0, max(n_valid - 1, 0))

        for s in range(0, T, chunk_size):
            e = min(s + chunk_size, T)
            x = logits[s:e, :n_valid].float()  # [C, Vv]; padded columns never enter
            if n_valid > 0:
                m = x.amax(dim=-1)  # [C]
            else:
                m = torch.full((e - s,), float("-inf"), device=logits.device)
            if multi:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            # one SUM collective for [sum exp, target logit, sum exp * x] (all relative to max)
            stats = torch.zeros(3 if compute_entropy else 2, e - s, device=logits.device)
            if n_valid > 0:
                # in-place ops: at most two [C, Vv] temporaries per chunk
                xm = x - m[:, None]  # [C, Vv]
                tgt = x.gather(1, local_t[s:e, None]).squeeze(1)
                stats[1] = torch.where(owned[s:e], tgt, torch.zeros_like(tgt))
                ex = xm.exp() if compute_entropy else xm.exp_()
                stats[0] = ex.sum(dim=-1)
                if compute_entropy:  # sum_j ex_j * xm_j as a batched dot: no product temporary
                    stats[2] = (ex.unsqueeze(1) @ xm.unsqueeze(2)).view(-1)
                del ex, xm
            del x
            if multi:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            lse[s:e] = m + stats[0].log()
            log_prob[s:e] = stats[1] - lse[s:e]
            if compute_entropy:
                # H = lse - E_p[x] = log S - E_p[x - m]; shifting by m avoids cancellation
                entropy[s:e] = stats[0].log() - stats[2] / stats[0]

        ctx.save_for_backward(logits, target, lse, entropy if compute_entropy else lse)
        ctx.cfg = (vocab_start, n_valid, chunk_size, compute_entropy, inplace_backward)
        if compute_entropy:
            return log_prob, entropy
        empty = torch.zeros(0, device=logits.device)  # autograd.Function outputs must be tensors
        ctx.mark_non_differentiable(empty)
        return log_prob, empty

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, target, lse, entropy = ctx.saved_tensors
        vocab_start, n_valid, chunk_size, compute_entropy, inplace = ctx.cfg
        T, V = logits.shape
        # inplace: the logits buffer becomes the gradient (saves a [T, V_local] allocation)
        grad = logits if inplace else torch.empty_like(logits)
        if n_valid < V:
            grad[:, n_valid:] = 0  # padding gets no gradient
        grad_lp = grad_lp.float() if grad_lp is not None else torch.zeros_like(lse)
        use_ent = compute_entropy and grad_ent is not None
        local_t = target - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)
        local_t = local_t.clamp(0, max(n_valid - 1, 0))
        if n_valid == 0:
            return grad, None, None, None, None, None, None, None

        # no collectives: lse / entropy are already global, gradients are per shard
        for s in range(0, T, chunk_size):
            e = min(s + chunk_size, T)
            x = logits[s:e, :n_valid].float()  # [C, Vv]
            g = (x - lse[s:e, None]).exp_()  # [C, Vv] softmax p, recomputed
            if use_ent:
                # d H / dx_j = -p_j (x_j - E_p[x]),  E_p[x] = lse - H
                mean_x = (lse[s:e] - entropy[s:e])[:, None]
                ent_term = (x - mean_x).mul_(g).mul_(grad_ent[s:e, None].float())
            # d log_prob / dx = onehot(target) - p
            g.mul_(-grad_lp[s:e, None])
            if use_ent:
                g.sub_(ent_term)
                del ent_term
            rows = torch.arange(e - s, device=logits.device)
            g[rows, local_t[s:e]] += torch.where(owned[s:e], grad_lp[s:e], torch.zeros_like(grad_lp[s:e]))
            del x
            grad[s:e, :n_valid] = g.to(grad.dtype)
            del g
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprob(
    logits: Tensor,
    target: Tensor,
    tp_group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    compute_entropy: bool = False,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log p(target) (and entropy) from vocab-sharded logits, fp32 results.

    logits: [..., V_local], this rank's shard starting at global id `vocab_start`
    target: [...] global token ids (ids outside [0, vocab_size) give finite garbage: mask them)
    vocab_size: real vocabulary; global ids >= vocab_size are padding (excluded, = -inf)
    inplace_backward: write the gradient into the logits storage (like Megatron's fused
        cross-entropy); only when nothing else reads the logits after backward.
    returns log_prob [...], entropy [...] or None
    """
    lead = logits.shape[:-1]
    assert target.shape == lead, f"target {tuple(target.shape)} vs logits {tuple(logits.shape)}"
    flat = logits.reshape(-1, logits.shape[-1])
    n_valid = _n_valid(flat.shape[-1], vocab_start, vocab_size)
    lp, ent = _VocabParallelLogProb.apply(
        flat, target.reshape(-1).long(), tp_group, vocab_start, n_valid, max(1, int(chunk_size)),
        compute_entropy, inplace_backward,
    )
    return lp.view(lead), (ent.view(lead) if compute_entropy else None)
