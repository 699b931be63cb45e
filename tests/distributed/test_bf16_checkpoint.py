"""A bf16 model saves and loads with its optimizer state (the local spec's torch norms used to stay
fp32, and Megatron's half-precision optimizer then mapped Adam state onto the wrong parameters on
save: "Optimizer shape ... does not match model shape")."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed


def _round_trip(rank, world, path, out):
    from megatron_gad.engine.model_shard import ModelShard

    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    mb = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]

    def loss_fn(logits, batch):
        loss = logits.float().logsumexp(-1).mean()
        return loss, {"loss": loss.detach()}

    a = ModelShard("actor", path, 1, 1, params_dtype="bfloat16", vocab_divisible_by=8)
    dtypes = {str(p.dtype) for p in a.module.parameters()}
    a.train_step(mb, loss_fn)
    a.save(out, {"step": 1})
    b = ModelShard("actor", path, 1, 1, params_dtype="bfloat16", vocab_divisible_by=8)
    b.load(out, with_optimizer=True)
    same = all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
    la = a.train_step(mb, loss_fn)[0][0]["loss"]
    lb = b.train_step(mb, loss_fn)[0][0]["loss"]
    return dtypes, same, float(la), float(lb)


def test_bf16_checkpoint_with_optimizer_round_trip(tmp_path):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "qwen2", seed=1)
    dtypes, same, la, lb = run_local(_round_trip, 1, path, str(tmp_path / "ckpt"))[0]
    assert dtypes == {"torch.bfloat16"}  # norms included
    assert same
    assert la == lb  # Adam state restored: the next step is identical
