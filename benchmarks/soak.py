"""Soak: many tiny GAD steps on CPU under Ray, checkpoints, two forced resumes, memory per process.

Two runs of the same config (tiny demo student, Ray workers, ``--ranks`` ranks per role):

* **straight**: ``--steps`` steps (default 200) with a checkpoint every ``--save-freq`` (default 20);
* **interrupted**: the same steps, but a worker process is SIGKILLed mid-step twice (the
  ``MEGATRON_GAD_KILL_WORKER`` hook: the critic's rank 0 as a critic update starts, at steps about 1/3
  and 2/3 of the way, never on a checkpoint step), and each time a new trainer resumes with
  ``trainer.resume_mode=auto`` from the last complete checkpoint, redoing the lost steps.

Checked: every step's metrics (``metrics.jsonl`` without ``timing_s/``) of the interrupted run equal the
straight run's, and each stop names the role, rank and step. Measured: the resident memory (RSS) of the
driver and of every Ray worker process, sampled after every step; reported as the least-squares slope
in MB/step after ``--warmup`` steps (per process and run segment), so a leak of a few hundred KB per
step shows over 200 steps. Written to ``<out>.json`` and ``<out>.md`` (default benchmarks/results/soak).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/soak.py              # 200 steps, ~15 min on 2 cores
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/soak.py --steps 40 --save-freq 10 --out /tmp/soak

``tests/e2e/test_soak.py`` (marked slow) runs the 40-step version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

MB = 1024 * 1024


def build_assets(root: str) -> dict:
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    tok = build_tokenizer(os.path.join(root, "tok"))
    model = build_tiny_student(os.path.join(root, "model"), tok, seed=0, hidden=32, layers=2, heads=4, kv_heads=2,
                               ffn=64)
    data = write_dataset(os.path.join(root, "data"), n_train=64, n_heldout=8, seed=0)
    return {"model": model, "train": data["train"]}


def overrides(assets: dict, run_dir: str, steps: int, save_freq: int, ranks: int) -> list[str]:
    return [f"data.train_files=[{assets['train']}]", f"actor_rollout_ref.model.path={assets['model']}",
            "actor_rollout_ref.model.make_vocab_size_divisible_by=8", "data.max_prompt_length=16",
            "data.max_response_length=12", "data.train_batch_size=2", "actor_rollout_ref.rollout.n=2",
            "actor_rollout_ref.rollout.temperature=1.0", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.optim.lr=1e-3",
            "critic.optim.lr=1e-3", "critic.ppo_micro_batch_size_per_gpu=1",
            "actor_rollout_ref.actor.use_kl_loss=false", "critic.fused_loss=torch", "trainer.device=cpu",
            "trainer.workers=ray",
            f"trainer.n_gpus_per_node={ranks}", f"trainer.default_local_dir={run_dir}", "trainer.logger=[jsonl]",
            "data.on_bad_row=skip", f"trainer.total_training_steps={steps}", "trainer.critic_warmup=2",
            f"trainer.save_freq={save_freq}", "trainer.resume_mode=auto",
            # keep the disk use of a long soak flat: the resumes need only the newest checkpoint
            "trainer.max_actor_ckpt_to_keep=2", "trainer.max_critic_ckpt_to_keep=2"]


def rss_mb(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / MB
    except psutil.Error:  # the process is gone (a killed worker)
        return None


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (step, MB) points, MB/step; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def run_segment(cfg, kill: str | None, samples: dict, segment: str) -> dict:
    """One trainer from construction to its end or its worker's death; RSS of the driver and of every
    worker process sampled after each step into ``samples[(segment, process)] = [(step, MB), ...]``."""
    from megatron_gad.controller import faults
    from megatron_gad.controller.trainer import GADTrainer

    if kill:
        os.environ[faults.KILL_ENV] = kill
    else:
        os.environ.pop(faults.KILL_ENV, None)
    start = time.time()
    tr = GADTrainer(cfg)
    procs = {"driver": os.getpid()}
    for role, group in (("actor", tr.actor), ("critic", tr.critic)):
        procs.update({f"{role}:{r}": pid for r, pid in enumerate(group.pids)})
    real_step = tr._step
    first = []

    def step(batch, timer):  # sample once the step is done (self.step is the step before it)
        first[:] = first or [tr.step + 1]
        out = real_step(batch, timer)
        for name, pid in procs.items():
            mb = rss_mb(pid)
            if mb is not None:
                samples.setdefault(f"{segment}/{name}", []).append((tr.step + 1, mb))
        return out

    tr._step = step
    err = None
    try:
        tr.fit()
    except faults.WorkerDiedError as e:
        err = e
    finally:
        tr.shutdown()
        os.environ.pop(faults.KILL_ENV, None)
    return {"segment": segment, "from_step": first[0] if first else None, "last_step": tr.step,
            "seconds": round(time.time() - start, 1),
            "stopped": None if err is None else {"role": err.role, "rank": err.rank, "step": err.step,
                                                  "method": err.method, "message": str(err)}}


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("timing_s/")} for line in f]


def kill_steps(steps: int, save_freq: int) -> list[int]:
    """Two steps about 1/3 and 2/3 through, moved off checkpoint steps so work is lost and redone."""
    out = []
    for frac in (1 / 3, 2 / 3):
        s = max(3, round(steps * frac))
        if s % save_freq in (0, 1):
            s += 2
        out.append(min(s, steps - 1))
    return out


def soak(steps: int, save_freq: int, ranks: int, warmup: int, workdir: str) -> dict:
    import ray

    from megatron_gad import checkpoint as ckpt
    from megatron_gad.config import load_config

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assets = build_assets(os.path.join(workdir, "assets"))
    samples: dict[str, list] = {}
    straight_dir, run_dir = os.path.join(workdir, "straight"), os.path.join(workdir, "interrupted")
    # the straight run needs no periodic checkpoints (saving does not change the metrics): only the final one
    segments = [run_segment(load_config(None, overrides(assets, straight_dir, steps, -1, ranks)), None,
                            samples, "straight")]
    cfg = load_config(None, overrides(assets, run_dir, steps, save_freq, ranks))
    done = 0  # the step the next segment resumes from (the last complete checkpoint)
    for i, at in enumerate(kill_steps(steps, save_freq)):
        # the critic's update calls are counted per worker process, which starts with this segment
        seg = run_segment(cfg, f"critic:0:update_critic:{at - done - 1}", samples, f"interrupted_{i + 1}")
        segments.append(seg)
        if seg["stopped"] is None or seg["stopped"]["step"] != at:
            raise RuntimeError(f"expected a stop at step {at}, got {seg}")
        done = ckpt.read_latest(run_dir) or 0
    segments.append(run_segment(cfg, None, samples, f"interrupted_{len(segments)}"))
    want, got = metrics(straight_dir), metrics(run_dir)
    with open(os.path.join(straight_dir, "metrics.jsonl")) as f:
        step_s = sorted(json.loads(line)["timing_s/step"] for line in f)
    mismatched = [a["step"] for a, b in zip(want, got) if a != b]
    identical = len(want) == len(got) == steps and not mismatched
    slopes = {}
    for key, pts in sorted(samples.items()):
        steady = [(s, mb) for s, mb in pts if s > warmup]
        slopes[key] = {"samples": len(pts), "rss_first_mb": round(pts[0][1], 1), "rss_last_mb": round(pts[-1][1], 1),
                       "slope_mb_per_step": None if slope(steady) is None else round(slope(steady), 4)}
    return {"steps": steps, "save_freq": save_freq, "ranks_per_role": ranks, "warmup_steps": warmup,
            "kill_steps": kill_steps(steps, save_freq), "segments": segments,
            "metrics_identical": identical, "mismatched_steps": mismatched,
            "metric_rows": {"straight": len(want), "interrupted": len(got)}, "rss": slopes,
            "straight_step_seconds_median": round(step_s[len(step_s) // 2], 3),
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}}


def markdown(r: dict) -> str:
    lines = [f"# Soak: {r['steps']} GAD steps on CPU (Ray, {r['ranks_per_role']} rank(s) per role)", "",
             f"Checkpoint every {r['save_freq']} steps; the interrupted run loses a critic worker (SIGKILL) mid-step "
             f"at steps {', '.join(map(str, r['kill_steps']))} and resumes (trainer.resume_mode=auto) each time.", "",
             f"**Metrics identical to the straight run: {'yes' if r['metrics_identical'] else 'NO'}** "
             f"({r['metric_rows']['straight']} vs {r['metric_rows']['interrupted']} rows"
             + (f"; differing steps {r['mismatched_steps']}" if r["mismatched_steps"] else "") + ").", "",
             f"Median step time of the straight run: {r['straight_step_seconds_median']} s.", "",
             "| segment | steps | seconds (with start-up) | stopped by |", "|---|---|---|---|"]
    for s in r["segments"]:
        stop = s["stopped"]
        why = f"{stop['role']} rank {stop['rank']} died in {stop['method']} at step {stop['step']}" if stop else "-"
        lines.append(f"| {s['segment']} | {s['from_step']}..{s['last_step']} | {s['seconds']} | {why} |")
    lines += ["", f"RSS per process, slope after step {r['warmup_steps']} (least squares over the per-step samples):",
              "", "| segment/process | samples | first MB | last MB | MB/step |", "|---|---|---|---|---|"]
    for k, v in r["rss"].items():
        sl = "n/a" if v["slope_mb_per_step"] is None else f"{v['slope_mb_per_step']:+.4f}"
        lines.append(f"| {k} | {v['samples']} | {v['rss_first_mb']} | {v['rss_last_mb']} | {sl} |")
    lines += ["", f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, Python {r['machine']['python']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-freq", type=int, default=20)
    p.add_argument("--ranks", type=int, default=1, help="ranks (Ray worker processes) per role")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the slope (default: steps // 5)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--workdir", default=None, help="run directories (default: a temporary directory)")
    a = p.parse_args(argv)
    warmup = a.steps // 5 if a.warmup is None else a.warmup
    with tempfile.TemporaryDirectory(prefix="gad_soak_") as tmp:
        r = soak(a.steps, a.save_freq, a.ranks, warmup, a.workdir or tmp)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(r, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(r))
    print(markdown(r))
    return 0 if r["metrics_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
