"""Model architecture read from a Hugging Face ``config.json`` (Llama 2/3.x, Mistral, Qwen2, Qwen3 families).

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

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# "llama3": Llama 3.1-3.3's frequency-dependent scaling of the inverse frequencies (applied in models/build.py)
ROPE_TYPES = ("default", "llama3")
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
    # Qwen3: RMSNorm over each query / key head before RoPE (Megatron's qk_layernorm)
    qk_layernorm: bool = False
    rope_type: str = "default"
    # llama3 RoPE scaling (unused with rope_type "default")
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 0
    # sliding-window attention span (Mistral v0.1, Qwen with use_sliding_window); None: full attention.
    # Only sequences no longer than it are run (config_checks refuses longer ones): there full = sliding.
    sliding_window: int | None = None

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
    if model_type != "qwen2" and cfg.get("attention_bias"):
        # transformers then adds a bias to o_proj too, which the Megatron layers here do not have
        raise UnsupportedArch(f"attention_bias=true is not supported for model_type {model_type!r}")
    if cfg.get("mlp_bias"):
        raise UnsupportedArch("mlp_bias=true is not supported (the MLP linears have no bias)")
    heads = cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_scaling") or {}, **(cfg.get("rope_parameters") or {}))
    theta = cfg.get("rope_theta")
    if theta is None:  # transformers >= 5 nests it under rope_parameters
        theta = rope.get("rope_theta", 10000.0)
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedArch("partial_rotary_factor != 1 is not supported (RoPE over the whole head)")
    max_pos = cfg.get("max_position_embeddings", 4096)
    scaling = {}
    if rope_type == "llama3":
        try:
            scaling = dict(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                           rope_high_freq_factor=float(rope["high_freq_factor"]),
                           # transformers falls back to max_position_embeddings when it is absent
                           rope_original_max_positions=int(rope.get("original_max_position_embeddings") or max_pos))
        except KeyError as e:
            raise UnsupportedArch(f"rope_type 'llama3' needs {e.args[0]!r} in rope_scaling / rope_parameters") from None
        if scaling["rope_high_freq_factor"] <= scaling["rope_low_freq_factor"]:
            raise UnsupportedArch("rope_type 'llama3' needs high_freq_factor > low_freq_factor")
    return Arch(
        model_type=model_type,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=max_pos,
        rope_theta=float(theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        qk_layernorm=model_type == "qwen3",
        rope_type=rope_type,
        sliding_window=_sliding_window(cfg, model_type),
        **scaling,
    )


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    """Mistral applies ``sliding_window`` whenever it is set (v0.1: 4096; v0.3: null); Qwen2/3 only with
    ``use_sliding_window`` (their configs carry a window that is otherwise unused)."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def sliding_window_problem(arch: Arch, longest: int, what: str) -> str | None:
    """Why sequences of ``longest`` tokens cannot run on ``arch`` (None: they can). Attention here is full
    causal attention, which equals a sliding window only while no sequence is longer than the window."""
    if arch.sliding_window is not None and longest > arch.sliding_window:
        return (f"{what}={longest} is longer than the model's sliding_window={arch.sliding_window}: sliding-window "
                f"attention is not implemented, and full attention over more tokens than the window changes the "
                f"model's outputs; keep sequences within {arch.sliding_window} tokens")
    return None


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
