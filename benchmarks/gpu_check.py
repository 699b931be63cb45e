r"""GPU acceptance run: every check in its own subprocess, PASS/FAIL/SKIP against a stated threshold.

Runs from source on the GPU check machine as it is (Python 3.12, torch 2.11, Triton 3.6, transformers
5.17; megatron-core 0.16.1 brought as a wheel; no Ray, no Transformer Engine, no vLLM, one GPU) and,
with ``--smoke``, on a CPU (tiny shapes, gloo, Triton under ``TRITON_INTERPRET=1``). Each check runs
in a child process with a timeout; each measured value is appended to ``OUT/results.jsonl`` the moment
it exists (a hang or a crash loses nothing before it), the children's output goes to
``OUT/checks.log``, the summary to ``OUT/summary.txt``. Exit status 1 if any check FAILs.

Checks (thresholds are next to each check below and in docs/gpu-check.md):
  import          the package imports from source; the GPU path (trainer with local workers,
                  workers, engine, kernels) imports no Ray; megatron-core is 0.16.x
  cluster_only    SKIP rows for what this machine cannot run: TE spec (+ local->TE checkpoint), Ray
                  placement, TP/PP > 1
  kernels         fused discriminator head + BT loss (disc_head_bt_loss impl=triton vs impl=torch) and
                  the chunked vocab-parallel log-prob vs log_softmax, fp32 and bf16: equality, time,
                  peak memory
  megatron_vs_hf  Megatron-Core (local spec) logits vs transformers (fp32, per sequence alone) on a
                  mixed-length batch: padded, packed (workers/micro_batches.py -> engine/packing.py)
                  and per row, fp32 and bf16, Llama and Qwen2; greedy KV-cached decoding (fp32)
  checkpoint      ModelShard save -> fresh shard load: weights and Adam state bit-identical
  gad_steps       3 trainer steps (1 warmup + 2 GAD) with trainer.workers=local (no Ray)
  throughput      forward+backward of a ~1B-parameter random Llama in bf16: tokens/s, TFLOP/s, MFU
                  (local spec, unfused attention: a lower bound for TE clusters)
  attention_packed  packed causal attention, 1/8/64 sequences in 16k tokens, fwd+bwd: the fused backend
                  vs eager (>= 5x at 64 sequences; outputs and q/k/v grads equal within bf16 tolerance)
  vs_transformers the 1B fwd+bwd beside transformers attn_implementation="sdpa" in the same process:
                  >= 0.95x its tokens/s, <= 1.1x its peak (benchmarks/gpu_checks_attention.py)
  rollout_native  native rollout vs transformers.generate, Qwen2.5-0.5B shape, 64 rows, greedy 32 tokens:
                  tok/s ratio >= 1.0, forwards per position, host syncs per step (gpu_checks_rollout.py)
  families        (benchmarks/gpu_checks_families.py) Qwen3-8B and Llama-3.1-8B layer shapes (2 layers,
                  q/k norms; llama3 RoPE on a row of 8,500 tokens, past its 8,192 window) vs transformers:
                  packed logits fp32 and bf16, greedy KV-cached decoding (fp32)

Here (CPU):  PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke

On the GPU machine, once per checkout bring the megatron-core wheel (``sh benchmarks/gpu_wheels.sh``:
``.wheels/`` is git-ignored, 2.6 MB), then the device tool's ``run`` with ``carry: [".wheels"]``,
``timeout_s: 480`` and this ``command`` (it runs in the repository root):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \
      python3 benchmarks/gpu_check.py --out $OUT

The whole run is capped at ``--budget-s`` (420 s on a GPU since the attention rows; run a rerun with
``--only`` the checks that failed, so it fits the 15-minute device budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = "results.jsonl"
sys.path.insert(0, HERE)
from gpu_checks_rollout import check_rollout_native  # noqa: E402,F401  (a check_<name> of this module)

# name -> timeout (s) on a GPU; --smoke multiplies by SMOKE_SCALE (a loaded 2-core CPU box).
CHECKS = {"import": 45, "cluster_only": 30, "kernels": 75, "megatron_vs_hf": 75, "checkpoint": 60,
          "gad_steps": 75, "throughput": 120, "families": 240, "weight_sync": 45}
# issue 20: attention backends (benchmarks/gpu_checks_attention.py)
CHECKS.update({"attention_packed": 90, "vs_transformers": 150})
CHECKS["rollout_native"] = 120  # benchmarks/gpu_checks_rollout.py
SMOKE_SCALE = 4
# GPU_CHECK_BF16=1: the checkpoint and GAD-step checks use bf16 on CPU too (what they use on a GPU).
BF16_ON_CPU = os.environ.get("GPU_CHECK_BF16") == "1"

# Thresholds (see each check's docstring for why).
TOL = {
    "logits_fp32_abs": 1e-4,  # fp32 Megatron vs fp32 transformers, max |diff| of logits
    "logits_bf16_rel": 5e-2,  # bf16 Megatron vs fp32 transformers, max |diff| / max |ref|
    "disc_fp32_rel": 1e-5,  # triton vs torch: loss and every gradient, max |diff| / max |ref|
    "disc_bf16_rel": 1e-2,
    "logprob_fp32_rel": 1e-5,  # chunked vs log_softmax (fp32 math): log-probs and gradient
    "logprob_bf16_rel": 1e-2,
    "logprob_peak_ratio": 1.0,  # chunked (in-place backward) peak memory < naive peak memory
    "mfu_min": 0.10,  # ~1B bf16 fwd+bwd, local spec: below 10% something is badly wrong
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, SXM


# ----------------------------------------------------------------------------------------------
# Recording (children and parent append to the same file; never at the same time)
# ----------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self, out: str, check: str):
        self.path = os.path.join(out, RESULTS)
        self.check = check
        self.statuses: list[str] = []

    def __call__(self, case: str, status: str, value=None, threshold: str | None = None, unit: str = "",
                 reason: str = "", **detail) -> None:
        assert status in ("PASS", "FAIL", "SKIP"), status
        rec = {"check": self.check, "case": case, "status": status, "value": _num(value), "unit": unit,
               "threshold": threshold, "reason": reason, "detail": {k: _num(v) for k, v in detail.items()},
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        line = json.dumps(rec, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.statuses.append(status)
        print(f"[{status}] {self.check}/{case}: {_fmt(value)}{unit} ({threshold or 'reported'}) {reason}",
              flush=True)

    def check_le(self, case: str, value: float, limit: float, unit: str = "", **detail) -> None:
        ok = value is not None and math.isfinite(value) and value <= limit
        self(case, "PASS" if ok else "FAIL", value, f"<= {limit:g}", unit, **detail)

    def check_ge(self, case: str, value: float, limit: float, unit: str = "", **detail) -> None:
        ok = value is not None and math.isfinite(value) and value >= limit
        self(case, "PASS" if ok else "FAIL", value, f">= {limit:g}", unit, **detail)

    def check_true(self, case: str, ok: bool, what: str, value=None, **detail) -> None:
        self(case, "PASS" if ok else "FAIL", value, what, **detail)

    def report(self, case: str, value, unit: str = "", **detail) -> None:
        """A measurement with no pass/fail bar (time, throughput): PASS when it is a finite number."""
        ok = isinstance(value, (int, float)) and math.isfinite(float(value))
        self(case, "PASS" if ok else "FAIL", value, None, unit, **detail)


def _num(v):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------
# Helpers for the children
# ----------------------------------------------------------------------------------------------
def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> float:
    """Median seconds of fn() (GPU-synchronised), after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _peak_bytes(fn) -> float | None:
    """Peak extra bytes allocated while fn() runs (GPU only)."""
    import torch

    if not torch.cuda.is_available():
        fn()
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync()
    return float(torch.cuda.max_memory_allocated() - base)


