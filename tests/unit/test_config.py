"""Tests for megatron_gad.config: loading, overrides, round-trip, and every validation rule's message."""

import dataclasses
import json
from pathlib import Path

import pytest

from megatron_gad.config import (
    ConfigError,
    GADConfig,
    actor_dp,
    apply_overrides,
    config_from_dict,
    critic_dp,
    critic_model_path,
    dump_yaml,
    load_config,
    padded_vocab_size,
    to_dict,
    validate,
    world_size,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# A Qwen2.5-0.5B-like architecture: 14 query heads, 2 KV heads, 24 layers, odd-ish vocab.
ARCH = {"num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768}
TP2 = "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"
GPUS8 = "trainer.n_gpus_per_node=8"


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == GADConfig()
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-6
    assert cfg.actor_rollout_ref.actor.optim.betas == (0.9, 0.999)
    assert cfg.trainer.logger == ["console"] and cfg.trainer.total_training_steps is None
    validate(cfg)
    validate(cfg, ARCH)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.seed = 3


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train_files: a.parquet\n  train_batch_size: 16\n"
                    "actor_rollout_ref:\n  actor:\n    optim:\n      lr: 1e-5\n      min_lr: 1\n")
    cfg = load_config(str(path), [
        "critic.optim.lr=2e-6",
        "trainer.warmup.until_d_acc=[0.6,0.7]",
        "trainer.total_training_steps=null",
        "trainer.total_training_steps=20",
        "trainer.resume_from_path=null",
        "trainer.experiment_name=0042",        # stays text, not the int 42
        "data.val_files=[b.parquet, c.parquet]",
        "trainer.warmup={mode: sft}",          # a mapping merges into the section
        "actor_rollout_ref.actor.optim.betas=[0.9, 0.95]",
    ])
    assert cfg.data.train_files == ["a.parquet"]  # a single string becomes a list
    assert cfg.data.train_batch_size == 16
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-5 and isinstance(cfg.actor_rollout_ref.actor.optim.lr, float)
    assert cfg.actor_rollout_ref.actor.optim.min_lr == 1.0 and isinstance(cfg.actor_rollout_ref.actor.optim.min_lr,
                                                                         float)  # int accepted for float
    assert cfg.critic.optim.lr == 2e-6
    assert cfg.trainer.warmup.until_d_acc == [0.6, 0.7]
    assert cfg.trainer.warmup.mode == "sft" and cfg.trainer.warmup.patience == 3
    assert cfg.trainer.total_training_steps == 20 and cfg.trainer.resume_from_path is None
    assert cfg.trainer.experiment_name == "0042"
    assert cfg.data.val_files == ["b.parquet", "c.parquet"]
    assert cfg.actor_rollout_ref.actor.optim.betas == (0.9, 0.95)
    assert apply_overrides(cfg, []) == cfg
    assert config_from_dict({"algorithm": {"adv_estimator": "rloo"}}).algorithm.adv_estimator == "rloo"
    assert config_from_dict({"critic": {"optim": {"lr": "3e-6"}}}).critic.optim.lr == 3e-6  # text from json etc.


def test_dump_reloads_equal(tmp_path):
    cfg = load_config(str(CONFIGS / "gad.yaml"), ["trainer.init_critic_from=/ckpt/step_30/critic",
                                                  "actor_rollout_ref.actor.optim.eps=1e-12"])
    out = tmp_path / "run" / "config.yaml"
    dump_yaml(cfg, out)
    assert load_config(str(out)) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg
    assert json.loads(json.dumps(to_dict(cfg))) == to_dict(cfg)  # plain types only


@pytest.mark.parametrize("name", ["gad_warmup.yaml", "gad_joint_warmup.yaml", "gad.yaml", "demo.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(str(CONFIGS / name))
    validate(cfg)
    if name.startswith("gad"):  # LMOps: one actor update per step
        assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size == cfg.data.train_batch_size == 256
    if name == "gad.yaml":
        assert cfg.trainer.critic_warmup == 0 and cfg.actor_rollout_ref.actor.use_kl_loss
        assert cfg.actor_rollout_ref.rollout.n == 8 and cfg.actor_rollout_ref.rollout.temperature == 0.8
    if name == "gad_warmup.yaml":
        assert cfg.trainer.critic_warmup == 10 and cfg.trainer.warmup.mode == "frozen"
    if name == "gad_joint_warmup.yaml":  # the paper's: SFT beside the critic, the first 10 steps critic-only
        w = cfg.trainer.warmup
        assert (w.mode, w.critic_only_steps, w.until_d_acc, cfg.trainer.total_epochs) == ("sft", 10, None, 1)
    if name == "demo.yaml":
        assert cfg.trainer.device == "cpu"


def test_derived_helpers():
    cfg = load_config(None, [GPUS8, TP2, "critic.megatron.pipeline_model_parallel_size=4", "trainer.placement=split"])
    assert world_size(cfg) == 8 and actor_dp(cfg) == 2 and critic_dp(cfg) == 1
    assert critic_model_path(apply_overrides(cfg, ["actor_rollout_ref.model.path=/m"])) == "/m"
    assert critic_model_path(apply_overrides(cfg, ["critic.model.path=/c"])) == "/c"
    assert padded_vocab_size(151936, 128) == 151936 and padded_vocab_size(50257, 128) == 50304
    assert padded_vocab_size(7, 1) == 7


# (overrides, expected substring): errors raised while loading (keys, types, choices).
LOAD_ERRORS = [
    (["actor_rollout_ref.actor.optim.lrr=1e-6"], "did you mean 'actor_rollout_ref.actor.optim.lr'?"),
    (["actor_rollout_ref.actr.ppo_epochs=2"], "Valid keys at actor_rollout_ref: model, actor, rollout, ref"),
    (["data.train_batch_size=eight"], "data.train_batch_size: expected int, got 'eight'"),
    (["data.train_batch_size=8.5"], "data.train_batch_size: expected int, got 8.5"),
    (["data.shuffle=1"], "data.shuffle: expected bool, got 1"),
    (["trainer.total_epochs=true"], "trainer.total_epochs: expected int, got True"),  # bools are not ints
    (["actor_rollout_ref.rollout.name=sglang"],
     "actor_rollout_ref.rollout.name: expected one of 'auto', 'megatron', 'vllm'"),
    (["trainer.placement=splt"], "did you mean 'split'?"),
    (["trainer.logger=[console, tensorboard]"], "trainer.logger[1]: expected one of 'console', 'jsonl', 'wandb'"),
    (["actor_rollout_ref.actor.optim.betas=[0.9]"], "expected 2 values"),
    (["trainer.warmup.until_d_acc=[0.6, high]"], "trainer.warmup.until_d_acc[1]: expected float"),
    (["data.seed.x=1"], "data.seed: expected int"),
    (["trainer.warmup"], "is not of the form key.sub=value"),
]


@pytest.mark.parametrize("overrides,message", LOAD_ERRORS)
def test_load_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  critic_warmpu: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.critic_warmpu'; did you mean "
                                          r"'trainer.critic_warmup'\?"):
        load_config(str(path))


# (overrides, arch, expected substring): errors raised by validate().
VALIDATE_ERRORS = [
    ([GPUS8, "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4"], ARCH,
     "must divide the model's num_attention_heads=14"),
    ([GPUS8, "critic.megatron.tensor_model_parallel_size=4"], {**ARCH, "num_attention_heads": 16},
     "critic.megatron.tensor_model_parallel_size=4 must divide the model's num_key_value_heads=2"),
    ([GPUS8, TP2, "actor_rollout_ref.model.make_vocab_size_divisible_by=3"], {**ARCH, "vocab_size": 50257},
     "set actor_rollout_ref.model.make_vocab_size_divisible_by to a multiple of TP=2"),
    ([GPUS8, TP2, "actor_rollout_ref.model.make_vocab_size_divisible_by=1"], {**ARCH, "vocab_size": 151935},
     "is not divisible by TP"),
    (["trainer.n_gpus_per_node=6", "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=4"], None,
     "TP*PP=1*4=4 must divide the world size trainer.nnodes*trainer.n_gpus_per_node=6"),
    (["trainer.n_gpus_per_node=4", "trainer.placement=split", "critic.megatron.tensor_model_parallel_size=4"], None,
     "the critic gets world/2=2 GPUs, which is not a multiple of TP*PP=4*1=4"),
    (["trainer.n_gpus_per_node=3", "trainer.placement=split"], None, "which is odd"),
    ([GPUS8, "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=8"], {**ARCH, "num_hidden_layers": 6},
     "pipeline_model_parallel_size=8 exceeds the model's num_hidden_layers=6"),
    ([GPUS8, "critic.megatron.pipeline_model_parallel_size=4"], {**ARCH, "num_hidden_layers": 6},
     "critic.megatron.pipeline_model_parallel_size=4 must divide the model's num_hidden_layers=6"),
    (["data.max_prompt_length=2048", "data.max_response_length=2048"], {**ARCH, "max_position_embeddings": 4096 - 1},
     "exceeds the model's max_position_embeddings=4095"),
    (["actor_rollout_ref.rollout.n=1"], None, "needs n >= 2; set actor_rollout_ref.rollout.n >= 2"),
    (["actor_rollout_ref.rollout.n=0"], None, "actor_rollout_ref.rollout.n=0 must be >= 1"),
    (["actor_rollout_ref.rollout.temperature=0"], None, "actor_rollout_ref.rollout.temperature=0.0 must be > 0"),
    (["actor_rollout_ref.actor.clip_ratio_high=0"], None, "clip_ratio_high=0.0 must be > 0"),
    (["critic.optim.lr=-1e-6"], None, "critic.optim.lr=-1e-06 must be >= 0"),
    (["trainer.warmup.until_d_acc=[0.4, 0.7]"], None, "must be [low, high] with 0.5 <= low < high <= 1"),
    (["trainer.warmup.until_d_acc=[0.7, 0.6]"], None, "must be [low, high] with 0.5 <= low < high <= 1"),
    (["trainer.warmup.until_d_acc=[0.6]"], None, "must be [low, high]"),
    (["data.train_batch_size=12", "actor_rollout_ref.actor.ppo_mini_batch_size=8"], None,
     "data.train_batch_size=12 must be divisible by actor_rollout_ref.actor.ppo_mini_batch_size=8"),
    ([GPUS8, "actor_rollout_ref.actor.ppo_mini_batch_size=1", "data.train_batch_size=8",
      "actor_rollout_ref.rollout.n=4"], None, "must be divisible by the actor data-parallel size 8"),
    (["trainer.n_gpus_per_node=4", "data.train_batch_size=6", "actor_rollout_ref.actor.ppo_mini_batch_size=2"],
     None, "must be divisible by the critic data-parallel size 4"),
    (["trainer.critic_warmup=-1"], None, "trainer.critic_warmup=-1 must be >= 0"),
    (["trainer.save_freq=0"], None, "must be -1 (never) or >= 1"),
    (["actor_rollout_ref.rollout.name=vllm", "trainer.workers=local"], None,
     "actor_rollout_ref.rollout.name=vllm needs trainer.workers=ray"),
    (["actor_rollout_ref.rollout.tensor_model_parallel_size=2"], None,
     "actor_rollout_ref.rollout.tensor_model_parallel_size=2: only 1 is supported yet"),
    (["algorithm.rollout_is=token", "algorithm.rollout_is_threshold=0.5"], None,
     "algorithm.rollout_is_threshold=0.5 must be > 1"),
    (["critic.fused_loss=te"], None,
     "critic.fused_loss=te: the Transformer Engine value head is not used in training"),
    (["trainer.device=cpu", "critic.megatron.params_dtype=float16"], None,
     "critic.megatron.params_dtype=float16 is not supported with trainer.device=cpu"),
    (["actor_rollout_ref.actor.optim.lr_scheduler=cosine", "actor_rollout_ref.actor.optim.min_lr=1e-3"], None,
     "set min_lr <= lr"),
    (["actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=400"], None,
     "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=400 is smaller than one sequence can be (512 tokens: "
     "data.max_prompt_length=256 + data.max_response_length=256); raise it to at least 512"),
    (["critic.use_dynamic_bsz=true", "critic.ppo_max_token_len_per_gpu=1000"], None,
     "critic.ppo_max_token_len_per_gpu=1000 is smaller than a teacher sequence plus one student sample can be "
     "(1024 tokens"),
    (["trainer.device=cpu", "critic.megatron.fp8=hybrid", "critic.megatron.params_dtype=bfloat16"], None,
     "critic.megatron.fp8=hybrid: FP8 runs in Transformer Engine on a GPU; it cannot run with trainer.device=cpu"),
    (["trainer.device=cuda", "actor_rollout_ref.actor.megatron.fp8=e4m3"], None,
     "actor_rollout_ref.actor.megatron.fp8=e4m3 needs actor_rollout_ref.actor.megatron.params_dtype=bfloat16"),
    (["actor_rollout_ref.actor.ppo_max_token_len_per_gpu=0"], None,
     "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=0 must be >= 1"),
]


@pytest.mark.parametrize("overrides,arch,message", VALIDATE_ERRORS)
def test_validate_errors(overrides, arch, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, arch)
    assert message in str(err.value)


def test_validate_reads_config_json_from_model_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ARCH))
    ok = load_config(None, [f"actor_rollout_ref.model.path={tmp_path}", GPUS8, TP2])
    validate(ok)  # 14 heads, 2 KV heads: TP=2 fits
    bad = apply_overrides(ok, ["critic.megatron.tensor_model_parallel_size=8"])
    with pytest.raises(ConfigError, match=r"critic\.megatron\.tensor_model_parallel_size=8 must divide"):
        validate(bad)  # the critic defaults to the actor's checkpoint
    validate(load_config(None, ["actor_rollout_ref.model.path=/does/not/exist", GPUS8,
                                "critic.megatron.tensor_model_parallel_size=8"]))  # no config.json: skipped


