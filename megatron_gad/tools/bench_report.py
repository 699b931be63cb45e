"""``megatron-gad bench``'s arithmetic: per-step FLOPs from the sequences a step really held, the
steady-state summary per stage, and the markdown. Pure Python (no torch); ``tools/bench.py`` runs the
steps and feeds this. Formulas: ``docs/bench.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_gad.models.arch import Arch
from megatron_gad.planner import forward_flops, matmul_params

# The report format `bench` writes and `bench --aggregate` reads (here, not in bench.py: both import it).
SCHEMA = "megatron-gad-bench/1"

# The phase -> role map for FLOPs and devices (phases as GADTrainer._phase names them).
ACTOR_PHASES = ("gen", "old_log_prob", "ref", "update_actor", "sft")
CRITIC_PHASES = ("reward", "update_critic")
MiB = 2**20


@dataclass(frozen=True)
class Pass:
    """One model's cost of a forward over a set of sequences: all FLOPs and the attention part of them."""
    forward: float
    attention: float


def pass_cost(arch: Arch, role: str, vocab: int, seq_lens: list[int]) -> Pass:
    if not seq_lens:
        return Pass(0.0, 0.0)
    total = forward_flops(arch, role, vocab, seq_lens)
    return Pass(total, total - 2 * matmul_params(arch, role, vocab) * sum(seq_lens))


def recompute_extra(p: Pass, granularity: str | None) -> float:
    """FLOPs a training pass spends again in backward: full recompute reruns the forward, selective
    recompute reruns core attention (``QK^T`` and ``AV``)."""
    if granularity == "full":
        return p.forward
    if granularity == "selective":
        return p.attention
    return 0.0


@dataclass(frozen=True)
class ModelSpec:
    """What a role's FLOPs depend on besides the sequences."""
    arch: Arch
    vocab: int  # padded vocabulary (the actor's output layer)
    recompute: str | None  # override_transformer_config.recompute_granularity
    ppo_epochs: int


def step_flops(lengths: dict, metrics: dict, actor: ModelSpec, critic: ModelSpec | None,
               phases: list[str]) -> dict[str, dict[str, float]]:
    """Model and hardware FLOPs of each of a step's ``phases`` from its sequence lengths.

    ``lengths``: ``prompt`` / ``teacher`` (per prompt, B each) and ``sample_prompt`` / ``sample_response``
    (per student sample, B*n each; empty without a rollout). Forward = 1x, backward = 2x the forward;
    model FLOPs count each pass once, hardware FLOPs add what recompute runs again. ``metrics``: the
    step's trainer metrics (the saturation guard's skipped / extra critic updates)."""
    samples = [p + r for p, r in zip(lengths["sample_prompt"], lengths["sample_response"])]
    teachers = [p + t for p, t in zip(lengths["prompt"], lengths["teacher"])]
    a_samples = pass_cost(actor.arch, "actor", actor.vocab, samples)
    out: dict[str, dict[str, float]] = {}

    def train(p: Pass, spec: ModelSpec, times: float) -> dict[str, float]:
        hardware = 3 * p.forward + recompute_extra(p, spec.recompute)
        return {"model": 3 * p.forward * times, "hardware": hardware * times}

    def forward(p: Pass) -> dict[str, float]:
        return {"model": p.forward, "hardware": p.forward}

    for phase in phases:
        if phase in ("gen", "old_log_prob", "ref"):
            # generation: prefill + decode with a KV cache computes the same pairs as one causal forward
            out[phase] = forward(a_samples)
        elif phase == "update_actor":
            out[phase] = train(a_samples, actor, actor.ppo_epochs)
        elif phase == "sft":
            out[phase] = train(pass_cost(actor.arch, "actor", actor.vocab, teachers), actor, 1)
        elif phase == "reward" and critic is not None:
            out[phase] = forward(pass_cost(critic.arch, "critic", critic.vocab, samples))
        elif phase == "update_critic" and critic is not None:
            pairs = pass_cost(critic.arch, "critic", critic.vocab, teachers + samples)
            if metrics.get("critic/update_skipped", 0.0) >= 1.0:  # the guard only evaluated the pairs
                out[phase] = forward(pairs)
            else:
                out[phase] = train(pairs, critic, critic.ppo_epochs * (1 + metrics.get("critic/extra_steps", 0.0)))
        else:  # adv, weight_sync, save, validate: no model FLOPs counted
            out[phase] = {"model": 0.0, "hardware": 0.0}
    return out


