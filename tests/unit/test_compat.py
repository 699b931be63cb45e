"""verl / LMOps launch-script keys: carried over with their meaning or refused naming our setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_gad import compat
from megatron_gad.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[2]

# A GAD launch script's overrides as LMOps / verl write them (Hydra quoting and "+" included).
LMOPS = [
    "algorithm.adv_estimator=grpo", "data.train_files=[/data/train.parquet]", "data.val_files=[/data/test.parquet]",
    "data.train_batch_size=64", "data.val_batch_size=128", "data.max_prompt_length=2048",
    "data.max_response_length=1536", "data.filter_overlong_prompts=True", "data.truncation='error'",
    "actor_rollout_ref.model.path=/models/qwen", "actor_rollout_ref.actor.optim.lr=1e-6",
    "actor_rollout_ref.model.use_remove_padding=True", "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "actor_rollout_ref.actor.use_kl_loss=True",
    "actor_rollout_ref.actor.kl_loss_coef=0.001", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    "actor_rollout_ref.actor.entropy_coeff=0", "actor_rollout_ref.actor.grad_clip=0.2",
    "actor_rollout_ref.actor.clip_ratio=0.2", "actor_rollout_ref.actor.optim.warmup_style=constant",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
    "actor_rollout_ref.model.enable_gradient_checkpointing=True",
    "actor_rollout_ref.actor.fsdp_config.param_offload=False",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False",
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=2", "actor_rollout_ref.rollout.name=megatron",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.rollout.enforce_eager=False", "actor_rollout_ref.rollout.free_cache_engine=False",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.ref.fsdp_config.param_offload=False",
    "critic.optim.lr=1e-6", "critic.model.use_remove_padding=True", "critic.model.enable_gradient_checkpointing=True",
    "critic.ppo_micro_batch_size_per_gpu=2", "critic.grad_clip=0.2", "critic.model.fsdp_config.param_offload=False",
    "critic.model.fsdp_config.optimizer_offload=False", "critic.ulysses_sequence_parallel_size=1",
    "algorithm.use_kl_in_reward=False", "algorithm.kl_ctrl.kl_coef=0.001", "reward_model.enable=False",
    "trainer.critic_warmup=10", "trainer.logger=['console','wandb']", "trainer.project_name=gad",
    "trainer.experiment_name=qwen-gad", "trainer.n_gpus_per_node=8", "trainer.nnodes=1", "trainer.save_freq=50",
    "trainer.test_freq=50", "trainer.total_epochs=2", "trainer.val_before_train=False",
    "+trainer.max_actor_ckpt_to_keep=2", "trainer.max_critic_ckpt_to_keep=2",
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2", "critic.megatron.tensor_model_parallel_size=2",
]


def test_lmops_override_list_loads_and_validates():
    cfg = load_config(None, LMOPS)
    validate(cfg, arch={})
    a = cfg.actor_rollout_ref.actor
    assert (a.optim.clip_grad, cfg.critic.optim.clip_grad, a.clip_ratio_low, a.clip_ratio_high) == (0.2, 0.2, 0.2, 0.2)
    assert (a.optim.lr_scheduler, cfg.data.on_bad_row, cfg.trainer.logger) == ("constant", "skip", ["console", "wandb"])
    assert (cfg.trainer.max_actor_ckpt_to_keep, cfg.data.train_batch_size) == (2, 64)


# LMOps' GAD-stage launch script (gad/scripts/train/gpt5-chat-filtered-7b-adversarial-lr1e-6.sh), its overrides in
# its order with the shell variables filled in: every one names a setting megatron-gad honours.
LMOPS_GAD = [
    "algorithm.adv_estimator=grpo", "data.prompt_key=content", "data.train_files=/d/train.parquet",
    "data.val_files=/d/test.parquet", "data.train_batch_size=256", "data.val_batch_size=600",
    "data.max_prompt_length=2048", "data.max_response_length=1536", "data.truncation=right",
    "actor_rollout_ref.model.path=/m/actor", "actor_rollout_ref.actor.optim.lr=1e-6",
    "actor_rollout_ref.actor.grad_clip=0.2",
    "actor_rollout_ref.model.use_remove_padding=True", "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=12288",
    "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.entropy_coeff=0.0",
    "actor_rollout_ref.actor.kl_loss_coef=0.001", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1",
    "actor_rollout_ref.model.enable_gradient_checkpointing=True",
    "actor_rollout_ref.actor.fsdp_config.param_offload=False",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1", "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.temperature=0.8", "actor_rollout_ref.rollout.gpu_memory_utilization=0.7",
    "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.ref.fsdp_config.param_offload=False",
    "critic.model.path=/m/critic", "critic.optim.lr=1e-6", "critic.model.use_remove_padding=True",
    "critic.ppo_max_token_len_per_gpu=12288", "critic.grad_clip=0.2", "algorithm.kl_ctrl.kl_coef=0.001",
    "trainer.val_before_train=True", "trainer.critic_warmup=0", "trainer.logger=['console','wandb']",
    "trainer.project_name=p", "trainer.experiment_name=e", "trainer.n_gpus_per_node=8", "trainer.nnodes=1",
    "trainer.save_freq=50", "trainer.test_freq=50", "trainer.default_hdfs_dir=null", "trainer.total_epochs=4",
    "actor_rollout_ref.rollout.enforce_eager=False", "actor_rollout_ref.rollout.free_cache_engine=False",
    "trainer.default_local_dir=/tmp/e",
]


def test_lmops_gad_script_runs_unchanged():
    """Only the rollout engine's TP differs from the script (2 there; one vLLM engine per GPU here)."""
    cfg = load_config(None, LMOPS_GAD)
    validate(cfg, arch={})
    a, d = cfg.actor_rollout_ref.actor, cfg.data
    assert (d.truncation, cfg.trainer.val_before_train, a.ppo_mini_batch_size, d.train_batch_size) == \
        ("right", True, 256, 256)
    assert (a.use_kl_loss, a.kl_loss_coef, cfg.actor_rollout_ref.rollout.temperature) == (True, 0.001, 0.8)


