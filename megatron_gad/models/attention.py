"""Core attention of the local (non-Transformer-Engine) layer spec with a backend switch.

:class:`CoreAttention` sits in the ``core_attention`` slot of the local spec (where
:class:`~megatron_gad.models.packed_attention.PackedDotProductAttention` was) and chooses per call:

========== ===================================================== ===========================================
backend    packed THD (``packed_seq_params``, training/scoring)  unpacked (prefill, decode, padded tools)
========== ===================================================== ===========================================
eager      today's per-segment Megatron softmax, bit for bit     Megatron's ``DotProductAttention``, bit for bit
sdpa       ``scaled_dot_product_attention`` per segment          ``scaled_dot_product_attention``
varlen     ``torch.nn.attention.varlen.varlen_attn``, one call   sdpa
flash      ``flash_attn.flash_attn_varlen_func``, one call        sdpa
flex       FlexAttention, document-causal block mask per pack    sdpa
auto       CUDA + bf16/fp16 + head dim <= 256 (multiple of 8): varlen, else flash, else flex (packed) and
           sdpa (unpacked); otherwise (CPU, fp32, other head dims) eager
========== ===================================================== ===========================================

The setting is ``<role>.megatron.attention_backend``; ``MEGATRON_GAD_ATTENTION_BACKEND`` overrides it
in every command (read when a model is built). A backend named explicitly that cannot run here
(no CUDA, a torch without ``varlen_attn``, no ``flash-attn`` package, FlexAttention backward on CPU, a
feature only eager implements) is an error naming the reason, never a silent fallback.

Masks, on every backend: packed input is causal within each ``cu_seqlens`` segment and takes no
``attention_mask``; under ``MEGATRON_GAD_EMULATE_TE_MASKING=1`` (see ``packed_attention``) an
``attention_mask`` is ignored, and unpacked attention is causal (top-left aligned, as TE's ``causal``
and SDPA's ``is_causal``) unless ``sq == 1`` or the layer passes ``no_mask``. Without the switch an
unpacked call applies the tool's padding mask (as an additive ``-10000`` mask, Megatron's fill value,
so a fully masked padding row stays finite) or, with none, plain causal when ``sq > 1``.

Per micro-batch state (host segment bounds for the per-segment loops, the flex block mask) is built
once from ``cu_seqlens`` and cached on that tensor, so every layer shares it; the fused packed
backends need nothing from the host (``max_seqlen`` is already a host int in ``PackedSeqParams``).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from megatron_gad.config import ATTENTION_BACKENDS
from megatron_gad.models.packed_attention import (
    EMULATE_TE_MASKING_ENV,
    PackedDotProductAttention,
    emulate_te_masking,
    host_bounds,
    micro_batch_cache,
)

log = logging.getLogger("megatron_gad")

BACKENDS = ATTENTION_BACKENDS
BACKEND_ENV = "MEGATRON_GAD_ATTENTION_BACKEND"
HALF = (torch.bfloat16, torch.float16)


class AttentionBackendError(RuntimeError):
    """A backend named in the config / environment cannot run in this process."""


def requested_backend(configured: str | None = "auto") -> str:
    """The backend to use: ``MEGATRON_GAD_ATTENTION_BACKEND`` if set, else the config value."""
    env = os.environ.get(BACKEND_ENV, "").strip().lower()
    name = env or (configured or "auto").strip().lower()
    if name not in BACKENDS:
        where = f"{BACKEND_ENV}={env!r}" if env else f"attention_backend={configured!r}"
        raise ValueError(f"{where}: choose one of {', '.join(BACKENDS)}")
    return name


# ---------------------------------------------------------------- what this process has
@functools.lru_cache(maxsize=1)
def varlen_attn_fn():
    """``torch.nn.attention.varlen.varlen_attn`` or None (torch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=1)
