"""Discriminator head + Bradley-Terry loss: fused (gather last rows, head on [B, H]) vs
unfused (head over all S*B tokens, then select the last token, then the loss).

Torch path on CPU, fp32. (Triton under TRITON_INTERPRET=1 is a correctness path, not a
timing path; the Triton and TE paths are timed only on GPU.) Memory: each variant in a
fresh subprocess, peak RSS (ru_maxrss) minus RSS after the inputs were allocated.
Timing: both variants alternate in one process (a shared CPU's load hits both), with
glibc keeping freed memory so per-rep page faults common to both are not timed. Both variants must hand the
backbone a dense dL/dhidden [S, B, H]; the
table also shows the memory beyond that buffer ("head-path extra").

    python benchmarks/bench_disc_loss.py [--seq 2048 --hidden 4096 --prompts 4 --n 8]
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
VARIANTS = ("unfused", "fused")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(S: int, H: int, N: int, n: int):
    import torch

    from megatron_gad.algos import discriminator_loss
    from megatron_gad.kernels.disc_loss import disc_head_bt_loss, gather_last_hidden

    torch.manual_seed(0)
    last_t = torch.randint(S // 2, S, (N,))  # right padding: last valid response token
    last_s = torch.randint(S // 2, S, (N * n,))
    w = (torch.randn(1, H) * 0.02).requires_grad_()
    b = torch.zeros(1).requires_grad_()
    base_rss = _rss_mib()
    # hidden after the final norm, sequence-first like Megatron: [S, B, H]
    hid_t = torch.randn(S, N, H).requires_grad_()
    hid_s = torch.randn(S, N * n, H).requires_grad_()
    input_rss = _rss_mib()

    def fused():
        loss, _, _, _ = disc_head_bt_loss(
            gather_last_hidden(hid_t, last_t), gather_last_hidden(hid_s, last_s), w, b, n, impl="torch")
        return loss.detach(), torch.autograd.grad(loss, [hid_t, hid_s, w, b])

    def unfused():
        all_t = (hid_t @ w.t()).squeeze(-1) + b  # [S, N] head on every token
        all_s = (hid_s @ w.t()).squeeze(-1) + b  # [S, N*n]
        t = all_t[last_t, torch.arange(N)]
        s = all_s[last_s, torch.arange(N * n)]
        loss, _ = discriminator_loss(s, t, n)
        return loss.detach(), torch.autograd.grad(loss, [hid_t, hid_s, w, b])

    return {"fused": fused, "unfused": unfused}, base_rss, input_rss


def _child(mode: str, S: int, H: int, N: int, n: int, reps: int):
    steps, base_rss, input_rss = _setup(S, H, N, n)
    if mode == "time":  # both variants in one process, alternating, so load changes hit both
        times = {v: [] for v in VARIANTS}
        losses = {}
        for _ in range(reps):
            for v in VARIANTS:
                t0 = time.perf_counter()
                losses[v], grads = steps[v]()
                times[v].append(time.perf_counter() - t0)
                del grads
        print(json.dumps({v: {"time_s": statistics.median(times[v][1:]), "times_s": times[v],
                              "loss": float(losses[v])} for v in VARIANTS}))
        return
    variant = mode.split(":")[1]
    for _ in range(2):
        _loss, grads = steps[variant]()
        del grads
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dhidden_mib = (S * N * (n + 1) * H * 4) / 2**20
    print(json.dumps({
        "variant": variant, "peak_extra_mib": peak - input_rss, "head_path_extra_mib": peak - input_rss - dhidden_mib,
        "input_mib": input_rss - base_rss, "dhidden_mib": dhidden_mib,
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return _child(a.child, a.seq, a.hidden, a.prompts, a.n, a.reps)

    import torch

    args = ["--seq", str(a.seq), "--hidden", str(a.hidden), "--prompts", str(a.prompts), "--n", str(a.n),
            "--reps", str(a.reps)]

    def child(mode, env=None):
        out = subprocess.run([sys.executable, __file__, "--child", mode] + args, capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = [child(f"mem:{v}") for v in VARIANTS]
    # timing: glibc told to keep freed memory (like torch's CUDA caching allocator), so
    # re-faulting the same fresh pages every rep, common to both variants, is not timed
    timing = child("time", env=dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40)))
    for r in rows:
        r.update(timing[r["variant"]])
        print(r, flush=True)
    unf, fus = rows
    assert abs(unf["loss"] - fus["loss"]) < 1e-4, "variants disagree"
    summary = {
        "speedup_fused_vs_unfused": unf["time_s"] / fus["time_s"],
        "peak_extra_ratio_fused_vs_unfused": fus["peak_extra_mib"] / unf["peak_extra_mib"],
    }
    B = a.prompts * (a.n + 1)
    meta = {
        "seq": a.seq, "hidden": a.hidden, "prompts": a.prompts, "n": a.n, "rows_B_total": B, "dtype": "float32",
        "impl": "torch (CPU)", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "reps": a.reps,
        "memory_metric": "peak RSS (ru_maxrss) minus RSS after allocating hidden inputs; fresh process per variant, "
                         "default allocator",
        "timing": "median wall time of forward + backward (autograd.grad w.r.t. hidden, weight, bias), first rep "
                  "dropped; both variants alternate in one process with MALLOC_MMAP_MAX_=0 (freed memory kept, "
                  "like a caching allocator)",
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "bench_disc_loss.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "results": rows}, f, indent=2)
    lines = [
        "# bench_disc_loss: discriminator head + Bradley-Terry loss, forward + backward (CPU)",
        "",
        f"hidden [S={a.seq}, B, H={a.hidden}] fp32 for N={a.prompts} teacher rows and N*n={a.prompts * a.n} "
        f"student rows (n={a.n}); torch path, torch {torch.__version__}, {os.cpu_count()} CPU cores. "
        "Triton interpreted on CPU is a correctness path only, not timed.",
        "",
        "Timing: median of alternating reps in one process, freed memory kept by glibc (like a caching allocator). "
        "Memory: fresh process per variant, default allocator.",
        "",
        f"dL/dhidden [S, B, H] that both variants must return to the backbone: {unf['dhidden_mib']:.0f} MiB.",
        "",
        "| variant | time (s) | peak extra (MiB) | beyond dL/dhidden (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['time_s']:.3f} | {r['peak_extra_mib']:.0f} "
                     f"| {r['head_path_extra_mib']:.0f} |")
    lines += ["", f"Speedup fused vs unfused: **{summary['speedup_fused_vs_unfused']:.2f}x**; "
                  f"peak extra memory ratio fused/unfused: {summary['peak_extra_ratio_fused_vs_unfused']:.2f}."]
    with open(os.path.join(HERE, "results", "bench_disc_loss.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
