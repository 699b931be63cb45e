"""``megatron-gad plan CONFIG [KEY=VALUE ...] --gpu KIND --nodes N [--json]``: will a layout fit?

Per role (actor, its frozen reference when the KL term is on, critic) and per phase of a GAD step
(rollout, reward, old / reference log-probs, critic update, actor update): the bytes each GPU holds,
the verdict against the device, the smallest config changes that make it fit (each one re-planned),
and an estimated step time and MFU. Reads the models' ``config.json`` only; imports no torch.
Formulas: ``megatron_gad/planner.py`` and ``docs/memory-plan.md``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache

from megatron_gad.config import (
    ConfigError,
    GADConfig,
    MegatronConfig,
    actor_dp,
    apply_overrides,
    critic_dp,
    critic_model_path,
    load_config,
    padded_vocab_size,
    validate,
)
from megatron_gad.errors import InputError
from megatron_gad.models.arch import Arch, arch_from_hf_config
from megatron_gad.planner import (
    DTYPE_BYTES,
    Recompute,
    StateBytes,
    attention_score_copies,
    attention_scores_elems,
    forward_flops,
    kv_cache_bytes,
    layer_activation_elems_per_token,
    logits_bytes,
    rank_state_bytes,
    stage_params,
    train_activation_bytes,
    worst_seq_lens,
)

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes torch reports as total_memory
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bandwidth: float  # bytes/s


GPUS = {
    "h100-80gb": Gpu("h100-80gb", 81559 * 2**20, 989e12, 3.35e12),
    "h200-141gb": Gpu("h200-141gb", 143771 * 2**20, 989e12, 4.8e12),
    "a100-80gb": Gpu("a100-80gb", 81920 * 2**20, 312e12, 2.039e12),
}
# Assumptions, printed with every plan
GEMM_EFFICIENCY = 0.40  # fraction of peak FLOP/s that prefill, log-prob and update passes reach
DECODE_BW_EFFICIENCY = 0.60  # fraction of HBM bandwidth a decode step reaches (it reads weights + KV cache)
RESERVE_PER_PROCESS = 3 * GiB  # CUDA context, NCCL buffers, allocator fragmentation, per process on a GPU

ROLE_KEYS = {"actor": "actor_rollout_ref.actor", "critic": "critic"}


def _megatron(cfg: GADConfig, role: str) -> MegatronConfig:
    return cfg.actor_rollout_ref.actor.megatron if role == "actor" else cfg.critic.megatron


def _attention_backend(m: MegatronConfig) -> str:
    """The role's core attention backend as its model build resolves it (environment override first)."""
    return os.environ.get("MEGATRON_GAD_ATTENTION_BACKEND", "").strip().lower() or m.attention_backend


def _recompute(m: MegatronConfig) -> Recompute:
    o = m.override_transformer_config
    return Recompute(o.recompute_granularity, o.recompute_method, o.recompute_num_layers)


@lru_cache(maxsize=4096)
def _worst_state(arch: Arch, role: str, tp: int, pp: int, dp: int, dtype: str, dist_opt: bool, vocab: int,
                 trainable: bool) -> StateBytes:
    """The fullest rank of the role (stages differ: embedding first, output layer last; the
    distributed optimizer's shards differ by padding)."""
    best = None
    for pp_rank in range(pp):
        params = stage_params(arch, role, tp, pp, pp_rank, vocab)
        for dp_rank in range(dp if dist_opt and trainable else 1):
            s = rank_state_bytes(params, dtype, dp, dp_rank, dist_opt, trainable)
            if best is None or s.total > best.total:
                best = s
    return best


def uses_vllm(cfg: GADConfig) -> bool:
    """Whether the trainer starts vLLM engines on a GPU cluster (``controller/trainer.py:rollout_engine``:
    ``rollout.name``; auto = vLLM with Ray workers on GPUs; assumed importable there, since a login node
    may lack it). The planner and ``slurm render`` both ask this."""
    r, t = cfg.actor_rollout_ref.rollout, cfg.trainer
    return t.mode == "gad" and t.workers == "ray" and (r.name == "vllm" or (r.name == "auto" and t.device != "cpu"))


