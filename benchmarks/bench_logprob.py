"""Log-prob of target tokens over a 151,936 vocabulary: naive full log_softmax vs ours.

Each variant runs in a fresh subprocess (so one variant's freed memory cannot hide
another's peak). Memory = peak RSS (getrusage ru_maxrss, the kernel's high-water mark,
which sees every torch CPU allocation) minus the RSS right after the fp32 logits were
allocated, i.e. everything forward+backward needs on top of its input, *including the
[T, V] gradient w.r.t. the logits* (which any implementation must produce, unless it
reuses the logits storage: our opt-in inplace_backward).

    python benchmarks/bench_logprob.py [--tokens 4096] [--vocab 151936]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "naive": {},
    "ours_chunk1024": {"chunk_size": 1024},
    "ours_chunk1024_inplace": {"chunk_size": 1024, "inplace_backward": True},
    "ours_chunk256_inplace": {"chunk_size": 256, "inplace_backward": True},
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(variant: str, T: int, V: int, reps: int):
    import torch

    from megatron_gad.kernels.logprob import vocab_parallel_logprob

    torch.manual_seed(0)
    target = torch.randint(0, V, (T,))
    grad_lp = torch.randn(T)
    base_rss = _rss_mib()
    logits = torch.randn(T, V).requires_grad_()  # [T, V] fp32 input: 2.3 GiB at 4096 x 151936
    input_rss = _rss_mib()

    def step():
        if variant == "naive":
            lp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
        else:
            lp, _ = vocab_parallel_logprob(logits, target, vocab_size=V, **VARIANTS[variant])
        (g,) = torch.autograd.grad(lp, logits, grad_lp)
        return lp.detach(), g

    times = []
    for _ in range(reps):
        if VARIANTS[variant].get("inplace_backward"):
            with torch.no_grad():  # the previous rep overwrote the logits with the gradient
                logits.normal_()
        t0 = time.perf_counter()
        lp, g = step()
        times.append(time.perf_counter() - t0)
        del g
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({
        "variant": variant, "time_s": statistics.median(times), "times_s": times,
        "peak_extra_mib": peak - input_rss, "input_mib": input_rss - base_rss,
        "lp_checksum": float(lp.double().sum()),
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return _child(a.child, a.tokens, a.vocab, a.reps)

    import torch

    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v, "--tokens", str(a.tokens), "--vocab", str(a.vocab),
               "--reps", str(a.reps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    naive = rows[0]
    unit = a.tokens * a.vocab * 4 / 2**20  # MiB of one [T, V] fp32 tensor
    for r in rows:
        # workspace = what is left after the [T, V] gradient buffer (none with inplace_backward)
        own_grad = 0.0 if VARIANTS[r["variant"]].get("inplace_backward") else unit
        r["workspace_mib"] = r["peak_extra_mib"] - own_grad
    for r in rows:
        r["mem_ratio_vs_naive"] = r["peak_extra_mib"] / naive["peak_extra_mib"]
        r["workspace_ratio_vs_naive"] = r["workspace_mib"] / naive["workspace_mib"]
        r["time_ratio_vs_naive"] = r["time_s"] / naive["time_s"]
    meta = {
        "tokens": a.tokens, "vocab": a.vocab, "dtype": "float32", "tp": 1, "reps": a.reps,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "memory_metric": "peak RSS (ru_maxrss) minus RSS after allocating the logits; fresh process per variant; "
                         "includes the [T,V] logits gradient except with inplace_backward",
        "timing": "median wall time of forward + backward (torch.autograd.grad) over reps, first rep included",
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "bench_logprob.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    lines = [
        "# bench_logprob: target log-prob, forward + backward (CPU)",
        "",
        f"T = {a.tokens} tokens (1 x {a.tokens}), V = {a.vocab}, fp32, TP = 1, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores. One [T, V] fp32 tensor = {unit:.0f} MiB.",
        "",
        "Memory = peak RSS minus RSS after the logits were allocated (fresh process per variant): "
        "all the memory forward+backward needs beyond its input, including the logits gradient.",
        "",
        "Workspace = peak extra minus the separate [T, V] gradient buffer (inplace variants have none).",
        "",
        "| variant | time (s) | peak extra (MiB) | peak extra / [T,V] | peak vs naive | workspace (MiB) "
        "| workspace vs naive | time vs naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['time_s']:.2f} | {r['peak_extra_mib']:.0f} | "
                     f"{r['peak_extra_mib'] / unit:.2f} | {r['mem_ratio_vs_naive']:.2f}x | {r['workspace_mib']:.0f} | "
                     f"{r['workspace_ratio_vs_naive']:.2f}x | {r['time_ratio_vs_naive']:.2f}x |")
    lines += ["", "Timings on a shared 2-core CPU are noisy (median of the reps); memory is the stable number.",
              "inplace_backward writes dL/dlogits into the logits storage (opt-in; only when nothing reads the",
              "logits after backward, e.g. logits straight from the output layer)."]
    with open(os.path.join(HERE, "results", "bench_logprob.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