def _rel(a, b) -> float:
    """max |a - b| / max |b| (fp64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _megatron_process():
    """World-size-1 process group (NCCL on a GPU, gloo on CPU) + the device mode: the process entry."""
    from megatron_gad.controller.local_group import ensure_single_process_group
    from megatron_gad.parallel.cpu_compat import cpu_device_mode

    ensure_single_process_group()
    return cpu_device_mode()


# ----------------------------------------------------------------------------------------------
# Checks (each runs in a child process: check_<name>(rec, smoke))
# ----------------------------------------------------------------------------------------------
def check_import(rec: Recorder, smoke: bool) -> None:
    """The package comes from this source tree; the whole no-Ray GPU path imports without Ray."""
    import importlib

    import torch

    import megatron_gad

    src = os.path.dirname(os.path.abspath(megatron_gad.__file__))
    rec.check_true("from_source", src == os.path.join(ROOT, "megatron_gad"), f"== {ROOT}/megatron_gad",
                   value=src)
    for mod in ("megatron_gad.controller.trainer", "megatron_gad.controller.local_group",
                "megatron_gad.workers.actor", "megatron_gad.workers.critic", "megatron_gad.engine.model_shard",
                "megatron_gad.kernels.disc_loss", "megatron_gad.kernels.logprob", "megatron_gad.checkpoint"):
        importlib.import_module(mod)
    rec.check_true("no_ray", "ray" not in sys.modules, "ray not imported by the local GPU path")
    import megatron.core

    ver = getattr(megatron.core, "__version__", "?")
    try:
        import transformers
        import triton

        extra = {"triton": triton.__version__, "transformers": transformers.__version__}
    except ImportError as exc:
        extra = {"missing": str(exc)}
    rec.check_true("megatron_core", str(ver).startswith("0.16."), "0.16.x", value=str(ver),
                   python=sys.version.split()[0], torch=torch.__version__,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **extra)


def check_cluster_only(rec: Recorder, smoke: bool) -> None:
    """What needs a real cluster: reported as SKIP with the reason, never as PASS."""
    import importlib.util

    import torch

    te = importlib.util.find_spec("transformer_engine") is not None
    ray = importlib.util.find_spec("ray") is not None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rec("te_spec", "SKIP", reason="Transformer Engine " + (
        "is installed but this script does not drive it: run pytest -m gpu tests/gpu on the cluster" if te else
        "is not installed here: the TE layer spec, fused_loss=te and a local-spec checkpoint loaded under the "
        "TE spec run on a TE cluster"))
    rec("local_to_te_checkpoint", "SKIP", reason="needs Transformer Engine (TE-spec state-dict keys)")
    rec("ray_trainer", "SKIP", reason=("Ray is installed, but" if ray else "Ray is not installed here;")
        + " the Ray worker groups and GPU placement run on a cluster (CPU: tests/controller/test_trainer.py)")
    rec("tp_pp_gt_1", "SKIP", reason=f"{gpus} GPU(s) here: TP/PP > 1 on GPUs (NCCL) needs several "
        "(CPU gloo: tests/distributed)")


def check_kernels(rec: Recorder, smoke: bool) -> None:
    """disc_head_bt_loss impl=triton vs impl=torch, and vocab_parallel_logprob vs log_softmax.

    Thresholds: relative max error (max|diff| / max|ref|) of the loss, scores and every gradient <=
    1e-5 in fp32 (same math, different reduction order) and <= 1e-2 in bf16 (inputs and gradients
    are bf16: 8 mantissa bits, ~4e-3 per rounding). The log-prob kernel works in fp32 whatever the
    logits' dtype; its reference is log_softmax of the logits in fp32; the gradient comes back in the
    logits' dtype. Memory: the chunked kernel with the in-place backward must peak below the naive
    log_softmax (it never holds a [T, V] fp32 softmax besides the logits). Times are reported.
    """
    import torch

    from megatron_gad.kernels.disc_loss import disc_head_bt_loss, resolve_impl
    from megatron_gad.kernels.logprob import vocab_parallel_logprob

    dev = _device()
    reps = 2 if smoke else 10
    # -------- fused discriminator head + Bradley-Terry loss
    N, n, H = (4, 2, 64) if smoke else (32, 8, 4096)
    try:
        impl = resolve_impl("triton")
    except RuntimeError as exc:
        impl = None
        rec("disc_triton", "SKIP", reason=str(exc))
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).split(".")[-1]
        g = torch.Generator(device=dev).manual_seed(0)
        ht = torch.randn(N, H, generator=g, device=dev).to(dtype)
        hs = torch.randn(N * n, H, generator=g, device=dev).to(dtype)
        w = (torch.randn(1, H, generator=g, device=dev) * 0.02).to(dtype)
        b = torch.zeros(1, device=dev, dtype=dtype)

        def run(which, ht=ht, hs=hs, w=w, b=b, as_dtype=None):
            a, s, ww, bb = (x.clone().to(as_dtype or x.dtype).requires_grad_() for x in (ht, hs, w, b))
            loss, _m, t_sc, s_sc = disc_head_bt_loss(a, s, ww, bb, n, impl=which, score_reg_coef=0.01)
            loss.backward()
            return {"loss": loss.detach().float(), "teacher_scores": t_sc, "student_scores": s_sc,
                    "grad_teacher": a.grad, "grad_student": s.grad, "grad_weight": ww.grad, "grad_bias": bb.grad}

        exact = run("torch", as_dtype=torch.float64)  # the same (rounded) inputs, fp64 math
        ref = run("torch")
        t_torch = _timed(lambda: run("torch"), reps)
        m_torch = _peak_bytes(lambda: run("torch"))
        if impl is None:
            continue
        got = run(impl)
        tol = TOL["disc_fp32_rel" if dtype == torch.float32 else "disc_bf16_rel"]
        # Each tensor's error vs fp64, relative to its largest entry, may reach max(tol, 2x the torch
        # path's own error): the bias gradient is a sum that cancels (the BT loss does not depend on
        # the bias; only the score regulariser does), so no implementation gets it to tol relative.
        worst, errs = 0.0, {}
        for k in exact:
            if got[k] is None:
                continue
            e_t, e_r = _rel(got[k], exact[k]), _rel(ref[k], exact[k])
            errs[k], errs[k + "_torch"] = e_t, e_r
            worst = max(worst, e_t / max(tol, 2 * e_r) * tol)
        rec.check_le(f"disc_{dn}_max_rel_err", worst, tol, **errs)
        t_tri = _timed(lambda: run(impl), reps)
        m_tri = _peak_bytes(lambda: run(impl))
        rec.report(f"disc_{dn}_time_triton", t_tri * 1e3, "ms", torch_ms=t_torch * 1e3,
                   speedup_vs_torch=t_torch / t_tri, shape=f"N={N} n={n} H={H}",
                   note="interpreted Triton: equality only, not speed" if dev.type == "cpu" else "")
        if m_tri is not None:
            rec.report(f"disc_{dn}_peak_triton", m_tri / 2**20, "MiB", torch_mib=m_torch / 2**20)
    # -------- vocab-parallel chunked log-prob
    T, V = (64, 1000) if smoke else (4096, 151936)
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).split(".")[-1]
        g = torch.Generator(device=dev).manual_seed(1)
        base = (torch.randn(T, V, generator=g, device=dev) * 2).to(dtype)
        target = torch.randint(0, V, (T,), generator=g, device=dev)

        def step(variant, base=base, target=target):
            logits = base.clone().requires_grad_()
            x = logits * 1.0  # non-leaf, like an output layer's logits
            if variant == "naive":
                lp = torch.log_softmax(x.float(), -1).gather(-1, target[:, None])[:, 0]
            else:
                lp, _ = vocab_parallel_logprob(x, target, chunk_size=4096 if not smoke else 256,
                                               inplace_backward=variant == "chunked_inplace")
            lp.sum().backward()
            return lp.detach(), logits.grad

        ref_lp, ref_g = step("naive")
        tol = TOL["logprob_fp32_rel" if dtype == torch.float32 else "logprob_bf16_rel"]
        t_naive = _timed(lambda: step("naive"), max(1, reps // 2))
        m_naive = _peak_bytes(lambda: step("naive"))
        for variant in ("chunked", "chunked_inplace"):
            lp, gr = step(variant)
            rec.check_le(f"logprob_{dn}_{variant}_max_rel_err", max(_rel(lp, ref_lp), _rel(gr, ref_g)), tol,
                         lp_rel=_rel(lp, ref_lp), grad_rel=_rel(gr, ref_g))
            t = _timed(lambda v=variant: step(v), max(1, reps // 2))
            rec.report(f"logprob_{dn}_{variant}_time", t * 1e3, "ms", naive_ms=t_naive * 1e3,
                       time_vs_naive=t / t_naive, shape=f"T={T} V={V}")
            m = _peak_bytes(lambda v=variant: step(v))
            if m is not None:
                ratio = m / m_naive
                if variant == "chunked_inplace":
                    rec.check_le(f"logprob_{dn}_{variant}_peak_vs_naive", ratio, TOL["logprob_peak_ratio"],
                                 peak_mib=m / 2**20, naive_mib=m_naive / 2**20)
                else:
                    rec.report(f"logprob_{dn}_{variant}_peak_vs_naive", ratio, peak_mib=m / 2**20,
                               naive_mib=m_naive / 2**20)
        del base
    _check_lm_head(rec, smoke, dev, reps)


def _check_lm_head(rec, smoke: bool, dev, reps: int) -> None:
    """lm_head_logprob (hidden -> log-prob + entropy through the LM head in chunks, temperature 0.7)
    vs the naive head: full [T, V] logits, / T, log_softmax (bf16: against that head in fp32 with the
    logits kernel's threshold; fp32: against fp64 math, within 1e-5 or no worse than 2x the fp32 naive
    head's own error), relative max error of log-probs, entropy and both gradients; its peak memory must stay
    below the naive head's, which holds the [T, V] logits, their softmax and gradient."""
    import torch

    from megatron_gad.kernels.lm_head import lm_head_logprob

    T, H, V = (64, 32, 1000) if smoke else (4096, 2048, 151936)
    temp = 0.7
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).split(".")[-1]
        g = torch.Generator(device=dev).manual_seed(2)
        hidden = torch.randn(T, H, generator=g, device=dev).to(dtype)
        weight = (torch.randn(V, H, generator=g, device=dev) * H ** -0.5 * 2).to(dtype)
        target = torch.randint(0, V, (T,), generator=g, device=dev)

        def step(variant, hidden=hidden, weight=weight, target=target):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            if variant == "exact":  # fp64 throughout: the reference both fp32 heads are measured against
                h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
            if variant in ("naive", "exact"):
                logp = torch.log_softmax((h @ w.t()).to(torch.float64 if variant == "exact" else torch.float32)
                                         / temp, -1)
                lp, ent = logp.gather(-1, target[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
            else:
                lp, ent = lm_head_logprob(h, w, target, temperature=temp, compute_entropy=True,
                                          token_chunk=256 if smoke else 4096, vocab_chunk=128 if smoke else 8192)
            (lp.sum() + ent.sum()).backward()
            return {"lp": lp.detach(), "entropy": ent.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}

        tol = TOL["logprob_fp32_rel" if dtype == torch.float32 else "logprob_bf16_rel"]
        if dtype == torch.float32:
            # fp32 against fp64: the hidden gradient sums V = 151,936 terms, and two fp32 orders of that sum
            # differ by ~sqrt(V) ulps (1.6e-5 relative on an H200), more than 1e-5. The fused head must be
            # within 1e-5 of exact math, or no worse than 2x today's fp32 head (full logits) is.
            exact, naive, got = step("exact"), step("naive"), step("fused")
            errs = {k: _rel(got[k].double(), exact[k]) for k in exact}
            naive_errs = {k: _rel(naive[k].double(), exact[k]) for k in exact}
            del exact, naive
            tol = max(tol, 2 * max(naive_errs.values()))
            errs.update({f"naive_{k}": v for k, v in naive_errs.items()})
            worst = max(v for k, v in errs.items() if not k.startswith("naive_"))
        else:
            ref, got = step("naive"), step("fused")
            errs = {k: _rel(got[k], ref[k]) for k in ref}
            worst = max(errs.values())
        rec.check_le(f"lm_head_{dn}_max_rel_err", worst, tol, **errs)
        t_naive = _timed(lambda: step("naive"), max(1, reps // 2))
        t = _timed(lambda: step("fused"), max(1, reps // 2))
        rec.report(f"lm_head_{dn}_time", t * 1e3, "ms", naive_ms=t_naive * 1e3, time_vs_naive=t / t_naive,
                   shape=f"T={T} H={H} V={V}")
        m_naive, m = _peak_bytes(lambda: step("naive")), _peak_bytes(lambda: step("fused"))
        if m is not None:
            rec.check_le(f"lm_head_{dn}_peak_vs_naive", m / m_naive, TOL["logprob_peak_ratio"],
                         peak_mib=m / 2**20, naive_mib=m_naive / 2**20)
        del hidden, weight


def _mixed_rows(smoke: bool, vocab: int):
    """Left-padded prompts ++ right-padded responses of very different lengths (one short row)."""
    import torch

    from megatron_gad.data import pad_sequences

    g = torch.Generator().manual_seed(0)
    p_lens, r_lens = ([2, 9, 5, 13], [1, 20, 7, 3]) if smoke else ([3, 60, 17, 150], [2, 190, 45, 90])
    prompts = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in p_lens]
    resps = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in r_lens]
    pi, pm = pad_sequences(prompts, 0, left=True)
    ri, rm = pad_sequences(resps, 0, left=False)
    return {"prompt_ids": pi, "prompt_mask": pm, "responses": ri, "response_mask": rm}


def check_megatron_vs_hf(rec: Recorder, smoke: bool) -> None:
    """Megatron-Core logits vs transformers on a mixed-length batch, three layouts, two dtypes.

    Reference: the HF model in fp32 on this device, each sequence alone (no padding). Megatron runs
    the whole batch padded (a [B, 1, S, S] causal+padding mask), packed (one THD row built by
    workers/micro_batches.py:actor_micro_batches -> engine/packing.py, no mask) and each row alone.
    Thresholds over every valid position: fp32 max |diff| <= 1e-4 (TF32 off; same math, other
    kernels: ~1e-6 expected); bf16 max |diff| / max |ref| <= 5e-2 (bf16 weights and activations
    through every layer; the HF model itself in bf16 is reported beside it for scale). Greedy
    KV-cached decoding (fp32) of the mixed-length prompts must equal transformers token for token.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gad.data import build_sequences
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.engine.packing import unpack_to_rows
    from megatron_gad.tools.tiny_models import make_hf_model
    from megatron_gad.workers.micro_batches import actor_micro_batches

    dev = _device()
    root = tempfile.mkdtemp(prefix="gpu_check_hf_")
    size = {} if smoke else {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
                             "max_position_embeddings": 512}
    vocab = size.get("vocab_size", 96)
    rows = _mixed_rows(smoke, vocab)
    ids, mask, _ = build_sequences(rows["prompt_ids"], rows["prompt_mask"], rows["responses"], rows["response_mask"])
    seqs = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
    lens = [len(s) for s in seqs]

    def capture(out, mb):
        return out.sum() * 0, {"logits": out.float()}

    with _megatron_process():
        for fam in ("llama", "qwen2"):
            path = make_hf_model(os.path.join(root, fam), fam, seed=3, **size)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
            with torch.no_grad():
                ref = [hf(s[None].to(dev)).logits[0].float().cpu() for s in seqs]
                hf.to(torch.bfloat16)
                hf_bf16 = [hf(s[None].to(dev)).logits[0].float().cpu() for s in seqs]
            del hf
            hf_bf16_rel = max(_rel(a, r) for a, r in zip(hf_bf16, ref))
            for dtype in ("float32", "bfloat16"):
                shard = ModelShard("actor", path, 1, 1, params_dtype=dtype, vocab_divisible_by=8)
                padded = shard.forward([{"input_ids": ids, "attention_mask": mask}], capture)[0]["logits"].cpu()
                got_padded = [padded[b][mask[b].bool()][:, :vocab] for b in range(len(seqs))]
                mb = actor_micro_batches(rows, [list(range(len(seqs)))])
                packed_out = shard.forward(mb, capture)[0]["logits"].cpu()
                as_rows = unpack_to_rows(packed_out, mb[0]["packed"])
                got_packed = [as_rows[b][mask[b].bool()][:, :vocab] for b in range(len(seqs))]
                got_row = [shard.forward([{"input_ids": s[None], "position_ids": torch.arange(len(s))[None],
                                           "mask_4d": None}], capture)[0]["logits"][0].cpu()[:, :vocab]
                           for s in seqs]
                for layout, got in (("padded", got_padded), ("packed", got_packed), ("per_row", got_row)):
                    case = f"{fam}_{dtype}_{layout}"
                    if dtype == "float32":
                        err = max(float((a - r).abs().max()) for a, r in zip(got, ref))
                        rec.check_le(case + "_max_abs", err, TOL["logits_fp32_abs"], lengths=str(lens))
                    else:
                        err = max(_rel(a, r) for a, r in zip(got, ref))
                        rec.check_le(case + "_max_rel", err, TOL["logits_bf16_rel"], hf_bf16_rel=hf_bf16_rel,
                                     lengths=str(lens))
                if dtype == "float32":
                    _greedy(rec, fam, shard, path, rows, dev)
                del shard
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def _greedy(rec, fam, shard, path, rows, dev) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gad.engine.generate import generate

    new = 8
    got = generate(shard, rows["prompt_ids"], rows["prompt_mask"], max_new_tokens=new, eos_id=2, pad_id=0,
                   greedy=True)["responses"].cpu()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    bad = 0
    for b in range(rows["prompt_ids"].shape[0]):
        p = rows["prompt_ids"][b][rows["prompt_mask"][b].bool()]
        with torch.no_grad():
            out = hf.generate(p[None].to(dev), attention_mask=torch.ones_like(p)[None].to(dev), max_new_tokens=new,
                              do_sample=False, eos_token_id=2, pad_token_id=0)
        ref = out[0, len(p):].cpu()
        bad += int(not torch.equal(got[b, : len(ref)], ref))
    rec.check_true(f"{fam}_float32_greedy_kv_cache", bad == 0, "every row's tokens == transformers",
                   value=bad, unit=" rows differ")


def check_checkpoint(rec: Recorder, smoke: bool) -> None:
    """Save a trained ModelShard (weights + Adam state, dist-checkpointing), load it into a fresh
    shard: every parameter and every optimizer-state tensor bit-identical (threshold: 0)."""
    import torch

    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.tools.tiny_models import make_hf_model

    root = tempfile.mkdtemp(prefix="gpu_check_ckpt_")
    path = make_hf_model(os.path.join(root, "hf"), "qwen2", seed=1)
    dtype = "bfloat16" if torch.cuda.is_available() or BF16_ON_CPU else "float32"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 16), generator=g)
    mb = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]

    def loss_fn(out, batch):
        loss = out.float().logsumexp(-1).mean()
        return loss, {"loss": loss.detach()}

    def opt_state(shard):
        out = []
        for opt in getattr(shard.optimizer, "chained_optimizers", [shard.optimizer]):
            inner = getattr(opt, "optimizer", opt)
            for s in inner.state.values():
                out += [t.detach().cpu() for _, t in sorted(s.items()) if torch.is_tensor(t)]
        return out

    with _megatron_process():
        a = ModelShard("actor", path, 1, 1, params_dtype=dtype, vocab_divisible_by=8)
        a.train_step(mb, loss_fn)
        a.train_step(mb, loss_fn)
        a.save(os.path.join(root, "ckpt"), {"step": 2})
        b = ModelShard("actor", path, 1, 1, params_dtype=dtype, vocab_divisible_by=8)
        extra = b.load(os.path.join(root, "ckpt"), with_optimizer=True)
        pa = dict(a.module.named_parameters())
        diff = max(float((p.detach().double() - pa[k].detach().double()).abs().max())
                   for k, p in b.module.named_parameters())
        same = all(torch.equal(p, pa[k]) for k, p in b.module.named_parameters())
        rec.check_true(f"weights_{dtype}_bit_identical", same, "== 0", value=diff, tensors=len(pa))
        sa, sb = opt_state(a), opt_state(b)
        same_opt = len(sa) == len(sb) > 0 and all(torch.equal(x, y) for x, y in zip(sa, sb))
        rec.check_true("adam_state_bit_identical", same_opt, "== 0", value=len(sb), unit=" tensors",
                       opt_step=b.opt_step, extra_step=extra.get("step"))
        # the loaded shard trains on exactly like the saved one
        la = a.train_step(mb, loss_fn)[0][0]["loss"]
        lb = b.train_step(mb, loss_fn)[0][0]["loss"]
        rec.check_true("next_step_loss_identical", bool(torch.equal(la, lb)), "== 0", value=float(la - lb))


def check_gad_steps(rec: Recorder, smoke: bool) -> None:
    """Three trainer steps (1 frozen warmup + 2 GAD) on the demo assets with trainer.workers=local:
    the actor and critic workers in this process, no Ray. Pass: stages warmup, gad, gad; the GAD
    phases in the spec's order; the required metrics present and finite; the actor updated (only in
    GAD steps); Ray never imported. On a GPU both roles run in bf16 with critic.fused_loss=auto."""
    import torch

    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    root = tempfile.mkdtemp(prefix="gpu_check_gad_")
    tok = build_tokenizer(os.path.join(root, "tok"))
    model = build_tiny_student(os.path.join(root, "model"), tok, seed=0)
    data = write_dataset(os.path.join(root, "data"), n_train=32, n_heldout=4, seed=0)
    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu or BF16_ON_CPU else "float32"
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        f"data.train_files=[{data['train']}]", f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={os.path.join(root, 'run')}", "trainer.total_training_steps=3",
        "trainer.critic_warmup=1", f"trainer.device={'cuda' if gpu else 'cpu'}", "trainer.workers=local",
        "trainer.logger=[jsonl]", "actor_rollout_ref.actor.use_kl_loss=true", "critic.fused_loss=auto",
        f"actor_rollout_ref.actor.megatron.params_dtype={dtype}", f"critic.megatron.params_dtype={dtype}"])
    validate(cfg)
    t0 = time.perf_counter()
    tr = GADTrainer(cfg)
    impl = getattr(tr.critic.worker, "impl", "?")
    before = tr.actor.weights_fingerprint()[0]
    try:  # a failure inside fit (e.g. the final checkpoint) still lets the steps logged so far be judged
        tr.fit()
        fit_error = ""
    except Exception as exc:
        traceback.print_exc()
        fit_error = f"{type(exc).__name__}: {exc}"[:300]
    wall = time.perf_counter() - t0
    rec.check_true("fit", not fit_error, "3 steps and the final checkpoint without an error", reason=fit_error)
    phases = list(tr.phases)
    after = tr.actor.weights_fingerprint()[0]
    tr.shutdown()
    with open(os.path.join(root, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    stages = [r["stage"] for r in rows]
    rows += [{}] * (3 - len(rows))
    rec.check_true("stages", stages == ["warmup", "gad", "gad"], "== [warmup, gad, gad]", value=",".join(stages),
                   dtype=dtype, disc_loss_impl=impl)
    # trainer.lean_step (default; demo: one PPO epoch, one mini-batch): rewards from the critic's update,
    # no old log-prob pass (controller/step_plan.py)
    want = ["gen", "update_critic", "ref", "adv", "update_actor", "save"]
    rec.check_true("gad_phase_order", phases == want, "== " + ",".join(want), value=",".join(phases))
    need_w = {"critic/d_loss", "critic/d_acc", "response_length/mean", "timing_s/step"}
    need_g = need_w | {"actor/pg_loss", "actor/kl", "reward/mean", "timing_s/update_actor"}
    missing = sorted((need_w - set(rows[0])) | (need_g - set(rows[1])) | (need_g - set(rows[2])))
    finite = all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, (int, float)))
    rec.check_true("metrics", not missing and finite, "required keys present, all finite",
                   value=len(missing), unit=" missing", missing=",".join(missing))
    rec.check_true("actor_updated", after != before and rows[0].get("actor/optimizer_state_bytes") == 0
                   and rows[1].get("actor/optimizer_state_bytes", 0) > 0, "frozen in warmup, updated in GAD",
                   value=after - before)
    rec.check_true("no_ray", "ray" not in sys.modules, "ray not imported")
    rec.report("gad_step_time", sum(r.get("timing_s/step", math.nan) for r in rows[1:]) / 2, "s",
               wall_incl_build_s=wall, d_acc=",".join(f"{r.get('critic/d_acc', math.nan):.3f}" for r in rows))


def throughput_model(gpu: bool):
    """(arch, batch, sequence length, timed repetitions) of the throughput rows (``throughput`` here,
    ``vs_transformers`` in gpu_checks_attention.py: the same model and batch): a random ~1B Llama on a GPU,
    a tiny one (GQA) for --smoke."""
    from megatron_gad.models.arch import Arch

    if gpu:
        arch = Arch(model_type="llama", hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                    ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, qkv_bias=False, head_dim=128)
        return arch, 2, 2048, 8
    arch = Arch(model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=128, vocab_size=256, max_position_embeddings=256, rope_theta=10000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, qkv_bias=False, head_dim=16)
    return arch, 2, 128, 2


def check_throughput(rec: Recorder, smoke: bool) -> None:
    """Forward+backward of a random Llama-like model in bf16 (Megatron local spec: unfused
    attention, no TE), fixed-length rows: tokens/s, model TFLOP/s (6 N + 12 L H S per token, N without
    the embedding table; causal attention counted in full, as is usual) and MFU against the GPU's dense
    bf16 peak. A lower bound for TE clusters. Threshold: MFU >= 0.10 on an H100/H200 (below that,
    something is badly wrong: fp32 math, host syncs, a CPU path). Smoke: a tiny model, reported only."""
    import torch

    from megatron_gad.models.build import build_model

    gpu = torch.cuda.is_available()
    arch, B, S, reps = throughput_model(gpu)
    with _megatron_process():
        from megatron_gad.parallel import state

        state.init_model_parallel(1, 1)
        t0 = time.perf_counter()
        model = build_model(arch, "actor", 1, 1, "bfloat16", vocab_divisible_by=128)
        if gpu:
            model.cuda()
        build_s = time.perf_counter() - t0
        n_all = sum(p.numel() for p in model.parameters())
        n_emb = model.embedding.word_embeddings.weight.numel()
        dev = _device()
        ids = torch.randint(0, arch.vocab_size, (B, S), device=dev)
        pos = torch.arange(S, device=dev)[None].expand(B, S)

        def step():
            out = model(ids, pos, None)
            out.float().logsumexp(-1).mean().backward()

        if gpu:
            torch.cuda.reset_peak_memory_stats()
        dt = _timed(step, reps)
        tokens = B * S
        flops = tokens * (6 * (n_all - n_emb) + 12 * arch.num_layers * arch.hidden_size * S)
        tflops = flops / dt / 1e12
        detail = {"params_b": n_all / 1e9, "tokens_per_s": tokens / dt, "tflops": tflops, "step_ms": dt * 1e3,
                  "batch": f"{B}x{S}", "build_s": build_s,
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}
        rec.report("tokens_per_s", tokens / dt, " tok/s", **detail)
        name = torch.cuda.get_device_name() if gpu else "cpu"
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if not gpu:
            rec("mfu", "SKIP", reason="CPU smoke: tiny model, no MFU")
        elif peak is None:
            rec("mfu", "SKIP", reason=f"unknown bf16 peak for {name}", tflops=tflops)
        else:
            rec.check_ge("mfu_lower_bound_local_spec", tflops * 1e12 / peak, TOL["mfu_min"], device=name,
                         peak_tflops=peak / 1e12, tflops=tflops)


from gpu_checks_attention import check_attention_packed, check_vs_transformers  # noqa: E402,F401
from gpu_checks_families import check_families  # noqa: E402,F401  Qwen3 / Llama-3.1 shapes vs transformers


def check_weight_sync(rec: Recorder, smoke: bool) -> None:
    """Issue 22: weight-sync export (checksums on the device, pinned host copies) and verified load on
    the device, in s/GB of bf16 (target <= 0.5 on a CPU; a GPU should be far below), bit-exact."""
    import torch

    from megatron_gad.engine.weight_sync import export_buckets, verified_items

    dev = _device()
    n = (1 << 20) if smoke else (1 << 28)  # bf16 elements in all: 2 MiB / 512 MiB
    g = torch.Generator(device=dev).manual_seed(0)
    items = [(f"w{i}", torch.randn(n // 8, generator=g, device=dev).bfloat16()) for i in range(8)]
    gb = n * 2 / 1e9
    sync = {}

    def run():
        sync["packed"] = export_buckets(items, 64 << 20, 0)
        sync["got"] = dict(verified_items([i for i, _ in sync["packed"]], lambda k: sync["packed"][k][1], dev))

    s = _timed(run, 1 if smoke else 3)
    rec.check_true("bit_exact", all(torch.equal(sync["got"][k], t) for k, t in items), "round trip")
    rec.check_true("pinned", dev.type != "cuda" or all(
        t.is_pinned() for _, b in sync["packed"] for t in b.values()), "host copies pinned on CUDA")
    rec.report("s_per_gb", s / gb, "s/GB", gb=gb, buckets=len(sync["packed"]))


# ----------------------------------------------------------------------------------------------
# Child and parent
# ----------------------------------------------------------------------------------------------
def child(name: str, out: str, smoke: bool) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the equality checks
    torch.backends.cudnn.allow_tf32 = False
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("MEGATRON_GAD_THREADS", "2")))
    rec = Recorder(out, name)
    try:
        globals()[f"check_{name}"](rec, smoke)
    except Exception as exc:
        traceback.print_exc()
        rec("error", "FAIL", reason=f"{type(exc).__name__}: {exc}"[:500])
        return 1
    return 0 if "FAIL" not in rec.statuses else 1


def _read_results(path: str, offset: int) -> tuple[list[dict], int]:
    if not os.path.exists(path):
        return [], offset
    with open(path) as f:
        f.seek(offset)
        text = f.read()
        return [json.loads(line) for line in text.splitlines() if line.strip()], offset + len(text.encode())


def parent(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, RESULTS)
    log_path = os.path.join(args.out, "checks.log")
    start = time.perf_counter()
    budget = args.budget_s or (420 * SMOKE_SCALE if args.smoke else 420)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    if args.smoke:
        env.setdefault("TRITON_INTERPRET", "1")  # CPU: the Triton kernels run interpreted
    offset = os.path.getsize(res_path) if os.path.exists(res_path) else 0
    all_rows: list[dict] = []
    names = args.only or list(CHECKS)
    print(f"gpu_check: {len(names)} checks, budget {budget:.0f} s, results -> {res_path}", flush=True)
    for name in names:
        left = budget - (time.perf_counter() - start)
        limit = min(CHECKS[name] * (SMOKE_SCALE if args.smoke else 1), left)
        rec = Recorder(args.out, name)
        if limit < 5:
            rec("not_run", "FAIL", reason=f"the run's {budget:.0f} s budget was spent before this check")
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--out", args.out]
            cmd += ["--smoke"] if args.smoke else []
            t0 = time.perf_counter()
            with open(log_path, "a") as log:
                log.write(f"\n===== {name} ({time.strftime('%H:%M:%S')}, timeout {limit:.0f} s)\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        start_new_session=True)
                try:
                    code = proc.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    code = None
            took = time.perf_counter() - t0
            rows, _ = _read_results(res_path, offset)
            mine = [r for r in rows if r["check"] == name]
            if code is None:
                rec("timeout", "FAIL", took, f"<= {limit:.0f}", " s",
                    reason=f"killed after {limit:.0f} s (results before the hang are kept); see checks.log")
            elif code != 0 and not any(r["status"] == "FAIL" for r in mine):
                rec("crash", "FAIL", code, "exit 0", reason=f"exit code {code}; see checks.log")
            elif not mine:
                rec("no_result", "FAIL", reason="the check reported nothing")
            print(f"  {name}: {took:.1f} s", flush=True)
        rows, offset = _read_results(res_path, offset)
        all_rows += rows
    return _summary(all_rows, args, time.perf_counter() - start)


def _summary(rows: list[dict], args, wall: float) -> int:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines = [f"gpu_check summary ({'smoke, CPU' if args.smoke else 'GPU'}; {wall:.0f} s): "
             f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"]
    for r in rows:
        thr = r["threshold"] or "reported"
        val = _fmt(r["value"]) + (r["unit"] or "")
        why = f"  [{r['reason'][:90]}]" if r["reason"] and r["status"] != "PASS" else ""
        lines.append(f"  {r['status']:4} {r['check']}/{r['case']}: {val} ({thr}){why}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 1 if counts["FAIL"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.jsonl, checks.log, summary.txt")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, gloo, TRITON_INTERPRET=1")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run cap (default 420; smoke 1680)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.out, args.smoke)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