def _offloaded(cfg: GADConfig, model: str) -> dict[str, bool]:
    """What ``model`` keeps in host memory between the phases that use it."""
    if model == "reference":  # frozen: weights only
        return dict(params=cfg.actor_rollout_ref.ref.megatron.param_offload, grads=False, optimizer=False)
    m = _megatron(cfg, model)
    return dict(params=m.param_offload, grads=m.grad_offload, optimizer=m.optimizer_offload)


def _tokens(rows: int, dynamic: bool, budget: int, seq: int) -> int:
    return budget if dynamic else rows * seq


def build_plan(cfg: GADConfig, archs: dict[str, Arch], gpu: Gpu) -> dict:
    """The whole plan as plain data (what ``--json`` prints)."""
    d, arr, c, t = cfg.data, cfg.actor_rollout_ref, cfg.critic, cfg.trainer
    P, R = d.max_prompt_length, d.max_response_length
    seq, n, B = P + R, arr.rollout.n, d.train_batch_size
    vocab = padded_vocab_size(archs["actor"].vocab_size, arr.model.make_vocab_size_divisible_by)
    world = t.nnodes * t.n_gpus_per_node
    gad = t.mode == "gad"
    dps = {"actor": actor_dp(cfg), "critic": critic_dp(cfg)}
    roles = {}
    for role in ("actor", "critic") if gad else ("actor",):
        m, a = _megatron(cfg, role), archs[role]
        tp, pp, dp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, dps[role]
        st = _worst_state(a, role, tp, pp, dp, m.params_dtype, m.use_distributed_optimizer, vocab, True)
        roles[role] = dict(tp=tp, pp=pp, dp=dp, params_dtype=m.params_dtype,
                           distributed_optimizer=m.use_distributed_optimizer, sequence_parallel=m.sequence_parallel,
                           offload=[k for k in ("param", "grad", "optimizer") if getattr(m, f"{k}_offload")],
                           recompute=m.override_transformer_config.recompute_granularity, **st.as_dict(),
                           total=st.total)
    if arr.actor.use_kl_loss:
        m = _megatron(cfg, "actor")
        st = _worst_state(archs["actor"], "actor", m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                          dps["actor"], m.params_dtype, False, vocab, False)
        roles["reference"] = dict(roles["actor"], distributed_optimizer=False, recompute=None, **st.as_dict(),
                                  total=st.total, offload=["param"] if arr.ref.megatron.param_offload else [])

    def fwd_transient(role: str, rows: int, dynamic: bool, budget: int) -> float:
        m, a = _megatron(cfg, role), archs[role]
        tp = m.tensor_model_parallel_size
        tokens = _tokens(rows, dynamic, budget, seq)
        # forward only: one layer's working set at a time (eager attention: its score matrices), plus the
        # actor's logits
        elems = layer_activation_elems_per_token(a, tp, m.sequence_parallel) * tokens + attention_scores_elems(
            a, tp, worst_seq_lens(tokens, seq), attention_score_copies(_attention_backend(m), m.params_dtype))
        work = elems * DTYPE_BYTES[m.params_dtype]
        return work + (logits_bytes(vocab, tp, tokens, m.params_dtype) if role == "actor" else 0)

    def train_transient(role: str, tokens: int) -> float:
        m, a = _megatron(cfg, role), archs[role]
        tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        act = train_activation_bytes(a, tp, pp, tokens, m.params_dtype, m.sequence_parallel, _recompute(m),
                                     in_flight=pp, seq_lens=worst_seq_lens(tokens, seq),
                                     score_copies=attention_score_copies(_attention_backend(m), m.params_dtype))
        # the actor's logits and their gradient live through its loss's backward
        return act + (2 * logits_bytes(vocab, tp, tokens, m.params_dtype) if role == "actor" else 0)

    am = _megatron(cfg, "actor")
    rows_rollout = B * n // max(1, dps["actor"])
    r, ref, a_ = arr.rollout, arr.ref, arr.actor
    phases: list[tuple[str, str, float]] = []
    detail = {}  # parts of a phase's transient worth showing on their own
    vllm = uses_vllm(cfg)
    # a vLLM engine process on each GPU of the actor: awake it claims gpu_memory_utilization of the device
    # for its weights, activations and KV cache; asleep (free_cache_engine) its weights are on the host
    # and its KV cache is freed
    budget = int(r.gpu_memory_utilization * gpu.memory) if vllm else 0
    if vllm:
        engine_weights = sum(p.numel for p in stage_params(archs["actor"], "actor", r.tensor_model_parallel_size, 1, 0,
                                                            vocab)) * DTYPE_BYTES[am.params_dtype]
        detail["rollout"] = dict(engine_kind="vllm", engine_budget=budget, engine_weights=engine_weights,
                                 engine_kv_cache=budget - engine_weights)
        phases.append(("rollout", "rollout", 0.0))  # the engine's KV cache is inside its budget
    elif gad:
        kv = kv_cache_bytes(archs["actor"], am.tensor_model_parallel_size, am.pipeline_model_parallel_size,
                            rows_rollout, seq, am.params_dtype)
        prefill = fwd_transient("actor", r.log_prob_micro_batch_size_per_gpu, False, 0) * P / seq
        detail["rollout"] = dict(kv_cache=kv, kv_rows_per_rank=rows_rollout)
        phases.append(("rollout", "actor", kv + prefill))
    if gad:
        phases += [
                   ("reward", "critic", fwd_transient("critic", c.forward_micro_batch_size_per_gpu, c.use_dynamic_bsz,
                                                      c.forward_max_token_len_per_gpu)),
                   ("old_log_prob", "actor", fwd_transient(
                       "actor", r.log_prob_micro_batch_size_per_gpu, r.log_prob_use_dynamic_bsz,
                       r.log_prob_max_token_len_per_gpu))]
        if a_.use_kl_loss:
            phases.append(("ref_log_prob", "reference", fwd_transient(
                "actor", ref.log_prob_micro_batch_size_per_gpu, ref.log_prob_use_dynamic_bsz,
                ref.log_prob_max_token_len_per_gpu)))
        phases.append(("critic_update", "critic", train_transient("critic", _tokens(
            c.ppo_micro_batch_size_per_gpu * (n + 1), c.use_dynamic_bsz, c.ppo_max_token_len_per_gpu, seq))))
    phases.append(("actor_update", "actor", train_transient("actor", _tokens(
        a_.ppo_micro_batch_size_per_gpu, a_.use_dynamic_bsz, a_.ppo_max_token_len_per_gpu, seq))))
    if vllm:  # the actor's weights stream to the awake engine (buckets go through host memory)
        phases.append(("weight_sync", "actor", 0.0))

    colocate = t.placement == "colocate"

    def resident_bytes(model: str, phase: str, phase_model: str) -> int:
        """What ``model`` keeps on the device during ``phase``: everything, except offloaded state
        of a model the phase does not use (weights) or does not update (gradients, optimizer)."""
        r, off = roles[model], _offloaded(cfg, model)
        uses = model == phase_model
        updating = uses and phase.endswith("_update")
        return ((r["weights"] if uses or not off["params"] else 0)
                + (r["grads"] if updating or not off["grads"] else 0)
                + (r["optimizer"] if updating or not off["optimizer"] else 0))

    rows = []
    for name, role, transient in phases:
        # colocated: every GPU holds a rank of every model; split: the phase's role's GPUs hold its models
        on_gpu = list(roles) if colocate else (["critic"] if role == "critic" else
                                               [k for k in roles if k != "critic"])
        resident = sum(resident_bytes(k, name, role) for k in on_gpu)
        engine_here = vllm and "actor" in on_gpu
        awake = name in ("rollout", "weight_sync") or not r.free_cache_engine
        engine = budget if engine_here and awake else 0
        processes = (2 if colocate and gad else 1) + int(engine_here)
        total = resident + engine + transient + processes * RESERVE_PER_PROCESS
        fits = total <= gpu.memory and not (name == "rollout" and vllm and detail["rollout"]["engine_kv_cache"] <= 0)
        rows.append(dict(phase=name, role=role, resident=resident, engine=engine, transient=int(transient),
                         reserve=processes * RESERVE_PER_PROCESS, total=int(total), fits=fits,
                         **detail.get(name, {})))
    peak = max(rows, key=lambda x: x["total"])
    return dict(gpu=gpu.name, device_bytes=gpu.memory, nodes=t.nnodes, gpus_per_node=t.n_gpus_per_node, world=world,
                placement=t.placement, roles=roles, phases=rows, peak_phase=peak["phase"], peak_bytes=peak["total"],
                fits=all(x["fits"] for x in rows), time=_step_time(cfg, archs, gpu, vocab, dps, roles, gad))


