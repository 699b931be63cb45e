"""gpu_check row ``rollout_native``: the native Megatron rollout (``engine.generate``) side by side with
``transformers.generate`` on the same prompts, in one process (imported by ``benchmarks/gpu_check.py``).

GPU: a random Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 / 2 heads, vocab 151,936, tied) in
bf16, 64 rows = 8 prompts x 8 samples with prompt lengths 16-200, greedy, 32 new tokens. Measured:
tok/s of both (best of 2 after a warm-up), model forwards per response position, the generate loop's
host syncs per decode step and CUDA's own count of synchronising calls per step
(``torch.cuda.set_sync_debug_mode``), the buckets chosen, greedy agreement with transformers (reported:
bf16 near-ties may flip an argmax). Threshold: native tok/s >= 1.0x transformers (issue 21), and the
loop syncs at most once per step.
Smoke (CPU): a tiny model in fp32, 16 rows of 4-40 tokens, 8 new tokens: greedy rows equal to
transformers token for token (threshold: all rows); the speed ratio is reported only.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

RATIO_MIN = 1.0  # native tok/s / transformers tok/s (issue 21)


def _prompt_rows(prompts: int, samples: int, lo: int, hi: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (prompts,), generator=g).tolist()
    ps = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return [p for p in ps for _ in range(samples)], lengths


def _timed(fn, reps: int):
    import torch

    best, out = None, None
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def _count_cuda_syncs(fn) -> int | None:
    """Synchronising CUDA calls made by fn() (torch's sync debug mode warns on each); None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def check_rollout_native(rec, smoke: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gad.controller.local_group import ensure_single_process_group
    from megatron_gad.data import pad_sequences
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.parallel.cpu_compat import cpu_device_mode
    from megatron_gad.tools.tiny_models import make_hf_model

    gpu = torch.cuda.is_available()
    if gpu:
        shape = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=512)
        prompts, samples, lo, hi, new, dtype, reps = 8, 8, 16, 200, 32, "bfloat16", 2
    else:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=128)
        prompts, samples, lo, hi, new, dtype, reps = 4, 4, 4, 40, 8, "float32", 1
    root = tempfile.mkdtemp(prefix="gpu_check_rollout_")
    t0 = time.perf_counter()
    path = make_hf_model(os.path.join(root, "qwen2"), "qwen2", seed=0, **shape)
    build_s = time.perf_counter() - t0
    rows, lengths = _prompt_rows(prompts, samples, lo, hi, shape["vocab_size"])
    ids, mask = pad_sequences(rows, 0, left=True)
    eos = 2
    ensure_single_process_group()
    with cpu_device_mode():
        shard = ModelShard("actor", path, 1, 1, params_dtype=dtype, vocab_divisible_by=128, trainable=False)
        stats: dict = {}

        def native():
            return generate(shard, ids, mask, max_new_tokens=new, eos_id=eos, pad_id=0, greedy=True, stats=stats)

        generate(shard, ids[:2], mask[:2], max_new_tokens=4, eos_id=eos, pad_id=0, greedy=True)  # warm-up
        native_s, out = _timed(native, reps)
        native_tokens = int(out["response_mask"].sum())
        native_rows = [r[m.bool()].tolist() for r, m in zip(out["responses"], out["response_mask"])]
        run_stats = dict(stats)
        cuda_syncs = _count_cuda_syncs(native)
        shard.offload(params=True)  # the GPU to transformers now

    dev = torch.device("cuda") if gpu else torch.device("cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(dev).eval()
    calls = [0]
    hf.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    hids, hmask = ids.to(dev), mask.to(dev)

    @torch.no_grad()
    def hf_generate():
        return hf.generate(hids, attention_mask=hmask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                           pad_token_id=0)

    with torch.no_grad():
        hf.generate(hids[:2], attention_mask=hmask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
    calls[0] = 0
    hf_s, hout = _timed(hf_generate, reps)
    hf_forwards = calls[0] // reps
    gen = hout[:, ids.shape[1]:].cpu().tolist()
    hf_rows = [g[: g.index(eos) + 1] if eos in g else g for g in gen]
    hf_tokens = sum(map(len, hf_rows))
    hf_cuda_syncs = _count_cuda_syncs(hf_generate)

    native_tps, hf_tps = native_tokens / native_s, hf_tokens / hf_s
    positions = max(len(r) for r in native_rows)
    same = sum(a == b for a, b in zip(native_rows, hf_rows))
    detail = dict(rows=len(rows), prompt_lengths=str(sorted(lengths)), new_tokens=new, dtype=dtype,
                  native_tok_s=native_tps, transformers_tok_s=hf_tps, native_s=native_s, transformers_s=hf_s,
                  native_forwards=run_stats["forwards"], native_forwards_per_position=run_stats["forwards"] / positions,
                  native_steps=run_stats["steps"], native_buckets=run_stats["buckets"],
                  native_prefill_rows=run_stats["prefill_rows"], transformers_forwards=hf_forwards,
                  native_cuda_syncs_per_step=None if cuda_syncs is None else cuda_syncs / run_stats["steps"],
                  transformers_cuda_syncs_per_step=None if hf_cuda_syncs is None else hf_cuda_syncs / new,
                  greedy_rows_equal=f"{same}/{len(rows)}", model_build_s=build_s)
    rec.report("native_tok_s", native_tps, " tok/s", **detail)
    rec.check_le("loop_host_syncs_per_step", run_stats["host_syncs"] / run_stats["steps"], 1.0,
                 steps=run_stats["steps"], host_syncs=run_stats["host_syncs"])
    if gpu:
        rec.check_ge("native_vs_transformers", native_tps / hf_tps, RATIO_MIN, "x", **detail)
        rec.report("greedy_rows_equal_transformers_bf16", same / len(rows), " of rows",
                   reason="bf16: near-ties may flip an argmax between the padded and unpadded computation")
    else:
        rec.report("native_vs_transformers", native_tps / hf_tps, "x",
                   reason="CPU smoke: tiny model, ratio reported only", **detail)
        rec.check_true("greedy_rows_equal_transformers_fp32", same == len(rows), "every row's tokens == transformers",
                       value=len(rows) - same, unit=" rows differ")
