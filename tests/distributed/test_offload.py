"""critic.megatron.{param,grad,optimizer}_offload: between passes the critic holds none of the
offloaded state on its device (the bytes it holds drop to what is left), each pass gets back what it
needs, and scores, losses and weights are bit-identical to a run without offload, checkpoints too."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.test_packed_passes import _rows

pytestmark = pytest.mark.distributed

OFFLOADS = {"none": [], "params": ["critic.megatron.param_offload=true"],
            "all": ["critic.megatron.param_offload=true", "critic.megatron.grad_offload=true",
                    "critic.megatron.optimizer_offload=true"]}


def _run(rank, world, path, rows, pairs, tmp):
    from megatron_gad.config import load_config
    from megatron_gad.workers.critic import CriticWorker

    os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = "1"
    out = {}
    for name, extra in OFFLOADS.items():
        cfg = load_config(None, [f"actor_rollout_ref.model.path={path}",
                                 "actor_rollout_ref.model.make_vocab_size_divisible_by=8", "critic.fused_loss=torch",
                                 "critic.optim.lr=0.01", "critic.megatron.params_dtype=bfloat16",
                                 "critic.megatron.use_distributed_optimizer=true", *extra])
        w = CriticWorker(cfg.critic, model_path=path, vocab_divisible_by=8, total_steps=4, eos_id=2)
        w.shard.reload("params")  # offloaded from the start; writing a parameter directly needs it back
        w.shard.module.output_layer.weight.data.copy_(torch.linspace(-0.5, 0.5, 32)[None])
        trace = []
        for _ in range(2):
            scores = w.compute_scores(rows)["scores"]
            held_after_scores = w.shard.held_bytes()
            metrics = w.update_critic(pairs, 2)
            trace.append((scores, held_after_scores, w.shard.held_bytes(), metrics))
        w.save(os.path.join(tmp, name), {})
        fresh = CriticWorker(cfg.critic, model_path=path, vocab_divisible_by=8, total_steps=4, eos_id=2)
        fresh.load(os.path.join(tmp, name))
        resumed = (fresh.update_critic(pairs, 2)["critic/d_loss"], w.update_critic(pairs, 2)["critic/d_loss"])
        w.shard.reload("params")  # reading parameters directly (not through a pass) needs them back
        weights = torch.cat([p.detach().flatten().float() for p in w.shard.module.parameters()])
        out[name] = dict(trace=trace, weights=weights, resumed=resumed)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("offload")
    path = make_hf_model(str(tmp / "m"), "qwen2", seed=4)
    rows, pairs = _rows()
    return run_local(_run, 2, path, rows, pairs, str(tmp))


def test_offloaded_state_leaves_the_device_between_passes(results):
    for rank in results:
        base = rank["none"]["trace"]
        for i, (_, after_scores, after_update, metrics) in enumerate(rank["all"]["trace"]):
            assert after_scores == {"weights": 0, "grads": 0, "optimizer": 0}
            assert after_update == {"weights": 0, "grads": 0, "optimizer": 0}
            assert metrics["memory/critic/idle_bytes"] == 0
            # the update held what the run without offload holds; the reward pass only the weights
            assert metrics["memory/critic/update_critic_bytes"] == base[i][3]["memory/critic/update_critic_bytes"]
            assert metrics["memory/critic/reward_bytes"] == base[i][1]["weights"] > 0
        for _, _, after_update, _ in rank["params"]["trace"]:
            assert after_update["weights"] == 0 and after_update["grads"] > 0 and after_update["optimizer"] > 0
        # the plain run keeps everything: weights, gradients and Adam state after an update
        assert all(v > 0 for v in base[-1][2].values())


def test_offload_changes_no_result(results):
    for rank in results:
        base = rank["none"]
        for name in ("params", "all"):
            run = rank[name]
            assert torch.equal(run["weights"], base["weights"]), name
            for (s, *_, m), (s0, *_, m0) in zip(run["trace"], base["trace"]):
                if s0 is not None:
                    assert torch.equal(s, s0)
                assert m["critic/d_loss"] == m0["critic/d_loss"]
            assert run["resumed"][0] == run["resumed"][1] == base["resumed"][0]
