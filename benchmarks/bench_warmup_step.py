"""Frozen-warmup step vs GAD step: wall time per step and actor optimizer state, same config, one run.

A frozen-warmup step is rollout + discriminator update; a GAD step adds the reward pass, old (and
reference) log-probs, advantages and the actor's PPO update. Both are measured in the same process,
alternating nothing: the run does W warmup steps then G GAD steps on the bundled tiny demo model
(Ray + Megatron on CPU, fp32, TP=PP=1). The first step of each stage is excluded (allocation).
The actor lr defaults to 1e-9 so the policy (and thus response lengths, which drive every phase's
cost) stays put across the stage switch: the GAD step still runs every pass and the optimizer step.

    python benchmarks/bench_warmup_step.py [--warmup 6 --gad 6 --batch 8 --n 8 --kl]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--gad", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--response-length", type=int, default=26)
    ap.add_argument("--kl", action="store_true", help="low_var_kl to a reference (adds a ref pass)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--actor-lr", type=float, default=1e-9)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    import ray

    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    root = tempfile.mkdtemp(prefix="bench_warmup_")
    tok = build_tokenizer(os.path.join(root, "tok"))
    model = build_tiny_student(os.path.join(root, "model"), tok, seed=0, hidden=args.hidden, layers=args.layers,
                               heads=4, kv_heads=2, ffn=int(args.hidden * 8 / 3) // 8 * 8)
    data = write_dataset(os.path.join(root, "data"), n_train=256, n_heldout=8, seed=0)
    steps = args.warmup + args.gad
    cfg = load_config(None, [
        f"data.train_files=[{data['train']}]", f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.make_vocab_size_divisible_by=8", "data.max_prompt_length=16",
        f"data.max_response_length={args.response_length}", f"data.train_batch_size={args.batch}",
        f"actor_rollout_ref.rollout.n={args.n}", f"actor_rollout_ref.actor.ppo_mini_batch_size={args.batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.batch * args.n}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.batch * args.n}",
        f"critic.ppo_micro_batch_size_per_gpu={args.batch}", "critic.fused_loss=torch",
        f"actor_rollout_ref.actor.use_kl_loss={'true' if args.kl else 'false'}",
        f"actor_rollout_ref.actor.optim.lr={args.actor_lr}", "critic.optim.lr=1e-3", "trainer.device=cpu",
        f"trainer.total_training_steps={steps}", f"trainer.critic_warmup={args.warmup}",
        f"trainer.default_local_dir={os.path.join(root, 'run')}", "trainer.logger=[jsonl]"])
    validate(cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.time()
    trainer = GADTrainer(cfg)
    trainer.fit()
    trainer.shutdown()
    ray.shutdown()
    with open(os.path.join(root, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]

    def stage(name):
        sel = [r for r in rows if r["stage"] == name][1:]  # drop the first step of the stage
        # the final step also writes a checkpoint: leave the save time out of the step time
        return [r["timing_s/step"] - r.get("timing_s/save", 0.0) for r in sel], sel

    warm_t, warm_rows = stage("warmup")
    gad_t, gad_rows = stage("gad")
    phases = sorted({k for r in rows for k in r if k.startswith("timing_s/")})
    result = {
        "settings": vars(args) | {"model": f"random Llama h{args.hidden} x{args.layers} layers, fp32, TP=PP=1, CPU"},
        "warmup_step_s_median": statistics.median(warm_t),
        "gad_step_s_median": statistics.median(gad_t),
        "warmup_over_gad": statistics.median(warm_t) / statistics.median(gad_t),
        "actor_optimizer_state_bytes": {"warmup": max(r["actor/optimizer_state_bytes"] for r in warm_rows),
                                        "gad": max(r["actor/optimizer_state_bytes"] for r in gad_rows)},
        "phase_medians_s": {s: {p: statistics.median([r.get(p, 0.0) for r in rs]) for p in phases}
                            for s, rs in (("warmup", warm_rows), ("gad", gad_rows))},
        "wall_s": time.time() - t0,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_warmup_step.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# Frozen-warmup step vs GAD step (same config, one run)", "",
             f"settings: {result['settings']}", "",
             "| stage | median step (s) | actor optimizer state (bytes) |", "|---|---|---|",
             f"| frozen warmup | {result['warmup_step_s_median']:.3f} "
             f"| {result['actor_optimizer_state_bytes']['warmup']:.0f} |",
             f"| GAD | {result['gad_step_s_median']:.3f} | {result['actor_optimizer_state_bytes']['gad']:.0f} |",
             "", f"warmup / GAD step time: **{result['warmup_over_gad']:.2f}x**", "",
             "| phase | warmup (s) | GAD (s) |", "|---|---|---|"]
    for p in phases:
        med = result["phase_medians_s"]
        lines.append(f"| {p} | {med['warmup'][p]:.3f} | {med['gad'][p]:.3f} |")
    with open(os.path.join(args.out, "bench_warmup_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
