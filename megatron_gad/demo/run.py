"""``megatron-gad demo``: GAD vs sequence-level KD on the dyck task, end to end on CPU in minutes.

Per seed, under ``OUT/seed<k>/``:

1. ``sft``      SFT on the teacher responses from the random student (SeqKD baseline) -> checkpoint.
2. ``warmup``   frozen-actor discriminator warmup from the SFT checkpoint (``critic_warmup=W``); the
                actor's weights fingerprint is compared before/after (it must not move).
3. ``gad``      GAD from the SFT actor with the warmed-up discriminator (``init_critic_from``), G steps.
4. ``sft_cont`` SFT continued from the SFT checkpoint for the same G steps (the fair baseline).

Every model is scored on the evaluation rows (``heldout.jsonl``: a separate draw of teacher examples;
their prompts are the same 11 lengths as training's, so only the teacher strings are unseen, not the
prompts) with the task's ground-truth checker (validity of n samples at temperature 1, plus greedy
validity); the discriminator never sees that checker. The report goes to
``OUT/demo_report.json`` and a table to stdout; progress lines go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

STAGES = ("sft", "warmup", "gad", "sft_cont")


@dataclass(frozen=True)
class DemoSettings:
    # data
    n_train: int = 1000
    n_heldout: int = 200
    eval_prompts: int = 200          # evaluation rows scored per model (the training prompts, fresh teacher strings)
    eval_n: int = 8                  # samples per evaluation row at temperature 1
    # student (~100k parameters)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 172
    # batch: prompts per step x samples per prompt
    batch: int = 16
    n: int = 8
    temperature: float = 1.0
    max_response_length: int = 26    # 24 symbols + EOS, one spare
    # stages
    sft_steps: int = 300             # longer SFT memorises the 1000 examples and D then learns less
    sft_lr: float = 1e-3
    sft_clip_grad: float = 0.0       # 0 = no clipping (clipping at 1.0 slowed SFT ~2x here)
    warmup_steps: int = 150
    warmup_critic_lr: float = 3e-4   # critic lr during the frozen warmup
    warmup_critic_epochs: int = 1    # critic passes over each warmup batch (>1 inflates d_acc)
    critic_lr: float = 3e-4          # critic lr during GAD (one pass per step)
    critic_clip_grad: float = 0.0    # clipped (1.0) or at 1e-3, d_acc stalled near 0.55-0.6
    critic_weight_decay: float = 0.0
    gad_steps: int = 300
    actor_lr: float = 3e-5
    clip_grad: float = 1.0           # the actor's PPO updates
    warmup_target_d_acc: float = 0.6
    d_acc_window: int = 10           # warmup's final d_acc = mean of the last window steps
    rollout: str = "megatron"        # the sampling engine of the GAD stages: megatron | vllm


FULL = DemoSettings()
QUICK = dataclasses.replace(FULL, eval_prompts=32, eval_n=4, sft_steps=300, warmup_steps=8, gad_steps=6)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- config
def stage_config(s: DemoSettings, *, mode: str, run_dir: str, model_path: str, train_file: str, seed: int,
                 steps: int, actor_lr: float, critic_warmup: int = 0, init_critic_from: str | None = None,
                 critic_lr: float | None = None, critic_epochs: int = 1, verifier: bool = False):
    """The GADConfig of one demo stage (TP=PP=1, float32, one CPU rank per role). ``verifier``: the
    task's checker as a weight-0 verifier (logged as ``critic/verifier_auc``, never in the reward)."""
    from megatron_gad.config import config_from_dict, validate
    from megatron_gad.demo import task

    fp32 = {"params_dtype": "float32", "seed": 42 + seed}
    d = {
        "data": {"train_files": [train_file], "max_prompt_length": 8,
                 "max_response_length": s.max_response_length, "train_batch_size": s.batch, "seed": seed},
        "actor_rollout_ref": {
            "model": {"path": model_path, "make_vocab_size_divisible_by": 8},
            "actor": {"megatron": fp32, "optim": {"lr": actor_lr,
                                                  "clip_grad": s.sft_clip_grad if mode == "sft" else s.clip_grad},
                      "ppo_mini_batch_size": s.batch, "ppo_micro_batch_size_per_gpu": s.batch * s.n,
                      "ppo_epochs": 1, "use_kl_loss": False, "loss_agg_mode": "token-mean"},
            "rollout": {"name": s.rollout, "n": s.n, "temperature": s.temperature,
                        "log_prob_micro_batch_size_per_gpu": 256},
        },
        "critic": {"megatron": fp32, "optim": {"lr": s.critic_lr if critic_lr is None else critic_lr,
                                               "clip_grad": s.critic_clip_grad,
                                               "weight_decay": s.critic_weight_decay},
                   "ppo_micro_batch_size_per_gpu": s.batch, "ppo_epochs": critic_epochs, "fused_loss": "torch"},
        "algorithm": {"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": True},
        "trainer": {"mode": mode, "total_training_steps": steps, "critic_warmup": critic_warmup,
                    "warmup": {"mode": "frozen"}, "init_critic_from": init_critic_from,
                    "save_freq": -1, "default_local_dir": run_dir, "resume_mode": "disable",
                    "logger": ["console", "jsonl"], "experiment_name": f"demo-{os.path.basename(run_dir)}",
                    "seed": seed + 1, "nnodes": 1, "n_gpus_per_node": 1, "device": "cpu"},
        "ray": {"num_cpus": 2},
    }
    if verifier:
        d["custom_reward_function"] = {"path": task.__file__, "name": "compute_score"}
        d["reward"] = {"verifier_weight": 0.0}
    cfg = config_from_dict(d)
    validate(cfg)
    return cfg


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(trainer, items: list[dict], prompts: list[str], s: DemoSettings, seed: int) -> dict:
    """Ground-truth validity of the current actor on the evaluation rows (T=1 samples and greedy)."""
    from megatron_gad.demo.task import score_samples

    sampled = trainer.sample(items, s.eval_n, temperature=1.0, seed=seed)
    greedy = trainer.sample(items, 1, greedy=True, seed=seed)
    t1 = score_samples(prompts, sampled)
    g = score_samples(prompts, greedy)
    return {"valid_rate": t1["valid_rate"], "distinct_valid_rate": t1["distinct_valid_rate"],
            "greedy_valid_rate": g["valid_rate"], "examples": [x[0] for x in sampled[:4]]}


