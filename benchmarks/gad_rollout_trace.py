"""A short GAD run per rollout engine (vLLM, native Megatron) on the same tiny task and seed: the
per-step training-inference mismatch (``rollout/logprob_diff_*``), weight syncs and phase times.

Ray on CPU, fp32, a random Llama student (hidden 256, 4 heads of 64 — vLLM's CPU attention needs
head_dim >= 32), 2 frozen-warmup steps then GAD steps. Writes
benchmarks/results/gad_rollout_trace.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KEYS = ("stage", "critic/d_acc", "reward/mean", "rollout/logprob_diff_max", "rollout/logprob_diff_mean",
        "rollout/weight_syncs", "timing_s/gen", "timing_s/weight_sync", "timing_s/step")


def run(engine: str, root: str, steps: int, tp: int) -> list[dict]:
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer

    run_dir = os.path.join(root, engine)
    cfg = load_config(None, [
        f"data.train_files=[{root}/data/train.jsonl]", f"actor_rollout_ref.model.path={root}/model",
        "actor_rollout_ref.model.make_vocab_size_divisible_by=8", f"actor_rollout_ref.rollout.name={engine}",
        "data.max_prompt_length=16", "data.max_response_length=24", "data.train_batch_size=4",
        "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.rollout.temperature=0.8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.actor.optim.lr=1e-4", "critic.optim.lr=1e-4", "critic.ppo_micro_batch_size_per_gpu=4",
        f"trainer.n_gpus_per_node={tp}", f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
        "critic.fused_loss=torch", "trainer.device=cpu", f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[jsonl]", "data.on_bad_row=skip", "trainer.critic_warmup=2",
        f"trainer.total_training_steps={steps}", "trainer.resume_mode=disable", "trainer.seed=3"])
    validate(cfg)
    tr = GADTrainer(cfg)
    try:
        tr.fit()
    finally:
        tr.shutdown()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: m.get(k) for k in KEYS} | {"step": m["step"]} for m in map(json.loads, f)]


def main() -> None:
    import ray

    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tp", type=int, default=1, help="actor TP (one vLLM engine per actor rank)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    report = {"args": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="gad_trace_") as root:
        tok = build_tokenizer(f"{root}/tok")
        build_tiny_student(f"{root}/model", tok, seed=0, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512)
        write_dataset(f"{root}/data", n_train=64, n_heldout=8, seed=0)
        for engine in ("vllm", "megatron"):
            report["runs"][engine] = run(engine, root, args.steps, args.tp)
    ray.shutdown()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gad_rollout_trace.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GAD steps per rollout engine (CPU, fp32, actor TP{args.tp}, T=0.8)", "",
             "| engine | step | stage | d_acc | reward | logprob_diff_max | logprob_diff_mean | weight_syncs | "
             "gen s | sync s | step s |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    for engine, rows in report["runs"].items():
        for m in rows:
            lines.append(f"| {engine} | {m['step']} | {m['stage']} | {fmt(m['critic/d_acc'], '.3f')} | "
                         f"{fmt(m['reward/mean'], '.4f')} | {fmt(m['rollout/logprob_diff_max'], '.2e')} | "
                         f"{fmt(m['rollout/logprob_diff_mean'], '.2e')} | {fmt(m['rollout/weight_syncs'], '.0f')} | "
                         f"{fmt(m['timing_s/gen'], '.2f')} | {fmt(m['timing_s/weight_sync'], '.2f')} | "
                         f"{fmt(m['timing_s/step'], '.2f')} |")
    with open(os.path.join(args.out, "gad_rollout_trace.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
