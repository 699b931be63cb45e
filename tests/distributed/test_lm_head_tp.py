"""The LM head fused into the log-prob (``kernels.lm_head``) under tensor parallelism, against full
logits + log_softmax in float64:

* the kernel alone at TP2 (a shard ending in vocabulary padding, and a shard that is all padding):
  log-probs, entropy, the hidden rows' gradient (summed over the shards) and each weight shard's;
* a real actor model at TP1 / TP2 (and TP2 with sequence parallelism), untied (llama) and tied
  (qwen2) embeddings, on a packed micro-batch: the actor's way (final hidden states under
  ``hidden_head`` -> response rows -> ``lm_head_logprob`` with the temperature folded in) equals
  the output layer's full [T, V/TP] logits gathered over TP, divided by the temperature and
  log-softmaxed in float64, in log-probs, entropy and every parameter's gradient (tied: the
  embedding gets both the lookup's and the head's gradient).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

TEMP = 0.7
TOL = dict(atol=1e-6, rtol=1e-6)


def _grad_close(got, ref, what=""):
    """Gradients: within 1e-6 of the largest entry (>= 1). They sum many fp32 terms: on the kernel
    case here (|grad| up to ~7) today's path (fp32 logits, vocab_parallel_logprob) is itself 4e-6
    from float64, and the fused head is equal to it."""
    err, scale = float((got.double() - ref.double()).abs().max()), max(1.0, float(ref.abs().max()))
    assert err <= 1e-6 * scale, f"{what}: max |diff| {err:.3g} vs 1e-6 x {scale:.3g}"
    return err / scale


def _ref(hidden, weight, target, vocab_size):
    logp = ((hidden.double() @ weight[:vocab_size].double().t()) / TEMP).log_softmax(-1)
    return logp.gather(-1, target[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _kernel(rank, world, v_padded, v_real):
    import torch.distributed as dist

    from megatron_gad.kernels.lm_head import lm_head_logprob

    g = torch.Generator().manual_seed(0)  # the same full problem on every rank
    N, H = 19, 10
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(v_padded, H, generator=g) * 0.7
    target = torch.randint(0, v_real, (N,), generator=g)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)

    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp0, ent0 = _ref(h0, w0, target, v_real)
    ((lp0 * w_lp).sum() + (ent0 * w_ent).sum()).backward()

    v_local = v_padded // world
    start = rank * v_local
    h, w = hidden.clone().requires_grad_(), weight[start:start + v_local].clone().requires_grad_()
    lp, ent = lm_head_logprob(h, w, target, dist.group.WORLD, vocab_start=start, vocab_size=v_real,
                              temperature=TEMP, token_chunk=4, vocab_chunk=5, compute_entropy=True)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    torch.testing.assert_close(lp, lp0.float(), **TOL)
    torch.testing.assert_close(ent, ent0.float(), **TOL)
    _grad_close(h.grad, h0.grad, "hidden")
    _grad_close(w.grad, w0.grad[start:start + v_local], "weight")
    return True


@pytest.mark.parametrize("v_padded,v_real", [(64, 57), (64, 30)])  # rank 1: 7 padding rows / all padding
def test_kernel_tp2_matches_fp64_logits(v_padded, v_real):
    from megatron_gad.parallel.launch import run_local

    assert run_local(_kernel, 2, v_padded, v_real) == [True, True]


def _models(rank, world, paths, sp):
    return [_model(world, path, sp) for path in paths]


def _model(world, path, sp):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.kernels.lm_head import hidden_head, lm_head_logprob, output_weight
    from megatron_gad.parallel import state
    from megatron_gad.workers.micro_batches import actor_micro_batches

    shard = ModelShard("actor", path, world, 1, sequence_parallel=sp, trainable=False)
    model = shard.module
    model.train()
    g = torch.Generator().manual_seed(1)
    B, P, R = 3, 6, 7
    batch = {"prompt_ids": torch.randint(3, 96, (B, P), generator=g),
             "prompt_mask": torch.ones(B, P, dtype=torch.long),
             "responses": torch.randint(3, 96, (B, R), generator=g),
             "response_mask": torch.ones(B, R, dtype=torch.long)}
    batch["prompt_mask"][0, :4] = 0  # rows of different lengths in the pack
    batch["response_mask"][1, 3:] = 0
    mb = actor_micro_batches(batch, [list(range(B))], align=world if sp else 1)[0]
    packed, idx = mb["packed"], mb["resp_index"]
    valid = idx >= 0
    target = mb["responses"][valid]
    w_lp, w_ent = torch.randn(int(valid.sum()), generator=g), torch.randn(int(valid.sum()), generator=g)
    tp = state.tp_group() if world > 1 else None

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        args = (packed.input_ids, packed.position_ids, None)
        if fused:
            with hidden_head(model):
                hidden = model(*args, packed_seq_params=packed.packed_seq_params())  # [1, T, H]
            weight = output_weight(model)
            lp, ent = lm_head_logprob(hidden[0].index_select(0, idx[valid]), weight, target, tp,
                                      vocab_start=state.layout().tp_rank * weight.shape[0],
                                      vocab_size=shard.arch.vocab_size, temperature=TEMP, token_chunk=5,
                                      vocab_chunk=16, compute_entropy=True)
        else:  # today's logits, full vocabulary, fp64 log_softmax
            logits = model(*args, packed_seq_params=packed.packed_seq_params())  # [1, T, V/TP]
            if world > 1:
                logits = gather_from_tensor_model_parallel_region(logits)
            sel = logits[0].index_select(0, idx[valid])[:, :shard.arch.vocab_size].double() / TEMP
            logp = sel.log_softmax(-1)
            lp, ent = logp.gather(-1, target[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return lp.float().detach(), ent.float().detach(), grads

    lp, ent, grads = run(True)
    lp0, ent0, grads0 = run(False)
    torch.testing.assert_close(lp, lp0, **TOL)
    torch.testing.assert_close(ent, ent0, **TOL)
    assert grads.keys() == grads0.keys() and len(grads) > 5
    worst = 0.0
    for n in grads0:
        worst = max(worst, _grad_close(grads[n], grads0[n], n))
    return worst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_gad.tools.tiny_models import make_hf_model

    root = tmp_path_factory.mktemp("lm_head")
    return {fam: make_hf_model(str(root / fam), fam, seed=4) for fam in ("llama", "qwen2")}


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_actor_head_matches_full_logits(models, tp, sp):
    """Both families (llama untied, qwen2 tied) in one launch; each rank's worst gradient error."""
    from megatron_gad.parallel.launch import run_local

    worst = run_local(_models, tp, [models["llama"], models["qwen2"]], sp)
    assert all(w <= 1e-6 for rank in worst for w in rank), worst
