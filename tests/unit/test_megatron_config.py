"""Validation of the per-role Megatron settings (verl's key names): what runs is accepted, what
cannot run yet is refused with a message naming the key and the fix."""

from __future__ import annotations

import pytest

from megatron_gad.config import ConfigError, load_config, validate

ARCH = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 96,
        "num_hidden_layers": 4, "max_position_embeddings": 4096}
FULL = "{recompute_granularity: full, recompute_method: uniform, recompute_num_layers: 1}"


def _check(*overrides):
    validate(load_config(None, ["trainer.n_gpus_per_node=2", *overrides]), ARCH)


@pytest.mark.parametrize("overrides", [
    ["critic.megatron.use_distributed_optimizer=true"],
    ["critic.megatron.param_offload=true", "critic.megatron.grad_offload=true",
     "critic.megatron.optimizer_offload=true"],
    ["actor_rollout_ref.actor.megatron.param_offload=true", "actor_rollout_ref.actor.megatron.grad_offload=true",
     "actor_rollout_ref.actor.megatron.optimizer_offload=true", "actor_rollout_ref.ref.megatron.param_offload=false"],
    ["critic.megatron.tensor_model_parallel_size=2", "critic.megatron.sequence_parallel=true"],
    [f"critic.megatron.override_transformer_config={FULL}"],
    ["actor_rollout_ref.actor.megatron.use_distributed_optimizer=true",
     f"actor_rollout_ref.actor.megatron.override_transformer_config={FULL}"],
    ["critic.megatron.override_transformer_config={recompute_granularity: selective}"],
    ["critic.megatron.override_transformer_config={recompute_granularity: full, recompute_method: block, "
     "recompute_num_layers: 4}"],
])
def test_supported_settings_validate(overrides):
    _check(*overrides)


@pytest.mark.parametrize("overrides,message", [
    (["critic.megatron.context_parallel_size=2"],
     "critic.megatron.context_parallel_size=2: context parallelism is not supported yet"),
    (["critic.megatron.virtual_pipeline_model_parallel_size=2"],
     "virtual_pipeline_model_parallel_size=2: the interleaved (virtual) pipeline schedule is not supported yet"),
    (["critic.megatron.sequence_parallel=true"], "sequence_parallel=true needs critic.megatron.tensor_model_parallel"),
    (["critic.megatron.override_transformer_config={recompute_granularity: full}"],
     "recompute_granularity=full needs recompute_method (uniform | block) and recompute_num_layers"),
    (["critic.megatron.override_transformer_config={recompute_method: uniform}"],
     "apply only to recompute_granularity=full (got recompute_granularity=null)"),
    (["critic.megatron.pipeline_model_parallel_size=2", "critic.megatron.override_transformer_config="
      "{recompute_granularity: full, recompute_method: block, recompute_num_layers: 3}"],
     "recompute_num_layers=3 exceeds the 2 layers of a pipeline stage"),
    (["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
      "actor_rollout_ref.actor.megatron.sequence_parallel=true"],
     "its native rollout decodes one token per step"),
    (["actor_rollout_ref.nccl_timeout=0"], "actor_rollout_ref.nccl_timeout"),
    (["critic.megatron.override_transformer_config={recompute_granularity: partial}"],
     "recompute_granularity: expected one of 'full', 'selective'; got 'partial'"),
])
def test_unsupported_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        _check(*overrides)
    assert message in str(e.value)