def flash_attn_varlen_fn():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a wheel whose CUDA library does not load
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def flex_fns():
    """(flex_attention, create_block_mask) or None (torch < 2.5)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


def unavailable_reason(name: str, device_type: str, dtype: torch.dtype, needs_grad: bool = False) -> str | None:
    """Why ``name`` cannot run on this device / dtype in this process; None when it can."""
    tv = f"torch {torch.__version__}"
    if name in ("auto", "eager", "sdpa"):
        return None
    if name == "flex":
        if flex_fns() is None:
            return f"FlexAttention (torch.nn.attention.flex_attention) is not in {tv} (it needs torch >= 2.5)"
        if needs_grad and device_type == "cpu":
            return f"FlexAttention has no backward on CPU in {tv}: use sdpa or eager for CPU training"
        return None
    if device_type != "cuda":
        return f"attention_backend={name} runs only on a CUDA device (this call runs on {device_type})"
    if dtype not in HALF:
        return f"attention_backend={name} runs only in bf16/fp16 (params_dtype is {str(dtype).removeprefix('torch.')})"
    if name == "varlen" and varlen_attn_fn() is None:
        return f"torch.nn.attention.varlen.varlen_attn is not in {tv} (it needs torch >= 2.10)"
    if name == "flash" and flash_attn_varlen_fn() is None:
        return "the flash-attn package is not installed (or does not load): pip install flash-attn, or use varlen"
    return None


def head_dim_fused(head_dim: int) -> bool:
    """Head dims the FlashAttention kernels take (what ``auto`` requires before leaving eager)."""
    return head_dim % 8 == 0 and head_dim <= 256


def describe(name: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """One line for the log: what ``name`` runs for packed / unpacked input on this device."""
    if name == "auto":
        if device_type != "cuda" or dtype not in HALF or not head_dim_fused(head_dim):
            return "auto: eager (CPU, fp32 or head dim not fused)"
        packed = "varlen" if varlen_attn_fn() else ("flash" if flash_attn_varlen_fn() else "flex")
        return f"auto: packed {packed}, unpacked sdpa"
    if name in ("varlen", "flash", "flex"):
        return f"packed {name}, unpacked sdpa"
    return name


_ANNOUNCED: set[tuple] = set()


def announce(role: str, name: str, dtype: torch.dtype, head_dim: int) -> None:
    """At model build: refuse a backend named explicitly that this process cannot run (one message
    naming the reason), and log the choice once per role and setting."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unavailable_reason(name, device_type, dtype)
    if reason:
        raise AttentionBackendError(f"{role}: attention backend {name!r} unavailable: {reason}")
    key = (role, name, dtype)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        src = f" (from {BACKEND_ENV})" if os.environ.get(BACKEND_ENV, "").strip() else ""
        msg = f"{role} attention backend {name}{src}: {describe(name, device_type, dtype, head_dim)}"
        if log.hasHandlers():  # train / demo configure logging
            log.info(msg)
        elif not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"[megatron-gad] {msg}", file=sys.stderr, flush=True)  # the tools' progress lines


