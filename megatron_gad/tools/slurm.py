"""``megatron-gad slurm render``: an sbatch script derived from a config, so the allocation, the Ray
cluster and the trainer's layout agree by construction.

The node and GPU counts become both the ``#SBATCH`` lines and the ``trainer.nnodes`` /
``trainer.n_gpus_per_node`` overrides; the config with those overrides goes through the same
``validate`` as ``train`` and the same per-node bundle mapping as the trainer's placement
(``controller/placement.py:rank_bundles``), so a request that cannot hold the layout is refused here,
before anything is queued. Rendering is a pure function of its arguments (``render_script``); the CLI
entry point only adds writing the file and creating ``OUT/logs`` (SLURM does not create the
``--output`` directory). Only the standard library and the config module are imported: this runs on
login nodes.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from megatron_gad.config import ConfigError, GADConfig, actor_dp, critic_dp, load_config, validate
from megatron_gad.tools.plan import uses_vllm

TEMPLATE = Path(__file__).with_name("templates") / "gad.sbatch"
# The trainer's exit code after saving a checkpoint on SIGUSR1 (controller/trainer.py, which imports
# torch, so the number is repeated here; tests/unit/test_slurm.py checks both agree).
SAVED_ON_SIGNAL_EXIT = 75
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM's --time forms: M, M:S, H:M:S, D-H[:M[:S]]


@dataclass(frozen=True)
class Request:
    nodes: int
    gpus_per_node: int
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    container: str | None = None
    venv: str | None = None
    job_name: str = "megatron-gad"
    cpus_per_task: int | None = None  # default: 8 per GPU
    ray_port: int = 6379
    join_timeout_s: int = 300
    bench: str | None = None  # `megatron-gad bench` flags: the job benchmarks the config instead of training


def layout_overrides(req: Request) -> list[str]:
    """The overrides that make the config's world size the allocation's."""
    return [f"trainer.nnodes={req.nodes}", f"trainer.n_gpus_per_node={req.gpus_per_node}"]


def cpus_per_node(req: Request) -> int:
    return req.cpus_per_task or 8 * req.gpus_per_node


def placement_summary(cfg: GADConfig) -> list[str]:
    """What the trainer will ask Ray for, in the words of ``controller/placement.py`` (the script's header)."""
    from megatron_gad.controller.placement import BUNDLE, placement_request

    worlds = _worlds(cfg)
    vllm = uses_vllm(cfg)
    pr = placement_request(worlds["actor"], worlds.get("critic", 0), cfg.trainer.placement == "colocate",
                           "critic" in worlds, vllm)
    lines = [f"Ray placement group: {pr.bundles} bundles of {BUNDLE} (PACK, node by node)"]
    for role, start in (("actor", pr.actor_start), ("critic", pr.critic_start)):
        if start is not None:
            m = cfg.actor_rollout_ref.actor.megatron if role == "actor" else cfg.critic.megatron
            lines.append(f"  {role}: TP {m.tensor_model_parallel_size} x PP {m.pipeline_model_parallel_size} x DP "
                         f"{worlds[role] // (m.tensor_model_parallel_size * m.pipeline_model_parallel_size)} on "
                         f"bundles {start}..{start + worlds[role] - 1}")
    if vllm:
        rtp = cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
        lines.append(f"  rollout: {worlds['actor'] // rtp} vLLM engine(s) (TP {rtp}) on the actor's bundles")
    lines.append(f"  each rank's process: {pr.gpu_fraction:.4g} GPU and {pr.gpu_fraction:.4g} CPU of its bundle")
    return lines


def _worlds(cfg: GADConfig) -> dict[str, int]:
    def world(m, dp: int) -> int:
        return m.tensor_model_parallel_size * m.pipeline_model_parallel_size * dp

    out = {"actor": world(cfg.actor_rollout_ref.actor.megatron, actor_dp(cfg))}
    if cfg.trainer.mode == "gad":
        out["critic"] = world(cfg.critic.megatron, critic_dp(cfg))
    return out


def check_request(cfg: GADConfig, req: Request) -> None:
    """Refuse an allocation that cannot hold the config's layout, naming the numbers.

    ``cfg`` already carries the allocation's nnodes / n_gpus_per_node; ``validate`` checks TP*PP against
    the world size and the batch sizes against DP. On top of that every TP group must sit on one node,
    checked with the trainer's own bundle mapping on the allocation's node shape, vLLM engine TP groups
    included, and each node's Ray CPUs must cover the placement group's one CPU per GPU bundle."""
    from megatron_gad.controller.placement import BUNDLE, placement_request, rank_bundles

    if req.time is not None and not _TIME.match(req.time):
        raise ConfigError(f"--time {req.time!r} is not a SLURM time (e.g. 24:00:00, 2-00:00:00, 90)")
    if cfg.trainer.workers != "ray":
        raise ConfigError("trainer.workers=local runs without Ray on one device; a SLURM job needs "
                          "trainer.workers=ray")
    validate(cfg)
    bundle_nodes = [f"node{i}" for i in range(req.nodes) for _ in range(req.gpus_per_node)]
    colocate = cfg.trainer.placement == "colocate"
    roles = [("actor", cfg.actor_rollout_ref.actor.megatron, actor_dp(cfg))]
    if cfg.trainer.mode == "gad":
        roles.append(("critic", cfg.critic.megatron, critic_dp(cfg)))
    start = 0
    for role, m, dp in roles:
        tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        world = tp * pp * dp
        if tp > req.gpus_per_node:
            raise ConfigError(f"{role}: TP={tp} needs {tp} GPUs on one node, but --gpus-per-node is "
                              f"{req.gpus_per_node}; lower {role}'s tensor_model_parallel_size or use bigger nodes")
        try:
            rank_bundles(bundle_nodes, world, tp, start, role)
        except ValueError as e:
            raise ConfigError(f"{req.nodes} nodes x {req.gpus_per_node} GPUs cannot hold the layout "
                              f"(TP={tp} x PP={pp} x DP={dp} for the {role}, placement="
                              f"{cfg.trainer.placement}): {e}") from None
        if not colocate:
            start += world
    if uses_vllm(cfg):  # engines sit on the actor's bundles, one per rollout-TP group of them
        rtp = cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
        world = _worlds(cfg)["actor"]
        if rtp > req.gpus_per_node or world % rtp:
            raise ConfigError(f"rollout: a vLLM engine of TP={rtp} needs {rtp} GPUs on one node and the actor's "
                              f"{world} GPUs in whole engines (--gpus-per-node {req.gpus_per_node}); lower "
                              "actor_rollout_ref.rollout.tensor_model_parallel_size")
        try:
            rank_bundles(bundle_nodes, world, rtp, 0, "rollout (vLLM engines)")
        except ValueError as e:
            raise ConfigError(f"{req.nodes} nodes x {req.gpus_per_node} GPUs cannot hold the vLLM engines: "
                              f"{e}") from None
    worlds = _worlds(cfg)
    pr = placement_request(worlds["actor"], worlds.get("critic", 0), colocate, "critic" in worlds, uses_vllm(cfg))
    per_node = min(pr.bundles, req.gpus_per_node)
    if per_node * BUNDLE["CPU"] > cpus_per_node(req):
        engines = " (actor, critic and vLLM engine processes share each bundle's CPU)" if uses_vllm(cfg) else ""
        raise ConfigError(f"Ray gets {cpus_per_node(req)} CPUs per node (--cpus-per-task), but the trainer's placement "
                          f"group asks {BUNDLE['CPU']} CPU per GPU bundle, {per_node} bundles per node{engines}: "
                          f"it would wait forever; raise --cpus-per-task to at least {per_node * BUNDLE['CPU']}")


def _q(value: str) -> str:
    return shlex.quote(value)


def _train_args(overrides: list[str], resume: bool) -> str:
    args = list(overrides)
    if resume:
        args.append("trainer.resume_mode=auto")  # a requeued job continues from the latest checkpoint
    return "".join(f"  {_q(a)} \\\n" for a in args)


def _bench_flags(req: Request, config_path: str, out: str) -> str:
    """``--bench "--steps 5 ..."``: the bench flags, with a report per node count under ``$OUT/bench``
    unless ``--out`` / ``--name`` are given (``bench --aggregate OUT/bench/*.json`` then compares them)."""
    try:
        flags = shlex.split(req.bench)
    except ValueError as e:
        raise ConfigError(f"--bench {req.bench!r}: {e}") from None
    if "--aggregate" in flags or any(not f.startswith("-") and "=" in f for f in flags):
        raise ConfigError(f"--bench {req.bench!r}: give bench's own flags (--steps, --stages, --out, --name, --gpu); "
                          "config overrides go before --nodes as for train, and --aggregate runs on a login node")
    if "--out" not in flags:
        flags += ["--out", os.path.join(out, "bench")]
    if "--name" not in flags:
        stem = os.path.splitext(os.path.basename(config_path))[0]
        flags += ["--name", f"bench_{stem}_{req.nodes}x{req.gpus_per_node}"]
    return " " + shlex.join(flags)


def _stage_configs(pipeline_path: str, overrides: list[str]):
    from megatron_gad.tools.pipeline import load_pipeline, stage_configs

    p = load_pipeline(pipeline_path, overrides)
    return p, stage_configs(p)


def render_script(config_path: str, overrides: list[str], req: Request, pipeline: bool = False) -> str:
    """The sbatch script for ``config_path`` + ``overrides`` on ``req``'s allocation (deterministic).
    ``pipeline``: ``config_path`` is a pipeline file; the job runs ``megatron-gad pipeline`` and every
    training stage's layout is checked against the allocation.

    Raises ConfigError when the config is invalid or the allocation cannot hold its layout."""
    if req.container and req.venv:
        raise ConfigError("--container and --venv are alternatives: the job runs in one environment")
    overrides = list(overrides) + layout_overrides(req)
    if pipeline:
        p, cfgs = _stage_configs(config_path, overrides)
        summary = []
        for name, cfg in cfgs.items():
            try:
                check_request(cfg, req)
            except ConfigError as e:
                raise ConfigError(f"stage {name}: {e}") from None
            summary += [f"stage {name} ({cfg.trainer.mode}):"] + [f"  {line}" for line in placement_summary(cfg)]
        if req.bench is not None:
            raise ConfigError("--bench and --pipeline are alternatives: bench one training config at a time")
        out, command, out_arg = p.output_dir, "pipeline", '--out "$OUT"'
        args = _train_args(overrides, resume=False)  # the pipeline resumes every stage itself
    else:
        cfg = load_config(config_path, overrides)
        check_request(cfg, req)
        summary = placement_summary(cfg)
        out = os.path.abspath(cfg.trainer.default_local_dir)
        command, out_arg = "train", 'trainer.default_local_dir="$OUT"'
        if req.bench is not None:  # a benchmark job: bench's flags after the run directory
            command, out_arg = "bench", out_arg + _bench_flags(req, config_path, out)
        # default_local_dir is passed by the script itself (as $OUT), after the user's overrides
        args = _train_args([o for o in overrides if not o.startswith("trainer.default_local_dir=")],
                           resume=req.bench is None)
    config_abs = os.path.abspath(config_path)
    cpus = cpus_per_node(req)
    extra = "".join(f"#SBATCH --{k}={v}\n" for k, v in
                    (("partition", req.partition), ("account", req.account), ("time", req.time)) if v)
    activate = f"source {_q(os.path.join(os.path.abspath(req.venv), 'bin', 'activate'))}" if req.venv else \
        "# (no --venv / --container: the submitting shell's environment is used)"
    container, on_head = "", ""
    if req.container:
        # the run directory and the config must be visible inside the container; add data/model mounts
        # with CONTAINER_MOUNTS=src:dst,... at submission
        mounts = f"{out}:{out},{os.path.dirname(config_abs)}:{os.path.dirname(config_abs)}"
        container = f"{_q('--container-image=' + req.container)} " \
                    f"\"--container-mounts={mounts}${{CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}}\""
        on_head = 'srun --overlap --nodes=1 --ntasks=1 -w "$head_node" "${CONTAINER[@]}"'
    values = {
        "CONFIG": config_abs, "JOB_NAME": req.job_name, "NODES": str(req.nodes), "GPUS": str(req.gpus_per_node),
        "CPUS": str(cpus), "EXTRA_SBATCH": extra, "OUT": out, "OUT_Q": _q(out), "CONFIG_Q": _q(config_abs),
        "ACTIVATE": activate, "CONTAINER_OPTS": container, "ON_HEAD": on_head, "RAY_PORT": str(req.ray_port),
        "JOIN_TIMEOUT": str(req.join_timeout_s), "TRAIN_ARGS": args.rstrip("\n"), "COMMAND": command,
        "OUT_ARG": out_arg, "PLACEMENT": "".join(f"#   {line}\n" for line in summary),
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    text = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], text)
    if f"SAVED_ON_SIGNAL={SAVED_ON_SIGNAL_EXIT}" not in text:  # the template and the trainer must agree
        raise AssertionError("templates/gad.sbatch: SAVED_ON_SIGNAL differs from SAVED_ON_SIGNAL_EXIT")
    return text


def main_slurm(args) -> int:
    req = Request(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                  account=args.account, time=args.time, container=args.container, venv=args.venv,
                  job_name=args.job_name, cpus_per_task=args.cpus_per_task, ray_port=args.ray_port,
                  join_timeout_s=args.join_timeout, bench=getattr(args, "bench", None))
    text = render_script(args.config, list(args.overrides), req, pipeline=args.pipeline)
    if args.out in (None, "-"):
        print(text, end="")
        return 0
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(args.out, 0o755)
    out_dir = re.search(r"^OUT=(.*)$", text, re.M).group(1)
    logs = os.path.join(shlex.split(out_dir)[0], "logs")
    try:
        os.makedirs(logs, exist_ok=True)  # sbatch --output needs the directory to exist at submission
        note = f"logs will be in {logs}"
    except OSError as e:
        note = f"create {logs} before submitting ({e.strerror}): SLURM does not create the --output directory"
    print(f"wrote {args.out} ({req.nodes} nodes x {req.gpus_per_node} GPUs); {note}; submit with: sbatch {args.out}")
    return 0
