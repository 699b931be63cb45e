"""Checks of every path the driver can see, run by ``megatron-gad train`` before any worker starts.

Each problem is an :class:`~megatron_gad.errors.InputError` whose message names the config key, the
path and what to do. Paths that exist only on worker nodes are checked where they are read: on a Ray
cluster (``ray.address`` set), a path only the workers read (``critic.model.path``,
``trainer.init_actor_from``, ``trainer.init_critic_from``) that the driver cannot see is left to the
workers, which run the same checks (``group_base.check_worker_paths``) and fail with the same message
naming their node.
"""

from __future__ import annotations

import json
import logging
import os
import re

from megatron_gad import checkpoint as ckpt
from megatron_gad.config import GADConfig, critic_model_path
from megatron_gad.errors import InputError

# Any one of these makes a directory loadable with AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
# What `megatron-gad demo --out DIR` writes under DIR/seed<k>/ (configs/demo.yaml points there).
_DEMO_ASSET = re.compile(r"^(?P<out>.*?)/?seed(?P<seed>\d+)/(?:student|tokenizer|data)(?:/.*)?$")


def demo_hint(path: str) -> str | None:
    """The command that builds ``path`` when it is one of the demo's assets, else None."""
    m = _DEMO_ASSET.match(os.path.normpath(path).replace(os.sep, "/"))
    if m is None:
        return None
    out, seeds = m.group("out") or ".", int(m.group("seed")) + 1
    cmd = f"megatron-gad demo --quick --out {out}" + (f" --seeds {seeds}" if seeds > 1 else "")
    return (f"it is one of the demo's assets, which do not exist until the demo has run: run `{cmd}` first "
            f"(it writes the tokenizer, tiny student and data under {out}/seed{seeds - 1}/), then rerun this command")


def _missing(key: str, path: str, what: str) -> InputError:
    hint = demo_hint(path)
    fix = hint or f"set {key} to {what}"
    return InputError(f"{key}={path}: no such file or directory; {fix}")


