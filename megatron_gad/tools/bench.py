"""``megatron-gad bench CONFIG [KEY=VALUE ...] [--steps K] [--stages warmup,gad] [--out DIR]``.

Runs K trainer steps of each requested stage with the real trainer (``GADTrainer.fit``: same workers,
same phases) and writes ``<out>/<name>.json`` and ``<out>/<name>.md``: per-phase time, tokens/s per
device, achieved TFLOP/s, MFU and HFU against the device's peak, the memory each role reports per phase
(``memory/<role>/...`` metrics) and the weight-sync cost. ``--aggregate REPORT.json ...`` turns reports
of runs at several node counts into a scaling table and plot (``tools/bench_aggregate.py``).
Arithmetic: ``tools/bench_report.py``; formulas: ``docs/bench.md``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time

from megatron_gad.errors import InputError

log = logging.getLogger("megatron_gad")

STAGES = ("warmup", "gad", "sft")


# ------------------------------------------------------------------------------------------ stages
def parse_stages(text: str) -> list[str]:
    """``warmup,gad`` -> ["warmup", "gad"]: warmup before gad, each once; ``sft`` (trainer.mode=sft) alone."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise InputError(f"--stages {text!r}: expected a comma list of {', '.join(STAGES)} (e.g. warmup,gad)")
    if len(set(stages)) != len(stages):
        raise InputError(f"--stages {text!r}: a stage is named twice")
    if "sft" in stages and len(stages) > 1:
        raise InputError(f"--stages {text!r}: sft (trainer.mode=sft, no critic) cannot be combined with the GAD "
                         "stages; bench it on its own")
    if stages == ["gad", "warmup"]:
        raise InputError(f"--stages {text!r}: the warmup comes before gad; write warmup,gad")
    return stages


def stage_overrides(stages: list[str], steps: int, run_dir: str) -> list[str]:
    """The trainer settings that make ``fit`` run exactly ``steps`` steps of each stage, in a run
    directory of its own, without validation, sample logs, resumption or periodic checkpoints
    (applied after the user's overrides, so these win)."""
    out = [f"trainer.total_training_steps={steps * len(stages)}", "trainer.save_freq=-1", "trainer.test_freq=-1",
           "trainer.resume_mode=disable", "trainer.resume_from_path=null", "trainer.sample_log_freq=0",
           f"trainer.default_local_dir={run_dir}", "trainer.logger=[console, jsonl]"]
    if stages == ["sft"]:
        return out + ["trainer.mode=sft"]
    # a fixed-length warmup (an adaptive one could end early or never)
    return out + ["trainer.mode=gad", f"trainer.critic_warmup={steps if 'warmup' in stages else 0}",
                  "trainer.warmup.until_d_acc=null"]


# ------------------------------------------------------------------------------------------ peak FLOP/s
_GPU_NAMES = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100", "a100-80gb"))


