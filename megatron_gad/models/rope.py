"""RoPE for packed (THD) input without a device->host sync, through Megatron's ``apply_rope_fusion`` hook.

Megatron-Core's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``) splits the packed tokens
with ``(cu_seqlens[1:] - cu_seqlens[:-1]).tolist()`` and compares ``freqs.size(0) == cu_seqlens[-1]``:
two host syncs in every attention layer (q and k), and the cos/sin of the same positions recomputed
each time. With ``TransformerConfig.apply_rope_fusion=True`` Megatron instead calls the module-level
``fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size=, cp_rank=)`` (and
``fused_apply_rotary_pos_emb(t, freqs, interleaved=)`` for unpacked input), which Transformer Engine
provides when installed. Without TE both are None; :func:`install` puts these in their place:

* :func:`apply_rotary_pos_emb_thd`: each token's position inside its segment from device ops on
  ``cu_seqlens`` (``searchsorted``), the cos/sin of those positions computed once per micro-batch
  (cached on the ``cu_seqlens`` tensor, keyed by the frequency table), then exactly Megatron's
  rotation ``t * cos + rotate_half(t) * sin``: the same operations on the same numbers, so results are
  bit-identical to the unfused path (positions restart at every segment, as there).
* unpacked input: Megatron's own ``_apply_rotary_pos_emb_bshd``, unchanged.

Only the local spec's processes install them (when the hooks are still None, i.e. no usable TE); a
process with TE keeps TE's kernels and today's ``apply_rope_fusion=False``.
"""

from __future__ import annotations

import torch

from megatron_gad.models.packed_attention import micro_batch_cache


def thd_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] long: each packed token's position inside its ``cu_seqlens`` segment (device ops only)."""
    cu = cu_seqlens.long()
    idx = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu[1:].contiguous(), idx, right=True)
    return idx - cu.index_select(0, seg.clamp_(max=cu.numel() - 1))


def _cos_sin(cu_seqlens: torch.Tensor, freqs: torch.Tensor, total: int, dtype: torch.dtype):
    """cos/sin ``[total, 1, 1, d]`` of every packed position, once per micro-batch and frequency table
    (q and k of every layer share them). The table itself is kept in the entry, so an id is never
    matched against another table that happens to reuse a freed one's address."""
    cache = micro_batch_cache(cu_seqlens)
    key = ("rope", id(freqs), total, dtype)
    hit = cache.get(key)
    if hit is not None and hit[0] is freqs:
        return hit[1], hit[2]
    f = freqs.index_select(0, thd_positions(cu_seqlens, total).to(freqs.device))
    # as Megatron's _apply_rotary_pos_emb_bshd computes them (mscale 1.0: the fused path has none)
    cos, sin = (torch.cos(f) * 1.0).to(dtype), (torch.sin(f) * 1.0).to(dtype)
    cache[key] = (freqs, cos, sin)
    return cos, sin


def apply_rotary_pos_emb_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                             cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """``fused_apply_rotary_pos_emb_thd``-shaped RoPE: ``t [T, heads, d]`` with positions restarting at
    every ``cu_seqlens`` boundary; ``freqs [max_seqlen, 1, 1, rot_dim]``. No host sync."""
    from megatron.core.models.common.embeddings.rope_utils import _rotate_half

    if cp_size != 1:
        raise NotImplementedError("context parallelism is not supported by the local spec's RoPE")
    cos, sin = _cos_sin(cu_seqlens, freqs, t.shape[0], t.dtype)
    rot_dim = freqs.shape[-1]
    x = t.unsqueeze(1)  # [T, 1, heads, d], the layout Megatron's bshd rotation runs in
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x = (x * cos) + (_rotate_half(x, False) * sin)
    return torch.cat((x, x_pass), dim=-1).squeeze(1)


def apply_rotary_pos_emb_bshd(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Unpacked input: Megatron's unfused rotation (the fused hook's signature)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


apply_rotary_pos_emb_thd._megatron_gad = True
apply_rotary_pos_emb_bshd._megatron_gad = True


def install() -> bool:
    """Put the functions above into Megatron's RoPE hooks where they are empty (no Transformer Engine).
    True when the hooks are ours, i.e. ``apply_rope_fusion`` should be set for this process's models."""
    from megatron.core.models.common.embeddings import rope_utils

    thd, bshd = rope_utils.fused_apply_rotary_pos_emb_thd, rope_utils.fused_apply_rotary_pos_emb
    ours = all(f is None or getattr(f, "_megatron_gad", False) for f in (thd, bshd))
    if not ours:
        return False  # Transformer Engine's kernels: leave them, and apply_rope_fusion off as before
    rope_utils.fused_apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd
    rope_utils.fused_apply_rotary_pos_emb = apply_rotary_pos_emb_bshd
    return True