# ---------------------------------------------------------------- per micro-batch state
def document_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int32 segment index of every packed token, from device ops only."""
    pos = torch.arange(total, device=cu.device, dtype=cu.dtype)
    return torch.searchsorted(cu[1:].contiguous(), pos, right=True)


def document_causal_block_mask(cu: torch.Tensor, total: int):
    """FlexAttention block mask: causal within each ``cu_seqlens`` segment; built once per micro-batch."""
    c = micro_batch_cache(cu)
    key = ("flex", total)
    if key not in c:
        _, create_block_mask = flex_fns()
        doc = document_ids(cu, total)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        c[key] = create_block_mask(mask_mod, None, None, total, total, device=cu.device)
    return c[key]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    flex_attention, _ = flex_fns()
    return torch.compile(flex_attention, dynamic=None)


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    return frozenset(inspect.signature(varlen_attn_fn()).parameters)


def varlen_call(q, k, v, cu, max_seqlen: int, scale: float):
    """``varlen_attn`` over a whole pack, causal. Its keyword names differ between torch releases
    (``is_causal`` in 2.10/2.11, ``window_size=(-1, 0)`` later; ``scale`` and ``enable_gqa`` only in
    some): read them from the signature. The first seven arguments are positional in all of them."""
    fn, params = varlen_attn_fn(), _varlen_params()
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        raise AttentionBackendError(f"varlen_attn of torch {torch.__version__} has neither is_causal nor window_size")
    if "scale" in params:
        kw["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1]), rel_tol=1e-12):
        raise AttentionBackendError(f"varlen_attn of torch {torch.__version__} takes no scale; "
                                    f"this model needs {scale}")
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # torch 2.11: K/V must have the query's head count
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu32 = cu if cu.dtype == torch.int32 else cu.to(torch.int32)
    return fn(q, k, v, cu32, cu32, max_seqlen, max_seqlen, **kw)


class CoreAttention(PackedDotProductAttention):
    """``PackedDotProductAttention`` (the eager reference) with the backends above; ``backend`` comes
    from the layer spec's params (:func:`local_layer_spec`)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        # features only the eager path implements: a fused backend named explicitly refuses them
        c = self.config
        blockers = []
        if self.attention_dropout.p > 0:
            blockers.append(f"attention_dropout={self.attention_dropout.p}")
        if getattr(c, "window_size", None) is not None:
            blockers.append("sliding-window attention")
        if self.softmax_offset is not None:
            blockers.append(f"softmax_type={c.softmax_type}")
        if c.apply_query_key_layer_scaling:
            blockers.append("apply_query_key_layer_scaling")
        self._eager_only = ", ".join(blockers)

    # ------------------------------------------------------------------ dispatch
    def choose(self, packed: bool, q: torch.Tensor) -> str:
        """The implementation this call runs (one of eager / sdpa / varlen / flash / flex)."""
        name = self.backend
        if name == "eager":
            return "eager"
        if name == "auto":
            if (not q.is_cuda or q.dtype not in HALF or self._eager_only
                    or not head_dim_fused(self.hidden_size_per_attention_head)):
                return "eager"
            if not packed:
                return "sdpa"
            if varlen_attn_fn() is not None:
                return "varlen"
            return "flash" if flash_attn_varlen_fn() is not None else "flex"
        if self._eager_only:
            raise AttentionBackendError(f"attention backend {name!r} does not implement {self._eager_only}; "
                                        "use attention_backend=eager")
        if not packed and name in ("varlen", "flash", "flex"):
            name = "sdpa"
        needs_grad = torch.is_grad_enabled() and q.requires_grad
        reason = unavailable_reason(name, q.device.type, q.dtype, needs_grad=needs_grad)
        if reason:
            raise AttentionBackendError(f"attention backend {name!r} unavailable: {reason}")
        return name

    def forward(self, query, key, value, attention_mask, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None):
        packed = packed_seq_params is not None
        impl = self.choose(packed, query)
        if impl == "eager":
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if attention_bias is not None:
            raise ValueError(f"attention_bias is not supported by attention backend {impl!r}")
        emulate = emulate_te_masking()
        if not packed:
            return self._sdpa_unpacked(query, key, value, None if emulate else attention_mask,
                                       attn_mask_type, emulate)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: only 'thd' is supported")
        if attention_mask is not None and not emulate:
            raise ValueError("packed (THD) attention takes no attention_mask: the sequences are defined by cu_seqlens "
                             f"(set {EMULATE_TE_MASKING_ENV}=1 to ignore it as Transformer Engine does)")
        psp = packed_seq_params
        cu = psp.cu_seqlens_q
        if cu is None:
            raise ValueError("packed_seq_params.cu_seqlens_q is required")
        if psp.cu_seqlens_kv is not None and psp.cu_seqlens_kv is not cu:
            raise ValueError(f"attention backend {impl!r} needs cu_seqlens_kv to be cu_seqlens_q (self-attention)")
        for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            if getattr(psp, name, None) not in (None, cu):
                raise NotImplementedError(f"{name} different from cu_seqlens_q is not supported on the local spec")
        T = query.shape[0]
        if impl == "sdpa":
            out = self._sdpa_packed(query, key, value, cu)
        elif impl == "varlen":
            out = varlen_call(query, key, value, cu, int(psp.max_seqlen_q), self.softmax_scale)
        elif impl == "flash":
            out = flash_attn_varlen_fn()(query, key, value, cu.to(torch.int32), cu.to(torch.int32),
                                         int(psp.max_seqlen_q), int(psp.max_seqlen_q), dropout_p=0.0,
                                         softmax_scale=self.softmax_scale, causal=True)
        else:
            out = self._flex_packed(query, key, value, cu)
        return out.reshape(T, self.hidden_size_per_partition)

    # ------------------------------------------------------------------ implementations
    def _gqa(self) -> bool:
        return self.num_attention_heads_per_partition > self.num_query_groups_per_partition

    def _sdpa_unpacked(self, query, key, value, attention_mask, attn_mask_type, emulate: bool):
        """[sq, b, np, hn] q, [sk, b, ng, hn] k/v -> [sq, b, np*hn]."""
        sq, b = query.shape[0], query.shape[1]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask, causal = None, False
        if attention_mask is not None:  # only a tool's padding mask (bool, True = masked) comes here
            mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(attention_mask.to(query.device), -10000.0)
        elif mask_type != AttnMaskType.no_mask and sq > 1:
            causal = True
        ctx = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                             value.permute(1, 2, 0, 3), attn_mask=mask, is_causal=causal,
                                             scale=self.softmax_scale, enable_gqa=self._gqa())
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa_packed(self, query, key, value, cu):
        """One SDPA call per segment (host bounds cached per micro-batch) on splits of q/k/v, outputs
        concatenated: the backward neither zero-fills nor copies a full-size gradient per segment."""
        bounds = host_bounds(cu)
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds} do not cover the {query.shape[0]} packed tokens")
        outs = []
        sizes = [e - s for s, e in itertools.pairwise(bounds)]
        for q, k, v in zip(query.split(sizes), key.split(sizes), value.split(sizes)):
            if q.shape[0] == 0:
                continue
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=True, scale=self.softmax_scale,
                                               enable_gqa=self._gqa())
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, dim=0)

    def _flex_packed(self, query, key, value, cu):
        T = query.shape[0]
        block_mask = document_causal_block_mask(cu, T)
        flex = _compiled_flex() if query.is_cuda else flex_fns()[0]
        q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # [1, heads, T, hn]
        o = flex(q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=self._gqa())
        return o[0].transpose(0, 1)


def local_layer_spec(normalization: str = "RMSNorm", backend: str = "auto", **kwargs):
    """Megatron's local GPT layer spec with ``core_attention`` = :class:`CoreAttention` on ``backend``
    (already resolved with :func:`requested_backend`)."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    spec = get_gpt_layer_local_spec(normalization=normalization, **kwargs)
    attn = spec.submodules.self_attention
    core = ModuleSpec(module=CoreAttention, params={"backend": backend})
    sub = dataclasses.replace(attn.submodules, core_attention=core)
    new_attn = dataclasses.replace(attn, submodules=sub)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=new_attn))
