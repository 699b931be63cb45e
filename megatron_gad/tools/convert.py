"""``megatron-gad convert``: Hugging Face directory <-> megatron-gad distributed checkpoint.

hf-to-mcore launches TP*PP ranks; each builds its own Megatron shard from the HF weights (through
:class:`ModelShard`, the same code path training uses) and together they write a dist checkpoint
without optimizer state. mcore-to-hf loads a checkpoint at TP=PP=1 in one spawned rank
(dist-checkpointing reshards whatever layout it was saved at), maps the full state dict back to
HF names and writes safetensors + config.json + tokenizer files.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from megatron_gad import checkpoint as ckpt
from megatron_gad.tools import ToolError, log, stdout_to_stderr

DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- checks shared with `generate`
def read_model_dir(path: str):
    """(hf_config dict, Arch, megatron-gad meta or None) of an HF dir or megatron-gad checkpoint."""
    from megatron_gad.models.arch import arch_from_hf_config, read_hf_config

    if not os.path.exists(path):
        raise ToolError(f"{path}: no such directory; pass an existing Hugging Face model directory or "
                        "megatron-gad checkpoint")
    if not os.path.isdir(path):
        raise ToolError(f"{path}: not a directory (expected a Hugging Face model directory or a "
                        "megatron-gad checkpoint)")
    try:
        cfg = read_hf_config(path)
    except FileNotFoundError as e:
        raise ToolError(str(e)) from None
    try:
        arch = arch_from_hf_config(cfg)
    except (ValueError, KeyError) as e:
        msg = f"missing config key {e}" if isinstance(e, KeyError) else str(e)
        raise ToolError(f"{path}: {msg}") from None
    meta = ckpt.read_meta(path) if ckpt.is_megatron_checkpoint(path) else None
    return cfg, arch, meta


def check_layout(hf_config: dict, tp: int, pp: int, vocab_divisible_by: int) -> None:
    """The constraints Megatron puts on TP / PP for this architecture (``config.json``), as one clear error."""
    from megatron_gad.config_checks import layout_problems

    bad = layout_problems(hf_config, tp, pp, vocab_divisible_by, tp_key="--tp", pp_key="--pp",
                          vocab_key="--vocab-divisible-by")
    if bad:
        raise ToolError("impossible layout: " + "; ".join(bad))


def _check_out_dir(out_dir: str, inputs: list[str], overwrite: bool) -> None:
    out = os.path.abspath(out_dir)
    if any(out == os.path.abspath(p) for p in inputs):
        raise ToolError(f"OUT_DIR {out_dir} is the input directory; choose another")
    if os.path.isfile(out_dir):
        raise ToolError(f"OUT_DIR {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ToolError(f"OUT_DIR {out_dir} exists and is not empty (pass --overwrite to replace it)")


# ---------------------------------------------------------------- hf-to-mcore
@dataclass(frozen=True)
class HfToMcoreJob:
    hf_dir: str
    out_dir: str
    tp: int = 1
    pp: int = 1
    role: str = "actor"
    vocab_divisible_by: int = 128
    dtype: str = "float32"


def hf_to_mcore_on_rank(job: HfToMcoreJob) -> int:
    """Inside a launched rank (within ``cpu_device_mode()`` on CPU): build this rank's shard from
    the HF weights and save it with the others (collective). Returns the shard's parameter count."""
    from megatron_gad.engine.model_shard import ModelShard

    role = ModelShard(job.role, job.hf_dir, job.tp, job.pp, params_dtype=job.dtype,
                     vocab_divisible_by=job.vocab_divisible_by, trainable=False)
    # params_dtype is recorded so mcore-to-hf / generate rebuild the model in the same dtype.
    role.save(job.out_dir, extra={"params_dtype": job.dtype}, with_optimizer=False)
    return sum(p.numel() for p in role.module.parameters())


