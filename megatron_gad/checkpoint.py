"""Distributed checkpoints of one model role (Megatron ``dist_checkpointing``), written atomically.

Layout of a model checkpoint directory (also what ``convert hf-to-mcore`` writes)::

    config.json            the HF architecture (so any tool can rebuild the model)
    tokenizer files        copied from the source model
    megatron_gad.json      {"role": "actor"|"critic", "vocab_divisible_by": ..., "has_optimizer": ...}
    dist/                  Megatron distributed checkpoint: model (+ optimizer) shards
    rng/rank_<r>.pt        per-rank RNG states (+ caller extras such as the step)

It is written to ``<dir>.tmp`` and renamed when every rank has finished, so a crash never leaves a
half checkpoint under the final name. A training run keeps ``latest_checkpointed_iteration.txt``
beside its ``global_step_<N>`` directories (verl's name) as the pointer to the newest one. A run
checkpoint (both roles + ``trainer_state.json``) is written whole under ``global_step_<N>.partial``
and renamed before ``latest`` moves to it (``save_run_checkpoint``); old ones are pruned only after
that (``prune_run_checkpoints``, verl's ``trainer.max_{actor,critic}_ckpt_to_keep``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

META = "megatron_gad.json"
LATEST = "latest_checkpointed_iteration.txt"
TRAINER_STATE = "trainer_state.json"
STEP_PREFIX = "global_step_"
PARTIAL = ".partial"  # a run checkpoint being written: global_step_<N>.partial, renamed when complete


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _model_sharded_state_dict(model, skip_output_layer: bool = False):
    sd = model.sharded_state_dict()
    if skip_output_layer:
        sd = {k: v for k, v in sd.items() if not k.startswith("output_layer.")}
    return sd


# Megatron's distributed optimizer writes its state in the format named here. Its default
# ("fully_sharded_model_space") needs ShardedTensor.flattened_range, which megatron-core 0.16's
# dist_checkpointing refuses; "fully_reshardable" loses torch Adam's per-parameter ``step`` on load
# without Apex / TE (KeyError: 'step'). "dp_reshardable" (Megatron-LM's default) round-trips and
# reshards over DP (tests/distributed/test_megatron_settings.py); a changed TP or PP changes the
# per-bucket sizes, which Megatron checks and refuses.
# The other optimizers ignore it.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adams_of_distributed_optimizers(optimizer) -> list:
    """The torch Adam inside each Megatron distributed optimizer of ``optimizer`` (chained or not);
    empty with Apex / Transformer Engine, whose fused Adam keeps its state the way Megatron expects."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return []
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, dopt.DistributedOptimizer)]


def _prime_torch_adam_state(optimizer) -> None:
    """Without Apex / Transformer Engine (CPU), Megatron's distributed optimizer reads the torch Adam
    ``step`` of every parameter while it prepares a load, which a fresh optimizer (no step taken yet)
    lacks. Give each stepped tensor torch Adam's own initial state (zero moments, step 0) first; the
    load then overwrites all of it."""
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def _restore_adam_steps(optimizer) -> None:
    """Without Apex / TE, Megatron's distributed optimizer keeps torch Adam's step count in its param
    groups' ``step`` (what the checkpoint's common state restores) but leaves each parameter's own
    ``step`` tensor wrong after a load: one tensor shared by every parameter (torch increments it in
    place once per parameter) and, in the dp_reshardable format, overwritten with the fresh state's 0
    (wrong bias correction from the first resumed step). Give every parameter its own, right count."""
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and torch.is_tensor(st.get("step")):
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype)


