"""``megatron-gad inspect RUN_DIR [--png] [--json]``: what a GAD run's files say about its
discriminator, and what to change.

Reads ``metrics.jsonl`` (and ``samples.jsonl``, ``config.resolved.yaml`` when present) of a training
run — nothing is recomputed — and reports d_acc over time against the warmup band, the reward and
score drift, response lengths, the training–inference log-prob mismatch, and the warnings that fire:

* **saturated D**: d_acc >= 0.95 over the last window of GAD steps (the reward then carries little
  signal: the users' "d_acc stuck at 0.96–0.99");
* **blind D**: d_acc <= 0.55 over that window;
* **score drift**: the teacher/student mean scores moved by more than 5 (Bradley–Terry is shift
  invariant; nothing pins the scale);
* **EOS**: ``critic.eos_policy=none``, or identical texts scored apart (``critic/identical_pair_gap``);
* **reward hacking**: the reward rises while held-out ``val/d_acc`` rises too (the critic finds the
  student's samples *easier* to tell apart), ``critic/verifier_auc`` < 0.55 over the last window
  (a verifier is configured: ``custom_reward_function``), or ``reward/hacking_warning`` fired;
* **mismatch**: ``rollout/logprob_diff_max`` > 0.1.

``--png`` (needs matplotlib) writes ``RUN_DIR/inspect.png``: d_acc with the band, mean scores,
reward, response lengths over steps.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from megatron_gad.errors import InputError
from megatron_gad.metrics import read_step_records, trend_slope

SATURATED, BLIND, DRIFT, MISMATCH = 0.95, 0.55, 5.0, 0.1


def load_run(run_dir: str) -> tuple[list[dict], list[dict], dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: no such directory; pass a run's trainer.default_local_dir")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir}: no metrics.jsonl here; pass the trainer.default_local_dir of a run that "
                         "has logged at least one step")
    metrics = read_step_records(path)
    if not metrics:
        raise InputError(f"{path}: no complete step record yet")
    samples_path = os.path.join(run_dir, "samples.jsonl")
    samples = read_step_records(samples_path) if os.path.isfile(samples_path) else []
    cfg = {}
    cfg_path = os.path.join(run_dir, "config.resolved.yaml")
    if os.path.isfile(cfg_path):
        import yaml

        with open(cfg_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    return metrics, samples, cfg


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(metrics: list[dict], samples: list[dict], cfg: dict, window: int = 10) -> dict[str, Any]:
    """The numbers and warnings of a run (pure: tests feed it records)."""
    gad = [r for r in metrics if r.get("stage") == "gad"]
    warm = [r for r in metrics if r.get("stage") == "warmup"]
    critic = cfg.get("critic", {}) if isinstance(cfg, dict) else {}
    band = ((cfg.get("trainer") or {}).get("warmup") or {}).get("until_d_acc") if isinstance(cfg, dict) else None
    d_acc = _series(metrics, "critic/d_acc")
    recent = [v for _, v in _series(gad or metrics, "critic/d_acc")[-window:]]
    out: dict[str, Any] = {
        "steps": len(metrics), "last_step": metrics[-1]["step"], "warmup_steps": len(warm), "gad_steps": len(gad),
        "d_acc": {"first": d_acc[0][1] if d_acc else None, "last": d_acc[-1][1] if d_acc else None,
                  "recent_mean": _mean(recent), "band": band,
                  "saturated_steps": sum(v >= SATURATED for _, v in d_acc),
                  "blind_steps": sum(v <= BLIND for _, v in d_acc)},
    }
    reward = _series(gad, "reward/mean")
    out["reward"] = {"first": reward[0][1] if reward else None, "last": reward[-1][1] if reward else None,
                     "slope_per_step": trend_slope(reward)}
    scores = {}
    for side in ("teacher", "student"):
        s = _series(metrics, f"critic/{side}_value_mean")
        scores[side] = {"first": s[0][1] if s else None, "last": s[-1][1] if s else None,
                        "max_abs": max((abs(v) for _, v in s), default=None)}
    out["scores"] = scores
    length = _series(metrics, "response_length/mean")
    out["response_length"] = {"first": length[0][1] if length else None, "last": length[-1][1] if length else None}
    diff = [v for _, v in _series(metrics, "rollout/logprob_diff_max")]
    out["logprob_diff_max"] = max(diff) if diff else None
    gap = [v for _, v in _series(metrics, "critic/identical_pair_gap")]
    out["identical_pair_gap_max"] = max(gap) if gap else None
    auc = _series(metrics, "critic/verifier_auc")
    recent_auc = [v for _, v in auc[-window:]]
    out["verifier_auc"] = {"first": auc[0][1] if auc else None, "last": auc[-1][1] if auc else None,
                           "recent_mean": _mean(recent_auc), "steps": len(auc),
                           "hacking_warning_steps": sum(v > 0 for _, v in _series(metrics, "reward/hacking_warning"))}
    out["samples_logged"] = len(samples)

    warnings, advice = [], []
    r = out["d_acc"]["recent_mean"]
    if r is not None and r >= SATURATED:
        warnings.append(f"saturated discriminator: d_acc {r:.3f} over the last {len(recent)} steps (>= {SATURATED}); "
                        "the reward carries little signal")
        advice.append("lower critic.optim.lr, or soften the loss: critic.bt_temperature=2, critic.label_smoothing=0.1, "
                      "critic.swap_prob=0.1")
    if r is not None and r <= BLIND:
        warnings.append(f"blind discriminator: d_acc {r:.3f} over the last {len(recent)} steps (<= {BLIND})")
        advice.append("raise critic.optim.lr or warm the critic up longer (trainer.critic_warmup, "
                      "trainer.warmup.until_d_acc)")
    for side, s in scores.items():
        if s["first"] is not None and s["last"] is not None and abs(s["last"] - s["first"]) > DRIFT:
            warnings.append(f"score drift: the {side} mean score moved {s['first']:.2f} -> {s['last']:.2f}")
            advice.append("set critic.score_reg_coef (e.g. 1e-3) to pin the score scale")
            break
    if critic.get("eos_policy") == "none":
        warnings.append("critic.eos_policy=none: the teacher's EOS is dropped but the student's kept, so D can learn "
                        "'has EOS'")
        advice.append("use critic.eos_policy=append (the default)")
    if out["identical_pair_gap_max"]:
        gap = out["identical_pair_gap_max"]
        warnings.append(f"identical texts scored apart (critic/identical_pair_gap up to {gap:.3g})")
    va = out["verifier_auc"]
    if va["recent_mean"] is not None and va["recent_mean"] < BLIND:
        rising = (out["reward"]["slope_per_step"] or 0) > 0
        warnings.append(f"critic/verifier_auc {va['recent_mean']:.2f} over the last {len(recent_auc)} steps "
                        f"(< {BLIND}): D does not rank the verifier's good samples higher"
                        + ("; with the reward rising: possible reward hacking" if rising else ""))
        advice.append("give the verifier weight (reward.verifier_weight > 0), or retrain D with softer controls "
                      "(critic.label_smoothing, critic.swap_prob) before more GAD steps")
    if va["hacking_warning_steps"]:
        warnings.append(f"the trainer flagged possible reward hacking on {va['hacking_warning_steps']} steps "
                        "(reward/hacking_warning)")
    val = _series(metrics, "val/d_acc")
    slope = out["reward"]["slope_per_step"]
    if slope is not None and slope > 0 and len(val) >= 2 and val[-1][1] > val[0][1] + 0.05:
        warnings.append(f"reward rises ({slope:+.3g}/step) while held-out val/d_acc rises too "
                        f"({val[0][1]:.2f} -> {val[-1][1]:.2f}): the student may be exploiting the critic")
    if out["logprob_diff_max"] is not None and out["logprob_diff_max"] > MISMATCH:
        warnings.append(f"rollout/logprob_diff_max reached {out['logprob_diff_max']:.3g} (> {MISMATCH})")
        advice.append("correct for it: algorithm.rollout_is=token")
    out["warnings"], out["advice"] = warnings, advice
    return out


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(run_dir: str, s: dict, samples: list[dict]) -> str:
    d, sc = s["d_acc"], s["scores"]
    band = f" (warmup band {d['band']})" if d["band"] else ""
    lines = [f"run {run_dir}: {s['steps']} steps logged (last {s['last_step']}): {s['warmup_steps']} warmup, "
             f"{s['gad_steps']} GAD",
             f"d_acc: first {_fmt(d['first'])}, last {_fmt(d['last'])}, recent mean {_fmt(d['recent_mean'])}{band}; "
             f"{d['saturated_steps']} steps >= {SATURATED}, {d['blind_steps']} <= {BLIND}",
             f"reward (GAD steps): {_fmt(s['reward']['first'], '.4f')} -> {_fmt(s['reward']['last'], '.4f')} "
             f"(slope {_fmt(s['reward']['slope_per_step'], '+.3g')}/step)",
             f"scores: teacher {_fmt(sc['teacher']['first'])} -> {_fmt(sc['teacher']['last'])}, student "
             f"{_fmt(sc['student']['first'])} -> {_fmt(sc['student']['last'])}",
             f"response length: {_fmt(s['response_length']['first'], '.1f')} -> "
             f"{_fmt(s['response_length']['last'], '.1f')}; "
             f"rollout/logprob_diff_max {_fmt(s['logprob_diff_max'], '.2e')}"]
    va = s["verifier_auc"]
    if va["steps"]:
        lines.append(f"verifier AUC (D ranking the verifier's good samples first; 0.5 = blind to them): first "
                     f"{_fmt(va['first'])}, last {_fmt(va['last'])}, recent mean {_fmt(va['recent_mean'])} over "
                     f"{va['steps']} steps")
    lines.append("warnings: " + ("none" if not s["warnings"] else ""))
    lines += [f"  - {w}" for w in s["warnings"]]
    if s["advice"]:
        lines.append("what to change:")
        lines += [f"  - {a}" for a in dict.fromkeys(s["advice"])]
    if samples:
        last = samples[-1]["step"]
        lines.append(f"samples at step {last} (samples.jsonl):")
        for r in [x for x in samples if x["step"] == last][:2]:
            lines.append(f"  prompt  {r.get('prompt', '')!r}")
            lines.append(f"  student {r.get('student', '')!r}  score {_fmt(r.get('student_score'))}")
            lines.append(f"  teacher {r.get('teacher', '')!r}  score {_fmt(r.get('teacher_score'))}")
    return "\n".join(lines)


def write_png(run_dir: str, metrics: list[dict], band) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--png needs matplotlib: pip install 'megatron-gad[plots]' (or pip install matplotlib)") \
            from None
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    panels = [(("critic/d_acc", "critic/verifier_auc"), "d_acc (and verifier AUC)"),
              (("critic/teacher_value_mean", "critic/student_value_mean"), "mean score"),
              ("reward/mean", "reward (GAD steps)"), ("response_length/mean", "response length")]
    for a, (keys, title) in zip(ax.flat, panels):
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            pts = _series(metrics, key)
            if pts:
                a.plot([p[0] for p in pts], [p[1] for p in pts], label=key.split("/")[-1])
        a.set_title(title)
        a.set_xlabel("step")
        if isinstance(keys, tuple) and a.get_lines():
            a.legend()
    if band:
        ax[0, 0].axhspan(band[0], band[1], alpha=0.15, label="warmup band")
    gad = [r["step"] for r in metrics if r.get("stage") == "gad"]
    if gad:
        for a in ax.flat:
            a.axvline(gad[0], linestyle=":", color="gray")
    fig.tight_layout()
    path = os.path.join(run_dir, "inspect.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main_inspect(args) -> int:
    metrics, samples, cfg = load_run(args.run_dir)
    s = summarize(metrics, samples, cfg)
    if args.png:
        s["png"] = write_png(args.run_dir, metrics, s["d_acc"]["band"])
    if args.json:
        print(json.dumps(s), flush=True)
    else:
        print(format_summary(args.run_dir, s, samples), flush=True)
        if args.png:
            print(f"plots: {s['png']}", flush=True)
    return 0
