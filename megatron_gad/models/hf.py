"""Hugging Face (Llama / Mistral / Qwen2 / Qwen3) <-> Megatron-Core weights.

A small table-driven mapping rather than ``mbridge``: mbridge's loaders expect Megatron's training
arguments and GPU tensors, while we need an exact CPU path for two model families and both roles.
The mapping is in two steps so each is testable on its own:

1. HF state dict <-> *full* Megatron state dict (TP=1, PP=1 names, global layer numbers);
2. full Megatron tensor <-> this rank's shard (layer offset for PP, slice for TP).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch

from megatron_gad.config import padded_vocab_size
from megatron_gad.models.arch import Arch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")

# Megatron local-spec name -> HF name, per layer ({i} = global 0-based layer index).
_LAYER_TABLE = {
    "input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Qwen3's per-head q/k RMSNorms (``Arch.qk_layernorm``): one [head_dim] weight each, replicated over TP.
_QK_NORM_TABLE = {
    "self_attention.q_layernorm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}


def _layer_table(arch: Arch) -> dict[str, str]:
    return {**_LAYER_TABLE, **_QK_NORM_TABLE} if arch.qk_layernorm else _LAYER_TABLE


# Transformer Engine specs fuse the norms into the following linear.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- step 1: HF <-> full Megatron
def _qkv_to_mcore(q, k, v, arch: Arch):
    # HF: q [nh*d, ...], k/v [ng*d, ...] -> Megatron: per query group [q heads of group, k, v]
    ng, d, hpg = arch.num_kv_heads, arch.head_dim, arch.heads_per_group
    tail = q.shape[1:]
    q = q.reshape(ng, hpg * d, *tail)
    k = k.reshape(ng, d, *tail)
    v = v.reshape(ng, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(ng * (hpg + 2) * d, *tail)


def _qkv_from_mcore(qkv, arch: Arch):
    ng, d, hpg = arch.num_kv_heads, arch.head_dim, arch.heads_per_group
    tail = qkv.shape[1:]
    qkv = qkv.reshape(ng, (hpg + 2) * d, *tail)
    q, k, v = torch.split(qkv, [hpg * d, d, d], dim=1)
    return q.reshape(ng * hpg * d, *tail), k.reshape(ng * d, *tail), v.reshape(ng * d, *tail)


def _pad_vocab(w, vocab_pad: int):
    if w.shape[0] == vocab_pad:
        return w
    out = w.new_zeros(vocab_pad, *w.shape[1:])
    out[: w.shape[0]] = w
    return out


def hf_to_mcore(hf: dict[str, torch.Tensor], arch: Arch, vocab_divisible_by: int) -> dict:
    """Full (unsharded) Megatron actor state dict from an HF state dict."""
    vpad = padded_vocab_size(arch.vocab_size, vocab_divisible_by)
    out = {"embedding.word_embeddings.weight": _pad_vocab(hf["model.embed_tokens.weight"], vpad),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    lm_head = hf["model.embed_tokens.weight"] if arch.tie_word_embeddings else hf["lm_head.weight"]
    out["output_layer.weight"] = _pad_vocab(lm_head, vpad)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        for mc, h in _layer_table(arch).items():
            out[f"decoder.layers.{i}.{mc}"] = hf[h.format(i=i)]
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = _qkv_to_mcore(
            *(hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"), arch)
        if arch.qkv_bias:
            out[f"decoder.layers.{i}.self_attention.linear_qkv.bias"] = _qkv_to_mcore(
                *(hf[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"), arch)
        out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0)
    return out


def mcore_layer_to_hf(i: int, layer: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """HF tensors of global layer ``i`` from its full Megatron tensors (``layer``: names after
    ``decoder.layers.{i}.``). QKV is split per query group, fc1 into gate and up."""
    p = f"model.layers.{i}."
    hf = {h.format(i=i): layer[mcn] for mcn, h in _layer_table(arch).items()}
    qkv = _qkv_from_mcore(layer["self_attention.linear_qkv.weight"], arch)
    hf.update({f"{p}self_attn.{x}_proj.weight": t for x, t in zip("qkv", qkv)})
    if arch.qkv_bias:
        qkv_b = _qkv_from_mcore(layer["self_attention.linear_qkv.bias"], arch)
        hf.update({f"{p}self_attn.{x}_proj.bias": t for x, t in zip("qkv", qkv_b)})
    gate, up = torch.chunk(layer["mlp.linear_fc1.weight"], 2, dim=0)
    hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in hf.items()}


def mcore_global_to_hf(name: str, t: torch.Tensor, arch: Arch) -> dict[str, torch.Tensor]:
    """HF tensor(s) of a Megatron tensor outside the decoder layers (vocab padding removed). A
    tied model's output layer is the embedding: it maps to nothing."""
    V = arch.vocab_size
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": t[:V].contiguous()}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": t.contiguous()}
    if name == "output_layer.weight":
        return {} if arch.tie_word_embeddings else {"lm_head.weight": t[:V].contiguous()}
    raise KeyError(f"no Hugging Face name for Megatron tensor {name}")