def save_checkpoint(path: str, model, optimizer=None, *, hf_config: dict, role: str,
                    vocab_divisible_by: int, tokenizer_src: str | None = None, extra: dict | None = None) -> None:
    """Collective: every rank of the role calls it with its own shard."""
    from megatron.core import dist_checkpointing

    from megatron_gad.models.hf import copy_tokenizer_files

    rank = dist.get_rank()
    tmp = path.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "dist"))
        os.makedirs(os.path.join(tmp, "rng"))
    dist.barrier()
    model_sd = _model_sharded_state_dict(model)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
    dist_checkpointing.save(state, os.path.join(tmp, "dist"))
    torch.save({"rng": _rng_state(), "extra": extra or {}}, os.path.join(tmp, "rng", f"rank_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"role": role, "vocab_divisible_by": vocab_divisible_by,
                       "has_optimizer": optimizer is not None, "world_size": dist.get_world_size(),
                       "distributed_optimizer": optimizer is not None and _is_distributed_optimizer(optimizer),
                       "extra": extra or {}}, f, indent=2)
        if tokenizer_src:
            copy_tokenizer_files(tokenizer_src, tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path: str, model, optimizer=None, *, load_rng: bool = False,
                    skip_output_layer: bool = False) -> dict:
    """Collective load into this rank's shard at whatever TP x PP the model now has (Megatron
    reshards). ``skip_output_layer`` loads a backbone only, e.g. a discriminator from an actor
    checkpoint. Returns the ``extra`` dict saved with it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not is_megatron_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a megatron-gad checkpoint (no {META})")
    meta = read_meta(path)
    model_sd = _model_sharded_state_dict(model, skip_output_layer)
    state = {"model": model_sd}
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise ValueError(f"{path} holds no optimizer state")
        saved, now = bool(meta.get("distributed_optimizer")), _is_distributed_optimizer(optimizer)
        if saved != now:  # the two optimizers store their state in different layouts
            from megatron_gad.errors import InputError

            def name(flag: bool) -> str:
                return f"use_distributed_optimizer={str(flag).lower()}"

            raise InputError(f"{path} holds optimizer state written with {name(saved)}, but this run has "
                             f"{name(now)}; resume with ...megatron.{name(saved)} (the optimizer state cannot be "
                             f"converted between the two)")
        _prime_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    # The local and the Transformer Engine specs write the same tensor keys (the local spec's
    # sharded_state_dict_keys_map stores its norms under TE's fused names, e.g.
    # ``linear_qkv.layer_norm_weight``), but TE modules may ask for ``_extra_state`` (FP8 metadata)
    # that a checkpoint from the other spec never wrote. RETURN_UNEXPECTED drops requested keys the
    # checkpoint lacks *before* reading (a plain load raises on them) and names them, so only
    # optional extra state may be absent: those modules keep their fresh state.
    loaded, _, absent = dist_checkpointing.load(state, os.path.join(path, "dist"),
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    bad = sorted(k for k in absent if not k.endswith("_extra_state"))
    if bad:
        raise KeyError(f"{path}: checkpoint lacks {bad[:5]}{'...' if len(bad) > 5 else ''}")
    missing = model.load_state_dict(loaded["model"], strict=False)
    bad = [k for k in missing.missing_keys if not (skip_output_layer and k.startswith("output_layer."))
           and not k.endswith("_extra_state")]
    if bad:
        raise KeyError(f"{path}: checkpoint lacks {bad[:5]}{'...' if len(bad) > 5 else ''}")
    if optimizer is not None:
        # no_grad: the distributed optimizer's fp32 main params are views of the model's parameters,
        # which its dp_reshardable load copies into in place (Megatron does not disable autograd there)
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    extra = meta.get("extra", {})
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank()}.pt")
    if load_rng and os.path.isfile(rng_file):
        saved = torch.load(rng_file, weights_only=False)
        _set_rng_state(saved["rng"])
        extra = saved["extra"]
    return extra


def write_latest(run_dir: str, step: int) -> None:
    tmp = os.path.join(run_dir, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(step))
    os.replace(tmp, os.path.join(run_dir, LATEST))


def read_latest(run_dir: str) -> int | None:
    p = os.path.join(run_dir, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return int(f.read().strip())


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` through ``path.tmp`` + fsync + ``os.replace``: readers see the old file
    or the whole new one, never a prefix."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class CheckpointSaveError(OSError):
    """A run checkpoint could not be written; the previous one and ``latest`` are untouched."""


def save_run_checkpoint(run_dir: str, step: int, write) -> str:
    """``write(tmp_dir)`` writes the whole checkpoint of ``step`` into a temporary directory, which is
    then renamed to ``global_step_<step>``; only then does ``latest`` move to it. Any OSError on the
    way (a full disk, ...) removes the partial directory and raises :class:`CheckpointSaveError`
    saying which checkpoint is still the latest."""
    path = os.path.join(run_dir, f"{STEP_PREFIX}{step}")
    tmp = path + PARTIAL
    try:
        for name in os.listdir(run_dir):  # left by runs killed mid-save (this or another step): never read
            if name.startswith(STEP_PREFIX) and name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        if os.path.exists(path):  # the same step saved again: swap, never a moment without one
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        write_latest(run_dir, step)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
        prev = read_latest(run_dir)
        kept = (f"{LATEST} still points at {STEP_PREFIX}{prev}, which is intact: trainer.resume_mode=auto "
                f"continues from it" if prev is not None and prev != step else "no earlier checkpoint exists")
        raise CheckpointSaveError(e.errno, f"saving the step-{step} checkpoint to {path} failed "
                                           f"({reason}); the partial copy was removed and {kept}. "
                                           f"Free disk space under {run_dir} (or lower the number of "
                                           f"checkpoints kept) and resume") from e
    return path


def run_checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of the complete run checkpoints (``global_step_<N>`` with a trainer state), oldest first."""
    steps = []
    for name in os.listdir(run_dir):
        n = name[len(STEP_PREFIX):]
        if name.startswith(STEP_PREFIX) and n.isdigit() and os.path.isfile(os.path.join(run_dir, name, TRAINER_STATE)):
            steps.append(int(n))
    return sorted(steps)


def prune_run_checkpoints(run_dir: str, keep: dict[str, int | None]) -> list[str]:
    """Delete each role's checkpoints beyond the newest ``keep[role]`` complete ones (None: keep all);
    a step directory left with no role is removed whole. The one ``latest`` names is never touched.
    Called after a save completed, so a failed save deletes nothing. Returns the paths removed."""
    steps = run_checkpoint_steps(run_dir)
    latest = read_latest(run_dir)
    removed = []
    for role, k in keep.items():
        if k is None:
            continue
        with_role = [s for s in steps if os.path.isdir(os.path.join(run_dir, f"{STEP_PREFIX}{s}", role))]
        for s in with_role[:max(0, len(with_role) - k)]:
            if s == latest:
                continue
            d = os.path.join(run_dir, f"{STEP_PREFIX}{s}", role)
            shutil.rmtree(d)
            removed.append(d)
    roles = tuple(keep)
    for s in steps:
        d = os.path.join(run_dir, f"{STEP_PREFIX}{s}")
        if s != latest and not any(os.path.isdir(os.path.join(d, r)) for r in roles):
            gone = d + ".deleting"  # renamed first: a half-deleted directory never looks like a checkpoint
            os.replace(d, gone)
            shutil.rmtree(gone)
            removed.append(d)
    return removed