def probe_critic(trainer, items: list[dict], prompts: list[str], s: DemoSettings, seed: int) -> dict:
    """The critic (GAD's discriminator) on the evaluation rows against the current actor's fresh samples.

    ``heldout_d_acc``: share of (teacher, student) pairs of the evaluation rows ranked teacher-first (the
    teacher strings are not the training ones; the prompts are).
    ``valid_vs_invalid_auc``: does D rank the actor's *valid* samples above its invalid ones (the thing
    the reward should encode; ~0.5 means it judges something else).
    """
    import torch

    from megatron_gad.algos import ranking_auc
    from megatron_gad.demo.task import compute_score

    view = trainer.evaluate_critic(items, s.eval_n, seed=seed + 17, temperature=s.temperature)
    valid = torch.tensor([compute_score(prompt, text) for prompt, texts in zip(prompts, view["student_texts"])
                          for text in texts])  # 1.0 valid, 0.0 not: the AUC is the binary one, ties half
    auc = ranking_auc(view["student_scores"].flatten(), valid)
    return {"heldout_d_acc": view["d_acc"], "valid_vs_invalid_auc": auc,
            "student_valid_rate": float(valid.sum()) / max(1, valid.numel())}


# ---------------------------------------------------------------------------------------------- one seed
class _Stage:
    """Builds one stage's trainer, fits it and times it (init / fit / eval separately)."""

    def __init__(self, name: str, seed: int, cfg):
        from megatron_gad.controller.trainer import GADTrainer

        self.name, self.seed, self.cfg = name, seed, cfg
        steps = cfg.trainer.total_training_steps
        _log(f"seed {seed} | {name}: starting ({steps} steps, mode={cfg.trainer.mode}, "
             f"critic_warmup={cfg.trainer.critic_warmup})")
        t0 = time.perf_counter()
        self.trainer = GADTrainer(cfg)
        self.timing = {"init_s": time.perf_counter() - t0}

    def fit(self) -> None:
        t0 = time.perf_counter()
        self.trainer.fit()
        self.timing["fit_s"] = time.perf_counter() - t0
        steps = self.cfg.trainer.total_training_steps
        _log(f"seed {self.seed} | {self.name}: {steps} steps in {self.timing['fit_s']:.1f} s "
             f"(+{self.timing['init_s']:.1f} s start-up)")

    def timed(self, key: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - t0
        return out

    def close(self) -> dict:
        self.trainer.shutdown()
        self.timing["total_s"] = sum(v for k, v in self.timing.items() if k != "total_s")
        return self.timing


_DIAGNOSTICS = ("critic/verifier_auc", "critic/score_diff_mean", "critic/overlap", "critic/identical_pairs",
                "critic/identical_pair_gap", "critic/eos_mismatch", "reward/hacking_warning")


def gad_diagnostics(run_dir: str, metrics: list[dict], cfg) -> dict:
    """The GAD stage's discriminator view: the controls it ran with, per-step diagnostics (the
    verifier AUC is the checker's, logged at weight 0) and ``megatron-gad inspect``'s warnings."""
    from megatron_gad.tools.inspect_run import load_run, summarize

    c = cfg.critic
    controls = {"eos_policy": c.eos_policy, "score_pooling": c.score_pooling, "loss_type": c.loss_type,
                "bt_temperature": c.bt_temperature, "label_smoothing": c.label_smoothing, "margin": c.margin,
                "swap_prob": c.swap_prob, "score_reg_coef": c.score_reg_coef,
                "saturation_guard": c.saturation_guard.enable, "verifier_weight": cfg.reward.verifier_weight}
    series = {k: [m.get(k) for m in metrics] for k in _DIAGNOSTICS}
    summary = summarize(*load_run(run_dir))
    return {"controls": controls, "series": series, "warnings": summary["warnings"], "advice": summary["advice"]}


def _ckpt(run_dir: str, step: int, role: str) -> str:
    return os.path.join(run_dir, f"global_step_{step}", role)


def run_seed(seed: int, out: str, s: DemoSettings) -> dict:
    from megatron_gad.data import GADDataset
    from megatron_gad.demo import assets, task

    root = os.path.join(out, f"seed{seed}")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    tok = assets.build_tokenizer(os.path.join(root, "tokenizer"))
    student = assets.build_tiny_student(os.path.join(root, "student"), tok, seed=seed, hidden=s.hidden,
                                        layers=s.layers, heads=s.heads, kv_heads=s.kv_heads, ffn=s.ffn)
    paths = task.write_dataset(os.path.join(root, "data"), s.n_train, s.n_heldout, seed=seed)
    with open(paths["heldout"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:s.eval_prompts]
    prompts = [r["content"] for r in rows]
    heldout = GADDataset(paths["heldout"], tok, max_prompt_length=8, max_response_length=s.max_response_length)
    items = [heldout[i] for i in range(len(rows))]
    teacher_score = task.score_samples(prompts, [r["teacher_response"] for r in rows])["valid_rate"]
    timings = {"setup_s": time.perf_counter() - t0}
    res: dict = {"seed": seed, "teacher_score": teacher_score, "timings": timings}
    run = {name: os.path.join(root, name) for name in STAGES}
    common = dict(train_file=paths["train"], seed=seed)

    # 1. SFT-only (the SeqKD baseline)
    st = _Stage("sft", seed, stage_config(s, mode="sft", run_dir=run["sft"], model_path=student,
                                          steps=s.sft_steps, actor_lr=s.sft_lr, **common))
    st.fit()
    res["sft_eval"] = st.timed("eval_s", evaluate, st.trainer, items, prompts, s, seed)
    sft_fp = st.trainer.actor.weights_fingerprint()
    timings["sft"] = st.close()
    _log(f"seed {seed} | sft: eval valid {res['sft_eval']['valid_rate']:.3f}")
    sft_actor = _ckpt(run["sft"], s.sft_steps, "actor")

    # 2. Frozen warmup: critic only, the actor must stay bit-identical
    st = _Stage("warmup", seed, stage_config(s, mode="gad", run_dir=run["warmup"], model_path=sft_actor,
                                             steps=s.warmup_steps, actor_lr=s.actor_lr,
                                             critic_warmup=s.warmup_steps, critic_lr=s.warmup_critic_lr,
                                             critic_epochs=s.warmup_critic_epochs, **common))
    fp_before = st.trainer.actor.weights_fingerprint()
    st.fit()
    fp_after = st.trainer.actor.weights_fingerprint()
    opt_bytes = sum(st.trainer.actor.optimizer_state_bytes())
    res["warmup_probe"] = st.timed("probe_s", probe_critic, st.trainer, items, prompts, s, seed)
    timings["warmup"] = st.close()
    metrics = read_metrics(run["warmup"])
    res["warmup_d_acc"] = [float(m["critic/d_acc"]) for m in metrics]
    res["warmup_stages"] = sorted({m.get("stage") for m in metrics})
    res["actor_frozen_during_warmup"] = bool(fp_before == fp_after and fp_before == sft_fp and opt_bytes == 0)
    res["actor_fingerprint"] = {"sft_end": sft_fp, "warmup_start": fp_before, "warmup_end": fp_after,
                                "warmup_optimizer_state_bytes": opt_bytes}
    tail = res["warmup_d_acc"][-s.d_acc_window:]
    res["warmup_final_d_acc"] = sum(tail) / len(tail)
    res["warmup_reached_target"] = res["warmup_final_d_acc"] >= s.warmup_target_d_acc
    _log(f"seed {seed} | warmup: d_acc {res['warmup_d_acc'][0]:.3f} -> {res['warmup_final_d_acc']:.3f} "
         f"(mean of last {len(tail)}), eval {res['warmup_probe']['heldout_d_acc']:.3f}; actor frozen: "
         f"{res['actor_frozen_during_warmup']}")
    if not res["actor_frozen_during_warmup"]:
        raise RuntimeError(f"seed {seed}: the actor changed during the frozen warmup: {res['actor_fingerprint']}")

    # 3. GAD from the SFT actor and the warmed-up critic
    st = _Stage("gad", seed, stage_config(s, mode="gad", run_dir=run["gad"], model_path=sft_actor,
                                          steps=s.gad_steps, actor_lr=s.actor_lr, critic_warmup=0,
                                          init_critic_from=_ckpt(run["warmup"], s.warmup_steps, "critic"),
                                          verifier=True, **common))
    st.fit()
    res["gad_eval"] = st.timed("eval_s", evaluate, st.trainer, items, prompts, s, seed)
    res["gad_probe"] = st.timed("probe_s", probe_critic, st.trainer, items, prompts, s, seed)
    timings["gad"] = st.close()
    metrics = read_metrics(run["gad"])
    res["gad_d_acc"] = [float(m["critic/d_acc"]) for m in metrics]
    res["gad_step_s"] = _median([float(m["timing_s/step"]) for m in metrics])
    res["gad_diagnostics"] = gad_diagnostics(run["gad"], metrics, st.cfg)
    _log(f"seed {seed} | gad: eval valid {res['gad_eval']['valid_rate']:.3f}")

    # 4. SFT continued for the same number of steps (the fair baseline)
    st = _Stage("sft_cont", seed, stage_config(s, mode="sft", run_dir=run["sft_cont"], model_path=sft_actor,
                                               steps=s.gad_steps, actor_lr=s.sft_lr, **common))
    st.fit()
    res["sft_continued_eval"] = st.timed("eval_s", evaluate, st.trainer, items, prompts, s, seed)
    timings["sft_cont"] = st.close()
    _log(f"seed {seed} | sft_cont: eval valid {res['sft_continued_eval']['valid_rate']:.3f}")
    timings["total_s"] = time.perf_counter() - t0
    return res


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else math.nan


# ---------------------------------------------------------------------------------------------- driver
def build_report(results: list[dict], s: DemoSettings, quick: bool, wall_s: float) -> dict:
    def col(key: str, field: str = "valid_rate") -> list[float]:
        return [r[key][field] for r in results]

    return {
        "seeds": [r["seed"] for r in results],
        "quick": quick,
        "teacher_score": [r["teacher_score"] for r in results],
        "sft_score": col("sft_eval"),
        "sft_continued_score": col("sft_continued_eval"),
        "gad_score": col("gad_eval"),
        "greedy": {"sft": col("sft_eval", "greedy_valid_rate"),
                   "sft_continued": col("sft_continued_eval", "greedy_valid_rate"),
                   "gad": col("gad_eval", "greedy_valid_rate")},
        "distinct_valid": {"sft": col("sft_eval", "distinct_valid_rate"),
                           "sft_continued": col("sft_continued_eval", "distinct_valid_rate"),
                           "gad": col("gad_eval", "distinct_valid_rate")},
        "warmup_d_acc": [r["warmup_d_acc"] for r in results],
        "warmup_final_d_acc": [r["warmup_final_d_acc"] for r in results],
        "warmup_reached_target": [r["warmup_reached_target"] for r in results],
        "actor_frozen_during_warmup": [r["actor_frozen_during_warmup"] for r in results],
        "gad_d_acc": [r["gad_d_acc"] for r in results],
        "gad_diagnostics": [r["gad_diagnostics"] for r in results],
        "critic_probe": {"after_warmup": [r["warmup_probe"] for r in results],
                                "after_gad": [r["gad_probe"] for r in results]},
        "examples": {k: [r[f"{k}_eval"]["examples"] for r in results] for k in ("sft", "gad", "sft_continued")},
        "actor_fingerprint": [r["actor_fingerprint"] for r in results],
        "timings": [r["timings"] for r in results],
        "gad_step_s": [r["gad_step_s"] for r in results],
        "wall_s": wall_s,
        "settings": dataclasses.asdict(s),
        "eval": {"metric": "task.score_samples valid_rate", "temperature": 1.0, "samples_per_prompt": s.eval_n,
                 "prompts": s.eval_prompts, "greedy": "1 sample per prompt"},
    }


def run_demo(out: str, seeds: int = 1, settings: DemoSettings = FULL, quick: bool = False) -> dict:
    from megatron_gad.demo.report import format_table

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    try:
        for k in range(seeds):
            results.append(run_seed(k, out, settings))
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    report = build_report(results, settings, quick, time.perf_counter() - t0)
    path = os.path.join(out, "demo_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(format_table(report), flush=True)
    _log(f"report written to {path} ({report['wall_s']:.0f} s in all)")
    return report


def main_demo(args) -> int:
    """Entry point of ``megatron-gad demo [--seeds K] [--out DIR] [--quick]``."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    quick = bool(getattr(args, "quick", False))
    seeds = int(getattr(args, "seeds", 1) or 1)
    out = getattr(args, "out", None)
    if not out:
        out = tempfile.mkdtemp(prefix="megatron-gad-demo-")
        _log(f"no --out given: writing to {out}")
    from megatron_gad.controller.preflight import check_output_dir

    check_output_dir("--out", out)  # an InputError (exit 2) before anything is built
    settings = QUICK if quick else FULL
    if getattr(args, "rollout", "megatron") == "vllm":
        from megatron_gad.engine.vllm_engine import vllm_unavailable_reason
        from megatron_gad.errors import InputError

        reason = vllm_unavailable_reason()
        if reason:
            raise InputError(f"--rollout vllm: {reason}; or use --rollout megatron")
        # vLLM's CPU attention needs head_dim >= 32: the same student with 2 heads of 32 instead of 4 of 16
        settings = dataclasses.replace(settings, rollout="vllm", heads=2, kv_heads=2)
        _log("--rollout vllm: GAD stages sample with vLLM; the student has 2 attention heads of 32 (vLLM's CPU "
             "attention refuses head_dim 16), so its numbers are not those of the default demo")
    run_demo(out, seeds, settings, quick)
    return 0
