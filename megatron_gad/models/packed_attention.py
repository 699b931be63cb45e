"""Core attention for Megatron's local (non-Transformer-Engine) GPT layer spec that accepts packed
sequences (THD), so the packed code path runs — and is tested — on CPU.

Megatron-Core 0.16's local ``DotProductAttention`` asserts ``packed_seq_params is None``. Everything
around it already handles THD: ``SelfAttention.forward`` squeezes q/k/v from ``[T, 1, heads, d]`` to
``[T, heads, d]`` before core attention and reshapes the ``[T, heads*d]`` result back to
``[T, 1, hidden]``; the non-fused RoPE (``rope_utils._apply_rotary_pos_emb_thd``) restarts positions
at each ``cu_seqlens`` boundary; ``GPTModel`` takes ``input_ids [1, T]`` and runs ``[T, 1, H]``
hidden states. :class:`PackedDotProductAttention` replaces only the core attention:

* packed input (``packed_seq_params.qkv_format == "thd"``): causal attention inside each segment of
  ``cu_seqlens_q`` (== ``cu_seqlens_kv``; self-attention), a loop over segments — exact, and
  ``O(sum l_i^2)`` rather than ``O(T^2)``. Scores, scaling and softmax go through Megatron's own
  ``baddbmm`` + ``FusedScaleMaskSoftmax`` exactly as the unpacked path does, per segment.
* unpacked input: exactly Megatron's ``DotProductAttention.forward`` (this class subclasses it), so
  the spec can use this module always.

``MEGATRON_GAD_EMULATE_TE_MASKING=1``
-------------------------------------
On GPU the model runs the Transformer Engine spec, whose ``TEDotProductAttention`` is built with
``attn_mask_type=causal``; TE reads ``attention_mask`` only for the ``padding*`` / ``arbitrary``
mask types, so for causal attention **any attention mask we pass is ignored** (and in decode Megatron
switches to ``no_mask``). A padded batch that is correct on CPU (where the local spec applies our
``[B, 1, S, S]`` padding mask) is therefore silently different on GPU. With this variable set (read
at every forward), this module sees exactly what TE's kernels see, so CPU tests prove the GPU code
path does not depend on a mask:

* packed: causal within each ``cu_seqlens`` segment (as without the switch) and ``attention_mask``
  ignored;
* unpacked: ``attention_mask`` ignored; plain causal when ``sq == sk``, no mask when ``sq == 1`` or
  the layer passes ``attn_mask_type=no_mask`` (decode), top-left aligned causal otherwise (TE's
  ``causal`` convention).

Without the switch, a packed forward refuses an ``attention_mask`` (packing carries the sequence
structure in ``cu_seqlens``; a ``[*, 1, T, T]`` mask is not a meaningful companion).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

EMULATE_TE_MASKING_ENV = "MEGATRON_GAD_EMULATE_TE_MASKING"


def emulate_te_masking() -> bool:
    """Whether ``MEGATRON_GAD_EMULATE_TE_MASKING`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(EMULATE_TE_MASKING_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_CACHE_ATTR = "_megatron_gad_attention_cache"


def micro_batch_cache(cu: torch.Tensor) -> dict:
    """Dict stored on the ``cu_seqlens`` tensor of this micro-batch: every layer reuses its entries
    (host bounds, block masks, RoPE tables) and they die with the micro-batch."""
    c = getattr(cu, _CACHE_ATTR, None)
    if c is None:
        c = {}
        setattr(cu, _CACHE_ATTR, c)
    return c


def host_bounds(cu: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as host ints: one device->host copy per micro-batch, not one per layer."""
    c = micro_batch_cache(cu)
    if "bounds" not in c:
        c["bounds"] = cu.detach().to("cpu", torch.long).tolist()
    return c["bounds"]


def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = host_bounds(cu)
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` (same constructor) that also accepts packed THD
    input; see the module docstring."""

    def forward(self, query, key, value, attention_mask, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None):
        emulate = emulate_te_masking()
        if packed_seq_params is None:
            if not emulate:
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias)
            return self._unpacked_te_like(query, key, value, attn_mask_type, attention_bias)
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedDotProductAttention")
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: only 'thd' is supported")
        if attention_mask is not None and not emulate:
            raise ValueError("packed (THD) attention takes no attention_mask: the sequences are defined by cu_seqlens "
                             f"(set {EMULATE_TE_MASKING_ENV}=1 to ignore it as Transformer Engine does)")
        return self._packed(query, key, value, packed_seq_params)

    # ------------------------------------------------------------------ helpers
    def _expand_kv(self, key, value, head_dim: int):
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if rep > 1:
            key = key.repeat_interleave(rep, dim=head_dim)
            value = value.repeat_interleave(rep, dim=head_dim)
        return key, value

    def _probs(self, scores: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        """scores [b, np, sq, sk] (already multiplied by softmax_scale) -> dropped-out probs, via
        Megatron's softmax module (its scale, fp32 softmax, softmax offset) with an explicit mask."""
        if masked is None:  # FusedScaleMaskSoftmax would build a causal mask itself for a causal layer
            probs = self._softmax_no_mask(scores)
        else:
            probs = self.scale_mask_softmax(scores, masked, self.softmax_offset)
        if self.attention_dropout.p == 0:  # identity: no RNG-tracker fork (x * 1.0 would be bit-equal)
            return probs
        if not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.attention_dropout(probs)
        return self.attention_dropout(probs)

    def _softmax_no_mask(self, scores: torch.Tensor) -> torch.Tensor:
        sms = self.scale_mask_softmax
        saved = sms.attn_mask_type, sms.window_size
        sms.attn_mask_type, sms.window_size = AttnMaskType.no_mask, None
        try:
            return sms(scores, None, self.softmax_offset)
        finally:
            sms.attn_mask_type, sms.window_size = saved

    def _attend(self, q, k, v, masked):
        """q [b, np, sq, hn], k/v [b, np, sk, hn] (heads expanded) -> context [b, np, sq, hn]."""
        b, np_, sq, hn = q.shape
        sk = k.shape[2]
        qf = q.reshape(b * np_, sq, hn)
        kf = k.reshape(b * np_, sk, hn)
        scores = torch.baddbmm(torch.empty(b * np_, sq, sk, dtype=q.dtype, device=q.device), qf, kf.transpose(1, 2),
                               beta=0.0, alpha=self.softmax_scale).view(b, np_, sq, sk)
        probs = self._probs(scores, masked)
        return torch.bmm(probs.view(b * np_, sq, sk), v.reshape(b * np_, sk, hn)).view(b, np_, sq, hn)

    # ------------------------------------------------------------------ packed (THD)
    def _packed(self, query, key, value, psp):
        """query [T, np, hn], key/value [T, ng, hn] -> [T, np*hn]."""
        cu_q, cu_kv = psp.cu_seqlens_q, psp.cu_seqlens_kv
        if cu_q is None:
            raise ValueError("packed_seq_params.cu_seqlens_q is required")
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_kv.cpu(), cu_q.cpu()):
            raise ValueError("self-attention needs cu_seqlens_kv == cu_seqlens_q")
        for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            padded = getattr(psp, name, None)
            if padded is not None and not torch.equal(padded.cpu(), cu_q.cpu()):
                raise NotImplementedError(f"{name} different from cu_seqlens_q is not supported on the local spec")
        T = query.shape[0]
        segs = _segments(cu_q)
        if segs[-1][1] != T or segs[0][0] != 0:
            raise ValueError(f"cu_seqlens {[s for s, _ in segs] + [segs[-1][1]]} do not cover the {T} packed tokens")
        key, value = self._expand_kv(key, value, head_dim=1)
        outs = []
        causal_cache: dict[int, torch.Tensor] = {}
        # split (one backward cat) rather than sliced per segment (each slice's backward writes a
        # zero-filled full-size gradient), and outputs concatenated rather than written into slices of
        # one buffer (whose backward copied the whole gradient once per segment): the same bits
        sizes = [e - s for s, e in segs]
        for q, k, v in zip(query.split(sizes), key.split(sizes), value.split(sizes)):
            n = q.shape[0]
            if n == 0:
                continue
            if n not in causal_cache:
                causal_cache[n] = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
            # [n, np, hn] -> [1, np, n, hn]
            ctx = self._attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               causal_cache[n])
            outs.append(ctx[0].transpose(0, 1))
        return torch.cat(outs, dim=0).reshape(T, self.hidden_size_per_partition)

    # ------------------------------------------------------------------ unpacked, TE-like masking
    def _unpacked_te_like(self, query, key, value, attn_mask_type, attention_bias):
        """[sq, b, np, hn] q, [sk, b, ng, hn] k/v -> [sq, b, np*hn], masking only what TE applies."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedDotProductAttention")
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        key, value = self._expand_kv(key, value, head_dim=2)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        masked = None
        if mask_type != AttnMaskType.no_mask and sq > 1:
            masked = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(1)  # top-left aligned
        ctx = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), masked)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def packed_local_layer_spec(normalization: str = "RMSNorm", **kwargs):
    """Megatron's local GPT layer spec (``get_gpt_layer_local_spec(normalization=..., **kwargs)``,
    as ``models/build.py:layer_spec`` builds it for CPU) with only ``core_attention`` replaced by
    :class:`PackedDotProductAttention`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=normalization, **kwargs)
    attn = spec.submodules.self_attention
    sub = dataclasses.replace(attn.submodules, core_attention=PackedDotProductAttention)
    new_attn = dataclasses.replace(attn, submodules=sub)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=new_attn))
