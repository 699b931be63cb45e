"""actor_rollout_ref.actor.megatron.{param,grad,optimizer}_offload and ref.megatron.param_offload: in every
phase of a GAD step (rollout, old and reference log-probs, update, weight export) the actor holds on its
device exactly the state that phase needs, by the planner's byte counts (an independent computation of
Megatron's layout), none between phases, and samples, log-probs, losses, exported weights and trained
weights are bit-identical to the same steps without offload."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_packed_passes import _rows

pytestmark = pytest.mark.distributed

A = "actor_rollout_ref.actor.megatron"
OFFLOADS = {"none": ["actor_rollout_ref.ref.megatron.param_offload=false"],
            "params": [f"{A}.param_offload=true"],  # the reference on the host: the default
            "all": [f"{A}.param_offload=true", f"{A}.grad_offload=true", f"{A}.optimizer_offload=true"]}
PHASES = ("generate", "log_prob", "ref_log_prob", "update", "export_weights")


def _expected(path: str, dp: int, dp_rank: int) -> dict:
    """The planner's bytes for this rank: the policy (bf16, distributed optimizer) and the reference."""
    from megatron_gad.config import padded_vocab_size
    from megatron_gad.models.arch import arch_from_hf_config, read_hf_config
    from megatron_gad.planner import rank_state_bytes, stage_params

    arch = arch_from_hf_config(read_hf_config(path))
    params = stage_params(arch, "actor", 1, 1, 0, padded_vocab_size(arch.vocab_size, 8))
    return {"policy": rank_state_bytes(params, "bfloat16", dp, dp_rank, True).as_dict(),
            "ref": rank_state_bytes(params, "bfloat16", dp, dp_rank, True, trainable=False).as_dict()}


def _run(rank, world, path, prompts):
    from megatron_gad.config import load_config
    from megatron_gad.workers.actor import ActorWorker

    out = {}
    for name, extra in OFFLOADS.items():
        cfg = load_config(None, [f"actor_rollout_ref.model.path={path}",
                                 "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
                                 "actor_rollout_ref.actor.optim.lr=0.01", f"{A}.params_dtype=bfloat16",
                                 f"{A}.use_distributed_optimizer=true", "actor_rollout_ref.actor.use_kl_loss=true",
                                 "actor_rollout_ref.actor.kl_loss_coef=0.1", *extra])
        w = ActorWorker(cfg.actor_rollout_ref, max_response_length=12, total_steps=4, eos_id=2, pad_id=0)
        trace = []
        held = {"init": (w.shard.held_bytes(), w.ref.held_bytes())}
        for step in range(2):
            batch = dict(prompts)
            batch.update(w.generate(prompts, seed=step))
            held["generate"] = (w.shard.held_bytes(), w.ref.held_bytes())
            batch["old_log_prob"] = w.compute_log_prob(batch)["log_prob"]
            held["log_prob"] = (w.shard.held_bytes(), w.ref.held_bytes())
            batch["ref_log_prob"] = w.compute_ref_log_prob(batch)["log_prob"]
            held["ref_log_prob"] = (w.shard.held_bytes(), w.ref.held_bytes())
            adv = torch.linspace(-1, 1, batch["responses"].shape[0])[:, None] * batch["response_mask"]
            batch["advantages"] = adv
            batch.pop("rollout_log_prob")
            metrics = w.update_actor(batch, 1)
            held["update"] = (w.shard.held_bytes(), w.ref.held_bytes())
            export = w.export_weights(1)
            held["export_weights"] = (w.shard.held_bytes(), w.ref.held_bytes())
            trace.append(dict(batch=batch, metrics=metrics, memory=w.memory_metrics(), held=dict(held),
                              export=[info for info, _ in export]))
        w.shard.reload("params")  # reading parameters directly (not through a pass) needs them back
        weights = torch.cat([p.detach().flatten().float() for p in w.shard.module.parameters()])
        out[name] = dict(trace=trace, weights=weights)
    out["expected"] = _expected(path, world, rank)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("actor_offload")
    path = make_hf_model(str(tmp / "m"), "qwen2", seed=5)
    rows, _ = _rows()
    return run_local(_run, 2, path, {"prompt_ids": rows["prompt_ids"], "prompt_mask": rows["prompt_mask"]})


def _total(d: dict) -> float:
    return float(sum(d.values()))


def test_each_phase_holds_what_it_needs(results):
    zero = {"weights": 0, "grads": 0, "optimizer": 0}
    for r, rank in enumerate(results):
        pol, ref = rank["expected"]["policy"], rank["expected"]["ref"]
        # the distributed optimizer's padded parameter buffer exists from the first update on; before it
        # the policy's weights are the plain parameters, as many bytes as the frozen reference's
        weights_only = dict(zero, weights=pol["weights"])
        unpadded = dict(ref)
        assert unpadded["weights"] < pol["weights"]
        for name in ("params", "all"):
            assert rank[name]["trace"][0]["held"]["init"] == (zero, zero), name  # nothing before the first pass
        for i, step in enumerate(rank["all"]["trace"]):
            mem = step["memory"]
            for phase in PHASES:  # between phases the device holds nothing of the actor or the reference
                assert step["held"][phase] == (zero, zero), phase
                assert mem["memory/actor/idle_bytes"] == 0
            before_update = unpadded if i == 0 else weights_only
            assert mem["memory/actor/generate_bytes"] == _total(before_update)
            assert mem["memory/actor/log_prob_bytes"] == _total(before_update)
            assert mem["memory/actor/ref_log_prob_bytes"] == _total(ref)
            assert mem["memory/actor/update_bytes"] == _total(pol)
            if r == 0:  # replica 0 sends the weights; the other replicas skip the export
                assert mem["memory/actor/export_weights_bytes"] == _total(weights_only)
            else:
                assert "memory/actor/export_weights_bytes" not in mem
        params = rank["params"]["trace"]
        for step in params:  # weights leave; gradients and Adam state stay once allocated
            assert step["held"]["update"] == (dict(pol, weights=0), zero)
        assert params[0]["memory"]["memory/actor/ref_log_prob_bytes"] == _total(ref)
        assert params[1]["memory"]["memory/actor/ref_log_prob_bytes"] == _total(ref) + pol["grads"] + pol["optimizer"]
        base = rank["none"]["trace"]
        assert base[0]["held"]["init"] == (unpadded, ref)  # no gradient buffers or Adam state before an update
        assert base[0]["memory"]["memory/actor/generate_bytes"] == 2 * _total(ref)
        for step in base:
            assert step["held"]["update"] == (pol, ref)
            assert step["memory"]["memory/actor/update_bytes"] == _total(pol) + _total(ref)
        assert base[1]["memory"]["memory/actor/generate_bytes"] == _total(pol) + _total(ref)


def test_offload_changes_no_result(results):
    for rank in results:
        base = rank["none"]
        for name in ("params", "all"):
            run = rank[name]
            assert torch.equal(run["weights"], base["weights"]), name
            for step, step0 in zip(run["trace"], base["trace"]):
                for k in ("responses", "response_mask", "old_log_prob", "ref_log_prob"):
                    assert torch.equal(step["batch"][k], step0["batch"][k]), (name, k)
                for k in ("actor/pg_loss", "actor/kl", "actor/grad_norm"):
                    assert step["metrics"][k] == step0["metrics"][k], (name, k)
                assert step["export"] == step0["export"], name  # names, shapes and checksums of every bucket
        # the weights moved: the steps trained (the comparison is not between two untouched models)
        assert not torch.equal(base["trace"][0]["batch"]["old_log_prob"], base["trace"][1]["batch"]["old_log_prob"])