def mcore_to_hf(mc: dict[str, torch.Tensor], arch: Arch) -> dict:
    """HF state dict from a full Megatron actor state dict (vocab padding removed)."""
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    names += [] if arch.tie_word_embeddings else ["output_layer.weight"]
    hf = {}
    for name in names:
        hf.update(mcore_global_to_hf(name, mc[name], arch))
    for i in range(arch.num_layers):
        prefix = f"decoder.layers.{i}."
        hf.update(mcore_layer_to_hf(i, {k[len(prefix):]: v for k, v in mc.items() if k.startswith(prefix)}, arch))
    return hf


def hf_param_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor of the architecture's HF state dict and its shape, from the architecture alone
    (what a weight sync must deliver; independent of how the sender built its tensors)."""
    H, d, V, F = arch.hidden_size, arch.head_dim, arch.vocab_size, arch.ffn_hidden_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                    p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                    p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                    p + "mlp.down_proj.weight": (H, F)})
        if arch.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if arch.qk_layernorm:
            out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return out


# ---------------------------------------------------------------- step 2: full <-> this rank's shard
def global_name(model, local_name: str) -> str:
    m = LAYER_RE.match(local_name)
    if not m:
        return local_name
    idx, rest = int(m.group(1)), m.group(2)
    rest = _TE_ALIASES.get(rest, rest)
    return f"decoder.layers.{model.decoder.layers[idx].layer_number - 1}.{rest}"


def _tp_slice(full: torch.Tensor, param, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # [gate; up]: each rank holds its slice of both
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]], 0)
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def _tp_unslice(parts: list[torch.Tensor], param, name: str) -> torch.Tensor:
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                         skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Copy a full Megatron state dict into this rank's shard; returns the names left untouched."""
    untouched = []
    for name, param in model.named_parameters():
        if name.startswith(skip_prefixes):
            untouched.append(name)
            continue
        gname = global_name(model, name)
        if gname not in full:
            raise KeyError(f"checkpoint has no tensor for {gname} (local {name})")
        shard = _tp_slice(full[gname], param, name, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{gname}: shard shape {tuple(shard.shape)} != parameter {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))
    return untouched


@torch.no_grad()
def iter_full_params(model, tp_group, tp_size: int):
    """(global name, full tensor) for each parameter of this stage, one at a time: a TP all-gather
    per parameter (collective: every TP rank of the stage iterates in step), so at most one full
    tensor is held beyond the shard. The tensor stays on the parameter's device."""
    import torch.distributed as dist

    for name, param in model.named_parameters():
        t = param.detach()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = _tp_unslice(parts, param, name)
        yield global_name(model, name), t


def gather_full_state_dict(model, tp_group, tp_size: int) -> dict[str, torch.Tensor]:
    """This stage's parameters as full tensors with global names (an all-gather over TP)."""
    # export-bound: host memory
    return {name: t.clone().cpu() for name, t in iter_full_params(model, tp_group, tp_size)}


# ---------------------------------------------------------------- files
def read_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(f))
        return sd
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def copy_tokenizer_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def write_hf_dir(hf_sd: dict[str, torch.Tensor], hf_config: dict, out_dir: str, tokenizer_src: str | None) -> None:
    """A directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_src:
        copy_tokenizer_files(tokenizer_src, out_dir)