def matmul_probe(shapes: list[tuple[int, int, int]], dtype: str, device: str, min_s: float = 0.05,
                 rounds: int = 5) -> dict:
    """Best FLOP/s of ``[M, K] @ [K, N]`` matmuls over ``rounds`` timed rounds of at least ``min_s``
    each, per shape; the peak is the best shape's. What one process reaches on this device."""
    import torch

    dt = getattr(torch, dtype)
    results = []
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dt, device=device)
        b = torch.randn(k, n, dtype=dt, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for _ in range(3):
            a @ b
        sync()
        best = 0.0
        reps = 1
        for _ in range(rounds):
            while True:
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ b
                sync()
                dt_s = time.perf_counter() - t0
                if dt_s >= min_s:
                    break
                reps *= 2
            best = max(best, 2.0 * m * k * n * reps / dt_s)
        results.append({"m": m, "k": k, "n": n, "flops_per_s": best})
    return {"dtype": dtype, "device": device, "threads": torch.get_num_threads(), "shapes": results,
            "flops_per_s": max(r["flops_per_s"] for r in results)}


def probe_shapes(cfg, archs: dict) -> list[tuple[int, int, int]]:
    """The model's own GEMM sizes: a training micro-batch of full-length sequences (M tokens) through
    the actor's QKV, FC1 and output layer."""
    from megatron_gad.config import padded_vocab_size

    a = archs["actor"]
    d, arr = cfg.data, cfg.actor_rollout_ref
    m = min(4096, arr.actor.ppo_micro_batch_size_per_gpu * (d.max_prompt_length + d.max_response_length))
    vocab = padded_vocab_size(a.vocab_size, arr.model.make_vocab_size_divisible_by)
    return [(m, a.hidden_size, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim),
            (m, a.hidden_size, 2 * a.ffn_hidden_size), (m, a.hidden_size, vocab)]


def resolve_peak(cfg, archs: dict, gpu: bool, gpu_kind: str | None) -> dict:
    """The per-device peak FLOP/s MFU is measured against: ``--gpu`` or the detected GPU in the device
    table (``tools/plan.GPUS``, dense bf16), else a measured matmul probe (CPU: in the actor's dtype)."""
    from megatron_gad.tools.plan import GPUS

    if gpu_kind is None and gpu:
        import torch

        if not torch.cuda.is_available():  # trainer.device=cuda with the GPUs on worker nodes only
            raise InputError("bench: this process sees no GPU to look up or measure; pass --gpu KIND "
                             "(h100-80gb, h200-141gb, a100-80gb) for the workers' devices")
        name = torch.cuda.get_device_name(0)
        gpu_kind = next((kind for tag, kind in _GPU_NAMES if tag in name), None)
        if gpu_kind is None:
            probe = matmul_probe([(8192, 8192, 8192)], "bfloat16", "cuda")
            return {"flops_per_s": probe["flops_per_s"], "source": "probe", "probe": probe,
                    "note": f"{name} is not in the device table; best bf16 8192^3 matmul measured here"}
    if gpu_kind is not None:
        g = GPUS[gpu_kind]
        return {"flops_per_s": g.peak_flops, "source": f"table:{g.name}",
                "note": "dense bf16 tensor-core peak from the device table (tools/plan.py)"}
    dtype = cfg.actor_rollout_ref.actor.megatron.params_dtype
    probe = matmul_probe(probe_shapes(cfg, archs), dtype, "cpu")
    shapes = ", ".join(f"{s['m']}x{s['k']}x{s['n']}" for s in probe["shapes"])
    return {"flops_per_s": probe["flops_per_s"], "source": "probe", "probe": probe,
            "note": f"best {dtype} CPU matmul of the model's GEMM sizes ({shapes}) on {probe['threads']} "
                    "thread(s), measured before the run"}


# ------------------------------------------------------------------------------------------ the run
def _bench_trainer_class():
    from megatron_gad.controller.trainer import GADTrainer

    class BenchTrainer(GADTrainer):
        """The trainer, recording the sequence lengths each step held (for tokens and FLOPs) and saving
        a checkpoint at the end only when asked."""

        def __init__(self, cfg, keep_checkpoint: bool):
            super().__init__(cfg)
            self.keep_checkpoint = keep_checkpoint
            self.lengths: list[dict] = []
            self._sampled: tuple[list[int], list[int]] = ([], [])

        def _rollout(self, batch, n, seed, **sampling):
            out = super()._rollout(batch, n, seed, **sampling)
            self._sampled = (out["prompt_mask"].sum(-1).tolist(), out["response_mask"].sum(-1).tolist())
            return out

        def _step(self, batch, timer):
            self._sampled = ([], [])
            metrics = super()._step(batch, timer)
            self.lengths.append({"prompt": batch["prompt_mask"].sum(-1).tolist(),
                                 "teacher": batch["teacher_response_mask"].sum(-1).tolist(),
                                 "sample_prompt": self._sampled[0], "sample_response": self._sampled[1]})
            return metrics

        def save(self) -> str:
            return super().save() if self.keep_checkpoint else ""

    return BenchTrainer


def _git() -> tuple[str | None, bool]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, False


def _gpu_name(kind: str | None) -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{kind} (from --gpu)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _megatron_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # not installed as a distribution (a source checkout)
        return None


def build_report(cfg, archs: dict, stages: list[str], steps: int, rows: list[dict], lengths: list[dict],
                 peak: dict, gpu: bool, meta: dict) -> dict:
    """The report from the run's metrics.jsonl ``rows`` and the recorded ``lengths`` (one each per step)."""
    from megatron_gad.config import actor_dp, critic_dp, padded_vocab_size, world_size
    from megatron_gad.metrics import TIMING_PREFIX
    from megatron_gad.tools import bench_report as br

    t, arr = cfg.trainer, cfg.actor_rollout_ref
    vocab = padded_vocab_size(archs["actor"].vocab_size, arr.model.make_vocab_size_divisible_by)
    a, c = arr.actor, cfg.critic
    actor = br.ModelSpec(archs["actor"], vocab, a.megatron.override_transformer_config.recompute_granularity,
                         a.ppo_epochs)
    critic = br.ModelSpec(archs["critic"], vocab, c.megatron.override_transformer_config.recompute_granularity,
                          c.ppo_epochs) if t.mode == "gad" else None
    world = world_size(cfg)
    role_world = world if t.placement == "colocate" else world // 2
    drop = set() if meta["save"] else {"save"}
    records: dict[str, list[dict]] = {}
    for row, lens in zip(rows, lengths):
        phases = {k[len(TIMING_PREFIX):]: float(v) for k, v in row.items()
                  if k.startswith(TIMING_PREFIX) and k != TIMING_PREFIX + "step" and k[len(TIMING_PREFIX):] not in drop}
        memory: dict[str, dict[str, float]] = {}
        for k, v in row.items():
            parsed = br.memory_key(k)
            if parsed is not None and isinstance(v, (int, float)):
                memory.setdefault(parsed[0], {})[parsed[1]] = float(v) * parsed[2]
        step_s = float(row[TIMING_PREFIX + "step"]) - sum(float(row.get(TIMING_PREFIX + k, 0.0)) for k in drop)
        records.setdefault(row["stage"], []).append({
            "step": row["step"], "step_s": step_s, "phases_s": phases, "tokens": br.step_tokens(lens),
            "flops": br.step_flops(lens, row, actor, critic, list(phases)), "memory": memory})
    exclude_first = steps > 1
    results = {s: br.summarise_stage(records.get(s, []), world, {"actor": role_world, "critic": role_world},
                                     peak["flops_per_s"], exclude_first) for s in stages}
    syncs = [r for r in rows if "timing_s/weight_sync" in r]
    sync = {"syncs": len(syncs), "note": "the rollout engine is the actor's own model: nothing to sync"
            if meta["rollout"] != "vllm" else "no step changed the actor's weights"}
    if syncs:
        sync.update(seconds=sum(r["timing_s/weight_sync"] for r in syncs) / len(syncs),
                    bytes=max(float(r.get("rollout/weight_sync_bytes", 0.0)) for r in syncs),
                    load_seconds=sum(float(r.get("rollout/weight_sync_load_s", 0.0)) for r in syncs) / len(syncs))
    roles = {"actor": dict(tp=a.megatron.tensor_model_parallel_size, pp=a.megatron.pipeline_model_parallel_size,
                           dp=actor_dp(cfg))}
    if t.mode == "gad":
        roles["critic"] = dict(tp=c.megatron.tensor_model_parallel_size, pp=c.megatron.pipeline_model_parallel_size,
                               dp=critic_dp(cfg))
    import torch

    return {
        "schema": br.SCHEMA, "command": meta["command"], "config": meta["config"], "config_name": meta["config_name"],
        "overrides": meta["overrides"], "stages": stages, "steps_per_stage": steps,
        "steady_state": ("the first step of each stage is excluded (start-up: compilation, lazily allocated "
                         "optimizer state, allocator warm-up)") if exclude_first else "one step: start-up included",
        "world_size": world, "nodes": t.nnodes, "gpus_per_node": t.n_gpus_per_node,
        "device": {"kind": "cuda" if gpu else "cpu", "name": meta["device_name"], "nodes": t.nnodes,
                   "per_node": t.n_gpus_per_node},
        "peak": peak, "git_commit": meta["git_commit"], "git_dirty": meta["git_dirty"],
        "torch_version": torch.__version__, "megatron_core_version": _megatron_version(),
        "python_version": platform.python_version(), "host": platform.node(),
        "layout": {"placement": t.placement, "workers": t.workers, "rollout": meta["rollout"], "roles": roles,
                   "params_dtype": a.megatron.params_dtype},
        "batch": {"prompts": cfg.data.train_batch_size, "n": arr.rollout.n if t.mode == "gad" else 1,
                  "max_prompt_length": cfg.data.max_prompt_length,
                  "max_response_length": cfg.data.max_response_length},
        "models": {role: {"hidden": m.arch.hidden_size, "layers": m.arch.num_layers, "heads": m.arch.num_heads,
                          "kv_heads": m.arch.num_kv_heads, "ffn": m.arch.ffn_hidden_size, "vocab": m.vocab,
                          "recompute": m.recompute}
                   for role, m in (("actor", actor), ("critic", critic)) if m is not None},
        "results": results, "weight_sync": sync,
        "per_step": [dict(r, stage=s) for s, rs in records.items() for r in rs],
        "run_dir": meta["run_dir"], "wall_s": meta["wall_s"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_bench(args) -> dict:
    from megatron_gad.config import load_config, validate, world_size
    from megatron_gad.controller.preflight import check_output_dir, check_paths
    from megatron_gad.controller.trainer import _use_gpu
    from megatron_gad.data import DataError
    from megatron_gad.metrics import read_step_records
    from megatron_gad.tools import bench_report as br
    from megatron_gad.tools.plan import load_archs

    stages = parse_stages(args.stages)
    name = args.name or "bench_" + os.path.splitext(os.path.basename(args.config))[0]
    check_output_dir("--out", args.out)
    run_dir = args.run_dir or os.path.join(args.out, name + "_run")
    cfg = load_config(args.config, [*args.overrides, *stage_overrides(stages, args.steps, run_dir)])
    validate(cfg)
    check_paths(cfg)
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))  # the bench's own run dir: a fresh record
    archs = load_archs(cfg)
    gpu = _use_gpu(cfg)
    if args.gpu and not gpu:
        raise InputError(f"--gpu {args.gpu}: this run is on the CPU (trainer.device={cfg.trainer.device}); the "
                         "device table is for GPU runs, CPU runs measure their peak")
    log.info("bench: measuring the peak FLOP/s")
    peak = resolve_peak(cfg, archs, gpu, args.gpu)
    log.info("bench: peak %.4g TFLOP/s per device (%s); %d step(s) of %s on %d device(s)", peak["flops_per_s"] / 1e12,
             peak["source"], args.steps, "+".join(stages), world_size(cfg))
    start = time.perf_counter()
    try:
        trainer = _bench_trainer_class()(cfg, args.save)
    except DataError as e:
        raise InputError(f"data: {e}; fix or remove the row, or set data.on_bad_row=skip") from e
    rollout = trainer.rollout_name
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    wall = time.perf_counter() - start
    rows = read_step_records(os.path.join(run_dir, "metrics.jsonl"))
    if len(rows) != len(trainer.lengths):
        raise RuntimeError(f"bench: {len(rows)} metric records for {len(trainer.lengths)} steps in {run_dir}")

    commit, dirty = _git()
    meta = {"command": "megatron-gad bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else
                                                          [args.config, *args.overrides]),
            "config": args.config, "config_name": os.path.splitext(os.path.basename(args.config))[0],
            "overrides": list(args.overrides), "save": args.save, "rollout": rollout,
            "device_name": _gpu_name(args.gpu) if gpu else _cpu_name(),
            "git_commit": commit, "git_dirty": dirty, "run_dir": run_dir, "wall_s": wall}
    report = build_report(cfg, archs, stages, args.steps, rows, trainer.lengths, peak, gpu, meta)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name)
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    md = br.render_markdown(report)
    with open(path + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md, flush=True)
    log.info("bench: wrote %s.json and %s.md", path, path)
    return report


def main_bench(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.aggregate:
        if args.config is not None:
            raise InputError("bench --aggregate takes reports only; run the benchmark and aggregate separately")
        from megatron_gad.tools.bench_aggregate import main_aggregate

        return main_aggregate(args.aggregate, args.out, args.stage)
    if args.config is None:
        raise InputError("bench: give a CONFIG to run, or --aggregate REPORT.json ... to combine reports")
    run_bench(args)
    return 0
