"""Log-probs (+ entropy) of target tokens straight from final hidden states: the LM head fused in.

``lm_head_logprob(hidden [N, H], weight [V_local, H], target [N])`` returns
log softmax(hidden @ weight.T / temperature)[target] (and the entropy of that distribution) over the
vocabulary sharded across tensor-parallel ranks, without ever holding the ``[N, V]`` logits: the
vocabulary is walked in chunks of ``vocab_chunk`` rows of the weight and the tokens in chunks of
``token_chunk``, with an online (running-max) softmax. Forward keeps O(N) statistics; backward
recomputes each ``[token_chunk, vocab_chunk]`` logits block from the saved hidden rows and the
weight, and produces the gradient of the hidden rows and of the (possibly tied) output weight.

Extra memory: O(token_chunk * vocab_chunk) per block, an fp32 ``[N, H]`` accumulator for the hidden
gradient and an fp32 ``[vocab_chunk, H]`` one for the weight gradient's current chunk (the weight
gradient itself has the weight's shape and dtype, as any backward must produce).

Tensor parallelism: ``hidden`` is the same on every rank of ``tp_group`` (a replicated input, as the
output layer sees it), each rank owns ``weight`` rows = global ids [vocab_start, vocab_start + V_local).
Forward combines the per-rank statistics with one MAX and one SUM all-reduce of O(N) values; backward
all-reduces the hidden gradient (each rank's is the part from its vocabulary shard), exactly what
Megatron's ``ColumnParallelLinear`` does for its input. The weight gradient stays per shard.

:func:`hidden_head` makes a GPT model's output layer hand back its input instead of logits, so a
loss function gets the final hidden states and applies the head itself with this kernel.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.kernels.logprob import _n_valid, _world


def _blocks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(s + size, n)


def _logits(h: Tensor, w: Tensor, temp: float) -> Tensor:
    """One [C, Vc] block of logits / temperature in fp32 (the GEMM in the parameters' dtype, as the
    output layer runs it; a division, not a multiplication by 1/T: the rounding of ``logits / T``)."""
    x = (h @ w.t()).float()
    return x.div_(temp) if temp != 1.0 else x


def _in_block(local_t: Tensor, owned: Tensor, j0: int, j1: int) -> tuple[Tensor, Tensor]:
    """Which rows' target column lies in vocabulary block [j0, j1), and its column there (clamped)."""
    col = local_t - j0
    hit = owned & (col >= 0) & (col < j1 - j0)
    return hit, col.clamp(0, j1 - j0 - 1)


