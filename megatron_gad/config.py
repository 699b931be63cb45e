"""Typed, strict run configuration for megatron-gad.

The schema is a tree of frozen dataclasses whose key names follow verl (``actor_rollout_ref.actor.optim.lr``,
``trainer.critic_warmup``, ...) so verl users can carry their scripts over. A config comes from a YAML file
plus ``key.sub=value`` overrides. Loading is strict: a typo or a wrong type fails at start-up with the full
dotted key, instead of being silently ignored and discovered hours into a run. ``validate`` then checks the
cross-field rules (parallel layout, batch divisibility, model architecture) and says how to fix each one.

Only the standard library and PyYAML are imported here: the driver loads the config before torch or Ray start.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from megatron_gad.compat import translate, translate_tree
from megatron_gad.errors import UserError

__all__ = [
    "ConfigError",
    "GADConfig",
    "actor_dp",
    "apply_overrides",
    "config_from_dict",
    "critic_dp",
    "critic_model_path",
    "dump_yaml",
    "load_config",
    "padded_vocab_size",
    "to_dict",
    "validate",
    "world_size",
]


class ConfigError(UserError, ValueError):
    """A config that cannot be loaded or would not run; the message names the key and the fix."""


# Schema
ParamsDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "content"
    teacher_response_key: str = "teacher_response"
    max_prompt_length: int = 256
    max_response_length: int = 256
    train_batch_size: int = 8  # prompts per step
    shuffle: bool = True
    seed: int = 1
    on_bad_row: Literal["error", "skip"] = "error"
    # Tokenized rows are cached (keyed by the files' bytes, the tokenizer and the row keys) so a resume or
    # requeue does not tokenize again; null: <trainer.default_local_dir>/.cache/data. Docs: README "Data".
    cache_dir: str | None = None
    use_cache: bool = True
    tokenize_workers: int | None = None  # processes tokenizing a large set; null: one per CPU, at most 16
    # A prompt over max_prompt_length (verl's key and values): error = a bad row (data.on_bad_row says
    # whether the run stops or drops it); left = keep its last tokens; right = its first; middle = the
    # first half and the last half. Responses are never truncated.
    truncation: Literal["error", "left", "right", "middle"] = "error"


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    # Padding the vocab to a fixed multiple (not multiplied by TP, unlike Megatron's default) keeps the
    # embedding shape identical for every TP, so checkpoints reshard without touching the vocab rows.
    make_vocab_size_divisible_by: int = 128


@dataclass(frozen=True)
class OverrideTransformerConfig:
    """Megatron ``TransformerConfig`` fields a role may set (verl's ``override_transformer_config``).
    Activation recompute: null (keep every activation) | selective (recompute core attention only) |
    full (keep each layer's input; ``recompute_method`` uniform / block and ``recompute_num_layers``
    say which layers, as in Megatron)."""
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None


ATTENTION_BACKENDS = ("auto", "eager", "sdpa", "varlen", "flex", "flash")
AttentionBackend = Literal["auto", "eager", "sdpa", "varlen", "flex", "flash"]


@dataclass(frozen=True)
class MegatronConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    params_dtype: ParamsDtype = "float32"
    seed: int = 42
    # FP8 GEMMs through Transformer Engine (GPU with TE, bf16 params): null (off) | e4m3 | hybrid
    # (e4m3 forward, e5m2 gradients), with Megatron's recipe names.
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    # Shard the Adam state and fp32 master weights over the data-parallel ranks (ZeRO-1, Megatron's
    # distributed optimizer): optimizer bytes per rank drop by about DP.
    use_distributed_optimizer: bool = False
    # Split the norm/residual activations along the sequence over the TP ranks (needs TP > 1).
    sequence_parallel: bool = False
    # verl's keys, kept so their configs load; validation refuses values other than these defaults.
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    override_transformer_config: OverrideTransformerConfig = field(default_factory=OverrideTransformerConfig)
    # Between the phases that use them, keep these in host memory (verl's keys): the weights (back for
    # every pass), the fp32 gradient buffers and the optimizer state (back for updates only).
    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    # Core attention of the local (non-TE) spec, docs/attention.md; MEGATRON_GAD_ATTENTION_BACKEND overrides.
    attention_backend: AttentionBackend = "auto"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 0.2
    lr_warmup_steps: int = 0
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class ActorConfig:
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_mini_batch_size: int = 8  # prompts per optimizer step
    ppo_micro_batch_size_per_gpu: int = 4  # sequences per micro-batch
    # Token-budget micro-batches (verl's keys): packed micro-batches of at most this many tokens per GPU,
    # balanced by token count, instead of a fixed number of sequences.
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384
    ppo_epochs: int = 1
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = \
        "token-mean"
    policy_loss: Literal["vanilla"] = "vanilla"
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: Literal["low_var_kl", "k1", "k2", "k3", "kl", "abs", "mse"] = "low_var_kl"
    entropy_coeff: float = 0.0
    logprob_chunk_size: int = 1024
    # GAD steps: + sft_loss_coef x the NLL of the step's teacher responses, in the same optimizer step
    # as the policy loss (each term with its own token-mean denominator); 0 = off
    sft_loss_coef: float = 0.0


@dataclass(frozen=True)
class RolloutConfig:
    # the sampling engine: vllm (its own Ray workers, weights synced from the actor after each update) or
    # megatron (the actor's own model, the reference path); auto: vllm where the trainer runs on GPUs and
    # vLLM imports, else megatron
    name: Literal["auto", "megatron", "vllm"] = "auto"
    tensor_model_parallel_size: int = 1  # vLLM engine TP (independent of the actor's; only 1 yet); unused by megatron
    n: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = -1
    log_prob_micro_batch_size_per_gpu: int = 8
    log_prob_use_dynamic_bsz: bool = False
    log_prob_max_token_len_per_gpu: int = 16384
    gpu_memory_utilization: float = 0.5
    free_cache_engine: bool = True  # vLLM sleep mode between rollouts (GPU): weights and KV cache leave the GPU
    enforce_eager: bool = False  # vLLM without CUDA graphs (always eager on CPU)
    weight_sync_bucket_mb: int = 512  # Megatron -> vLLM weights travel in buckets of about this size
    # native (megatron) rollout: at most this many rows decode together in one length bucket; null: all rows of
    # the rank (one forward per step for all of them); set it where their KV cache would not fit
    micro_batch_size: int | None = None


@dataclass(frozen=True)
class RefMegatronConfig:
    """The frozen reference runs in the actor's layout (``actor.megatron``); only where its weights live
    between passes is its own (verl's key). Default true, unlike verl: the reference is used once per step,
    so its weights stay in host memory and come to the device for its log-prob pass only."""
    param_offload: bool = True
    # null: the actor's actor.megatron.attention_backend
    attention_backend: AttentionBackend | None = None


@dataclass(frozen=True)
class RefConfig:
    megatron: RefMegatronConfig = field(default_factory=RefMegatronConfig)
    log_prob_micro_batch_size_per_gpu: int = 8
    log_prob_use_dynamic_bsz: bool = False
    log_prob_max_token_len_per_gpu: int = 16384


@dataclass(frozen=True)
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    # Seconds a collective of the actor's process group may wait before the run fails (verl's key; verl's
    # default is 600). Long enough for the slowest rank's checkpoint save or weight export; LMOps runs 36000.
    nccl_timeout: int = 7200


@dataclass(frozen=True)
class CriticModelConfig:
    path: str = ""  # empty: initialise the discriminator from the actor's checkpoint (as GAD does)


@dataclass(frozen=True)
class SaturationGuardConfig:
    """Keeps D out of saturation in GAD steps (controller/saturation.py); off by default."""

    enable: bool = False
    upper: float = 0.95  # rolling d_acc above this: skip D's update, or scale its lr
    lower: float = 0.55  # below this: extra D updates on the same pairs
    window: int = 5  # GAD steps in the rolling mean
    action: Literal["skip", "scale_lr"] = "skip"
    lr_scale: float = 0.1
    extra_steps: int = 1


@dataclass(frozen=True)
class ReplayConfig:
    """Past student samples for the discriminator (``algos.replay``); off while capacity or
    groups_per_step is 0. The buffer is not checkpointed: a resumed run refills it."""
    capacity: int = 0  # prompt groups kept (the newest)
    groups_per_step: int = 0  # past groups added to each critic update, after the current ones


@dataclass(frozen=True)
class CriticConfig:
    model: CriticModelConfig = field(default_factory=CriticModelConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Prompts per micro-batch: a micro-batch holds each prompt's teacher sequence and its n student samples,
    # so every Bradley-Terry pair is scored within one forward pass.
    ppo_micro_batch_size_per_gpu: int = 4
    # Sequences per micro-batch when scoring student samples (the reward pass).
    forward_micro_batch_size_per_gpu: int = 8
    # Token-budget micro-batches (verl's keys). Update: a group (teacher + its n samples) larger than the
    # budget is split, each part repeating the teacher sequence; the loss is unchanged.
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384
    forward_max_token_len_per_gpu: int = 16384
    ppo_epochs: int = 1
    # auto: the fused Triton kernel where Triton runs (CUDA), else torch. "te" is refused by validation
    # (kernels/disc_loss.py:TE_HEAD_NOT_USED); it stays in the choices so the refusal can say why.
    fused_loss: Literal["auto", "triton", "torch", "te"] = "auto"
    score_reg_coef: float = 0.0
    head_init_std: float = 0.0  # 0.0 = zero-init scalar head
    # How a response's end is scored, the same rule for teacher and student (docs/discriminator.md):
    # append: the teacher text gets one EOS (the data pipeline's) and a student keeps the EOS it sampled, so
    # equal texts are equal token ids; strip: a final EOS is dropped from both; none: the teacher's EOS is
    # dropped but the student's kept -- the users' failure (D learns "has EOS"), for comparison only.
    eos_policy: Literal["append", "strip", "none"] = "append"
    # Where a sequence's score is read, the same for both sides: last = its last token (the paper);
    # mean = the mean of the head over its response tokens (docs/discriminator.md).
    score_pooling: Literal["last", "mean"] = "last"
    # Saturation controls of the pair loss (algos.discriminator.pair_loss), all off by default:
    # bt: Bradley-Terry on the gap; hinge; bce: the paper's ablation, -log s(D(teacher)) - log(1 - s(D(student)))
    loss_type: Literal["bt", "hinge", "bce"] = "bt"
    bt_temperature: float = 1.0  # z = (gap - margin) / temperature
    label_smoothing: float = 0.0  # bt target 1 - eps
    margin: float = 0.0
    swap_prob: float = 0.0  # each pair's teacher and student exchanged (label flipped) with this probability
    saturation_guard: SaturationGuardConfig = field(default_factory=SaturationGuardConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    # R1 gradient penalty on the input embeddings of teacher sequences (algos.r1_penalty): + r1_coef / 2 x
    # E_teacher ||dD/de||^2 in each update (a double backward; not with activation recompute); 0 = off
    r1_coef: float = 0.0
    nccl_timeout: int = 7200  # seconds, for the critic's process group (see actor_rollout_ref.nccl_timeout)


@dataclass(frozen=True)
class FilterGroupsConfig:
    """DAPO's dynamic sampling, without resampling (verl's ``algorithm.filter_groups``): a prompt's group
    whose rewards' std is <= ``min_std`` carries no ranking signal and leaves the actor's batch."""
    enable: bool = False
    min_std: float = 0.0


@dataclass(frozen=True)
class AlgorithmConfig:
    adv_estimator: Literal["grpo", "rloo"] = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    # truncated importance sampling against the rollout engine's own log-probs (training-inference
    # mismatch, as verl): null (off) | token | sequence; weights min(ratio, threshold)
    rollout_is: Literal["token", "sequence"] | None = None
    rollout_is_threshold: float = 2.0
    # GRPO: divide by max(group std, this floor) (0 = off): a group whose rewards barely differ is not
    # blown up to full-size advantages
    grpo_std_floor: float = 0.0
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


@dataclass(frozen=True)
class WarmupConfig:
    mode: Literal["frozen", "sft"] = "frozen"
    until_d_acc: list[float] | None = None  # [low, high] band of discriminator accuracy
    patience: int = 3
    max_steps: int | None = None
    # mode sft: the first k warmup steps train the discriminator only (LMOps' warmup run: critic_warmup=10)
    critic_only_steps: int = 0


@dataclass(frozen=True)
class BestCheckpointConfig:
    """Keep the checkpoint with the best validation metric in <default_local_dir>/best (off: metric null).
    ``metric``: a key of the validation metrics (e.g. val/d_acc); ``mode``: max or min is better."""
    metric: str | None = None
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class TrainerConfig:
    total_training_steps: int | None = None
    total_epochs: int = 1
    critic_warmup: int = 0
    # "gad": the adversarial loop (with its warmup); "sft": plain distillation on the teacher responses
    # (sequence-level KD, the baseline GAD is compared with) — no rollout and no discriminator.
    mode: Literal["gad", "sft"] = "gad"
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    save_freq: int = -1  # -1: no periodic checkpoints; N: every N steps
    test_freq: int = -1  # -1: no validation; N: held-out metrics (data.val_files) every N steps and at the end
    val_before_train: bool = False  # also validate before the first step (logged as step 0; verl's key)
    best_checkpoint: BestCheckpointConfig = field(default_factory=BestCheckpointConfig)
    default_local_dir: str = "outputs/gad"
    resume_mode: Literal["auto", "disable"] = "auto"
    resume_from_path: str | None = None
    init_critic_from: str | None = None  # a warmup checkpoint's critic dir
    init_actor_from: str | None = None
    logger: list[Literal["console", "jsonl", "wandb"]] = field(default_factory=lambda: ["console"])
    project_name: str = "megatron_gad"
    experiment_name: str = "gad"
    seed: int = 1
    nnodes: int = 1
    n_gpus_per_node: int = 1
    placement: Literal["colocate", "split"] = "colocate"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "ray": each role's ranks are Ray processes; "local": each role's one rank runs in the trainer's own
    # process (no Ray; one device, TP = PP = DP = 1 — the GPU check machine, quick single-device runs).
    workers: Literal["ray", "local"] = "ray"
    log_every: int = 1
    # every N steps, samples.jsonl gets a per-sample view (prompt, a student sample, the teacher response, both
    # critic scores, lengths, EOS) of up to 4 prompts; 0 = off
    sample_log_freq: int = 10
    # a role whose loss or gradient is non-finite skips that optimizer update; this many such steps of
    # one role in a row stop the run (see ModelShard.train_step)
    max_nonfinite_steps: int = 3
    # verl's keys: keep only the newest N complete checkpoints (None: keep all); older ones are deleted
    # only after a newer one is complete
    max_actor_ckpt_to_keep: int | None = None
    max_critic_ckpt_to_keep: int | None = None
    # rewards from the critic update's own forward and, on-policy (one PPO epoch, one mini-batch), no
    # separate old log-prob pass (controller/step_plan.py); false: the separate passes (for comparison)
    lean_step: bool = True


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    num_cpus: int | None = None
    local_mode: bool = False


@dataclass(frozen=True)
class CustomRewardFunctionConfig:
    """verl's keys: a task verifier, ``name`` in the Python file ``path`` (controller/verifier.py)."""
    path: str | None = None
    name: str = "compute_score"


@dataclass(frozen=True)
class RewardConfig:
    # the actor's reward = D(student) + verifier_weight * verifier (0 = the verifier is logged only)
    verifier_weight: float = 0.0
    # the discriminator's part of the reward: critic_weight x shaped D (0 with a verifier = the
    # checker-only control: the critic still trains and is logged, the actor never sees it)
    critic_weight: float = 1.0
    # score: D(student); sigmoid_gap: sigmoid(D(student) - D(teacher of its prompt)), bounded in (0, 1)
    critic_shape: Literal["score", "sigmoid_gap"] = "score"
    # warn (reward/hacking_warning) when critic/verifier_auc stays below hacking_auc over hacking_window
    # GAD steps while D's reward rises
    hacking_auc: float = 0.55
    hacking_window: int = 5


@dataclass(frozen=True)
class GADConfig:
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


# YAML: PyYAML follows YAML 1.1, where a float needs a dot, so `1e-6` would load as the string "1e-6".
# Learning rates are written that way, so our loader also resolves dot-less exponent forms to floats.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# dict -> dataclasses, with strict type checks

@cache
def _hints(cls: type) -> dict[str, Any]:
    # Annotations are strings under `from __future__ import annotations`; resolve them once per class.
    return {f.name: get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _unknown_key(prefix: str, name: Any, valid: list[str]) -> ConfigError:
    msg = f"unknown config key '{_join(prefix, name)}'"
    close = difflib.get_close_matches(str(name), valid, n=1)
    if close:
        msg += f"; did you mean '{_join(prefix, close[0])}'?"
    return ConfigError(f"{msg} Valid keys at {prefix or 'the top level'}: {', '.join(valid)}")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        names = [_type_name(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in get_args(tp) else "")
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"{get_origin(tp).__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _accepts_str(tp: Any) -> bool:
    if _is_union(tp):
        return any(_accepts_str(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return tp is str


def _coerce(value: Any, tp: Any, key: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad()
        return _build(tp, value, key)
    if _is_union(tp):
        if value is None and type(None) in get_args(tp):
            return None
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:  # Optional[X]: let X's own (more precise) error through
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise bad()
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        # `type(...) is` so that True does not pass for 1 (True == 1 in Python).
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}; got {value!r}{hint}")
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str) and _accepts_str(item):
            value = [value]  # `train_files: data.parquet` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is Any:
        return value
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # Dicts built outside our YAML loader (json, argparse) may still carry "1e-6" as text.
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            return float(value.replace("_", ""))
        raise bad()
    raise TypeError(f"config schema uses an unsupported type at {key}: {tp!r}")  # a bug in this file


def _build(cls: type, d: Mapping, prefix: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for name, value in d.items():
        if name not in hints:
            raise _unknown_key(prefix, name, list(hints))
        kwargs[name] = _coerce(value, hints[name], _join(prefix, name))
    return cls(**kwargs)


def config_from_dict(d: Mapping | None) -> GADConfig:
    """Build a GADConfig from a (possibly partial) nested dict; missing keys take their defaults."""
    if d is None:
        return GADConfig()
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(d).__name__}")
    return _build(GADConfig, d, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists, no tuples) that `config_from_dict` turns back into an equal config."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


# Overrides, loading, dumping
def apply_overrides(cfg: GADConfig, overrides: list[str] | tuple[str, ...] = ()) -> GADConfig:
    """Return a new config with `key.sub=value` overrides applied (values parsed as YAML)."""
    if isinstance(overrides, str):
        overrides = [overrides]  # a bare string would otherwise be iterated character by character
    d = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        for new_key, new_value in translate(key.strip(), value):  # verl/LMOps spellings (megatron_gad/compat.py)
            parts, value = new_key.split("."), new_value
            tp: Any = GADConfig
            for part in parts:  # the target field's type; unknown keys are reported by config_from_dict below
                tp = _hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
            # Names and paths such as `experiment_name=0042` or `=true` must stay text, not become 42 / True.
            if isinstance(value, (bool, int, float)) and tp is not None and _accepts_str(tp):
                value = raw.strip()
            for part in reversed(parts):
                value = {part: value}
            d = _merge(d, value)  # a mapping value merges: `trainer.warmup={mode: sft}` changes only `mode`
    return config_from_dict(d)


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> GADConfig:
    """Load a YAML config (None = all defaults) and apply dotlist overrides. Does not call `validate`."""
    data: Any = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = _yaml_load(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}; pass the path of a YAML "
                              "config (configs/gad.yaml is a complete example)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; fix the file "
                              "(a YAML mapping of keys such as `trainer:`, `data:`)") from None
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"config file {str(path)!r} holds a YAML {type(data).__name__}, not a mapping of "
                              "keys; write it as sections such as `trainer:` and `data:` (see configs/gad.yaml)")
        try:
            cfg = config_from_dict(translate_tree(data) if data is not None else None)
        except ConfigError as e:
            raise ConfigError(f"config file {str(path)!r}: {e}") from None
        return apply_overrides(cfg, overrides)
    return apply_overrides(config_from_dict(data), overrides)


def dump_yaml(cfg: GADConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every key, defaults included) so a run can be reproduced exactly."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Resolved megatron-gad config (all keys, defaults included). Reload with load_config().\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=None)


# Derived quantities
def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Round vocab_size up to a multiple of divisible_by (independent of TP, so checkpoints reshard)."""
    if divisible_by < 1:
        raise ConfigError(f"make_vocab_size_divisible_by must be >= 1, got {divisible_by}")
    return -(-vocab_size // divisible_by) * divisible_by


def world_size(cfg: GADConfig) -> int:
    return cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node


def _model_parallel(m: MegatronConfig) -> int:
    return m.tensor_model_parallel_size * m.pipeline_model_parallel_size


def _role_world(cfg: GADConfig) -> int:
    # colocate: actor and critic time-share every GPU; split: each gets its own half of the GPUs.
    return world_size(cfg) if cfg.trainer.placement == "colocate" else world_size(cfg) // 2


def actor_dp(cfg: GADConfig) -> int:
    return _role_world(cfg) // max(1, _model_parallel(cfg.actor_rollout_ref.actor.megatron))


def critic_dp(cfg: GADConfig) -> int:
    return _role_world(cfg) // max(1, _model_parallel(cfg.critic.megatron))


def critic_model_path(cfg: GADConfig) -> str:
    return cfg.critic.model.path or cfg.actor_rollout_ref.model.path


def validate(cfg: GADConfig, arch: Mapping | None = None) -> None:
    """Check cross-field rules; raise one ConfigError listing every problem (key and fix for each).

    `arch` is the model's HF `config.json` as a dict. When None, `<model.path>/config.json` is read if it
    exists (for the actor, and for the critic when its path differs); otherwise architecture checks are skipped.
    The rules live in `megatron_gad.config_checks`.
    """
    from megatron_gad.config_checks import check

    check(cfg, arch)
