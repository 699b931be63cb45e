"""Text table of a ``megatron-gad demo`` report (the dict written to ``demo_report.json``)."""

from __future__ import annotations

import itertools
import math


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.3f} ± {s:.3f}"


def d_acc_curve(values: list[float], points: int = 8) -> list[tuple[int, float]]:
    """(last step, mean d_acc) over ``points`` consecutive windows of the per-step values."""
    if not values:
        return []
    points = min(points, len(values))
    bounds = [round(i * len(values) / points) for i in range(points + 1)]
    return [(b, sum(values[a:b]) / (b - a)) for a, b in itertools.pairwise(bounds) if b > a]


def format_table(r: dict) -> str:
    seeds = r["seeds"]
    st = r["settings"]
    head = ["model"] + [f"seed {k}" for k in seeds] + ["mean ± std", "greedy (mean)", "distinct-valid (mean)"]
    rows = [("teacher", r["teacher_score"], None, None),
            (f"SFT only ({st['sft_steps']} steps)", r["sft_score"], r["greedy"]["sft"], r["distinct_valid"]["sft"]),
            (f"SFT continued (+{st['gad_steps']})", r["sft_continued_score"], r["greedy"]["sft_continued"],
             r["distinct_valid"]["sft_continued"]),
            (f"GAD (+{st['gad_steps']})", r["gad_score"], r["greedy"]["gad"], r["distinct_valid"]["gad"])]
    table = [head]
    for name, xs, greedy, distinct in rows:
        table.append([name] + [f"{x:.3f}" for x in xs] + [_fmt(xs), f"{mean_std(greedy)[0]:.3f}" if greedy else "-",
                                                         f"{mean_std(distinct)[0]:.3f}" if distinct else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"evaluation validity ({st['eval_prompts']} rows x {st['eval_n']} samples at T=1; "
             f"teacher = the same checker on the teacher's responses)"]
    for i, row in enumerate(table):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    lines.append(f"frozen warmup ({st['warmup_steps']} steps, D lr {st['warmup_critic_lr']:g} x "
                 f"{st['warmup_critic_epochs']} passes/batch): d_acc per window "
                 f"(step: mean), target >= {st['warmup_target_d_acc']}")
    for k, curve, final, frozen, probe in zip(seeds, r["warmup_d_acc"], r["warmup_final_d_acc"],
                                               r["actor_frozen_during_warmup"],
                                               r["critic_probe"]["after_warmup"]):
        pts = ", ".join(f"{b}: {v:.2f}" for b, v in d_acc_curve(curve))
        lines.append(f"  seed {k}: {pts} | final {final:.3f} | eval {probe['heldout_d_acc']:.3f} | "
                     f"actor frozen: {frozen}")
    lines.append("discriminator on fresh student samples (valid-vs-invalid AUC; 0.5 = does not see validity):")
    for k, a, g in zip(seeds, r["critic_probe"]["after_warmup"], r["critic_probe"]["after_gad"]):
        def auc(p: dict) -> str:
            return "n/a" if p["valid_vs_invalid_auc"] is None else f"{p['valid_vs_invalid_auc']:.3f}"
        lines.append(f"  seed {k}: after warmup AUC {auc(a)}, eval d_acc {a['heldout_d_acc']:.3f} | "
                     f"after GAD AUC {auc(g)}, eval d_acc {g['heldout_d_acc']:.3f}")
    lines += _diagnostics_lines(seeds, r.get("gad_diagnostics"))
    stage_s = {name: mean_std([t[name]["total_s"] for t in r["timings"]])[0]
               for name in ("sft", "warmup", "gad", "sft_cont")}
    lines.append("time per seed (s, start-up + training + evaluation): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in stage_s.items())
                 + f"; GAD step {mean_std(r['gad_step_s'])[0]:.2f} s; wall {r['wall_s']:.0f} s")
    return "\n".join(lines)


def _windows(values: list, points: int = 6) -> str:
    pts = d_acc_curve([v for v in values if v is not None], points)
    return ", ".join(f"{b}: {v:.2f}" for b, v in pts) if pts else "n/a"


def _diagnostics_lines(seeds: list[int], diags: list[dict] | None) -> list[str]:
    """The GAD stage's discriminator controls, its diagnostics over training (per window of steps
    with a value) and the warnings ``megatron-gad inspect`` gives for the run."""
    if not diags:
        return []
    c = diags[0]["controls"]
    lines = [f"GAD discriminator controls: eos_policy={c['eos_policy']}, score_pooling={c['score_pooling']}, "
             f"loss={c['loss_type']} (T={c['bt_temperature']:g}, smoothing={c['label_smoothing']:g}, "
             f"margin={c['margin']:g}, swap={c['swap_prob']:g}), score_reg_coef={c['score_reg_coef']:g}, "
             f"saturation_guard={'on' if c['saturation_guard'] else 'off'}; verifier = the task's checker at "
             f"weight {c['verifier_weight']:g} (logged only)"]
    lines.append("GAD diagnostics per window of steps (step: mean):")
    for k, d in zip(seeds, diags):
        s = d["series"]
        lines.append(f"  seed {k}: verifier AUC (D ranks valid samples first) {_windows(s['critic/verifier_auc'])}")
        lines.append(f"          score gap teacher-student {_windows(s['critic/score_diff_mean'])}; "
                     f"overlap {_windows(s['critic/overlap'], 3)}")
        ident = [v for v in s["critic/identical_pairs"] if v is not None]
        gap = [v for v in s["critic/identical_pair_gap"] if v is not None]
        eos = [v for v in s["critic/eos_mismatch"] if v is not None]
        hack = sum(1 for v in s["reward/hacking_warning"] if v)
        lines.append(f"          identical pairs {sum(ident) / max(1, len(ident)):.3f} (max gap "
                     f"{max(gap, default=0.0):.2g}); EOS on one side {sum(eos) / max(1, len(eos)):.3f}; "
                     f"reward-hacking flags {hack}")
        lines.append("          inspect: " + ("; ".join(d["warnings"]) if d["warnings"] else "no warnings"))
    return lines