def step_tokens(lengths: dict) -> dict[str, int]:
    """Token counts of a step. ``step`` (the throughput numerator): the prompt + response tokens of the
    B*n student samples, as verl's throughput; with no rollout (trainer.mode=sft) the prompt + teacher
    tokens of the B rows trained on."""
    prompt, response = sum(lengths["sample_prompt"]), sum(lengths["sample_response"])
    teacher = sum(lengths["prompt"]) + sum(lengths["teacher"])
    return {"sample_prompt": prompt, "sample_response": response, "teacher_sequence": teacher,
            "step": prompt + response if lengths["sample_response"] else teacher}


def memory_key(key: str) -> tuple[str, str, float] | None:
    """``memory/<role>/<name>_bytes`` -> (role, name, 1); ``..._gb`` -> (role, name, GiB): any role and
    phase a worker emits."""
    m = re.fullmatch(r"memory/([^/]+)/(.+?)_(bytes|gb)", key)
    if m is None:
        return None
    return m.group(1), m.group(2), 1.0 if m.group(3) == "bytes" else float(2**30)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summarise_stage(records: list[dict], devices: int, role_devices: dict[str, int], peak: float,
                    exclude_first: bool) -> dict:
    """Steady-state numbers of one stage from its per-step ``records`` (``phases_s``, ``flops``,
    ``tokens``, ``step_s``, ``memory``): means over the measured steps (all but the first when
    ``exclude_first``), per-device rates over ``devices`` (a phase: over its role's devices)."""
    measured = records[1:] if exclude_first and len(records) > 1 else records
    phases: dict[str, dict] = {}
    for name in dict.fromkeys(p for r in measured for p in r["phases_s"]):
        secs = _mean([r["phases_s"].get(name, 0.0) for r in measured])
        model = _mean([r["flops"].get(name, {}).get("model", 0.0) for r in measured])
        hw = _mean([r["flops"].get(name, {}).get("hardware", 0.0) for r in measured])
        dev = role_devices.get("critic" if name in CRITIC_PHASES else "actor", devices)
        rate = model / secs / dev if secs > 0 else 0.0
        phases[name] = {"seconds": secs, "model_flops": model, "hardware_flops": hw,
                        "model_tflops_per_device": rate / 1e12, "mfu": rate / peak}
    step_s = _mean([r["step_s"] for r in measured])
    model = sum(p["model_flops"] for p in phases.values())
    hw = sum(p["hardware_flops"] for p in phases.values())
    tokens = {k: _mean([r["tokens"][k] for r in measured]) for k in measured[0]["tokens"]} if measured else {}
    memory: dict[str, dict[str, float]] = {}  # role -> name -> max bytes over the measured steps
    for r in measured:
        for role, names in r["memory"].items():
            for name, b in names.items():
                memory.setdefault(role, {})[name] = max(b, memory.get(role, {}).get(name, 0.0))
    return {
        "steps": [r["step"] for r in records], "measured_steps": [r["step"] for r in measured],
        "step_seconds": step_s, "phases": phases, "tokens_per_step": tokens,
        "tokens_per_s": tokens.get("step", 0.0) / step_s if step_s > 0 else 0.0,
        "tokens_per_s_per_device": tokens.get("step", 0.0) / step_s / devices if step_s > 0 else 0.0,
        "model_flops_per_step": model, "hardware_flops_per_step": hw,
        "model_tflops_per_device": model / step_s / devices / 1e12 if step_s > 0 else 0.0,
        "hardware_tflops_per_device": hw / step_s / devices / 1e12 if step_s > 0 else 0.0,
        "mfu": model / step_s / devices / peak if step_s > 0 else 0.0,
        "hfu": hw / step_s / devices / peak if step_s > 0 else 0.0,
        "memory_bytes": memory,
    }


