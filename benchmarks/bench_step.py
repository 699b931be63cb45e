"""A GAD step today vs with ``trainer.lean_step`` (issue 22), side by side in one run.

Runs ``megatron-gad bench`` (the real trainer, ``tools/bench.py``) on the same config with
``trainer.lean_step=false`` (separate reward and old log-prob passes) and ``=true`` (rewards from the
critic update's forward; on-policy, no old log-prob pass), alternating the two ``--rounds`` times so
that load from other processes on this shared machine hits both alike, and writes the per-phase mean
seconds of the GAD stage (steps 2..K of each run) to ``benchmarks/results/bench_step_<name>.{json,md}``.

Configs: ``demo`` (the demo model, 16 prompts x 8 samples: the command of bench_cpu_demo_b16n8.md)
and ``0.1b`` (a 99M-parameter Llama of the demo's shape family: hidden 768, 14 layers, 4 prompts x 4
samples). The assets (tokenizer, random student, dyck data) are built under ``--assets``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DEMO = ["trainer.workers=local", "data.train_batch_size=16", "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=16", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=128",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=256", "critic.ppo_micro_batch_size_per_gpu=16"]
CONFIGS = {
    "demo": {"model": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=172), "overrides": DEMO},
    "0.1b": {"model": dict(hidden=768, layers=14, heads=12, kv_heads=4, ffn=2048),
             "overrides": ["trainer.workers=local", "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4",
                           "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                           "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
                           "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
                           "critic.ppo_micro_batch_size_per_gpu=4"]},
}
VARIANTS = {"today": "trainer.lean_step=false", "lean": "trainer.lean_step=true"}


def build_assets(root: str, model: dict) -> list[str]:
    from megatron_gad.demo import assets, task

    if not os.path.exists(os.path.join(root, "student", "config.json")):
        tok = assets.build_tokenizer(os.path.join(root, "tokenizer"))
        assets.build_tiny_student(os.path.join(root, "student"), tok, seed=0, **model)
        task.write_dataset(os.path.join(root, "data"), 1000, 16, seed=0)
    return [f"data.train_files=[{root}/data/train.jsonl]", f"actor_rollout_ref.model.path={root}/student"]


def run_bench(name: str, overrides: list[str], steps: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "megatron_gad.cli", "bench", os.path.join(ROOT, "configs", "demo.yaml"),
           *overrides, "--steps", str(steps), "--stages", "warmup,gad", "--out", out, "--name", name,
           "--run-dir", os.path.join(out, name + "_run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, name + ".json")) as f:
        return json.load(f)


def summarize(reports: list[dict]) -> dict:
    """Mean over the runs of each GAD-stage phase's seconds and of the step."""
    gad = [r["results"]["gad"] for r in reports]
    phases = sorted({p for g in gad for p in g["phases"]})
    return {"step_s": sum(g["step_seconds"] for g in gad) / len(gad),
            "phases": {p: sum(g["phases"].get(p, {}).get("seconds", 0.0) for g in gad) / len(gad) for p in phases},
            "runs": [g["step_seconds"] for g in gad]}


def markdown(name: str, res: dict, args) -> str:
    t, n = res["today"], res["lean"]
    order = ["gen", "reward", "old_log_prob", "ref", "adv", "update_critic", "update_actor"]
    phases = [p for p in order if p in t["phases"] or p in n["phases"]]
    phases += sorted((set(t["phases"]) | set(n["phases"])) - set(phases))
    lines = [f"# GAD step today vs trainer.lean_step: {name}", "",
             f"`python benchmarks/bench_step.py --config {name} --steps {args.steps} --rounds {args.rounds}`: "
             f"`megatron-gad bench configs/demo.yaml {' '.join(CONFIGS[name]['overrides'])}` with "
             "`trainer.lean_step=false` (today: reward and old log-prob passes) and `=true`, alternated "
             f"{args.rounds}x in one run; GAD stage, mean over steps 2..{args.steps} of each run and over the runs "
             "(2-core CPU shared with other jobs: absolute seconds are noisy, the two columns saw the same load).", "",
             "| phase | today s | share | lean s | share |", "|---|---|---|---|---|"]
    for p in phases:
        a, b = t["phases"].get(p), n["phases"].get(p)
        cell = lambda v, tot: ("—", "—") if v is None else (f"{v:.4f}", f"{100 * v / tot:.1f}%")
        lines.append(f"| {p} | {' | '.join(cell(a, t['step_s']))} | {' | '.join(cell(b, n['step_s']))} |")
    lines += [f"| **step** | **{t['step_s']:.4f}** | | **{n['step_s']:.4f}** | |", "",
              f"Speed-up of the GAD step: **{t['step_s'] / n['step_s']:.2f}x** (per run: today "
              f"{', '.join(f'{x:.3f}' for x in t['runs'])} s; lean {', '.join(f'{x:.3f}' for x in n['runs'])} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--assets", default=os.path.join(ROOT, "outputs", "bench_step_assets"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    c = CONFIGS[args.config]
    base = build_assets(os.path.join(args.assets, args.config), c["model"]) + c["overrides"]
    work = os.path.join(args.assets, args.config, "runs")
    reports = {v: [] for v in VARIANTS}
    t0 = time.time()
    for r in range(args.rounds):
        for v, flag in (list(VARIANTS.items()) if r % 2 == 0 else list(VARIANTS.items())[::-1]):
            reports[v].append(run_bench(f"{v}_{r}", [*base, flag], args.steps, work))
            print(f"round {r + 1} {v}: step {reports[v][-1]['results']['gad']['step_seconds']:.3f} s", flush=True)
    res = {v: summarize(rs) for v, rs in reports.items()}
    res["speedup"] = res["today"]["step_s"] / res["lean"]["step_s"]
    res["wall_s"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_step_{args.config.replace('.', '')}")
    with open(stem + ".json", "w") as f:
        json.dump({"config": args.config, "overrides": c["overrides"], "steps": args.steps, "rounds": args.rounds,
                   **res}, f, indent=2)
    md = markdown(args.config, res, args)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
