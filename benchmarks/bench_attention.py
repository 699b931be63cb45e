"""Packed causal attention through the model's own core attention module, per backend.

One pack of T tokens holding 1 / 8 / 64 sequences of mixed lengths (``gpu_checks_attention.pack_lengths``),
``models.attention.CoreAttention`` at TP 1 (the module the layer spec builds), forward+backward against
a random output gradient. Columns: median time of fwd+bwd and of the forward alone, peak memory, and
the largest relative difference of the output and the q/k/v gradients from eager's (max |diff| /
max(1, max |eager|)).

* CPU (default): T 2,048, 8 query / 2 KV heads, head dim 64, fp32; eager vs sdpa vs flex. Each case runs
  in a fresh subprocess and its peak is the resident-set high-water mark (``ru_maxrss``) above the
  process's size once its inputs exist. FlexAttention has no CPU backward: forward only there, and
  uncompiled (it materialises the scores: a correctness twin, not a fast path on CPU).
* GPU (``--gpu``, or when CUDA is present): T 16,384, 16 / 2 heads, head dim 128, bf16; eager, sdpa,
  varlen (torch >= 2.10), flex (compiled) and flash (flash-attn installed); peak from
  ``torch.cuda.max_memory_allocated``; in one process.

    PYTHONPATH=. python benchmarks/bench_attention.py   # -> benchmarks/results/bench_attention.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CPU = {"T": 2048, "H": 8, "G": 2, "D": 64, "dtype": "float32", "reps": 3, "backends": ["eager", "sdpa", "flex"]}
GPU = {"T": 16384, "H": 16, "G": 2, "D": 128, "dtype": "bfloat16", "reps": 10,
       "backends": ["eager", "sdpa", "varlen", "flex", "flash"]}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def case(backend: str, n: int, shape: dict, separate_process: bool) -> dict:
    """Measure one backend on one pack; returns a result row (never raises for an unavailable backend)."""
    import torch
    from gpu_checks_attention import make_attention, max_rel, packed_inputs, run_packed, timed_s

    from megatron_gad.models.attention import unavailable_reason

    dtype = getattr(torch, shape["dtype"])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = {"backend": backend, "seqs": n}
    backward = not (backend == "flex" and dev.type == "cpu")
    reason = unavailable_reason(backend, dev.type, dtype, needs_grad=backward)
    if reason:
        return {**row, "skipped": reason}
    mod = make_attention(backend, shape["H"], shape["G"], shape["D"], dtype)
    qkv, grad, psp, lens = packed_inputs(shape["T"], n, shape["H"], shape["G"], shape["D"], dtype, dev)
    row["longest"] = max(lens)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out, grads = run_packed(mod, qkv, grad, psp, backward)
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_mib()
        out, grads = run_packed(mod, qkv, grad, psp, backward)
        # ru_maxrss: this process's high-water mark (KiB); meaningful because the case has its own process
        row["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
                           if separate_process else None)
    row["impl"] = mod.choose(True, qkv[0])
    row["fwd_bwd_ms"] = timed_s(lambda: run_packed(mod, qkv, grad, psp), shape["reps"]) * 1e3 if backward else None
    with torch.no_grad():
        row["fwd_ms"] = timed_s(lambda: run_packed(mod, qkv, grad, psp, backward=False), shape["reps"]) * 1e3
    if backend != "eager":
        ref_out, ref_grads = run_packed(make_attention("eager", shape["H"], shape["G"], shape["D"], dtype), qkv, grad,
                                        psp, backward)
        row["maxrel_out"] = max_rel(out, ref_out)
        if backward:
            row["maxrel_grads"] = max(max_rel(a, b) for a, b in zip(grads, ref_grads))
    return row


def _child(backend: str, n: int, shape: dict) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("MEGATRON_GAD_THREADS", "2")))
    print(json.dumps(case(backend, n, shape, separate_process=True)))


def _fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    s = meta["shape"]
    lines = [f"# Packed causal attention per backend ({meta['device']})", "",
             f"{s['T']} tokens in one pack, {s['H']} query / {s['G']} KV heads, head dim {s['D']}, {s['dtype']}; "
             f"`models.attention.CoreAttention` (TP 1), median of {s['reps']} after a warm-up. "
             f"torch {meta['torch']}, {meta['when']}. Peak: "
             + ("CUDA max allocated above the inputs." if meta["device"] != "cpu" else
                "resident-set high-water mark above the inputs, one process per case (noisy on a shared box).")
             + " maxrel: max |x - eager| / max(1, max |eager|) over the output (and q/k/v gradients).", "",
             "| seqs | backend | runs | fwd+bwd ms | fwd ms | peak MiB | speed-up vs eager (fwd+bwd) | maxrel out | "
             "maxrel grads |", "|---|---|---|---|---|---|---|---|---|"]
    eager = {r["seqs"]: r for r in rows if r["backend"] == "eager" and "skipped" not in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['seqs']} | {r['backend']} | skipped: {r['skipped']} | | | | | | |")
            continue
        e = eager.get(r["seqs"], {})
        speed = (e["fwd_bwd_ms"] / r["fwd_bwd_ms"]) if r.get("fwd_bwd_ms") and e.get("fwd_bwd_ms") else None
        lines.append(f"| {r['seqs']} | {r['backend']} | {r.get('impl', '')} | {_fmt(r.get('fwd_bwd_ms'))} | "
                     f"{_fmt(r.get('fwd_ms'))} | {_fmt(r.get('peak_mib'), '.0f')} | "
                     f"{_fmt(speed, '.2f') + ('x' if speed else '')} | {_fmt(r.get('maxrel_out'), '.1e')} | "
                     f"{_fmt(r.get('maxrel_grads'), '.1e')} |")
    if meta["device"] == "cpu":
        lines += ["", "flex on CPU: forward only (no CPU backward in torch), uncompiled (materialises the scores). "
                  "Times come from a shared 2-core box under heavy load: compare backends within one pack size "
                  "(each row's cases ran minutes apart), not absolute values."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), json.loads(args.shape))
        return 0
    import torch

    gpu = torch.cuda.is_available()
    shape = dict(GPU if gpu else CPU)
    if args.tokens:
        shape["T"] = args.tokens
    if args.reps:
        shape["reps"] = args.reps
    rows = []
    for n in args.seqs:
        for backend in shape["backends"]:
            if gpu:
                row = case(backend, n, shape, separate_process=False)
            else:
                env = dict(os.environ, PYTHONWARNINGS="ignore")
                env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
                proc = subprocess.run([sys.executable, __file__, "--child", backend, str(n), "--shape",
                                       json.dumps(shape)], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"{backend} {n} seqs failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shape": shape}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "bench_attention.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    text = markdown(meta, rows)
    with open(os.path.join(HERE, "results", "bench_attention.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
