"""The actor worker's training losses give the right gradients: the gradient norms Megatron reports
for one SFT step (token-mean NLL of teacher responses) and one PPO step (clipped surrogate with
per-token advantages), both through the in-place vocab-parallel backward, equal the norms
transformers computes for the same losses and batch, at TP x PP 1x1 and 2x2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


T = 0.7  # rollout temperature of the PPO part


def _batch():
    g = torch.Generator().manual_seed(0)
    B, P, R = 4, 5, 6
    prompt_ids = torch.randint(3, 96, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_ids[0, :2], prompt_mask[0, :2] = 0, 0  # left padding
    resp = torch.randint(3, 96, (B, R), generator=g)
    resp_mask = torch.ones(B, R, dtype=torch.long)
    resp[1, 4:], resp_mask[1, 4:] = 0, 0  # right padding
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "teacher_response": resp,
            "teacher_response_mask": resp_mask}


def _worker(path, tp, pp, extra=()):
    from megatron_gad.config import load_config
    from megatron_gad.workers.actor import ActorWorker

    cfg = load_config(None, [f"actor_rollout_ref.model.path={path}",
                             "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
                             f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
                             f"actor_rollout_ref.actor.megatron.pipeline_model_parallel_size={pp}",
                             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",  # 2 micro-batches
                             "actor_rollout_ref.actor.logprob_chunk_size=5",
                             f"actor_rollout_ref.rollout.temperature={T}", *extra])
    return ActorWorker(cfg.actor_rollout_ref, max_response_length=cfg.data.max_response_length, total_steps=1,
                       eos_id=2, pad_id=0)


def _sft_and_ppo_grad_norms(rank, world, path, tp, pp, batch, ppo_batch, extra=()):
    sft = _worker(path, tp, pp, extra).sft_step(batch)  # a fresh worker each: same initial weights
    ppo = _worker(path, tp, pp, extra).update_actor(ppo_batch, num_mini_batches=1)
    return None if sft is None else (sft["actor/grad_norm"], ppo["actor/grad_norm"], ppo["actor/pg_clipfrac"])


def _hf_log_probs(model, batch, temperature: float = 1.0):
    from megatron_gad.data import build_sequences

    ids, mask, pos = build_sequences(batch["prompt_ids"], batch["prompt_mask"], batch["teacher_response"],
                                     batch["teacher_response_mask"])
    P = batch["prompt_ids"].shape[1]
    logits = model(ids, attention_mask=mask, position_ids=pos).logits
    lp = torch.log_softmax(logits[:, P - 1:-1] / temperature, -1)
    return lp.gather(-1, batch["teacher_response"][..., None])[..., 0]


def _hf_grad_norm(path, batch, per_token_loss, temperature: float = 1.0):
    """Norm of the gradient of the token-mean of per_token_loss(lp) over the whole batch (every valid
    token weighs the same, whatever micro-batch it falls in)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lp = _hf_log_probs(model, batch, temperature)
    m = batch["teacher_response_mask"].float()
    everything = slice(None)
    loss = (per_token_loss(lp, everything) * m).sum() / m.sum()
    loss.backward()
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))


# memory settings change memory, not gradients: the same reference with them on
MEMORY = ("actor_rollout_ref.actor.megatron.use_distributed_optimizer=true",
          "actor_rollout_ref.actor.megatron.override_transformer_config="
          "{recompute_granularity: full, recompute_method: uniform, recompute_num_layers: 1}")


@pytest.mark.parametrize("tp,pp,extra", [(1, 1, ()), (2, 2, ()), (2, 1, MEMORY)])
def test_sft_and_ppo_grad_norms_match_transformers(tmp_path, tp, pp, extra):
    from transformers import AutoModelForCausalLM

    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "llama", seed=2)
    batch = _batch()
    # PPO at ratio 1 (old log-probs = the current policy's): the clipped surrogate's gradient is
    # -A * grad(log p); per-token advantages exercise the token-mean aggregation. The policy is the
    # sampling distribution softmax(logits / T) (rollout temperature T); SFT is plain cross-entropy.
    with torch.no_grad():
        old = _hf_log_probs(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), batch, T)
    adv = torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    ppo_batch = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
                 "responses": batch["teacher_response"], "response_mask": batch["teacher_response_mask"],
                 "old_log_prob": old, "advantages": adv}
    results = [r for r in run_local(_sft_and_ppo_grad_norms, tp * pp, path, tp, pp, batch, ppo_batch, extra)
               if r is not None]
    assert len(results) == 1
    sft_norm, ppo_norm, clipfrac = results[0]
    assert sft_norm == pytest.approx(_hf_grad_norm(path, batch, lambda lp, h: -lp), rel=1e-5)
    assert clipfrac == 0.0
    assert ppo_norm == pytest.approx(_hf_grad_norm(path, batch, lambda lp, h: -adv[h] * torch.exp(lp - old[h]), T),
                                     rel=1e-5)