def test_validate_lists_every_problem():
    cfg = load_config(None, ["actor_rollout_ref.rollout.n=1", "trainer.save_freq=0", "trainer.n_gpus_per_node=0"])
    with pytest.raises(ConfigError, match=r"invalid config \(3 problems\)"):
        validate(cfg)


def test_layout_problems_name_the_callers_settings():
    from megatron_gad.config_checks import layout_problems

    keys = {"tp_key": "--tp", "pp_key": "--pp", "vocab_key": "--vocab-divisible-by"}
    mha = {"num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 95, "num_hidden_layers": 4}
    assert layout_problems(mha, 2, 2, 128, **keys) == []
    assert layout_problems(mha, 2, 3, 1, **keys) == [
        ("--tp=2: the padded vocabulary 95 (vocab_size=95 rounded up to a multiple of 1) is not divisible by TP; "
         "set --vocab-divisible-by to a multiple of TP=2"),
        "--pp=3 must divide the model's num_hidden_layers=4: every pipeline stage gets the same number of layers",
    ]
    assert layout_problems(mha, 8, 1, 128, **keys) == [
        "--tp=8 must divide the model's num_attention_heads=4; pick a TP that divides it",
        "--tp=8 must divide the model's num_key_value_heads=4; pick a TP that divides it",  # MHA: KV heads = heads
    ]
    assert layout_problems(mha, 0, 1, 128, **keys) == ["--tp=0 and --pp=1 must be >= 1"]
    assert layout_problems({}, 3, 5, 128, **keys) == []  # nothing known about the model: nothing to check