# ------------------------------------------------------------------------------------------ markdown
def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def render_markdown(report: dict) -> str:
    dev, peak = report["device"], report["peak"]
    lines = [f"# megatron-gad bench: {report['config_name']}", "",
             f"`{report['command']}`", "",
             f"- device: {dev['nodes']} node(s) x {dev['per_node']} {dev['kind']} ({dev['name']}); "
             f"{report['world_size']} devices in all; placement {report['layout']['placement']}, "
             f"{report['layout']['workers']} workers, {report['layout']['rollout']} rollout",
             "- layout: " + "; ".join(f"{k} TP {v['tp']} x PP {v['pp']} x DP {v['dp']}"
                                        for k, v in report["layout"]["roles"].items()),
             f"- batch: {report['batch']['prompts']} prompts x {report['batch']['n']} samples per step, "
             f"max prompt {report['batch']['max_prompt_length']} / response {report['batch']['max_response_length']}"
             " tokens",
             f"- peak: {peak['flops_per_s'] / 1e12:.4g} TFLOP/s per device ({peak['source']}: {peak['note']})",
             f"- stages {', '.join(report['stages'])}, {report['steps_per_stage']} steps each; "
             f"{report['steady_state']}",
             f"- git {report['git_commit'] or 'unknown'}{' (dirty)' if report['git_dirty'] else ''}, "
             f"torch {report['torch_version']}, megatron-core {report['megatron_core_version']}", "",
             "| stage | step s | tokens/step | tokens/s/device | model TFLOP/s/device | MFU | HFU |",
             "|---|---|---|---|---|---|---|"]
    for stage, s in report["results"].items():
        lines.append(f"| {stage} | {s['step_seconds']:.3f} | {s['tokens_per_step'].get('step', 0):.0f} | "
                     f"{s['tokens_per_s_per_device']:.1f} | {s['model_tflops_per_device']:.4g} | "
                     f"{s['mfu']:.2%} | {s['hfu']:.2%} |")
    for stage, s in report["results"].items():
        lines += ["", f"## {stage}: per phase (mean over steps {s['measured_steps']})", "",
                  "| phase | s | share | model GFLOP | model TFLOP/s/device | MFU |", "|---|---|---|---|---|---|"]
        for name, p in s["phases"].items():
            share = p["seconds"] / s["step_seconds"] if s["step_seconds"] > 0 else 0.0
            lines.append(f"| {name} | {p['seconds']:.4f} | {share:.1%} | {p['model_flops'] / 1e9:.4g} | "
                         f"{p['model_tflops_per_device']:.4g} | {p['mfu']:.2%} |")
        if s["memory_bytes"]:
            lines += ["", "| role | memory metric | max MiB |", "|---|---|---|"]
            for role, names in s["memory_bytes"].items():
                lines += [f"| {role} | {name} | {b / MiB:.3f} |" for name, b in names.items()]
    ws = report["weight_sync"]
    lines += ["", "## weight sync", ""]
    if ws["syncs"]:
        lines.append(f"{ws['syncs']} syncs: {ws['seconds']:.4f} s each on average (trainer phase), "
                     f"{ws['bytes'] / MiB:.3f} MiB per sync, engine load {ws['load_seconds']:.4f} s")
    else:
        lines.append(f"none ({ws['note']})")
    lines += ["", "Formulas: docs/bench.md. Model FLOPs: forward 1x, backward 2x per pass; hardware FLOPs add "
                  "recompute. Rates per device: a phase over its role's devices, a step over all."]
    return "\n".join(lines) + "\n"