def test_yaml_file_takes_the_same_keys(tmp_path):
    path = tmp_path / "verl.yaml"
    path.write_text("actor_rollout_ref:\n  actor:\n    grad_clip: 0.7\n    fsdp_config: {param_offload: false}\n"
                    "  model: {use_remove_padding: true}\ndata: {filter_overlong_prompts: false}\n")
    cfg = load_config(str(path))
    assert cfg.actor_rollout_ref.actor.optim.clip_grad == 0.7 and cfg.data.on_bad_row == "error"


@pytest.mark.parametrize("override,pointer", [
    ("actor_rollout_ref.model.use_remove_padding=False", "packed (THD) sequences"),
    ("actor_rollout_ref.actor.fsdp_config.param_offload=True", "actor_rollout_ref.actor.megatron.tensor_model"),
    ("critic.model.fsdp_config.fsdp_size=8", "critic.megatron.tensor_model_parallel_size"),
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=4", "sequence_parallel=true"),
    ("algorithm.use_kl_in_reward=True", "use_kl_loss=true"),
    ("actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1", "optim.lr_warmup_steps"),
    ("actor_rollout_ref.actor.optim.warmup_style=linear_decay", "lr_scheduler"),
])
def test_refusals_name_the_megatron_gad_setting(override, pointer):
    with pytest.raises(ConfigError, match=r"not supported|expected") as e:
        load_config(None, [override])
    assert pointer in str(e.value) and override.split("=")[0] in str(e.value)


def test_typos_are_still_rejected():
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'actor_rollout_ref.actor.grad_clipp'")):
        load_config(None, ["actor_rollout_ref.actor.grad_clipp=0.2"])


def test_gradient_checkpointing_and_rollout_keys_map():
    target = "actor_rollout_ref.actor.megatron.override_transformer_config"
    key = "actor_rollout_ref.model.enable_gradient_checkpointing"
    assert compat.translate(key, True) == [(target, {"recompute_granularity": "full", "recompute_method": "uniform",
                                                     "recompute_num_layers": 1})]
    assert compat.translate(key, False) == [(target, {"recompute_granularity": None, "recompute_method": None,
                                                      "recompute_num_layers": None})]
    r = "actor_rollout_ref.rollout.enforce_eager"
    assert compat.translate("+" + r, True) == [(r, True)]


def test_doc_is_generated_from_the_table():
    doc = (ROOT / "docs" / "compat.md").read_text()
    assert doc == compat.markdown(), "run: python -m megatron_gad.compat > docs/compat.md"