class _LMHeadLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, vocab_start, n_valid, temp, token_chunk, vocab_chunk,
                compute_entropy):
        N = hidden.shape[0]
        dev = hidden.device
        local_t = target - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)  # this rank holds the target's row of the weight
        # running statistics relative to the running max m: S = sum exp(x - m), Q = sum exp(x - m)(x - m)
        m = torch.full((N,), float("-inf"), device=dev)
        S = torch.zeros(N, device=dev)
        Q = torch.zeros(N, device=dev)
        tgt = torch.zeros(N, device=dev)  # target logit (raw), on the rank that owns it, else 0
        with torch.no_grad():
            for j0, j1 in _blocks(n_valid, vocab_chunk):  # padded vocabulary rows never enter
                w = weight[j0:j1]
                hit, col = _in_block(local_t, owned, j0, j1)
                for s, e in _blocks(N, token_chunk):
                    x = _logits(hidden[s:e], w, temp)  # [C, Vc]
                    tgt[s:e] += torch.where(hit[s:e], x.gather(1, col[s:e, None]).squeeze(1), 0.0)
                    m_old = m[s:e]
                    m_new = torch.maximum(m_old, x.amax(dim=1))
                    x.sub_(m_new[:, None])  # x - m_new
                    ex = x.exp()
                    s_blk = ex.sum(dim=1)
                    if compute_entropy:
                        q_blk = (ex.unsqueeze(1) @ x.unsqueeze(2)).view(-1)  # sum ex * (x - m): no product temp
                    del ex, x
                    # rescale what was summed against the old max; a row's first block has S = 0
                    # (and m_old = -inf, whose products would be NaN), so it takes the block alone
                    first = S[s:e] == 0
                    a = torch.where(first, 0.0, (m_old - m_new).exp())
                    if compute_entropy:
                        shift = torch.where(first, 0.0, m_old - m_new)
                        Q[s:e] = a * (Q[s:e] + shift * S[s:e]) + q_blk
                    S[s:e] = a * S[s:e] + s_blk
                    m[s:e] = m_new
            if _world(group) > 1:
                # combine the ranks' shards: rescale each to the global max, then sum
                M = m.clone()
                dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
                live = S > 0  # a rank whose shard is all padding has m = -inf, S = Q = 0
                shift = torch.where(live, m - M, 0.0)
                a = torch.where(live, shift.exp(), 0.0)
                stats = torch.stack([a * S, a * (Q + shift * S), tgt])
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
                S, Q, tgt, m = stats[0], stats[1], stats[2], M
            lse = m + S.log()
            log_prob = tgt - lse
            # H = lse - E_p[x] = log S - E_p[x - m]; relative to the max, no cancellation
            entropy = S.log() - Q / S if compute_entropy else None
        ctx.save_for_backward(hidden, weight, target, lse, entropy if compute_entropy else lse)
        ctx.cfg = (group, vocab_start, n_valid, temp, token_chunk, vocab_chunk, compute_entropy)
        if compute_entropy:
            return log_prob, entropy
        empty = torch.zeros(0, device=dev)  # autograd.Function outputs must be tensors
        ctx.mark_non_differentiable(empty)
        return log_prob, empty

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, target, lse, entropy = ctx.saved_tensors
        group, vocab_start, n_valid, temp, token_chunk, vocab_chunk, compute_entropy = ctx.cfg
        N, Hd = hidden.shape
        dt = weight.dtype
        grad_lp = grad_lp.float() if grad_lp is not None else torch.zeros_like(lse)
        use_ent = compute_entropy and grad_ent is not None
        if use_ent:
            grad_ent = grad_ent.float()
            mean_x = lse - entropy  # E_p[x], x = logits / T
        local_t = target - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(N, Hd, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # padded rows keep 0
        for j0, j1 in _blocks(n_valid, vocab_chunk):
            w = weight[j0:j1]
            hit, col = _in_block(local_t, owned, j0, j1)
            gw = torch.zeros(j1 - j0, Hd, dtype=torch.float32, device=hidden.device) if need_w else None
            for s, e in _blocks(N, token_chunk):
                h = hidden[s:e]
                x = _logits(h, w, temp)  # recomputed block of logits / T
                g = (x - lse[s:e, None]).exp_()  # softmax p of the block
                if use_ent:
                    # dH/dx_j = -p_j (x_j - E_p[x])
                    x.sub_(mean_x[s:e, None]).mul_(g).mul_(grad_ent[s:e, None])
                # d log_prob / dx = onehot(target) - p
                g.mul_(-grad_lp[s:e, None])
                if use_ent:
                    g.sub_(x)
                del x
                rows = torch.arange(e - s, device=hidden.device)
                g[rows, col[s:e]] += torch.where(hit[s:e], grad_lp[s:e], 0.0)
                if temp != 1.0:
                    g.div_(temp)  # x = logits / T
                g = g.to(dt)
                if need_h:
                    grad_h[s:e] += (g @ w).float()
                if need_w:
                    gw += (g.t() @ h).float()
                del g
            if need_w:
                grad_w[j0:j1] = gw.to(dt)
        if need_h:
            if _world(group) > 1:  # the replicated input's gradient: every shard contributes
                dist.all_reduce(grad_h, group=group)
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def lm_head_logprob(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    tp_group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
    compute_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log p(target) (and entropy) of softmax(hidden @ weight.T / temperature), fp32 results.

    hidden: [..., H], the same on every rank of ``tp_group``
    weight: [V_local, H], this rank's vocabulary shard starting at global id ``vocab_start``
    target: [...] global token ids (ids outside [0, vocab_size) give finite garbage: mask them)
    vocab_size: real vocabulary; global ids >= vocab_size are padding (excluded, = -inf)
    returns log_prob [...], entropy [...] or None
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = hidden.shape[:-1]
    assert target.shape == lead, f"target {tuple(target.shape)} vs hidden {tuple(hidden.shape)}"
    assert weight.shape[-1] == hidden.shape[-1], f"weight {tuple(weight.shape)} vs hidden {tuple(hidden.shape)}"
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.dtype != weight.dtype:  # e.g. fp32 hidden states under a bf16 head: the GEMM's dtype
        flat = flat.to(weight.dtype)
    n_valid = _n_valid(weight.shape[0], vocab_start, vocab_size)
    lp, ent = _LMHeadLogProb.apply(
        flat, weight, target.reshape(-1).long(), tp_group, vocab_start, n_valid, float(temperature),
        max(1, int(token_chunk)), max(1, int(vocab_chunk)), compute_entropy,
    )
    return lp.view(lead), (ent.view(lead) if compute_entropy else None)


# ------------------------------------------------------------------------------ model plumbing
def _gpt(module):
    """The GPTModel inside (DDP / Float16Module wrappers expose it as ``.module``)."""
    while not hasattr(module, "output_layer") and hasattr(module, "module"):
        module = module.module
    return module


def output_weight(module) -> Tensor:
    """The LM head's weight on the last pipeline stage: the output layer's own, or the word
    embedding it is tied to (what GPTModel passes to the output layer). Not
    ``shared_embedding_or_output_weight()`` alone: on a first stage it returns the word embedding
    even when the head is untied."""
    gpt = _gpt(module)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _passthrough(self, x, weight=None, runtime_gather_output=None):
    if self.sequence_parallel:
        # each TP rank holds a slice of the tokens; the head reads any token on every rank. The
        # gather's backward keeps this rank's slice of the gradient: lm_head_logprob's backward has
        # already summed the shards' contributions, so the gradient is replicated.
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
    return x, None


@contextlib.contextmanager
def hidden_head(module):
    """Within the block, the GPT model's output layer returns its input: the model's output is the
    final (normed) hidden states [B, S, H], full sequence on every TP rank, instead of [B, S, V/TP]
    logits. No-op on a stage without an output layer. The weight for :func:`lm_head_logprob` is
    :func:`output_weight`."""
    layer = getattr(_gpt(module), "output_layer", None)
    if layer is None:
        yield
        return
    layer.forward = types.MethodType(_passthrough, layer)  # instance attribute shadows the class's
    try:
        yield
    finally:
        del layer.forward
