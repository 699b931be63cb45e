"""``megatron-gad pipeline PIPELINE.yaml``: SeqKD -> warmup -> GAD -> export to Hugging Face from one file.

A pipeline file names its stages in order; each training stage is a config plus overrides and runs as
its own ``megatron-gad train`` subprocess (a fresh process per stage: no Ray or process-group state
carries over), writing into ``OUT/<stage>/``. A stage with ``init_from: <earlier stage>`` starts from that
stage's final checkpoint, passed by path:

* after a ``trainer.mode=sft`` stage (SeqKD): ``actor_rollout_ref.model.path=<its final>/actor`` -- the
  student, its KL reference and (unless ``critic.model.path`` is set) the discriminator's backbone all
  start from the distilled student;
* after a GAD-mode stage (warmup): ``trainer.init_actor_from=<its final>/actor`` and
  ``trainer.init_critic_from=<its final>/critic``.

An ``export: <stage>`` stage writes that stage's final actor as an HF directory ``OUT/<name>/``.

Resumability: each stage directory holds ``pipeline_stage.json`` (written atomically), ``running`` from
the stage's start and ``done`` once its final checkpoint exists, with the stage's *key*: a hash of its
resolved config (minus keys that only say how to run it, :data:`RUN_ONLY_KEYS`) and of the identity of
the checkpoint it started from. A re-run skips ``done`` stages with the same key, resumes ``running`` ones
(``trainer.resume_mode=auto``), and refuses -- naming what changed -- a stage whose key changed, and every
stage after it, unless ``--force`` moves their outputs aside (``OUT/<stage>.replaced-<time>``) and
retrains them. ``--from STAGE`` retrains STAGE and the stages after it.

Signals: USR1 (SLURM's warning before the time limit) is passed to the running stage, which saves and
exits with 75; the pipeline then exits with 75 too (the sbatch script requeues, the next run resumes).
TERM and INT are passed on as well and end the pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import yaml

from megatron_gad.config import ConfigError, GADConfig, load_config, to_dict, validate
from megatron_gad.errors import InputError, RunFailure

MARKER = "pipeline_stage.json"
LATEST = "latest_checkpointed_iteration.txt"  # checkpoint.LATEST (that module imports torch)
# the trainer's exit after saving on USR1 (tests/unit/test_pipeline_spec.py checks both agree)
SAVED_ON_SIGNAL_EXIT = 75
# Keys that say how a stage runs, not what it computes: changing them does not invalidate a stage
# (a requeued job on another Ray address, more nodes, another save cadence or logger).
RUN_ONLY_KEYS = ("ray", "trainer.resume_mode", "trainer.resume_from_path", "trainer.default_local_dir",
                 "trainer.logger", "trainer.log_every", "trainer.sample_log_freq", "trainer.save_freq",
                 "trainer.max_actor_ckpt_to_keep", "trainer.max_critic_ckpt_to_keep", "trainer.nnodes",
                 "trainer.n_gpus_per_node", "trainer.workers", "trainer.project_name", "trainer.experiment_name")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_STAGE_KEYS = ("name", "config", "overrides", "init_from", "export")
_TOP_KEYS = ("output_dir", "overrides", "stages")


class PipelineError(ConfigError):
    """A pipeline file or a pipeline state that cannot run as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config: str | None = None  # training stage: its YAML config
    overrides: tuple[str, ...] = ()
    init_from: str | None = None  # an earlier training stage whose final checkpoint this one starts from
    export: str | None = None  # export stage: the training stage whose final actor becomes an HF directory

    @property
    def kind(self) -> str:
        return "export" if self.export else "train"

    @property
    def source(self) -> str | None:
        return self.export or self.init_from


