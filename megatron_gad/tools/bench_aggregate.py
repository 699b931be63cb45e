"""``megatron-gad bench --aggregate REPORT.json ... [--out DIR] [--stage S]``: a scaling table and plot
from ``bench`` reports of the same config at several node counts.

Per report (sorted by devices): throughput (tokens/s, all devices), throughput per device, speedup
and scaling efficiency against the smallest run:
``efficiency = (throughput / devices) / (throughput_smallest / devices_smallest)`` — 1.0 is perfect
(weak or strong) scaling of the per-device rate. Writes ``scaling.json``, ``scaling.md`` and
``scaling.png`` (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import os

from megatron_gad.errors import InputError
from megatron_gad.tools.bench_report import SCHEMA


def load_report(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as e:
        raise InputError(f"--aggregate {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--aggregate {path}: not JSON ({e.msg} at line {e.lineno}); pass the .json a bench "
                         "run wrote") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise InputError(f"--aggregate {path}: not a megatron-gad bench report (no \"schema\": \"{SCHEMA}\")")
    return report


def _stage(reports: list[tuple[str, dict]], stage: str | None) -> str:
    """The stage to compare: ``stage`` or, by default, gad (else sft, else warmup) if every report has it."""
    have = [set(r["results"]) for _, r in reports]
    common = set.intersection(*have)
    if stage is not None:
        if stage not in common:
            missing = [p for (p, r) in reports if stage not in r["results"]]
            raise InputError(f"--stage {stage}: not in {', '.join(missing)} (stages there: "
                             f"{', '.join(sorted(set.union(*have)))})")
        return stage
    for s in ("gad", "sft", "warmup"):
        if s in common:
            return s
    raise InputError("--aggregate: the reports share no stage; bench every node count with the same --stages")


def scaling_table(reports: list[tuple[str, dict]], stage: str | None = None) -> dict:
    """The table's rows (sorted by devices) and the stage they compare."""
    if not reports:
        raise InputError("--aggregate: no reports given")
    names = {r["config_name"] for _, r in reports}
    if len(names) > 1:
        raise InputError(f"--aggregate: the reports are of different configs ({', '.join(sorted(names))}); a "
                         "scaling table compares one config at several node counts")
    st = _stage(reports, stage)
    rows = []
    for path, r in reports:
        s = r["results"][st]
        if s["step_seconds"] <= 0 or not s["measured_steps"]:
            raise InputError(f"--aggregate {path}: stage {st} has no measured step")
        rows.append({"report": path, "nodes": r["nodes"], "gpus_per_node": r["gpus_per_node"],
                     "devices": r["world_size"], "device": r["device"]["name"], "step_seconds": s["step_seconds"],
                     "tokens_per_step": s["tokens_per_step"]["step"], "throughput": s["tokens_per_s"],
                     "throughput_per_device": s["tokens_per_s_per_device"], "mfu": s["mfu"],
                     "git_commit": r["git_commit"]})
    rows.sort(key=lambda x: (x["devices"], x["nodes"]))
    if len({x["devices"] for x in rows}) < len(rows):
        dup = sorted({x["devices"] for x in rows if sum(y["devices"] == x["devices"] for y in rows) > 1})
        raise InputError(f"--aggregate: several reports at {dup} device(s); pass one report per node count")
    base = rows[0]
    for x in rows:
        x["speedup"] = x["throughput"] / base["throughput"]
        x["ideal_speedup"] = x["devices"] / base["devices"]
        x["efficiency"] = x["speedup"] / x["ideal_speedup"]
    commits = sorted({str(x["git_commit"]) for x in rows})
    return {"config_name": names.pop(), "stage": st, "baseline_devices": base["devices"], "rows": rows,
            "git_commits": commits}


def render_markdown(table: dict) -> str:
    lines = [f"# Scaling: {table['config_name']}, stage {table['stage']}", "",
             f"Efficiency = throughput per device / that of the smallest run ({table['baseline_devices']} "
             "device(s)).", "",
             "| nodes | devices | step s | tokens/step | tokens/s | tokens/s/device | speedup | ideal | efficiency "
             "| MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in table["rows"]:
        lines.append(f"| {x['nodes']} | {x['devices']} | {x['step_seconds']:.3f} | {x['tokens_per_step']:.0f} | "
                     f"{x['throughput']:.1f} | {x['throughput_per_device']:.1f} | {x['speedup']:.2f} | "
                     f"{x['ideal_speedup']:.2f} | {x['efficiency']:.1%} | {x['mfu']:.2%} |")
    if len(table["git_commits"]) > 1:
        lines += ["", f"Note: the reports come from different commits ({', '.join(table['git_commits'])})."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    x = [r["devices"] for r in rows]
    base = rows[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(x, [r["throughput"] for r in rows], "o-", label="measured")
    ax1.plot(x, [base["throughput"] * r["ideal_speedup"] for r in rows], "--", color="grey", label="linear")
    ax1.set_xlabel("devices")
    ax1.set_ylabel("tokens / s")
    ax1.set_title(f"throughput ({table['stage']})")
    ax1.legend()
    ax2.plot(x, [r["efficiency"] for r in rows], "o-")
    ax2.axhline(1.0, ls="--", color="grey")
    ax2.set_ylim(0, max(1.1, max(r["efficiency"] for r in rows) * 1.05))
    ax2.set_xlabel("devices")
    ax2.set_ylabel(f"efficiency vs {table['baseline_devices']} device(s)")
    ax2.set_title("scaling efficiency")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.suptitle(table["config_name"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_aggregate(paths: list[str], out: str, stage: str | None = None) -> int:
    from megatron_gad.controller.preflight import check_output_dir

    table = scaling_table([(p, load_report(p)) for p in paths], stage)
    check_output_dir("--out", out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scaling.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    md = render_markdown(table)
    with open(os.path.join(out, "scaling.md"), "w", encoding="utf-8") as f:
        f.write(md)
    plot(table, os.path.join(out, "scaling.png"))
    print(md + f"\nwrote {os.path.join(out, 'scaling.json')}, scaling.md and scaling.png", flush=True)
    return 0
