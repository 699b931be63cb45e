"""gpu_check rows for the attention backends (issue 20), and the packed microbenchmark they share with
``benchmarks/bench_attention.py``.

``check_attention_packed``: packed causal attention through the model's own module
(``models.attention.CoreAttention``, one layer, TP 1), 1 / 8 / 64 sequences of mixed lengths in one
pack, forward+backward. On a GPU: 16,384 tokens, 16 query / 2 KV heads, head dim 128, bf16, the fused
backend ``auto`` picks (varlen_attn on torch >= 2.10) against eager. Pass: >= 5x eager's speed at 64
sequences; output and q/k/v gradients equal to eager's within bf16 tolerance (max |diff| <= 5e-2 of
max(1, max |eager|): a wrong mask or segment bound is off by O(1)). ``--smoke`` (CPU): 256 tokens,
fp32, sdpa as the fused backend, equality within 1e-5, speed reported only (tiny shapes say nothing).

``check_vs_transformers``: forward+backward of the same random ~1B Llama (H 2048, 16 layers, FFN 5,632,
V 32,000, bf16, 2 x 2,048 tokens, ``check_throughput``'s loss) with ``transformers``
(``attn_implementation="sdpa"``) and with megatron-gad's local spec (``attention_backend=auto``), one
after the other in this process. Pass: megatron-gad >= 0.95x transformers' tokens/s and peak memory
<= 1.1x. Smoke: a tiny model on CPU, both measured, ratios reported only.

Both are imported by ``benchmarks/gpu_check.py`` (``--only attention_packed vs_transformers``).
"""

from __future__ import annotations

import functools
import time
import types

PACKS = (1, 8, 64)
TOL_BF16 = 5e-2  # max |fused - eager| / max(1, max |eager|), outputs and q/k/v gradients
TOL_FP32 = 1e-5
SPEEDUP_MIN = 5.0  # fused vs eager at 64 sequences
TPS_RATIO_MIN = 0.95  # megatron-gad / transformers+sdpa tokens/s
PEAK_RATIO_MAX = 1.1


class _OneRank:
    """TP group of one rank (the module reads only size() and rank())."""

    def size(self):
        return 1

    def rank(self):
        return 0


