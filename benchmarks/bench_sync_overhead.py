"""Weight-sync overhead of megatron-gad's own code, before vs after issue 22, in one process.

What ``engine/weight_sync.py`` adds to a sync besides the engine's reload: the sender's bucketing,
host copies and checksums (``make_buckets`` + ``describe`` before; ``export_buckets`` after) and the
receiver's per-bucket verification (``verified_items``). Timed on random fp32 and bf16 tensors of the
"large" model's shapes of bench_rollout (87.5M parameters), the two revisions alternated, best of
``--repeats`` (this 2-core machine is shared: the best run is the least disturbed one). The "before"
side is ``git show REF:megatron_gad/engine/weight_sync.py``. Writes
benchmarks/results/bench_sync_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.bench_rollout import RESULTS, _sync_module


def tensors(dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The large bench_rollout model's tensor shapes (hidden 768, 10 layers, vocab 32000, FFN 2048)."""
    g = torch.Generator().manual_seed(0)
    shapes = [("embed", (32000, 768))]
    for i in range(10):
        shapes += [(f"l{i}.q", (768, 768)), (f"l{i}.k", (256, 768)), (f"l{i}.v", (256, 768)), (f"l{i}.o", (768, 768)),
                   (f"l{i}.gate", (2048, 768)), (f"l{i}.up", (2048, 768)), (f"l{i}.down", (768, 2048)),
                   (f"l{i}.n1", (768,)), (f"l{i}.n2", (768,))]
    return [(n, (torch.randn(s, generator=g) * 0.02).to(dtype)) for n, s in shapes]


def one(ws, items, bucket_bytes: int) -> tuple[float, float]:
    t = time.perf_counter()
    if hasattr(ws, "export_buckets"):
        packed = ws.export_buckets(items, bucket_bytes, 0)
    else:
        buckets = list(ws.make_buckets(items, bucket_bytes))
        packed = [(ws.describe(b, 0, k, len(buckets)), b) for k, b in enumerate(buckets)]
    export = time.perf_counter() - t
    manifest = [i for i, _ in packed]
    t = time.perf_counter()
    for _ in ws.verified_items(manifest, lambda k: packed[k][1]):
        pass
    return export, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before-ref", default="72c66bb", help="revision before issue 22")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        before = os.path.join(root, "weight_sync_before.py")
        with open(before, "w") as f:
            f.write(subprocess.run(["git", "show", f"{args.before_ref}:megatron_gad/engine/weight_sync.py"],
                                   capture_output=True, text=True, check=True,
                                   cwd=os.path.dirname(RESULTS)).stdout)
        impls = {f"before ({args.before_ref})": _sync_module(before), "after": _sync_module(None)}
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            items = tensors(dtype)
            gb = sum(t.numel() * t.element_size() for _, t in items) / 1e9
            best = {k: (float("inf"), float("inf")) for k in impls}
            for _ in range(args.repeats):
                for name, ws in impls.items():
                    e, v = one(ws, items, args.bucket_mb << 20)
                    best[name] = (min(best[name][0], e), min(best[name][1], v))
            for name, (e, v) in best.items():
                rows.append({"impl": name, "dtype": str(dtype).removeprefix("torch."), "gb": gb, "export_s": e,
                             "verify_s": v, "s_per_gb": (e + v) / gb})
    lines = ["# Weight-sync overhead of megatron-gad's code (export + verification), before vs after", "",
             f"`python benchmarks/bench_sync_overhead.py --before-ref {args.before_ref} --repeats {args.repeats}`: "
             f"{len(tensors(torch.float32))} tensors of the bench_rollout 'large' model's shapes, buckets of "
             f"{args.bucket_mb} MB, both revisions alternated in one process, best of {args.repeats}; torch threads: "
             f"{torch.get_num_threads()}. vLLM's own reload is not included (bench_rollout_sync.md).", "",
             "| weight_sync.py | dtype | GB | export s | verify s | s/GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['gb']:.3f} | {r['export_s']:.3f} | {r['verify_s']:.3f} | "
                     f"{r['s_per_gb']:.2f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_sync_overhead.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "bench_sync_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
