"""The actor worker's training losses give the right gradients: the gradient norm Megatron reports
for one SFT step (token-mean NLL of teacher responses, in-place vocab-parallel backward) equals the
norm transformers computes for the same loss and batch, at TP x PP 1x1 and 2x2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def _sft_grad_norm(rank, world, path, tp, pp, batch):
    from megatron_gad.config import load_config
    from megatron_gad.workers.actor import ActorWorker

    cfg = load_config(None, [f"actor_rollout_ref.model.path={path}",
                             "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
                             f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
                             f"actor_rollout_ref.actor.megatron.pipeline_model_parallel_size={pp}",
                             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",  # 2 micro-batches
                             "actor_rollout_ref.actor.logprob_chunk_size=5"])
    worker = ActorWorker(cfg, total_steps=1, eos_id=2, pad_id=0)
    return worker.sft_step(batch)


def _hf_grad_norm(path, batch):
    from transformers import AutoModelForCausalLM

    from megatron_gad.data import build_sequences

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, mask, pos = build_sequences(batch["prompt_ids"], batch["prompt_mask"], batch["teacher_response"],
                                     batch["teacher_response_mask"])
    P = batch["prompt_ids"].shape[1]
    loss = 0.0
    for half in (slice(0, 2), slice(2, 4)):  # the same micro-batches, each a token mean, averaged
        logits = model(ids[half], attention_mask=mask[half], position_ids=pos[half]).logits
        lp = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, batch["teacher_response"][half, :, None])[..., 0]
        m = batch["teacher_response_mask"][half].float()
        loss = loss + (-(lp * m).sum() / m.sum()) / 2
    loss.backward()
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_sft_grad_norm_matches_transformers(tmp_path, tp, pp):
    from tiny_models import make_hf_model

    from megatron_gad.parallel.launch import run_local

    path = make_hf_model(str(tmp_path / "m"), "llama", seed=2)
    batch = _batch()
    results = [r for r in run_local(_sft_grad_norm, tp * pp, path, tp, pp, batch) if r is not None]
    assert len(results) == 1
    want = _hf_grad_norm(path, batch)
    assert results[0]["actor/grad_norm"] == pytest.approx(want, rel=1e-5)