@dataclasses.dataclass(frozen=True)
class Pipeline:
    path: str
    output_dir: str
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PipelineError(f"{self.path}: no stage named {name!r}{_did_you_mean(name, self.names)}; "
                            f"stages: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.output_dir, name)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _override_list(value, where: str) -> list[str]:
    """``overrides`` as a list of ``key=value`` strings or a mapping ``key: value``."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        # JSON is YAML: lists, booleans and numbers keep their type through the override parser
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise PipelineError(f"{where}: overrides must be a mapping (key: value) or a list of 'key=value' strings")


def load_pipeline(path: str, overrides: list[str] = (), output_dir: str | None = None) -> Pipeline:
    """Read a pipeline file. ``overrides`` (the command line's) apply to every training stage after the
    file's; ``STAGE:key=value`` applies to that stage only. Config paths are relative to the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise PipelineError(f"cannot read pipeline file {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"pipeline file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise PipelineError(f"{path}: a pipeline file is a mapping with a non-empty `stages:` list "
                            "(see configs/pipelines/qwen2.5-7b.yaml)")
    for key in data:
        if key not in _TOP_KEYS:
            raise PipelineError(f"{path}: unknown key {key!r}{_did_you_mean(str(key), list(_TOP_KEYS))}; "
                                f"valid: {', '.join(_TOP_KEYS)}")
    base = Path(path).resolve().parent
    common = _override_list(data.get("overrides"), f"{path}: overrides")
    scoped: dict[str, list[str]] = {}
    for item in overrides:
        key = item.partition("=")[0]
        if key.rpartition(":")[2].strip() == "trainer.default_local_dir":
            raise PipelineError("trainer.default_local_dir is set by the pipeline (OUTPUT_DIR/<stage>); choose the "
                                "pipeline's directory with output_dir: in the file or --out DIR")
        if ":" in key:  # STAGE:key=value
            name, _, rest = item.partition(":")
            scoped.setdefault(name, []).append(rest)
        else:
            common.append(item)
    stages: list[Stage] = []
    for i, raw in enumerate(data["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
            raise PipelineError(f"{where}: each stage needs a `name:` (letters, digits, - and _)")
        for key in raw:
            if key not in _STAGE_KEYS:
                raise PipelineError(f"{where} ({raw['name']}): unknown key {key!r}"
                                    f"{_did_you_mean(str(key), list(_STAGE_KEYS))}; valid: {', '.join(_STAGE_KEYS)}")
        name, earlier = raw["name"], {s.name: s for s in stages}
        if name in earlier:
            raise PipelineError(f"{where}: stage name {name!r} is used twice")
        if ("config" in raw) == ("export" in raw):
            raise PipelineError(f"{where} ({name}): a stage has either `config:` (training) or `export:` "
                                "(an earlier training stage to export to Hugging Face)")
        for key in ("init_from", "export"):
            ref = raw.get(key)
            if ref is not None and (ref not in earlier or earlier[ref].kind != "train"):
                trained = [s.name for s in stages if s.kind == "train"]
                raise PipelineError(f"{where} ({name}): {key}: {ref!r} is not an earlier training stage"
                                    f"{_did_you_mean(str(ref), trained)}; earlier: {', '.join(trained) or 'none'}")
        if "export" in raw:
            if raw.get("overrides") or raw.get("init_from"):
                raise PipelineError(f"{where} ({name}): an export stage takes no overrides or init_from")
            stages.append(Stage(name, export=raw["export"]))
            continue
        config = os.path.normpath(base / str(raw["config"]))
        mine = common + _override_list(raw.get("overrides"), f"{where} ({name})") + scoped.pop(name, [])
        stages.append(Stage(name, config=config, overrides=tuple(mine), init_from=raw.get("init_from")))
    if scoped:
        name = next(iter(scoped))
        raise PipelineError(f"override {name}:{scoped[name][0]}: no training stage named {name!r}"
                            f"{_did_you_mean(name, [s.name for s in stages])}")
    out = output_dir or data.get("output_dir")
    if not out:
        raise PipelineError(f"{path}: set `output_dir:` (or pass --out DIR)")
    return Pipeline(str(path), os.path.abspath(out), tuple(stages))


# ---------------------------------------------------------------- stage configs and keys
INJECTED = ("trainer.init_actor_from", "trainer.init_critic_from")


def injected_overrides(upstream: GADConfig, ckpt: str) -> list[str]:
    """How a stage starts from ``ckpt`` (an earlier stage's final ``global_step_<N>``), by that stage's mode."""
    if upstream.trainer.mode == "sft":
        return [f"actor_rollout_ref.model.path={ckpt}/actor"]
    return [f"trainer.init_actor_from={ckpt}/actor", f"trainer.init_critic_from={ckpt}/critic"]


def stage_config(p: Pipeline, stage: Stage, upstream_ckpt: str | None,
                 configs: dict[str, GADConfig]) -> tuple[GADConfig, list[str]]:
    """The resolved config of a training stage and its full override list (what ``train`` gets).
    ``upstream_ckpt``: the ``init_from`` stage's final checkpoint (or a placeholder before it exists)."""
    own = [f"trainer.default_local_dir={p.stage_dir(stage.name)}", "trainer.resume_mode=auto"]
    if stage.init_from:
        plain = load_config(stage.config, list(stage.overrides))
        taken = [k for k in INJECTED if _get(to_dict(plain), k)]
        if taken:
            raise PipelineError(f"stage {stage.name}: {', '.join(taken)} is set, but the stage starts from stage "
                                f"{stage.init_from!r} (init_from), which sets it; drop one of the two")
        own += injected_overrides(configs[stage.init_from], upstream_ckpt)
    overrides = list(stage.overrides) + own
    try:
        return load_config(stage.config, overrides), overrides
    except ConfigError as e:
        raise PipelineError(f"stage {stage.name}: {e}") from None


def stage_configs(p: Pipeline, stages: tuple[Stage, ...] | None = None) -> dict[str, GADConfig]:
    """Every training stage's resolved config, in order, each upstream checkpoint as a placeholder path."""
    configs: dict[str, GADConfig] = {}
    for s in stages if stages is not None else p.stages:
        if s.kind == "train":
            configs[s.name] = stage_config(p, s, _placeholder(p, s.init_from) if s.init_from else None, configs)[0]
    return configs


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: d}


def hashed_settings(cfg: GADConfig) -> dict:
    """The flat settings a stage's key covers: every resolved key except :data:`RUN_ONLY_KEYS`."""
    flat = _flat(to_dict(cfg))
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(r + ".") for r in RUN_ONLY_KEYS)}