def _step_time(cfg: GADConfig, archs: dict[str, Arch], gpu: Gpu, vocab: int, dps: dict, roles: dict,
               gad: bool) -> dict:
    """Every sequence is assumed to reach max_prompt_length + max_response_length (an upper bound)."""
    d, arr, c, t = cfg.data, cfg.actor_rollout_ref, cfg.critic, cfg.trainer
    P, R, n, B = d.max_prompt_length, d.max_response_length, arr.rollout.n, d.train_batch_size
    world = t.nnodes * t.n_gpus_per_node
    role_gpus = {k: world if t.placement == "colocate" else world // 2 for k in ("actor", "critic")}
    speed = gpu.peak_flops * GEMM_EFFICIENCY

    def fl(role: str, seqs: int) -> float:
        return forward_flops(archs[role], role, vocab, [P + R]) * seqs

    def extra(role: str) -> float:  # full recompute runs the forward once more
        return 1.0 if _megatron(cfg, role).override_transformer_config.recompute_granularity == "full" else 0.0

    out = []
    if gad:
        am = _megatron(cfg, "actor")
        prefill = forward_flops(archs["actor"], "actor", vocab, [P]) * B * n
        decode_flops = fl("actor", B * n) - forward_flops(archs["actor"], "actor", vocab, [P]) * B * n
        # each decode step reads this rank's weights and (on average half of the new tokens') KV cache;
        # pipeline stages run one after another for a token
        kv = kv_cache_bytes(archs["actor"], am.tensor_model_parallel_size, am.pipeline_model_parallel_size,
                            B * n // max(1, dps["actor"]), P + R // 2, am.params_dtype)
        step_bytes = (roles["actor"]["weights"] + kv) * am.pipeline_model_parallel_size
        decode_s = max(R * step_bytes / (gpu.hbm_bandwidth * DECODE_BW_EFFICIENCY),
                       decode_flops / (role_gpus["actor"] * speed))
        out.append(dict(phase="rollout", flops=prefill + decode_flops,
                        seconds=prefill / (role_gpus["actor"] * speed) + decode_s))
        out.append(dict(phase="reward", flops=fl("critic", B * n),
                        seconds=fl("critic", B * n) / (role_gpus["critic"] * speed)))
        out.append(dict(phase="old_log_prob", flops=fl("actor", B * n),
                        seconds=fl("actor", B * n) / (role_gpus["actor"] * speed)))
        if arr.actor.use_kl_loss:
            out.append(dict(phase="ref_log_prob", flops=fl("actor", B * n),
                            seconds=fl("actor", B * n) / (role_gpus["actor"] * speed)))
        f = 3 * fl("critic", B * (n + 1)) * c.ppo_epochs  # teacher once per prompt + n students
        out.append(dict(phase="critic_update", flops=f,
                        seconds=f * (3 + extra("critic")) / 3 / (role_gpus["critic"] * speed)))
    seqs = B * n if gad else B
    f = 3 * fl("actor", seqs) * arr.actor.ppo_epochs
    out.append(dict(phase="actor_update", flops=f, seconds=f * (3 + extra("actor")) / 3 / (role_gpus["actor"] * speed)))
    total_s = sum(x["seconds"] for x in out)
    total_f = sum(x["flops"] for x in out)
    return dict(phases=out, step_seconds=total_s, mfu=total_f / (total_s * world * gpu.peak_flops),
                assumptions=dict(gemm_efficiency=GEMM_EFFICIENCY, decode_bandwidth_efficiency=DECODE_BW_EFFICIENCY,
                                 peak_flops=gpu.peak_flops, hbm_bandwidth=gpu.hbm_bandwidth,
                                 sequence_length="every sequence at max_prompt_length + max_response_length"))


# ------------------------------------------------------------------------------------------ suggestions
def _candidates(cfg: GADConfig, gad: bool) -> list[tuple[str, ...]]:
    """Single changes, cheapest first; each a tuple of overrides applied together."""
    out: list[tuple[str, ...]] = []
    for role in ("actor", "critic") if gad else ("actor",):
        key, m = ROLE_KEYS[role], _megatron(cfg, role)
        if not m.use_distributed_optimizer:
            out.append((f"{key}.megatron.use_distributed_optimizer=true",))
        if m.override_transformer_config.recompute_granularity != "full":
            out.append((f"{key}.megatron.override_transformer_config={{recompute_granularity: full, "
                        f"recompute_method: uniform, recompute_num_layers: 1}}",))
        if m.tensor_model_parallel_size > 1 and not m.sequence_parallel:
            out.append((f"{key}.megatron.sequence_parallel=true",))
        if not (m.grad_offload and m.optimizer_offload):
            out.append((f"{key}.megatron.grad_offload=true", f"{key}.megatron.optimizer_offload=true"))
        if not m.param_offload:
            out.append((f"{key}.megatron.param_offload=true",))
    a, c = cfg.actor_rollout_ref, cfg.critic
    if a.actor.use_kl_loss and not a.ref.megatron.param_offload:
        out.append(("actor_rollout_ref.ref.megatron.param_offload=true",))
    if uses_vllm(cfg) and not a.rollout.free_cache_engine:
        out.append(("actor_rollout_ref.rollout.free_cache_engine=true",))
    halve = [("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", a.actor.ppo_micro_batch_size_per_gpu),
             ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
              a.rollout.log_prob_micro_batch_size_per_gpu),
             ("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", a.ref.log_prob_micro_batch_size_per_gpu)]
    if gad:
        halve += [("critic.ppo_micro_batch_size_per_gpu", c.ppo_micro_batch_size_per_gpu),
                  ("critic.forward_micro_batch_size_per_gpu", c.forward_micro_batch_size_per_gpu)]
    out += [(f"{k}={v // 2}",) for k, v in halve if v > 1]
    for role in ("actor", "critic") if gad else ("actor",):
        key, m = ROLE_KEYS[role], _megatron(cfg, role)
        for k in (2, 4):  # same key: at most one of each per suggestion
            out.append((f"{key}.megatron.tensor_model_parallel_size={k * m.tensor_model_parallel_size}",))
            out.append((f"{key}.megatron.pipeline_model_parallel_size={k * m.pipeline_model_parallel_size}",))
    if gad and cfg.trainer.placement == "colocate":
        out.append(("trainer.placement=split",))  # each GPU then holds one role's models only
    return out


def suggest(cfg: GADConfig, archs: dict[str, Arch], gpu: Gpu, max_changes: int = 4, limit: int = 5) -> list[dict]:
    """The smallest sets of candidate changes (fewest first; no superset of a set that already fits)
    after which the re-planned config passes validation and fits; within a size, the fastest first."""
    cands = _candidates(cfg, cfg.trainer.mode == "gad")
    found: list[dict] = []
    chosen: list[set[int]] = []
    for size in range(1, max_changes + 1):
        for combo in itertools.combinations(range(len(cands)), size):
            if any(s <= set(combo) for s in chosen):
                continue
            overrides = [o for i in combo for o in cands[i]]
            keys = [o.split("=", 1)[0] for o in overrides]
            if len(set(keys)) < len(keys):
                continue
            try:
                new = apply_overrides(cfg, overrides)
                validate(new, _arch_dict(archs["actor"]))
            except ConfigError:
                continue
            plan = build_plan(new, archs, gpu)
            if plan["fits"]:
                chosen.append(set(combo))
                found.append(dict(overrides=overrides, peak_bytes=plan["peak_bytes"], peak_phase=plan["peak_phase"],
                                  step_seconds=plan["time"]["step_seconds"]))
        if len(found) >= limit:
            break
    # fewest changes first, then the fastest estimated step (e.g. PP 2 before PP 4)
    found.sort(key=lambda x: (len(x["overrides"]), x["step_seconds"], x["peak_bytes"]))
    return found[:limit]


def _arch_dict(a: Arch) -> dict:
    """The HF-config keys validation reads (its TP/PP divisibility rules)."""
    return {"num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
            "intermediate_size": a.ffn_hidden_size, "vocab_size": a.vocab_size, "num_hidden_layers": a.num_layers,
            "max_position_embeddings": a.max_position_embeddings}


# ------------------------------------------------------------------------------------------ entry points
def load_archs(cfg: GADConfig) -> dict[str, Arch]:
    from megatron_gad.config_checks import _load_arch

    out = {}
    for role, key, path in (("actor", "actor_rollout_ref.model.path", cfg.actor_rollout_ref.model.path),
                            ("critic", "critic.model.path", critic_model_path(cfg))):
        hf = _load_arch(path)
        if hf is None:
            raise InputError(f"{key}={path!r}: no config.json there; the planner reads the model's architecture "
                             f"from <model.path>/config.json (a Hugging Face model or megatron-gad checkpoint dir)")
        try:
            out[role] = arch_from_hf_config(hf)
        except (ValueError, KeyError) as e:
            raise InputError(f"{key}={path!r}: config.json does not describe a supported model ({e})") from None
    return out


def plan_config(cfg: GADConfig, gpu_name: str, with_suggestions: bool = True) -> dict:
    """Validate ``cfg`` against its models and plan it on ``gpu_name``."""
    if gpu_name not in GPUS:
        raise InputError(f"unknown GPU {gpu_name!r}; choose one of {', '.join(GPUS)}")
    archs = load_archs(cfg)
    validate(cfg)
    gpu = GPUS[gpu_name]
    plan = build_plan(cfg, archs, gpu)
    plan["suggestions"] = suggest(cfg, archs, gpu) if with_suggestions and not plan["fits"] else []
    return plan


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def render(plan: dict) -> str:
    lines = [f"device: {plan['nodes']} node(s) x {plan['gpus_per_node']} {plan['gpu']} "
             f"({_gib(plan['device_bytes'])} GiB each), placement={plan['placement']}", "",
             "per rank, GiB (fullest pipeline stage / data-parallel shard):",
             f"{'model':<10} {'TP':>3} {'PP':>3} {'DP':>3} {'dtype':<9} {'dist-opt':<8} {'recompute':<9} "
             f"{'weights':>8} {'grads':>8} {'optim':>8} {'total':>8}"]
    for name, r in plan["roles"].items():
        lines.append(f"{name:<10} {r['tp']:>3} {r['pp']:>3} {r['dp']:>3} {r['params_dtype']:<9} "
                     f"{'yes' if r['distributed_optimizer'] else 'no':<8} {r['recompute'] or '-'!s:<9} "
                     f"{_gib(r['weights']):>8} {_gib(r['grads']):>8} {_gib(r['optimizer']):>8} {_gib(r['total']):>8}")
    lines += ["", "per GPU and phase, GiB (resident models + the rollout engine's share + the phase's activations / "
                  "KV cache + reserve):",
              f"{'phase':<14} {'role':<10} {'resident':>9} {'engine':>7} {'transient':>10} {'reserve':>8} "
              f"{'total':>8}  fits"]
    for p in plan["phases"]:
        lines.append(f"{p['phase']:<14} {p['role']:<10} {_gib(p['resident']):>9} {_gib(p['engine']):>7} "
                     f"{_gib(p['transient']):>10} {_gib(p['reserve']):>8} {_gib(p['total']):>8}  "
                     f"{'yes' if p['fits'] else 'NO'}")
    ro = next((p for p in plan["phases"] if p.get("engine_kind") == "vllm"), None)
    if ro is not None:
        lines.append(f"vLLM engine per GPU: {_gib(ro['engine_budget'])} GiB while awake (rollout."
                     f"gpu_memory_utilization), its weights {_gib(ro['engine_weights'])}, KV cache and activations "
                     f"{_gib(ro['engine_kv_cache'])}" + ("" if ro["engine_kv_cache"] > 0 else
                                                         ": NO room for a KV cache"))
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines += ["", f"verdict: {verdict} (peak {_gib(plan['peak_bytes'])} GiB in {plan['peak_phase']}, device "
                  f"{_gib(plan['device_bytes'])} GiB)"]
    if not plan["fits"]:
        if plan["suggestions"]:
            lines.append("smallest changes that fit (each re-planned):")
            for s in plan["suggestions"]:
                lines.append(f"  - {' '.join(s['overrides'])}  -> peak {_gib(s['peak_bytes'])} GiB "
                             f"({s['peak_phase']}), step ~{s['step_seconds']:.0f} s")
        else:
            lines.append("no combination of up to 4 candidate changes fits; use more GPUs (--nodes) or a larger GPU")
    tm = plan["time"]
    a = tm["assumptions"]
    lines += ["", f"step time estimate (assumes {a['gemm_efficiency']:.0%} of peak {a['peak_flops'] / 1e12:.0f} "
                  f"TFLOP/s for GEMM passes, decode at {a['decode_bandwidth_efficiency']:.0%} of "
                  f"{a['hbm_bandwidth'] / 1e12:.2f} TB/s HBM; {a['sequence_length']}):"]
    for p in tm["phases"]:
        lines.append(f"  {p['phase']:<14} {p['flops'] / 1e15:10.1f} PFLOP {p['seconds']:8.1f} s")
    lines.append(f"  {'step':<14} {'':>16} {tm['step_seconds']:8.1f} s   MFU {tm['mfu']:.1%}")
    return "\n".join(lines)


def main_plan(args) -> int:
    cfg = load_config(args.config, list(args.overrides))
    if args.nodes is not None:
        cfg = replace(cfg, trainer=replace(cfg.trainer, nnodes=args.nodes))
    plan = plan_config(cfg, args.gpu)
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    return 0


def dry_run_report(cfg: GADConfig, gpu_name: str) -> str:
    """``megatron-gad train --dry-run``: what the run would start, without starting it."""
    import yaml

    from megatron_gad.config import to_dict, world_size
    from megatron_gad.controller.placement import BUNDLE, placement_request

    t, gad = cfg.trainer, cfg.trainer.mode == "gad"
    lines = ["# resolved config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "", "# layout"]
    worlds = {}
    for role, dp in (("actor", actor_dp(cfg)), ("critic", critic_dp(cfg))) if gad else (("actor", actor_dp(cfg)),):
        m = _megatron(cfg, role)
        worlds[role] = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * dp
        extra = " (+ its frozen reference on the same ranks)" if role == "actor" and \
            cfg.actor_rollout_ref.actor.use_kl_loss else ""
        lines.append(f"{role}: TP {m.tensor_model_parallel_size} x PP {m.pipeline_model_parallel_size} x DP {dp} = "
                     f"{worlds[role]} ranks{extra}")
    lines += ["", "# placement"]
    if t.workers == "local":
        lines.append("trainer.workers=local: both roles run in the trainer's process; no Ray, no placement group")
    else:
        r = cfg.actor_rollout_ref.rollout
        vllm = uses_vllm(cfg)
        req = placement_request(worlds["actor"], worlds.get("critic", 0), t.placement == "colocate", gad, vllm)
        if vllm:
            lines.append(f"rollout: {worlds['actor'] // r.tensor_model_parallel_size} vLLM engine(s) (TP "
                         f"{r.tensor_model_parallel_size}) on the actor's bundles, weights synced after each update")
        if t.device == "cpu":
            lines.append(f"trainer.device=cpu: {sum(worlds.values())} Ray CPU processes, no placement group")
        else:
            when = "" if t.device == "cuda" else " (trainer.device=auto: when GPUs are present)"
            lines.append(f"Ray placement group{when}: {req.bundles} bundles of {BUNDLE}, strategy PACK, over "
                         f"{t.nnodes} node(s) x {t.n_gpus_per_node} GPUs (world {world_size(cfg)})")
            for role, start in (("actor", req.actor_start), ("critic", req.critic_start)):
                if start is not None:
                    lines.append(f"  {role}: bundles {start}..{start + worlds[role] - 1} (node by node), "
                                 f"{req.gpu_fraction:.3g} GPU per rank")
    plan = plan_config(cfg, gpu_name)
    lines += ["", f"# memory plan on {gpu_name}", render(plan), "", "dry run: nothing started"]
    return "\n".join(lines)


def main_dry_run(cfg: GADConfig, gpu_name: str) -> int:
    print(dry_run_report(cfg, gpu_name), flush=True)
    return 0