def make_attention(backend: str, heads: int, kv_heads: int, head_dim: int, dtype):
    """The model's core attention module alone (TP 1), as the layer spec builds it."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_gad.models.attention import CoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            num_query_groups=kv_heads, kv_channels=head_dim, attention_dropout=0.0,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                            masked_softmax_fusion=False)
    return CoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                         pg_collection=types.SimpleNamespace(tp=_OneRank()), backend=backend)


def pack_lengths(total: int, n: int, seed: int = 0) -> list[int]:
    """``n`` lengths summing to ``total``, mixed (up to ~10x apart), deterministic."""
    import random

    rng = random.Random(seed + n)
    w = [rng.uniform(1.0, 10.0) for _ in range(n)]
    lens = [max(1, int(total * x / sum(w))) for x in w]
    lens[-1] += total - sum(lens)
    return lens


def packed_inputs(total: int, n: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(n)
    lens = pack_lengths(total, n)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(total, heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=g).to(device, dtype)
    grad = torch.randn(total, heads * head_dim, generator=g).to(device, dtype)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                          max_seqlen_kv=max(lens))
    return (q, k, v), grad, psp, lens


def run_packed(module, qkv, grad, psp, backward: bool = True):
    """One forward (+ backward): (output, [dq, dk, dv] or None)."""
    import torch

    leaves = [x.detach().clone().requires_grad_(backward) for x in qkv]
    with torch.set_grad_enabled(backward):
        out = module(*leaves, None, packed_seq_params=psp)
        if not backward:
            return out.detach(), None
        out.backward(grad)
    return out.detach(), [x.grad for x in leaves]


def max_rel(a, b) -> float:
    """max |a - b| / max(1, max |b|) (fp64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def check_attention_packed(rec, smoke: bool) -> None:
    import gpu_check as gc
    import torch

    gpu = torch.cuda.is_available()
    if gpu:
        T, H, G, D, dtype, reps, tol = 16384, 16, 2, 128, torch.bfloat16, 5, TOL_BF16
    else:
        T, H, G, D, dtype, reps, tol = 256, 4, 2, 16, torch.float32, 2, TOL_FP32
    dev = gc._device()
    eager = make_attention("eager", H, G, D, dtype)
    fused_name = "auto" if gpu else "sdpa"
    fused = make_attention(fused_name, H, G, D, dtype)
    with gc._megatron_process():
        for n in PACKS:
            qkv, grad, psp, lens = packed_inputs(T, n, H, G, D, dtype, dev)
            impl = fused.choose(True, qkv[0])
            ref_out, ref_grads = run_packed(eager, qkv, grad, psp)
            out, grads = run_packed(fused, qkv, grad, psp)
            errs = {"out": max_rel(out, ref_out)} | {f"d{x}": max_rel(a, b)
                                                     for x, a, b in zip("qkv", grads, ref_grads)}
            rec.check_le(f"{n}seq_{impl}_vs_eager_maxrel", max(errs.values()), tol, **errs, tokens=T,
                         longest=max(lens))
            run_eager = functools.partial(run_packed, eager, qkv, grad, psp)
            run_fused = functools.partial(run_packed, fused, qkv, grad, psp)
            t_eager, t_fused = gc._timed(run_eager, reps), gc._timed(run_fused, reps)
            p_eager, p_fused = gc._peak_bytes(run_eager), gc._peak_bytes(run_fused)
            detail = {"eager_ms": t_eager * 1e3, "fused_ms": t_fused * 1e3, "backend": impl,
                      "eager_peak_gib": p_eager / 2**30 if p_eager else None,
                      "fused_peak_gib": p_fused / 2**30 if p_fused else None}
            if gpu and n == 64:
                rec.check_ge(f"{n}seq_speedup_{impl}_vs_eager", t_eager / t_fused, SPEEDUP_MIN, "x", **detail)
            else:
                rec.report(f"{n}seq_speedup_{impl}_vs_eager", t_eager / t_fused, "x", **detail)


def _hf_llama(arch, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
                      num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                      num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                      max_position_embeddings=arch.max_position_embeddings, rope_theta=arch.rope_theta,
                      rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).train()


def check_vs_transformers(rec, smoke: bool) -> None:
    import gpu_check as gc
    import torch

    from megatron_gad.models.build import build_model

    gpu = torch.cuda.is_available()
    arch, B, S, reps = gc.throughput_model(gpu)  # the `throughput` row's model and batch
    dev = gc._device()
    ids = torch.randint(0, arch.vocab_size, (B, S), device=dev)
    pos = torch.arange(S, device=dev)[None].expand(B, S)
    measured = {}

    def measure(name, step):
        dt = gc._timed(step, reps)
        peak = gc._peak_bytes(step)
        measured[name] = (B * S / dt, peak)
        rec.report(f"{name}_tokens_per_s", B * S / dt, " tok/s", step_ms=dt * 1e3,
                   peak_gib=peak / 2**30 if peak else None)

    hf = [_hf_llama(arch, torch.bfloat16, dev)]  # a list, so the model can be freed before the next one

    def hf_step():
        hf[0](ids).logits.float().logsumexp(-1).mean().backward()

    measure("transformers_sdpa", hf_step)
    hf.clear()
    if gpu:
        torch.cuda.empty_cache()
    with gc._megatron_process():
        from megatron_gad.parallel import state

        state.init_model_parallel(1, 1)
        model = build_model(arch, "actor", 1, 1, "bfloat16", vocab_divisible_by=128, attention_backend="auto")
        if gpu:
            model.cuda()

        def mg_step():
            model(ids, pos, None).float().logsumexp(-1).mean().backward()

        measure("megatron_gad_auto", mg_step)
    (tps_hf, peak_hf), (tps_mg, peak_mg) = measured["transformers_sdpa"], measured["megatron_gad_auto"]
    if gpu:
        rec.check_ge("tokens_per_s_ratio_vs_transformers_sdpa", tps_mg / tps_hf, TPS_RATIO_MIN, "x")
        rec.check_le("peak_ratio_vs_transformers_sdpa", peak_mg / peak_hf, PEAK_RATIO_MAX, "x",
                     megatron_gib=peak_mg / 2**30, transformers_gib=peak_hf / 2**30)
    else:
        rec.report("tokens_per_s_ratio_vs_transformers_sdpa", tps_mg / tps_hf, "x",
                   note="CPU smoke: eager local spec vs transformers sdpa on a tiny model, not judged")
        rec("peak_ratio_vs_transformers_sdpa", "SKIP", reason="CPU smoke: no device peak memory")


def timed_s(fn, reps: int) -> float:
    """Median seconds of fn() after one untimed call (CUDA-synchronised) — for bench_attention.py."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