def stage_key(settings: dict, upstream_id: str | None) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _placeholder(p: Pipeline, name: str) -> str:
    """Where a stage's final checkpoint will be, before it exists (and in every stage key: the real
    path holds the step number, which the upstream's identity already covers)."""
    return os.path.join(p.stage_dir(name), "global_step_<final>")


# ---------------------------------------------------------------- markers
def read_marker(stage_dir: str) -> dict | None:
    try:
        with open(os.path.join(stage_dir, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PipelineError(f"{os.path.join(stage_dir, MARKER)} cannot be read ({e}); move {stage_dir} aside "
                            "or rerun with --force") from None


def write_marker(stage_dir: str, marker: dict) -> None:
    from megatron_gad.checkpoint import write_json_atomic

    os.makedirs(stage_dir, exist_ok=True)
    write_json_atomic(os.path.join(stage_dir, MARKER), marker)


def final_checkpoint(stage_dir: str) -> str | None:
    try:
        with open(os.path.join(stage_dir, LATEST)) as f:
            step = int(f.read().strip())
    except (OSError, ValueError):
        return None
    path = os.path.join(stage_dir, f"global_step_{step}")
    return path if os.path.isfile(os.path.join(path, "trainer_state.json")) else None


def _changes(old: dict, new: dict, limit: int = 6) -> str:
    keys = sorted(set(old) | set(new))
    diff = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diff[:limit]) + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")


# ---------------------------------------------------------------- plan
@dataclasses.dataclass
class Step:
    stage: Stage
    action: str  # skip | resume | run | rerun | stale (refused unless --force)
    reason: str
    settings: dict
    marker: dict | None
    config: GADConfig | None = None  # a training stage's resolved config (its upstream as a placeholder)


def plan(p: Pipeline, from_stage: str | None = None, until: str | None = None, force: bool = False) -> list[Step]:
    """What a run would do with each stage, from the files under ``p.output_dir``. Raises
    :class:`PipelineError` naming every changed stage unless ``force``."""
    names = p.names
    start = names.index(p.stage(from_stage).name) if from_stage else None
    stop = names.index(p.stage(until).name) if until else len(names) - 1
    if start is not None and start > stop:
        raise PipelineError(f"--from {from_stage} comes after --until {until}")
    configs = stage_configs(p, p.stages[:stop + 1])
    steps: dict[str, Step] = {}
    changing: set[str] = set()  # stages whose output this run writes anew
    for i, s in enumerate(p.stages[:stop + 1]):
        sd = p.stage_dir(s.name)
        marker = read_marker(sd)
        settings = hashed_settings(configs[s.name]) if s.kind == "train" else {"export": s.export}
        exists = os.path.isdir(sd) and any(os.scandir(sd))
        up_marker = steps[s.source].marker if s.source else None
        if start is not None and i >= start:
            action, reason = ("rerun" if exists else "run"), f"--from {from_stage}"
        elif s.source in changing:
            action, reason = ("stale", f"it starts from stage {s.source!r}, which must run again") if exists else \
                ("run", f"after {s.source}")
        elif marker is None:
            action, reason = ("stale", f"{sd} holds files this pipeline did not write (no {MARKER})") if exists \
                else ("run", "not run yet")
        elif marker.get("key") != stage_key(settings, (up_marker or {}).get("output_id")):
            if s.source and marker.get("upstream") != (up_marker or {}).get("output_id"):
                action, reason = "stale", f"stage {s.source!r}, which it starts from, was retrained since it ran"
            else:
                action, reason = "stale", "its settings changed: " + _changes(marker.get("settings", {}), settings)
        elif marker.get("status") == "done":
            ckpt = os.path.join(sd, marker.get("checkpoint", ""))
            if s.kind == "train" and not os.path.isfile(os.path.join(ckpt, "trainer_state.json")):
                action, reason = "stale", f"it is marked done but its checkpoint {ckpt} is missing"
            else:
                action, reason = "skip", f"done ({marker.get('checkpoint') or sd})"
        else:
            action, reason = "resume", "started before; continues from its latest checkpoint"
        if action == "stale" and force:
            action, reason = "rerun", f"--force: {reason}"
        if action != "skip":
            changing.add(s.name)
        steps[s.name] = Step(s, action, reason, settings, marker, configs.get(s.name))
    stale = [st for st in steps.values() if st.action == "stale"]
    if stale:
        lines = "\n".join(f"  {st.stage.name}: {st.reason}" for st in stale)
        raise PipelineError(f"{len(stale)} stage(s) under {p.output_dir} no longer match the pipeline:\n{lines}\n"
                            "rerun with --force to move their outputs aside (to <stage>.replaced-<time>) and "
                            "retrain them, or restore the settings they ran with")
    return list(steps.values())


def preflight(p: Pipeline, steps: list[Step]) -> dict[str, GADConfig]:
    """Validate every training stage that will run, and the paths its driver reads, before the first
    one starts: the config as written (the earlier stages' checkpoints do not exist yet)."""
    from megatron_gad.controller.preflight import check_loggers, check_paths

    out = {}
    for st in steps:
        s = st.stage
        if s.kind != "train" or st.action == "skip":
            continue
        overrides = list(s.overrides) + [f"trainer.default_local_dir={p.stage_dir(s.name)}"]
        try:
            cfg = load_config(s.config, overrides)
            validate(cfg)
            check_paths(cfg)
            check_loggers(cfg)
        except (ConfigError, InputError) as e:
            raise type(e)(f"stage {s.name} ({s.config}): {e}") from None
        out[s.name] = cfg
    return out


# ---------------------------------------------------------------- run
def say(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Children:
    """The running stage's process and the signals the pipeline got: USR1/TERM/INT are passed to it."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.signals: list[int] = []

    def handler(self, signum, frame) -> None:
        self.signals.append(signum)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self, cmd: list[str]) -> int:
        # its own session: a terminal's Ctrl-C reaches the stage once, through the pipeline
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            while True:
                try:
                    return self.proc.wait()
                except KeyboardInterrupt:  # only if no handler is installed (not the main thread)
                    self.proc.send_signal(signal.SIGINT)
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait()
            self.proc = None


def _move_aside(path: str) -> None:
    if os.path.exists(path):
        dest = base = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while os.path.exists(dest):  # moved twice within a second
            n, dest = n + 1, f"{base}-{n + 1}"
        os.replace(path, dest)
        say(f"moved {path} aside to {dest}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_gad.cli", *args]


def _final_of(p: Pipeline, name: str) -> str:
    marker = read_marker(p.stage_dir(name)) or {}
    return os.path.join(p.stage_dir(name), marker["checkpoint"])


def execute(p: Pipeline, steps: list[Step], children: _Children | None = None) -> int:
    """Run the planned steps in order; returns the exit code (0, the failed stage's, 75 after USR1)."""
    children = children or _Children()
    configs = {st.stage.name: st.config for st in steps if st.config is not None}  # upstream modes
    total = len(steps)
    for i, st in enumerate(steps, 1):
        s, sd = st.stage, p.stage_dir(st.stage.name)
        head = f"stage {i}/{total} {s.name}"
        if st.action == "skip":
            say(f"{head}: {st.reason}; skipped")
            continue
        if children.signals:
            return _stopped(children.signals[-1], f"before {head}")
        if st.action == "rerun":
            _move_aside(sd)
        up = read_marker(p.stage_dir(st.stage.source)) if st.stage.source else None
        upstream_id = (up or {}).get("output_id")
        marker = dict(st.marker) if st.action == "resume" else {"output_id": uuid.uuid4().hex}
        marker.update(stage=s.name, kind=s.kind, key=stage_key(st.settings, upstream_id), upstream=upstream_id,
                      settings=st.settings, status="running", started=marker.get("started", time.time()))
        t0 = time.time()
        if s.kind == "export":
            src = os.path.join(_final_of(p, s.export), "actor")
            tmp = sd + ".partial"
            _move_aside(tmp)
            cmd = _cli("convert", "mcore-to-hf", src, tmp)
            say(f"{head}: export {src} -> {sd}\n  $ {shlex.join(cmd)}")
            rc = children.run(cmd)
            if rc != 0:
                return _failed(head, rc, children)
            marker.update(status="done", finished=time.time(), source=src)
            write_marker(tmp, marker)
            _move_aside(sd)
            os.replace(tmp, sd)
        else:
            src = _final_of(p, s.init_from) if s.init_from else None
            _, overrides = stage_config(p, s, src, configs)
            write_marker(sd, marker)
            cmd = _cli("train", s.config, *overrides)
            what = "resume" if st.action == "resume" else "train"
            say(f"{head}: {what} {s.config} -> {sd}" + (f" (from {src})" if src else "") +
                f"\n  $ {shlex.join(cmd)}")
            rc = children.run(cmd)
            if rc == SAVED_ON_SIGNAL_EXIT:
                say(f"{head}: saved a checkpoint on signal; run the pipeline again to resume this stage")
                return SAVED_ON_SIGNAL_EXIT
            if rc != 0:
                return _failed(head, rc, children)
            final = final_checkpoint(sd)
            if final is None:
                raise RunFailure(f"{head}: train exited 0 but {sd} has no complete checkpoint ({LATEST})")
            marker.update(status="done", finished=time.time(), checkpoint=os.path.basename(final))
            write_marker(sd, marker)
        say(f"{head}: done in {time.time() - t0:.1f} s" +
            (f" ({marker['checkpoint']})" if s.kind == "train" else f" ({sd})"))
    say(f"all {total} stage(s) done; outputs under {p.output_dir}")
    return 0


def _stopped(signum: int, where: str) -> int:
    if signum == signal.SIGUSR1:
        say(f"signal USR1: stopping {where}; run the pipeline again to continue")
        return SAVED_ON_SIGNAL_EXIT
    return 128 + signum


def _failed(head: str, rc: int, children: _Children) -> int:
    if children.signals and children.signals[-1] != signal.SIGUSR1:
        say(f"{head}: stopped by signal {children.signals[-1]}")
        return 128 + children.signals[-1]
    say(f"{head}: failed with exit code {rc} (its messages are above); fix the cause and run the pipeline "
        "again: completed stages are skipped and this one resumes from its latest checkpoint")
    return rc if rc > 0 else 1


def describe(p: Pipeline, steps: list[Step]) -> str:
    width = max(len(s.name) for s in p.stages)
    lines = [f"pipeline {p.path} -> {p.output_dir}"]
    for st in steps:
        s = st.stage
        rel = os.path.relpath(s.config) if s.config else ""
        what = f"export {s.export}" if s.kind == "export" else \
            (rel if not rel.startswith("..") else s.config) + (f" from {s.init_from}" if s.init_from else "")
        lines.append(f"  {s.name:<{width}}  {st.action:<6}  {what}: {st.reason}")
    return "\n".join(lines)


def main_pipeline(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = load_pipeline(args.pipeline, list(args.overrides), args.out)
    steps = plan(p, args.from_stage, args.until, args.force)
    print(describe(p, steps), flush=True)
    cfgs = preflight(p, steps)
    if args.dry_run:
        from megatron_gad.tools.plan import dry_run_report

        for name, cfg in cfgs.items():
            report = dry_run_report(cfg, args.gpu)
            print(f"\n## stage {name}\n" + report[report.index("# layout"):].replace("dry run: nothing started", "")
                  .rstrip(), flush=True)
        print("\ndry run: every stage validated; nothing started", flush=True)
        return 0
    children = _Children()
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, children.handler)
    os.makedirs(p.output_dir, exist_ok=True)
    return execute(p, steps, children=children)