def check_model_dir(key: str, path: str, *, need_tokenizer: bool, role: str | None = None) -> None:
    """``path`` is a Hugging Face model directory or a megatron-gad checkpoint (of ``role`` when it is one)."""
    what = "a Hugging Face model directory (config.json, weights, tokenizer files) or a megatron-gad checkpoint"
    if not path:
        raise InputError(f"{key} is not set; set it to {what}")
    if not os.path.exists(path):
        raise _missing(key, path, what)
    if not os.path.isdir(path):
        raise InputError(f"{key}={path} is a file, not a directory; set it to {what}")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise InputError(f"{key}={path} is not a model: it has no config.json; set it to {what} "
                         "(convert other formats with `megatron-gad convert`)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{key}={path}: config.json cannot be read ({' '.join(str(e).split())}); "
                         "restore the model's config.json") from None
    if ckpt.is_megatron_checkpoint(path) and role is not None:
        _check_role(key, path, role)
    if need_tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise InputError(f"{key}={path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                         "tokenizer of the model into this directory (tokenizer.save_pretrained(path))")


def _check_role(key: str, path: str, role: str) -> None:
    try:
        meta = ckpt.read_meta(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{key}={path}: {ckpt.META} cannot be read ({e}); the checkpoint is damaged, "
                         "point the key at another one") from None
    found = meta.get("role")
    if found != role:
        raise InputError(f"{key}={path} is a checkpoint of the {found!r} role, but {key} needs the {role!r} role; "
                         f"point it at a checkpoint's {role} directory, e.g. "
                         f"<trainer.default_local_dir>/global_step_<N>/{role}")


# Architecture keys that must agree between a checkpoint and the model it is loaded into.
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size")


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_same_model(key: str, path: str, model_key: str, model_path: str) -> None:
    """The checkpoint at ``path`` has the architecture of the model at ``model_path`` (both config.json)."""
    mine = _read_json(os.path.join(path, "config.json"))
    ref = _read_json(os.path.join(model_path, "config.json")) if model_path else None
    if mine is None or ref is None:
        return
    diff = [f"{k}={mine.get(k)!r} vs {ref.get(k)!r}" for k in ARCH_KEYS if k in mine and k in ref
            and mine[k] != ref[k]]
    if diff:
        raise InputError(f"{key}={path} is a checkpoint of a different model than {model_key}={model_path} "
                         f"({', '.join(diff)}); point {key} at a checkpoint of that model, or change {model_key}")


def check_checkpoint(key: str, path: str, role: str) -> None:
    """``path`` is a megatron-gad checkpoint directory of ``role``."""
    example = f"<trainer.default_local_dir>/global_step_<N>/{role}"
    if not os.path.isdir(path):
        state = "is a file" if os.path.exists(path) else "does not exist"
        raise InputError(f"{key}={path} {state}; set it to a megatron-gad {role} checkpoint directory, e.g. {example}")
    if not ckpt.is_megatron_checkpoint(path):
        raise InputError(f"{key}={path} is not a megatron-gad checkpoint (no {ckpt.META}); set it to a {role} "
                         f"checkpoint directory such as {example} (an HF model goes through "
                         f"`megatron-gad convert hf-to-mcore --role {role}`)")
    _check_role(key, path, role)


def check_resume(cfg: GADConfig) -> None:
    path = cfg.trainer.resume_from_path
    if path is None:
        return
    key = "trainer.resume_from_path"
    fix = f"set {key} to a training checkpoint <trainer.default_local_dir>/global_step_<N>, or drop it"
    if not os.path.isdir(path):
        raise InputError(f"{key}={path} {'is a file' if os.path.exists(path) else 'does not exist'}; {fix}")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise InputError(f"{key}={path} holds no training checkpoint (no trainer_state.json); {fix}")
    roles = ("actor", "critic") if cfg.trainer.mode == "gad" else ("actor",)
    for role in roles:
        sub = os.path.join(path, role)
        if not ckpt.is_megatron_checkpoint(sub):
            raise InputError(f"{key}={path} has no {role} checkpoint ({sub}/{ckpt.META} is missing); {fix}")
        _check_role(key, sub, role)
        model_key = "actor_rollout_ref.model.path" if role == "actor" else "critic.model.path"
        check_same_model(key, sub, model_key, _model_path(cfg, role))


def _model_path(cfg: GADConfig, role: str) -> str:
    return cfg.actor_rollout_ref.model.path if role == "actor" else critic_model_path(cfg)


def check_data_files(key: str, files: list[str]) -> None:
    if not files:
        raise InputError(f"{key} is empty; list at least one JSONL or Parquet file of prompts and teacher responses")
    for path in files:
        if not os.path.exists(path):
            raise _missing(key, path, "an existing JSONL or Parquet file")
        if not os.path.isfile(path):
            raise InputError(f"{key}: {path} is a directory, not a file; list the data files themselves")
        if not os.access(path, os.R_OK):
            raise InputError(f"{key}: {path} is not readable; fix its permissions (chmod a+r)")
        if not path.lower().endswith((".jsonl", ".json", ".parquet")):
            raise InputError(f"{key}: {path} is not a .jsonl, .json or .parquet file; convert it to JSONL (one JSON "
                             "object per line) or Parquet")
        if os.path.getsize(path) == 0:
            raise InputError(f"{key}: {path} is empty; fill it with one JSON object per line "
                             "(prompt and teacher response columns) or remove it from the list")


def check_output_dir(key: str, path: str) -> None:
    """``path`` exists as a writable directory, or can be created."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(f"{key}={path} cannot be created: {probe} is a file; choose another directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{key}={path} is not writable ({probe} does not allow writing); choose a directory you "
                         "can write to, or fix its permissions")


def left_to_workers(cfg: GADConfig, key: str, path: str) -> bool:
    """True (with a warning) when ``path``, read only by workers, is missing here but may exist on the
    workers' nodes of a Ray cluster; they check it where they read it."""
    if cfg.ray.address is None or cfg.trainer.workers != "ray" or os.path.exists(path):
        return False
    logging.getLogger("megatron_gad").warning(
        "%s=%s does not exist on the driver's node; the workers check it on theirs (ray.address=%s)",
        key, path, cfg.ray.address)
    return True


def check_paths(cfg: GADConfig) -> None:
    """Every driver-visible path of a training config, in the order a person would fix them."""
    d, t = cfg.data, cfg.trainer
    arr = cfg.actor_rollout_ref
    check_model_dir("actor_rollout_ref.model.path", arr.model.path, need_tokenizer=True, role="actor")
    if t.mode == "gad" and cfg.critic.model.path \
            and not left_to_workers(cfg, "critic.model.path", cfg.critic.model.path):
        check_model_dir("critic.model.path", cfg.critic.model.path, need_tokenizer=False)
    check_data_files("data.train_files", list(d.train_files))
    if d.val_files and t.test_freq > 0:
        check_data_files("data.val_files", list(d.val_files))
    if t.init_actor_from and not left_to_workers(cfg, "trainer.init_actor_from", t.init_actor_from):
        check_checkpoint("trainer.init_actor_from", t.init_actor_from, "actor")
        check_same_model("trainer.init_actor_from", t.init_actor_from, "actor_rollout_ref.model.path",
                         arr.model.path)
    if t.init_critic_from and t.mode == "gad" \
            and not left_to_workers(cfg, "trainer.init_critic_from", t.init_critic_from):
        check_checkpoint("trainer.init_critic_from", t.init_critic_from, "critic")
        model_key = "critic.model.path" if cfg.critic.model.path else "actor_rollout_ref.model.path"
        check_same_model("trainer.init_critic_from", t.init_critic_from, model_key, critic_model_path(cfg))
    check_resume(cfg)
    check_output_dir("trainer.default_local_dir", t.default_local_dir)


def check_loggers(cfg: GADConfig) -> None:
    """A requested logger's package is installed: said at start-up, not after the workers started."""
    if "wandb" in cfg.trainer.logger:
        import importlib

        try:
            importlib.import_module("wandb")
        except ImportError:
            raise InputError("trainer.logger includes wandb, but wandb is not installed; pip install "
                             "'megatron-gad[wandb]' (or pip install wandb), or drop wandb from "
                             "trainer.logger") from None
