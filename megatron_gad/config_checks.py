"""Cross-field rules of a GAD config: parallel layout, batch divisibility, model architecture, ranges.

Each rule appends a message that names the key and the fix; `check` raises one ConfigError with all of
them. Public entry point: `megatron_gad.config.validate`.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping
from typing import Any

from megatron_gad.config import (
    ConfigError,
    GADConfig,
    MegatronConfig,
    OptimConfig,
    _model_parallel,
    actor_dp,
    critic_dp,
    padded_vocab_size,
    world_size,
)


# Validation
def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


_ROLES = ("actor_rollout_ref.actor", "critic")
_SIZE_KEYS = ["trainer.nnodes", "trainer.n_gpus_per_node"] + [
    f"{r}.megatron.{k}" for r in _ROLES for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size")]
_BATCH_KEYS = ["data.train_batch_size", "actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.rollout.n"]
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}
# (key, op, bound): single-field ranges; None values (unset optional fields) are skipped.
_BOUNDS = [(k, ">=", 1) for k in _SIZE_KEYS + _BATCH_KEYS + [
    "data.max_prompt_length", "data.max_response_length", "data.tokenize_workers",
    "actor_rollout_ref.model.make_vocab_size_divisible_by",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "actor_rollout_ref.actor.ppo_epochs",
    "actor_rollout_ref.actor.logprob_chunk_size", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", "critic.ppo_micro_batch_size_per_gpu",
    "critic.forward_micro_batch_size_per_gpu", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",
    "critic.ppo_max_token_len_per_gpu", "critic.forward_max_token_len_per_gpu",
    "critic.ppo_epochs", "trainer.total_training_steps", "trainer.total_epochs", "trainer.warmup.patience",
    "trainer.warmup.max_steps", "trainer.log_every", "ray.num_cpus", "trainer.max_nonfinite_steps",
    "trainer.max_actor_ckpt_to_keep", "trainer.max_critic_ckpt_to_keep", "actor_rollout_ref.nccl_timeout",
    "critic.nccl_timeout", "actor_rollout_ref.rollout.micro_batch_size",
]] + [(k, ">=", 0) for k in [
    "trainer.critic_warmup", "actor_rollout_ref.actor.kl_loss_coef", "critic.score_reg_coef", "critic.head_init_std",
    "trainer.warmup.critic_only_steps", "actor_rollout_ref.actor.sft_loss_coef", "algorithm.grpo_std_floor",
    "algorithm.filter_groups.min_std", "reward.critic_weight", "critic.replay.capacity",
    "critic.replay.groups_per_step", "critic.r1_coef",
] + [f"{r}.optim.{k}" for r in _ROLES for k in ("lr", "min_lr", "weight_decay", "clip_grad", "lr_warmup_steps")]] + [
    ("actor_rollout_ref.rollout.temperature", ">", 0), ("actor_rollout_ref.rollout.top_p", ">", 0),
    ("actor_rollout_ref.rollout.top_p", "<=", 1), ("actor_rollout_ref.rollout.gpu_memory_utilization", ">", 0),
    ("actor_rollout_ref.rollout.gpu_memory_utilization", "<=", 1), ("actor_rollout_ref.actor.clip_ratio_low", ">", 0),
    ("actor_rollout_ref.actor.clip_ratio_high", ">", 0), ("actor_rollout_ref.actor.clip_ratio_c", ">", 1),
] + [(f"{r}.optim.eps", ">", 0) for r in _ROLES]
_WHY = {  # the reason behind the less obvious bounds, appended to the message
    "actor_rollout_ref.rollout.temperature": "on-policy RL needs sampling; greedy decoding makes all n samples "
                                             "identical. Use e.g. 0.8",
    "actor_rollout_ref.actor.clip_ratio_c": "it is the dual-clip bound for negative advantages; e.g. 3.0",
    "actor_rollout_ref.actor.clip_ratio_low": "e.g. 0.2", "actor_rollout_ref.actor.clip_ratio_high": "e.g. 0.2",
}


def _check_optim(key: str, o: OptimConfig, bad: list[str]) -> None:
    if o.lr_scheduler != "constant" and o.min_lr > o.lr:
        bad.append(f"{key}.min_lr={o.min_lr} is above {key}.lr={o.lr}; the {o.lr_scheduler} schedule decays "
                   f"from lr down to min_lr, so set min_lr <= lr")
    if not all(0 <= b < 1 for b in o.betas):
        bad.append(f"{key}.betas={list(o.betas)}: Adam betas must each be in [0, 1)")


def _check_megatron(key: str, m: MegatronConfig, bad: list[str]) -> None:
    """The per-role Megatron settings that this release runs, and how they combine."""
    if m.context_parallel_size != 1:
        bad.append(f"{key}.context_parallel_size={m.context_parallel_size}: context parallelism is not supported "
                   f"yet (the packed passes and the KV-cache rollout do not split sequences across ranks); set it to "
                   f"1 and use tensor_model_parallel_size / sequence_parallel for long sequences")
    if m.virtual_pipeline_model_parallel_size is not None:
        bad.append(f"{key}.virtual_pipeline_model_parallel_size={m.virtual_pipeline_model_parallel_size}: the "
                   f"interleaved (virtual) pipeline schedule is not supported yet (each rank holds one model "
                   f"chunk); unset it (null)")
    if m.sequence_parallel and m.tensor_model_parallel_size < 2:
        bad.append(f"{key}.sequence_parallel=true needs {key}.tensor_model_parallel_size > 1 (it splits "
                   f"activations over the TP ranks); set sequence_parallel=false or raise TP")
    o, okey = m.override_transformer_config, f"{key}.override_transformer_config"
    if o.recompute_granularity == "full":
        if o.recompute_method is None or o.recompute_num_layers is None:
            bad.append(f"{okey}.recompute_granularity=full needs recompute_method (uniform | block) and "
                       f"recompute_num_layers (e.g. recompute_method=uniform, recompute_num_layers=1)")
        elif o.recompute_num_layers < 1:
            bad.append(f"{okey}.recompute_num_layers={o.recompute_num_layers} must be >= 1")
    elif o.recompute_method is not None or o.recompute_num_layers is not None:
        what = o.recompute_granularity or "null"
        bad.append(f"{okey}.recompute_method / recompute_num_layers apply only to recompute_granularity=full "
                   f"(got recompute_granularity={what}); unset them or set recompute_granularity=full")


def _check_actor_megatron(m: MegatronConfig, bad: list[str]) -> None:
    """Settings that the critic applies but the actor cannot use yet: refused instead of ignored
    (the distributed optimizer, recompute and offload apply to both roles)."""
    key = "actor_rollout_ref.actor.megatron"
    if m.sequence_parallel:
        bad.append(f"{key}.sequence_parallel=true is not supported yet for the actor: its native rollout decodes "
                   f"one token per step, which sequence parallelism cannot split over the TP ranks; unset it "
                   f"(critic.megatron.sequence_parallel works)")


def _check_layout(cfg: GADConfig, bad: list[str]) -> None:
    world, placement = world_size(cfg), cfg.trainer.placement
    if cfg.trainer.workers == "local" and (world != 1 or placement != "colocate"):
        bad.append(f"trainer.workers=local runs each role's one rank in the trainer's process: it needs "
                   f"trainer.nnodes*trainer.n_gpus_per_node=1 and trainer.placement=colocate (got world size "
                   f"{world}, placement={placement}); use trainer.workers=ray for more ranks")
        return
    if placement == "split" and world % 2:
        bad.append(f"trainer.placement=split gives half the GPUs to the actor and half to the critic, but the "
                   f"world size (trainer.nnodes*trainer.n_gpus_per_node) is {world}, which is odd; use an even "
                   f"world size or trainer.placement=colocate")
        return
    for role in _ROLES:
        m = _get(cfg, role).megatron
        mp, tp, pp = _model_parallel(m), m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        if placement == "colocate" and world % mp:
            bad.append(f"{role}.megatron: TP*PP={tp}*{pp}={mp} must divide the world size "
                       f"trainer.nnodes*trainer.n_gpus_per_node={world}; change the parallel sizes or GPU count")
        elif placement == "split" and (world // 2) % mp:
            bad.append(f"{role}.megatron: with trainer.placement=split the {role.split('.')[-1]} gets "
                       f"world/2={world // 2} GPUs, which is not a multiple of TP*PP={tp}*{pp}={mp}; change the "
                       f"parallel sizes or GPU count, or use trainer.placement=colocate")


def _check_batches(cfg: GADConfig, bad: list[str]) -> None:
    actor, n = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout.n
    tbs, mini = cfg.data.train_batch_size, actor.ppo_mini_batch_size
    if tbs % mini:
        bad.append(f"data.train_batch_size={tbs} must be divisible by actor_rollout_ref.actor.ppo_mini_batch_size="
                   f"{mini} (each step is split into whole mini-batches of prompts)")
    dp = actor_dp(cfg)
    if dp >= 1 and (mini * n) % dp:
        bad.append(f"actor_rollout_ref.actor.ppo_mini_batch_size*rollout.n={mini}*{n}={mini * n} sequences must be "
                   f"divisible by the actor data-parallel size {dp}; adjust ppo_mini_batch_size, n or the layout")
    cdp = critic_dp(cfg)
    if cdp >= 1 and tbs % cdp:
        bad.append(f"data.train_batch_size={tbs} must be divisible by the critic data-parallel size {cdp}: each "
                   f"prompt's teacher and student sequences are scored together on one rank")


def _check_token_budgets(cfg: GADConfig, bad: list[str]) -> None:
    """A token budget must hold the longest sequence the data allows (the critic: a teacher sequence
    plus one student sample), or a long row would fail mid-run."""
    d, arr, c = cfg.data, cfg.actor_rollout_ref, cfg.critic
    longest = d.max_prompt_length + d.max_response_length
    budgets = [("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", arr.actor.use_dynamic_bsz,
                arr.actor.ppo_max_token_len_per_gpu, longest),
               ("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", arr.rollout.log_prob_use_dynamic_bsz,
                arr.rollout.log_prob_max_token_len_per_gpu, longest),
               ("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", arr.ref.log_prob_use_dynamic_bsz,
                arr.ref.log_prob_max_token_len_per_gpu, longest),
               ("critic.forward_max_token_len_per_gpu", c.use_dynamic_bsz, c.forward_max_token_len_per_gpu, longest),
               ("critic.ppo_max_token_len_per_gpu", c.use_dynamic_bsz, c.ppo_max_token_len_per_gpu, 2 * longest)]
    for key, on, budget, need in budgets:
        if on and budget < need:
            what = "a teacher sequence plus one student sample" if need > longest else "one sequence"
            bad.append(f"{key}={budget} is smaller than {what} can be ({need} tokens: data.max_prompt_length="
                       f"{d.max_prompt_length} + data.max_response_length={d.max_response_length}"
                       f"{', twice' if need > longest else ''}); raise it to at least {need}")


def _load_arch(model_path: str) -> dict | None:
    path = os.path.join(model_path, "config.json")
    if not model_path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read model architecture {path!r}: {' '.join(str(e).split())}; restore that "
                          "config.json, or point actor_rollout_ref.model.path / critic.model.path at another "
                          "model") from None


def layout_problems(arch: Mapping, tp: int, pp: int, vocab_divisible_by: int, *, tp_key: str, pp_key: str,
                    vocab_key: str) -> list[str]:
    """What Megatron refuses in a TP x PP layout of this architecture, one message per problem.

    ``arch`` is the model's Hugging Face ``config.json`` (absent keys are not checked); the ``*_key``
    arguments are how the caller names each setting (a config key or a command-line flag) in the messages.
    """
    if tp < 1 or pp < 1:
        return [f"{tp_key}={tp} and {pp_key}={pp} must be >= 1"]
    bad = []
    heads = arch.get("num_attention_heads")
    # Megatron gives each TP rank whole heads and an equal slice of the MLP; MHA configs omit the KV-head count.
    kv_heads = arch.get("num_key_value_heads") or heads
    for name, size in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                       ("intermediate_size", arch.get("intermediate_size"))):
        if size and size % tp:
            bad.append(f"{tp_key}={tp} must divide the model's {name}={size}; pick a TP that divides it")
    vocab = arch.get("vocab_size")
    if vocab_divisible_by < 1:
        bad.append(f"{vocab_key}={vocab_divisible_by} must be >= 1")
    elif vocab and padded_vocab_size(vocab, vocab_divisible_by) % tp:
        bad.append(f"{tp_key}={tp}: the padded vocabulary {padded_vocab_size(vocab, vocab_divisible_by)} "
                   f"(vocab_size={vocab} rounded up to a multiple of {vocab_divisible_by}) is not divisible by TP; "
                   f"set {vocab_key} to a multiple of TP={tp}")
    layers = arch.get("num_hidden_layers")
    if layers and pp > layers:
        bad.append(f"{pp_key}={pp} exceeds the model's num_hidden_layers={layers}; every pipeline stage needs "
                   f"at least one layer")
    elif layers and layers % pp:
        bad.append(f"{pp_key}={pp} must divide the model's num_hidden_layers={layers}: every pipeline stage gets "
                   f"the same number of layers")
    return bad


def _check_arch(cfg: GADConfig, role: str, m: MegatronConfig, arch: Mapping, bad: list[str]) -> None:
    from megatron_gad.models.arch import UnsupportedArch, arch_from_hf_config, sliding_window_problem

    path = cfg.critic.model.path if role == "critic" and cfg.critic.model.path else cfg.actor_rollout_ref.model.path
    where = "critic.model.path" if role == "critic" and cfg.critic.model.path else "actor_rollout_ref.model.path"
    try:  # an architecture the model builder would refuse inside a worker, reported here as an input error
        parsed = arch_from_hf_config(dict(arch))
    except UnsupportedArch as e:
        bad.append(f"{where}={path}: {e}")
        return
    except KeyError:  # a missing size key: the layout rules below name it
        parsed = None
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    window = parsed and sliding_window_problem(parsed, longest, "data.max_prompt_length+data.max_response_length")
    if window:
        bad.append(f"{where}={path}: {window}")
    bad += layout_problems(arch, m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                           cfg.actor_rollout_ref.model.make_vocab_size_divisible_by,
                           tp_key=f"{role}.megatron.tensor_model_parallel_size",
                           pp_key=f"{role}.megatron.pipeline_model_parallel_size",
                           vocab_key="actor_rollout_ref.model.make_vocab_size_divisible_by")
    o, layers, pp = m.override_transformer_config, arch.get("num_hidden_layers"), m.pipeline_model_parallel_size
    if o.recompute_granularity == "full" and o.recompute_num_layers and layers and pp >= 1 and layers % pp == 0:
        per_stage = layers // pp
        # Megatron: "block" recomputes the first N layers of a stage, "uniform" groups of N layers
        if o.recompute_num_layers > per_stage:
            bad.append(f"{role}.megatron.override_transformer_config.recompute_num_layers={o.recompute_num_layers} "
                       f"exceeds the {per_stage} layers of a pipeline stage; use at most {per_stage}")
    max_pos = arch.get("max_position_embeddings")
    total = cfg.data.max_prompt_length + cfg.data.max_response_length
    if max_pos and total > max_pos:
        bad.append(f"data.max_prompt_length+data.max_response_length={total} exceeds the model's "
                   f"max_position_embeddings={max_pos}; shorten them")


def check(cfg: GADConfig, arch: Mapping | None = None) -> None:
    """The rules behind `megatron_gad.config.validate` (see there)."""
    bad: list[str] = []
    for key, op, bound in _BOUNDS:
        value = _get(cfg, key)
        if value is not None and not _OPS[op](value, bound):
            why = f" ({_WHY[key]})" if key in _WHY else ""
            bad.append(f"{key}={value} must be {op} {bound}{why}")
    _check_optim("actor_rollout_ref.actor.optim", cfg.actor_rollout_ref.actor.optim, bad)
    _check_optim("critic.optim", cfg.critic.optim, bad)
    for role in _ROLES:
        _check_megatron(f"{role}.megatron", _get(cfg, role).megatron, bad)
    _check_actor_megatron(cfg.actor_rollout_ref.actor.megatron, bad)
    actor, rollout, trainer = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout, cfg.trainer

    if rollout.n == 1 and cfg.algorithm.adv_estimator in ("grpo", "rloo"):
        bad.append(f"actor_rollout_ref.rollout.n=1 but algorithm.adv_estimator={cfg.algorithm.adv_estimator} "
                   f"normalises rewards within each prompt's group of samples, which needs n >= 2; set "
                   f"actor_rollout_ref.rollout.n >= 2")
    if rollout.top_k == 0 or rollout.top_k < -1:
        bad.append(f"actor_rollout_ref.rollout.top_k={rollout.top_k} must be -1 (disabled) or >= 1")
    band = trainer.warmup.until_d_acc
    if band is not None and not (len(band) == 2 and 0.5 <= band[0] < band[1] <= 1):
        bad.append(f"trainer.warmup.until_d_acc={band} must be [low, high] with 0.5 <= low < high <= 1 "
                   f"(0.5 is a blind discriminator; e.g. [0.6, 0.7]), or null to disable")
    if trainer.save_freq != -1 and trainer.save_freq < 1:
        bad.append(f"trainer.save_freq={trainer.save_freq} must be -1 (never) or >= 1 (every N steps)")

    if rollout.name == "vllm" and trainer.workers == "local":
        bad.append("actor_rollout_ref.rollout.name=vllm needs trainer.workers=ray (vLLM engines run in their own Ray "
                   "workers); use actor_rollout_ref.rollout.name=megatron with trainer.workers=local")
    if rollout.tensor_model_parallel_size != 1 and rollout.name != "megatron":  # native: the actor's layout
        bad.append(f"actor_rollout_ref.rollout.tensor_model_parallel_size={rollout.tensor_model_parallel_size}: only "
                   "1 is supported yet (one vLLM engine per actor GPU, data-parallel; the weight sync already sends "
                   "full tensors, so the actor's TP may differ); set it to 1")
    if rollout.weight_sync_bucket_mb < 1:
        bad.append(f"actor_rollout_ref.rollout.weight_sync_bucket_mb={rollout.weight_sync_bucket_mb} must be >= 1")
    if cfg.algorithm.rollout_is is not None and cfg.algorithm.rollout_is_threshold <= 1.0:
        bad.append(f"algorithm.rollout_is_threshold={cfg.algorithm.rollout_is_threshold} must be > 1 (importance "
                   "weights are truncated from above at this value; 2.0 is verl's default)")
    c = cfg.critic
    if c.bt_temperature <= 0:
        bad.append(f"critic.bt_temperature={c.bt_temperature} must be > 0 (1.0: plain Bradley-Terry)")
    if not 0 <= c.label_smoothing < 0.5:
        bad.append(f"critic.label_smoothing={c.label_smoothing} must be in [0, 0.5) (0.5 would make the target 1/2: "
                   "nothing to learn)")
    if not 0 <= c.swap_prob < 0.5:
        bad.append(f"critic.swap_prob={c.swap_prob} must be in [0, 0.5) (at 0.5 half the labels are flipped: "
                   "nothing to learn)")
    r, crf = cfg.reward, cfg.custom_reward_function
    if r.verifier_weight != 0 and not crf.path:
        bad.append(f"reward.verifier_weight={r.verifier_weight} needs a verifier: set custom_reward_function.path (a "
                   "Python file) and custom_reward_function.name (its function: prompt, response -> float)")
    if not 0.5 <= r.hacking_auc <= 1 or r.hacking_window < 2:
        bad.append(f"reward.hacking_auc={r.hacking_auc} must be in [0.5, 1] and reward.hacking_window="
                   f"{r.hacking_window} >= 2 (a reward trend needs two steps)")
    if r.critic_weight == 0 and r.verifier_weight == 0 and trainer.mode == "gad":
        bad.append("reward.critic_weight=0 and reward.verifier_weight=0: the actor's reward would be 0 for every "
                   "sample; the checker-only control needs a verifier (custom_reward_function.path) with "
                   "reward.verifier_weight > 0")
    if trainer.best_checkpoint.metric is not None and (trainer.test_freq < 1 or not cfg.data.val_files):
        bad.append(f"trainer.best_checkpoint.metric={trainer.best_checkpoint.metric} is read from the validation "
                   "metrics: set data.val_files and trainer.test_freq >= 1")
    if c.r1_coef > 0 and c.megatron.pipeline_model_parallel_size > 1:
        bad.append("critic.r1_coef: the penalty needs the input embeddings and the scores in one process; "
                   "set critic.megatron.pipeline_model_parallel_size=1 (or critic.r1_coef=0)")
    if c.r1_coef > 0 and c.megatron.override_transformer_config.recompute_granularity is not None:
        bad.append("critic.r1_coef needs the input-embedding gradient of the critic's graph (a double backward), "
                   "which activation recompute discards: unset critic.megatron.override_transformer_config."
                   "recompute_granularity or set critic.r1_coef=0")
    if c.loss_type == "bce" and c.margin != 0.0:
        bad.append(f"critic.margin={c.margin} applies to the score gap of the pair losses (bt, hinge); "
                   "critic.loss_type=bce scores each side alone: set critic.margin=0")
    g = c.saturation_guard
    if g.enable and not (0.5 <= g.lower < g.upper <= 1.0):
        bad.append(f"critic.saturation_guard: lower={g.lower} and upper={g.upper} must satisfy 0.5 <= lower < upper "
                   "<= 1 (e.g. lower=0.55, upper=0.95)")
    if g.enable and (g.window < 1 or g.extra_steps < 0 or not 0 < g.lr_scale <= 1):
        bad.append(f"critic.saturation_guard: window={g.window} must be >= 1, extra_steps={g.extra_steps} >= 0 and "
                   f"lr_scale={g.lr_scale} in (0, 1]")
    if c.fused_loss == "triton" and critic_controls_on(c):
        bad.append("critic.fused_loss=triton: the fused kernel computes plain Bradley-Terry (+ score_reg_coef) at the "
                   "last token only; with critic.loss_type/bt_temperature/label_smoothing/margin/swap_prob or "
                   "score_pooling=mean set use "
                   "critic.fused_loss=auto (it then runs the torch path) or torch")
    if cfg.critic.fused_loss == "te":
        from megatron_gad.kernels.disc_loss import TE_HEAD_NOT_USED  # the one wording, shared with the worker

        bad.append(TE_HEAD_NOT_USED)
    if trainer.device == "cpu":
        for role in _ROLES:
            if _get(cfg, role).megatron.params_dtype == "float16":
                bad.append(f"{role}.megatron.params_dtype=float16 is not supported with trainer.device=cpu "
                           f"(fp16 needs loss scaling and GPU kernels); use bfloat16 or float32 on CPU")
    if trainer.device == "cpu":
        env = os.environ.get("MEGATRON_GAD_ATTENTION_BACKEND", "").strip().lower()
        for key, value in [(f"{r}.megatron.attention_backend", _get(cfg, r).megatron.attention_backend)
                           for r in _ROLES] + [("MEGATRON_GAD_ATTENTION_BACKEND", env)]:
            if value in ("varlen", "flash"):
                bad.append(f"{key}={value} runs only on a CUDA device in bf16/fp16; with trainer.device=cpu use "
                           "auto, eager, sdpa or flex (forward only)")
    for role in _ROLES:
        m = _get(cfg, role).megatron
        if m.fp8 is None:
            continue
        if trainer.device == "cpu":
            bad.append(f"{role}.megatron.fp8={m.fp8}: FP8 runs in Transformer Engine on a GPU; it cannot run with "
                       "trainer.device=cpu (unset it)")
        if m.params_dtype != "bfloat16":
            bad.append(f"{role}.megatron.fp8={m.fp8} needs {role}.megatron.params_dtype=bfloat16 (TE keeps bf16 "
                       f"weights and casts GEMM inputs to FP8), got {m.params_dtype}")

    # Layout, batch and architecture rules divide by these sizes: run them only once the sizes are positive
    # (a non-positive size is already reported above and would only add noise or a ZeroDivisionError).
    sizes_ok = all(_get(cfg, k) >= 1 for k in _SIZE_KEYS)
    if sizes_ok:
        _check_layout(cfg, bad)
        if all(_get(cfg, k) >= 1 for k in _BATCH_KEYS):
            _check_batches(cfg, bad)
            _check_token_budgets(cfg, bad)

    actor_arch = arch if arch is not None else _load_arch(cfg.actor_rollout_ref.model.path)
    critic_arch = actor_arch
    if cfg.critic.model.path and cfg.critic.model.path != cfg.actor_rollout_ref.model.path:
        critic_arch = _load_arch(cfg.critic.model.path) or actor_arch
    if sizes_ok and cfg.actor_rollout_ref.model.make_vocab_size_divisible_by >= 1:
        if actor_arch:
            _check_arch(cfg, "actor_rollout_ref.actor", actor.megatron, actor_arch, bad)
        if critic_arch:
            _check_arch(cfg, "critic", cfg.critic.megatron, critic_arch, bad)

    if bad:
        bad = list(dict.fromkeys(bad))  # actor and critic may report the same shared-length problem
        if len(bad) == 1:  # one problem: one line
            raise ConfigError(f"invalid config: {bad[0]}")
        raise ConfigError(f"invalid config ({len(bad)} problems):\n  - " + "\n  - ".join(bad))


def critic_controls_on(c) -> bool:
    """Whether any setting the fused kernel lacks is on: a pair-loss control beyond plain
    Bradley-Terry, or mean pooling (the kernel reads each sequence's last token only)."""
    return (c.loss_type != "bt" or c.bt_temperature != 1.0 or c.label_smoothing != 0.0 or c.margin != 0.0
            or c.swap_prob != 0.0 or c.score_pooling != "last" or c.r1_coef != 0.0)
