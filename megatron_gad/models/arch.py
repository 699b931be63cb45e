"""Model architecture read from a Hugging Face ``config.json`` (Llama / Qwen2 families).

Our Megatron checkpoints keep the HF ``config.json`` beside the weights, so one reader serves both.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from megatron_gad.errors import UserError

if TYPE_CHECKING:
    import torch

SUPPORTED = ("llama", "qwen2")
ROPE_TYPES = ("default",)
# torch is imported only where a dtype is needed: the memory planner reads architectures without it
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)


class UnsupportedArch(UserError, ValueError):
    """A ``config.json`` this project cannot run faithfully: an input error (exit 2), never a silent approximation."""


def _rope_type(cfg: dict) -> str:
    """The RoPE variant, from transformers < 5 (``rope_scaling``, old key ``type``) or >= 5 (``rope_parameters``).

    Both keys are read: a config saved by transformers 5 holds only ``rope_parameters``, and running its
    scaled RoPE as plain RoPE would change every position past the original window without a warning.
    """
    kinds = set()
    for key in ("rope_scaling", "rope_parameters"):
        section = cfg.get(key)
        if section:
            if not isinstance(section, dict):
                raise UnsupportedArch(f"{key}={section!r} is not a mapping")
            kinds.add(section.get("rope_type") or section.get("type") or "default")
    if len(kinds) > 1:
        raise UnsupportedArch(f"rope_scaling and rope_parameters name different RoPE types ({sorted(kinds)}); "
                              "keep one")
    return kinds.pop() if kinds else "default"


def arch_from_hf_config(cfg: dict) -> Arch:
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED:
        raise UnsupportedArch(f"model_type {model_type!r} is not supported (supported model families: "
                              f"{', '.join(SUPPORTED)})")
    rope_type = _rope_type(cfg)
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArch(f"rope_type {rope_type!r} (rope_scaling / rope_parameters) is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)}); running it as plain RoPE would change "
                              "the model's outputs")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedArch(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_theta")
    if rope is None:  # transformers >= 5 nests it under rope_parameters
        rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return Arch(
        model_type=model_type,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=float(rope),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    )


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face model directory "
                                "or a megatron-gad checkpoint)")
    with open(cfg_path) as f:
        return json.load(f)


def load_arch(path: str) -> Arch:
    return arch_from_hf_config(read_hf_config(path))


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in _DTYPES:
        raise KeyError(name)
    return getattr(torch, name)