def _hf_to_mcore_rank(rank: int, world: int, job: HfToMcoreJob) -> int:
    stdout_to_stderr()
    return hf_to_mcore_on_rank(job)


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, role: str = "actor",
                vocab_divisible_by: int = 128, dtype: str = "float32", overwrite: bool = False) -> None:
    """Convert an HF model directory into a megatron-gad checkpoint sharded at TP x PP."""
    cfg, arch, meta = read_model_dir(hf_dir)
    if meta is not None:
        raise ToolError(f"{hf_dir} is already a megatron-gad checkpoint (use mcore-to-hf to export it)")
    if role not in ("actor", "critic"):
        raise ToolError(f"--role must be actor or critic, got {role!r}")
    if dtype not in DTYPES:
        raise ToolError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_layout(cfg, tp, pp, vocab_divisible_by)
    if not (glob.glob(os.path.join(hf_dir, "*.safetensors")) or glob.glob(os.path.join(hf_dir, "pytorch_model*.bin"))):
        raise ToolError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    _check_out_dir(out_dir, [hf_dir], overwrite)
    from megatron_gad.parallel.launch import run_local

    log(f"hf-to-mcore: {arch.model_type} ({arch.num_layers} layers, hidden {arch.hidden_size}) -> "
        f"{role} checkpoint at TP={tp} PP={pp}, {dtype}; launching {tp * pp} rank(s)")
    counts = run_local(_hf_to_mcore_rank, tp * pp,
                       HfToMcoreJob(hf_dir, out_dir, tp, pp, role, vocab_divisible_by, dtype))
    log(f"hf-to-mcore: wrote {out_dir} ({sum(counts)} parameters over {len(counts)} shard(s), "
        "tied/replicated tensors counted per shard)")


# ---------------------------------------------------------------- mcore-to-hf
def mcore_to_hf_on_rank(ckpt_dir: str, out_dir: str) -> int:
    """Inside a launched single rank (within ``cpu_device_mode()`` on CPU): load the actor
    checkpoint at TP=PP=1 and write the HF directory. Returns the number of tensors written."""
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.models import hf as hfmap

    meta = ckpt.read_meta(ckpt_dir)
    dtype = meta.get("extra", {}).get("params_dtype", "float32")
    role = ModelShard("actor", ckpt_dir, 1, 1, params_dtype=dtype, vocab_divisible_by=meta["vocab_divisible_by"],
                     trainable=False)
    hf_sd = hfmap.mcore_to_hf(role.full_state_dict(), role.arch)
    hfmap.write_hf_dir(hf_sd, role.hf_config, out_dir, tokenizer_src=ckpt_dir)
    return len(hf_sd)


def _mcore_to_hf_rank(rank: int, world: int, ckpt_dir: str, out_dir: str) -> int:
    stdout_to_stderr()
    return mcore_to_hf_on_rank(ckpt_dir, out_dir)


def mcore_to_hf(ckpt_dir: str, out_dir: str, overwrite: bool = False) -> None:
    """Export a megatron-gad actor checkpoint (any TP x PP) as an HF model directory."""
    _, arch, meta = read_model_dir(ckpt_dir)
    if meta is None:
        raise ToolError(f"{ckpt_dir} is not a megatron-gad checkpoint (no {ckpt.META}); "
                        "for a Hugging Face directory use hf-to-mcore")
    if meta.get("role") != "actor":
        raise ToolError(f"{ckpt_dir} holds a {meta.get('role')} (discriminator) checkpoint: its scalar head has "
                        "no Hugging Face causal-LM equivalent; only actor checkpoints export")
    _check_out_dir(out_dir, [ckpt_dir], overwrite)
    from megatron_gad.parallel.launch import run_local

    log(f"mcore-to-hf: loading {ckpt_dir} (saved on {meta.get('world_size', '?')} rank(s)) at TP=1 PP=1")
    (n,) = run_local(_mcore_to_hf_rank, 1, ckpt_dir, out_dir)
    log(f"mcore-to-hf: wrote {n} tensors of {arch.model_type} to {out_dir}")


def main_convert(args) -> int:
    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.hf_dir, args.out_dir, args.tp, args.pp, args.role, args.vocab_divisible_by,
                    args.dtype, args.overwrite)
    else:
        mcore_to_hf(args.ckpt_dir, args.out_dir, args.overwrite)
    return 0
