"""Rollout throughput and Megatron -> vLLM weight-sync cost, measured side by side on this machine.

Part 1, tokens/s on the same random Qwen2 and the same prompts (greedy, ``--new`` tokens each):
  * megatron-gad native engine (``engine.generate``: static lockstep decode per cost-model length bucket,
    KV cache, TP1 on one gloo rank), with its model forwards, forwards per response position and host
    syncs per decode step;
  * ``transformers`` ``generate`` (left-padded batch; its model forwards counted by a hook);
  * vLLM through our wrapper (``engine.vllm_engine.VLLMEngine.generate``: per-row seeds, sampled
    log-probs, our stop rule) and plain vLLM (``LLM.generate`` with one ``SamplingParams``) on the *same*
    engine, alternated, best of ``--repeats``: the wrapper's overhead.
Part 2, weight sync vs model size and bucket size: the actor-side export (TP all-gathers, HF re-layout,
bucketing: ``engine.weight_sync``) on one gloo rank, and the engine-side load (manifest check,
per-bucket verification, vLLM's in-place layer-wise reload) in a vLLM process; seconds per GB moved.

Writes benchmarks/results/bench_rollout.{json,md}. ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EOS = 2


def make_model(path: str, hidden: int, layers: int, vocab: int, heads: int, kv_heads: int, ffn: int) -> str:
    from megatron_gad.tools.tiny_models import make_hf_model

    return make_hf_model(path, "qwen2", seed=0, hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                         max_position_embeddings=512)


def prompts(n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


# ---------------------------------------------------------------- part 1: engines
def _native(rank, world, path, ps, new):
    from megatron_gad.data import pad_sequences
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    shard = ModelShard("actor", path, 1, 1, vocab_divisible_by=128, trainable=False)
    ids, mask = pad_sequences(ps, 0, left=True)
    generate(shard, ids[:2], mask[:2], max_new_tokens=4, eos_id=EOS, pad_id=0, greedy=True)  # warm-up
    stats: dict = {}
    t = time.perf_counter()
    out = generate(shard, ids, mask, max_new_tokens=new, eos_id=EOS, pad_id=0, greedy=True, stats=stats)
    seconds = time.perf_counter() - t
    rows = [r[m.bool()].tolist() for r, m in zip(out["responses"], out["response_mask"])]
    return {"seconds": seconds, "tokens": int(out["response_mask"].sum()), "forwards": stats["forwards"],
            "steps": stats["steps"], "host_syncs": stats["host_syncs"], "buckets": stats["buckets"],
            "prefill_rows": stats["prefill_rows"], "new_positions": out["responses"].shape[1], "rows": rows}


def _transformers(path, ps, new):
    from transformers import AutoModelForCausalLM

    from megatron_gad.data import pad_sequences

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = pad_sequences(ps, 0, left=True)
    calls = [0]
    hf.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad():
        hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
        calls[0] = 0
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=EOS,
                          pad_token_id=0)
    seconds = time.perf_counter() - t
    gen = out[:, ids.shape[1]:]
    rows = [row[: row.index(EOS) + 1] if EOS in row else row for row in gen.tolist()]  # up to and with EOS
    return {"seconds": seconds, "tokens": sum(map(len, rows)), "forwards": calls[0], "new_positions": gen.shape[1],
            "rows": rows}


def _vllm(path, ps, new, repeats):
    from megatron_gad.engine.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    eng = VLLMEngine(path, dtype="float32", max_model_len=max(map(len, ps)) + new, seed=0)
    start_s = time.perf_counter() - t0
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def ours():
        out = eng.generate(ps, max_new_tokens=new, eos_id=EOS, seeds=list(range(len(ps))), greedy=True)
        return sum(len(ids) for ids, _ in out)

    def plain(logprobs):
        sp = SamplingParams(max_tokens=new, temperature=0.0, stop_token_ids=[EOS], ignore_eos=True, logprobs=logprobs,
                            detokenize=False)
        out = eng.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out)

    fns = {"ours": ours, "plain_same": lambda: plain(0), "plain_minimal": lambda: plain(None)}
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns)
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            tokens = fn()
            s = time.perf_counter() - t
            if best[name] is None or s < best[name]["seconds"]:
                best[name] = {"seconds": s, "tokens": tokens}
    return {"start_s": start_s, **best}


def bench_engines(args, root: str) -> dict:
    from megatron_gad.parallel.launch import run_local
    from tests.rollout.helpers import in_fresh_process

    path = make_model(os.path.join(root, "engines"), args.hidden, args.layers, args.vocab, args.heads,
                      args.kv_heads, args.ffn)
    ps = prompts(args.prompts, 15, 48, args.vocab)
    res = {"native": run_local(_native, 1, path, ps, args.new)[0],
           "transformers": in_fresh_process(_transformers, path, ps, args.new)}
    v = in_fresh_process(_vllm, path, ps, args.new, args.repeats)
    res["vllm (megatron-gad wrapper)"] = v["ours"]
    res["vllm (plain LLM.generate, same outputs)"] = v["plain_same"]  # token ids + sampled log-probs
    res["vllm (plain LLM.generate, ids only)"] = v["plain_minimal"]
    for r in res.values():
        r["tok_per_s"] = r["tokens"] / r["seconds"]
        if "forwards" in r:  # model forwards per response position (prefill and forced prompt steps included)
            r["forwards_per_token"] = r["forwards"] / max(r["new_positions"], 1)
        if "steps" in r:
            r["host_syncs_per_step"] = r["host_syncs"] / max(r["steps"], 1)
    same = [a == b for a, b in zip(res["native"].pop("rows"), res["transformers"].pop("rows"))]
    params = sum(t.numel() for t in __import__("megatron_gad.models.hf", fromlist=["x"]).read_hf_state_dict(
        path).values())
    return {"model_params": params, "prompts": len(ps), "new_tokens": args.new, "vllm_start_s": v["start_s"],
            "engines": res, "greedy_rows_equal_transformers": sum(same) / len(same),
            "wrapper_overhead": res["vllm (plain LLM.generate, same outputs)"]["tok_per_s"]
            / res["vllm (megatron-gad wrapper)"]["tok_per_s"] - 1,
            "logprob_cost": res["vllm (plain LLM.generate, ids only)"]["tok_per_s"]
            / res["vllm (plain LLM.generate, same outputs)"]["tok_per_s"] - 1}


# ---------------------------------------------------------------- part 2: weight sync
def _sync_module(file: str | None):
    """``engine.weight_sync`` of this tree (None) or of another revision (a copy of its file): the
    "before" side of the before/after table, run in the same processes as "after"."""
    if file is None:
        from megatron_gad.engine import weight_sync

        return weight_sync
    import importlib.util

    spec = importlib.util.spec_from_file_location("weight_sync_before", file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _export(rank, world, path, bucket_bytes, impl_file):
    import dataclasses

    from megatron_gad.engine.model_shard import ModelShard

    ws = _sync_module(impl_file)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    shard = ModelShard("actor", path, 1, 1, vocab_divisible_by=128, trainable=False)
    t = time.perf_counter()
    items = ws.stream_hf_weights(shard.module, shard.arch, None, 1, emit=True)
    if hasattr(ws, "export_buckets"):
        packed = ws.export_buckets(items, bucket_bytes, 0)
    else:  # the revision before issue 22
        buckets = list(ws.make_buckets(items, bucket_bytes))
        packed = [(ws.describe(b, 0, k, len(buckets)), b) for k, b in enumerate(buckets)]
    return {"seconds": time.perf_counter() - t, "manifest": [dataclasses.astuple(i) for i, _ in packed],
            "buckets": [b for _, b in packed]}


def _load(path, syncs, impl_files):
    from megatron_gad.engine.vllm_engine import VLLMEngine
    from megatron_gad.models.arch import arch_from_hf_config, read_hf_config
    from megatron_gad.models.hf import hf_param_shapes

    eng = VLLMEngine(path, dtype="float32", max_model_len=64, seed=0, load_format="dummy")
    expected = hf_param_shapes(arch_from_hf_config(read_hf_config(path)))
    mods = {f: _sync_module(f) for f in set(impl_files)}
    out = []
    for sync, f in zip(syncs, impl_files):
        ws = mods[f]
        manifest = [ws.BucketInfo(*t) for t in sync["manifest"]]
        t = time.perf_counter()
        ws.check_manifest(manifest, expected)
        eng.load_weights(ws.verified_items(manifest, lambda k, b=sync["buckets"]: b[k]))
        load_s = time.perf_counter() - t
        t = time.perf_counter()  # vLLM's own part: the same tensors, unverified
        eng.load_weights((n, x) for b in sync["buckets"] for n, x in b.items())
        out.append((load_s, time.perf_counter() - t))
    return out


def bench_sync(args, root: str) -> list[dict]:
    import subprocess

    from megatron_gad.parallel.launch import run_local
    from tests.rollout.helpers import in_fresh_process

    impls = {"after": None}
    if args.before_ref:  # the same table for another revision's weight_sync.py, side by side
        before = os.path.join(root, "weight_sync_before.py")
        with open(before, "w") as f:
            f.write(subprocess.run(["git", "show", f"{args.before_ref}:megatron_gad/engine/weight_sync.py"],
                                   capture_output=True, text=True, check=True,
                                   cwd=os.path.dirname(RESULTS)).stdout)
        impls = {f"before ({args.before_ref})": before, "after": None}
    rows = []
    for name, (hidden, layers, vocab, heads, kv, ffn) in args.sizes.items():
        path = make_model(os.path.join(root, f"sync_{name}"), hidden, layers, vocab, heads, kv, ffn)
        runs = [(label, f, mb) for mb in args.buckets_mb for label, f in impls.items()]  # alternated
        syncs = [run_local(_export, 1, path, mb << 20, f)[0] for _, f, mb in runs]
        loads = in_fresh_process(_load, path, syncs, [f for _, f, _ in runs])
        for (label, _, mb), sync, (load_s, vllm_s) in zip(runs, syncs, loads):
            gb = sum(m[-1] for m in sync["manifest"]) / 1e9
            rows.append({"impl": label, "model": name, "params": int(gb * 1e9 / 4), "gb": gb, "bucket_mb": mb,
                         "buckets": len(sync["manifest"]), "export_s": sync["seconds"], "load_s": load_s,
                         "vllm_reload_s": vllm_s, "s_per_gb": (sync["seconds"] + load_s) / gb})
    return rows


def write(report: dict, out_dir: str, name: str = "bench_rollout") -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    e = report["engines"]
    lines = ["# Rollout engines and weight sync (2-core CPU, fp32)", ""]
    if e is not None:
        native = e["engines"]["native"]["tok_per_s"]
        lines += [f"Random Qwen2, {e['model_params'] / 1e6:.1f}M parameters; {e['prompts']} prompts of 15–48 tokens; "
                  f"greedy, up to {e['new_tokens']} new tokens each. vLLM start-up: {e['vllm_start_s']:.1f} s.", "",
                  "| engine | tokens | seconds | tok/s | vs native | vs transformers | forwards | forwards / position "
                  "| host syncs / step |", "|---|---|---|---|---|---|---|---|---|"]
        hf = e["engines"]["transformers"]["tok_per_s"]
        rows = dict(e["engines"])
        if report.get("before"):  # today's engine before the rewrite, measured in an earlier run (--before)
            rows = {"native before (separate run)": report["before"], **rows}
        for engine, r in rows.items():
            fwd = f"{r['forwards']} | {r['forwards_per_token']:.2f}" if "forwards_per_token" in r else "- | -"
            sync = f"{r['host_syncs_per_step']:.3f}" if "host_syncs_per_step" in r else "-"
            lines.append(f"| {engine} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_per_s']:.0f} | "
                         f"{r['tok_per_s'] / native:.2f}x | {r['tok_per_s'] / hf:.2f}x | {fwd} | {sync} |")
        n = e["engines"]["native"]
        lines += ["", f"Native: {n['buckets']} length bucket(s), {n['prefill_rows']} prefill rows, {n['steps']} "
                      f"decode steps; greedy rows equal to transformers token for token: "
                      f"{100 * e['greedy_rows_equal_transformers']:.0f} % (fp32; a random model's near-ties may flip "
                      "an argmax between the left-padded and the unpadded computation)."]
        lines += ["", f"Wrapper overhead over plain vLLM asked for the same outputs (same engine, best of "
                      f"{report['args']['repeats']}): {100 * e['wrapper_overhead']:+.1f} %; the sampled log-probs "
                      f"themselves cost {100 * e['logprob_cost']:+.1f} % over ids only.", ""]
    lines += ["## Weight sync (export on the actor rank + verified in-place load into vLLM)", "",
              "| weight_sync.py | model | params | GB | bucket MB | buckets | export s | load s | s/GB | "
              "of which vLLM reload s/GB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["sync"]:
        lines.append(f"| {r['impl']} | {r['model']} | {r['params'] / 1e6:.1f}M | {r['gb']:.3f} | {r['bucket_mb']} | "
                     f"{r['buckets']} | {r['export_s']:.2f} | {r['load_s']:.2f} | {r['s_per_gb']:.2f} | "
                     f"{r['vllm_reload_s'] / r['gb']:.2f} |")
    lines += ["", "export: TP gathers + HF re-layout + host copies + checksums on the actor rank; load: manifest "
                  "check + per-bucket verification + vLLM's in-place reload; the last column times vLLM's reload "
                  "alone (same tensors, unverified), the floor of this path."]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few prompts (smoke run)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--before", help="JSON of an earlier native measurement (seconds, tokens) shown as a row")
    p.add_argument("--sync-only", action="store_true", help="only part 2 (weight sync)")
    p.add_argument("--name", default="bench_rollout", help="output file stem in --out")
    p.add_argument("--before-ref", default=None,
                   help="git revision whose engine/weight_sync.py is timed side by side with this tree's")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.heads, args.kv_heads, args.ffn = 128, 2, 1024, 2, 1, 256
        args.prompts, args.new, args.repeats = 16, 16, 1
        args.sizes = {"tiny": (128, 2, 1024, 2, 1, 256)}
        args.buckets_mb = [1, 64]
    else:
        # the shape: hidden 512, 8 layers, vocab 32k (tied embeddings: 39M parameters)
        args.hidden, args.layers, args.vocab, args.heads, args.kv_heads, args.ffn = 512, 8, 32000, 8, 2, 1408
        args.prompts, args.new, args.repeats = 128, 128, 2
        args.sizes = {"small": (256, 4, 8000, 4, 2, 688), "medium": (512, 8, 32000, 8, 2, 1408),
                      "large": (768, 10, 32000, 12, 4, 2048)}
        args.buckets_mb = [16, 128, 512]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as root:
        report = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "name")},
                  "engines": None if args.sync_only else bench_engines(args, root), "sync": bench_sync(args, root)}
    if args.before:
        with open(args.before) as f:
            before = json.load(f)
        before["tok_per_s"] = before["tokens"] / before["seconds"]
        report["before"] = before
    write(report, args.out, args.name)


if __name__ == "__main__":
    main()
