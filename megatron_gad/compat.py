"""verl / LMOps launch-script keys that megatron-gad spells differently or does not have.

Applied to overrides and YAML before strict loading (``config.apply_overrides`` / ``load_config``): a key
listed here is either carried over with the same meaning (renamed, or accepted because our behaviour
already is what the value asks for) or refused with a message naming the megatron-gad setting that
does that job. Keys not listed go to the strict loader unchanged, so real typos are still rejected.
The table in ``docs/compat.md`` is generated from ``RULES`` (``python -m megatron_gad.compat``).

Standard library only: the config is loaded before torch or Ray start.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("megatron_gad")

A, C = "actor_rollout_ref.actor", "critic"
ROLLOUT = "actor_rollout_ref.rollout"
_FSDP_POINTER = ("FSDP is not used: Megatron shards the model with `{role}.megatron.tensor_model_parallel_size` / "
                 "`pipeline_model_parallel_size` (and the optimizer state with `use_distributed_optimizer`); "
                 "nothing is offloaded to CPU")


@dataclass(frozen=True)
class Rule:
    key: str  # dotted key; a trailing ".*" matches everything below
    kind: str  # "same" | "map" | "accept" | "refuse"
    note: str  # the meaning here; for a refusal, the megatron-gad setting that does the job
    target: tuple[str, ...] = ()  # "map": our key(s)
    convert: Callable[[Any], Any] | None = None  # "map": value -> our value (ValueError: refused, why)
    accepts: Callable[[Any], bool] | None = None  # "accept": values that already mean our behaviour
    accepted: str = ""  # those values, in words (for the doc)


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x and type(v) is type(x) for x in values)


def _off(v: Any) -> bool:
    return v is None or v is False or (type(v) in (int, float) and v in (0, -1))


def _refuse(key: str, note: str):
    def convert(v: Any) -> Any:
        from megatron_gad.config import ConfigError

        raise ConfigError(f"{key}={v!r}: {note}")
    return convert


def _recompute(v: Any) -> Any:
    """HF-style gradient checkpointing = Megatron full recompute of every layer (one layer per checkpoint)."""
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    if not v:
        return {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def _warmup_style(v: Any) -> Any:
    if v in ("constant", "cosine"):
        return v
    raise ValueError("expected constant or cosine (our `optim.lr_scheduler` also has linear)")


RULES: tuple[Rule, ...] = (
    *(Rule(f"{r}.grad_clip", "map", "gradient-norm clipping", (f"{r}.optim.clip_grad",)) for r in (A, C)),
    Rule(f"{A}.clip_ratio", "map", "symmetric PPO clip range", (f"{A}.clip_ratio_low", f"{A}.clip_ratio_high")),
    *(Rule(f"{r}.optim.warmup_style", "map", "learning-rate schedule after warm-up", (f"{r}.optim.lr_scheduler",),
           convert=_warmup_style) for r in (A, C)),
    *(Rule(f"{r}.optim.lr_warmup_steps_ratio", "accept",
           f"set `{r}.optim.lr_warmup_steps` (a step count) instead", accepts=_off, accepted="0")
      for r in (A, C)),
    *(Rule(f"{r}.optim.min_lr_ratio", "accept", f"set `{r}.optim.min_lr` (an absolute learning rate) instead",
           accepts=_off, accepted="0 or null") for r in (A, C)),
    Rule(f"{A}.ppo_micro_batch_size", "accept", f"set `{A}.ppo_micro_batch_size_per_gpu` instead",
         accepts=_is(None), accepted="null"),
    *(Rule(f"{m}.use_remove_padding", "accept",
           "every pass runs on packed (THD) sequences without pad tokens, so padding removal is always on "
           "(docs/packing.md)", accepts=_is(True), accepted="true")
      for m in ("actor_rollout_ref.model", "critic.model")),
    Rule("actor_rollout_ref.model.enable_gradient_checkpointing", "map", "full activation recomputation",
         (f"{A}.megatron.override_transformer_config",), convert=_recompute),
    Rule("critic.model.enable_gradient_checkpointing", "map", "full activation recomputation",
         (f"{C}.megatron.override_transformer_config",), convert=_recompute),
    Rule(f"{ROLLOUT}.enforce_eager", "same", "no CUDA graphs in the rollout engine"),
    Rule(f"{ROLLOUT}.free_cache_engine", "same", "release the rollout KV cache between rollouts"),
    Rule(f"{ROLLOUT}.tensor_model_parallel_size", "same", "TP of the rollout engine"),
    Rule(f"{ROLLOUT}.name", "same", "rollout engine (megatron: the actor's own model; vllm)"),
    Rule("data.val_batch_size", "accept",
         "validation runs over all of data.val_files in chunks of data.train_batch_size prompts; verl ignores this "
         "key too", accepts=lambda v: True, accepted="any"),
    Rule("data.filter_overlong_prompts", "map", "drop prompts longer than data.max_prompt_length",
         ("data.on_bad_row",), convert=lambda v: "skip" if v else "error"),
    Rule("data.filter_overlong_prompts_workers", "map", "processes that tokenize the dataset",
         ("data.tokenize_workers",)),
    Rule("data.truncation", "same",
         "a prompt over data.max_prompt_length: error (a bad row: the run stops, or drops it with "
         "`data.on_bad_row=skip`) / left (keep its end) / right (keep its start) / middle (both halves); "
         "responses are never cut. Unlike verl, an explicit left/right/middle wins over "
         "data.filter_overlong_prompts=true (verl drops the prompt before truncating)"),
    Rule("trainer.val_before_train", "same",
         "validation (data.val_files, with trainer.test_freq > 0) also before the first step, logged as step 0"),
    Rule("trainer.default_hdfs_dir", "accept", "checkpoints are written to trainer.default_local_dir only (no HDFS "
         "copy); point it at shared storage instead", accepts=_off, accepted="null"),
    Rule("algorithm.use_kl_in_reward", "accept",
         "the KL to the reference is a loss term: `actor_rollout_ref.actor.use_kl_loss=true` with "
         "`kl_loss_coef` / `kl_loss_type`", accepts=_is(False), accepted="false"),
    Rule("algorithm.kl_ctrl.*", "accept",
         "in-reward KL control is not used (verl applies it only with algorithm.use_kl_in_reward=true); the KL "
         "coefficient is `actor_rollout_ref.actor.kl_loss_coef`", accepts=lambda v: True, accepted="any"),
    Rule("reward_model.enable", "accept", "GAD's reward is the discriminator: configure it under `critic.*`",
         accepts=_is(False), accepted="false"),
    *(Rule(f"{p}.fsdp_config.*", "accept", _FSDP_POINTER.format(role=role), accepts=_off,
           accepted="false, 0, -1 or null (FSDP/offload off)")
      for p, role in ((A, A), ("actor_rollout_ref.ref", A), ("critic.model", C), (C, C))),
    *(Rule(f"{r}.ulysses_sequence_parallel_size", "accept",
           f"sequence parallelism is Megatron's, inside tensor parallelism: raise `{r}.megatron."
           "tensor_model_parallel_size` (with `sequence_parallel=true`)", accepts=_is(1), accepted="1")
      for r in (A, C)),
    *(Rule(k, "same", meaning) for k, meaning in (
        ("trainer.logger", "console / jsonl / wandb (wandb follows WANDB_MODE; offline by default)"),
        ("trainer.max_actor_ckpt_to_keep", "keep the newest N actor checkpoints"),
        ("trainer.max_critic_ckpt_to_keep", "keep the newest N critic checkpoints"),
        (f"{A}.use_kl_loss", "KL to the reference as a loss term"),
        (f"{A}.kl_loss_coef", "its coefficient"),
        ("algorithm.norm_adv_by_std_in_grpo", "GRPO advantage normalisation"),
        ("trainer.critic_warmup", "critic-only steps before GAD"),
        ("custom_reward_function.path", "a task verifier's Python file; mixed into the reward with "
                                        "`reward.verifier_weight` (0: logged only, `critic/verifier_auc`)"),
        ("custom_reward_function.name", "its function: (prompt, response) or verl's (data_source, solution_str, "
                                        "ground_truth, extra_info) -> float"),
        ("actor_rollout_ref.nccl_timeout", "seconds a collective of the actor's process groups may wait (default "
                                           "7200 here, 600 in verl)"),
        ("critic.nccl_timeout", "the same for the critic's process groups"),
        ("actor_rollout_ref.ref.megatron.param_offload", "the reference's weights in host memory between its "
                                                         "passes (default true here, false in verl)"),
    )),
)


def _rule(key: str) -> Rule | None:
    for rule in RULES:
        if rule.key == key or (rule.key.endswith(".*") and fnmatch.fnmatchcase(key, rule.key)):
            return rule
    return None


def translate(key: str, value: Any) -> list[tuple[str, Any]]:
    """Our ``(key, value)`` pairs for one verl-style setting: ``[]`` when it is accepted as a no-op."""
    key = key.lstrip("+")  # Hydra's "+key=" / "++key=" (add / force-add) mean the same as "key=" here
    rule = _rule(key)
    if rule is None:
        return [(key, value)]
    if rule.kind == "accept":
        if not rule.accepts(value):
            _refuse(key, f"not supported ({rule.note}); accepted here: {rule.accepted}")(value)
        log.debug("%s=%r accepted: %s", key, value, rule.note)
        return []
    targets = rule.target or (key,)
    try:
        out = [(t, rule.convert(value) if rule.convert else value) for t in targets]
    except ValueError as e:
        _refuse(key, f"{e}; megatron-gad key: {', '.join(targets)}")(value)
    return out


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:  # leaves only: rules are per key, "x.*" rules match each leaf
            items += _flatten(v, key)
        else:
            items.append((key, v))
    return items


def translate_tree(d: Mapping) -> dict:
    """A nested config dict (a YAML file) with every listed key translated as ``translate`` does."""
    out: dict = {}
    for key, value in _flatten(d):
        for k, v in translate(key, value):
            node = out
            *parents, leaf = k.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):  # a key given both as a value and as a section: let the loader say
                    return dict(d)
            node[leaf] = v
    return out


def markdown() -> str:
    """docs/compat.md, generated from RULES."""
    counts = {k: sum(r.kind == k for r in RULES) for k in ("same", "map", "accept")}
    lines = [
        "# verl / LMOps launch-script compatibility",
        "",
        "Generated from `megatron_gad/compat.py` (`python -m megatron_gad.compat > docs/compat.md`; a test checks it",
        "is current). Keys below are translated before strict loading, in YAML files and in `key=value` overrides",
        "(a leading `+`/`++` is accepted); every other key must be a megatron-gad key. **same**: same name and",
        "meaning. **map**: renamed onto the megatron-gad key(s). **accept**: the listed values already are",
        "megatron-gad's behaviour and are accepted; any other value is refused with the message shown, which",
        "names the setting to use.",
        "",
        f"{len(RULES)} rules: {counts['same']} same, {counts['map']} mapped, {counts['accept']} accepted for the "
        "listed values and refused with a pointer otherwise.",
        "",
        "| verl / LMOps key | kind | megatron-gad | accepted values | meaning / refusal names |",
        "|---|---|---|---|---|",
    ]
    for r in RULES:
        target = ", ".join(f"`{t}`" for t in r.target) if r.target else ("`(same)`" if r.kind == "same" else "-")
        lines.append(f"| `{r.key}` | {r.kind} | {target} | {r.accepted or 'any'} | {r.note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
