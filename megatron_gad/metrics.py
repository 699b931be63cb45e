"""Per-step metrics: section timers, reduction over micro-batches and console/JSONL/wandb logging."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

# Module-level clock so tests can replace it without touching the global time module.
_now = time.perf_counter

TIMING_PREFIX = "timing_s/"
# How long an online wandb.init may try to reach the server before the run falls back to offline
# logging (wandb's own default is 90 s); WANDB_INIT_TIMEOUT in the environment overrides it.
WANDB_INIT_TIMEOUT_S = 30.0

log = logging.getLogger("megatron_gad")


def _scalar(value: Any) -> float:
    """A Python float from a number, a numpy scalar or a one-element tensor."""
    if hasattr(value, "item"):
        if hasattr(value, "numel") and value.numel() != 1:
            raise TypeError(f"expected a scalar tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


class Timer:
    """Accumulates wall seconds per named section; ``collect()`` also reports ``timing_s/step``.

    Usage::

        timer.start_step()
        with timer("gen"):
            ...
        metrics.update(timer.collect())   # {"timing_s/gen": ..., "timing_s/step": ...}
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)
        self._step_start = _now()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = _now()
        try:
            yield
        finally:
            self._totals[name] += _now() - start

    def start_step(self) -> None:
        """Clears the sections and starts the step clock (``collect`` does this too)."""
        self._totals.clear()
        self._step_start = _now()

    def collect(self) -> dict[str, float]:
        """The accumulated sections and the step time so far, then starts a new step."""
        out = {TIMING_PREFIX + name: total for name, total in self._totals.items()}
        out[TIMING_PREFIX + "step"] = _now() - self._step_start
        self.start_step()
        return out


def reduce_metrics(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each key over the dicts that contain it (floats, ints, numpy or 0-d tensors)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for entry in metrics:
        for key, value in entry.items():
            sums[key] += _scalar(value)
            counts[key] += 1
    return {key: sums[key] / counts[key] for key in sums}


def fullest_rank(per_rank: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each key's largest value over a role's ranks: for memory metrics, the rank that decides whether
    a layout fits."""
    out: dict[str, float] = {}
    for metrics in per_rank:
        for k, v in metrics.items():
            out[k] = max(out.get(k, v), float(v))
    return out



def trend_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two points or a single x (a metric's
    trend over steps: ``inspect``'s reward trend, the trainer's reward-hacking monitor)."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None

def _json_value(value: Any) -> Any:
    if isinstance(value, (str, bool)):  # e.g. a sample's student_eos stays true/false, not 1.0
        return value
    v = _scalar(value)
    # JSON has no NaN/Inf; keep the line valid and the fact visible.
    return v if math.isfinite(v) else str(v)


# Console columns: (label, candidate keys, format). A candidate also matches "<group>/<candidate>".
_CONSOLE_FIELDS: Sequence[tuple[str, Sequence[str], str]] = (
    ("d_loss", ("d_loss",), "{:.4f}"),
    ("d_acc", ("d_acc",), "{:.3f}"),
    ("pg_loss", ("pg_loss",), "{:.4f}"),
    ("resp_len", ("response_length/mean",), "{:.1f}"),
    ("s/step", ("timing_s/step",), "{:.2f}"),
)


def _find(metrics: Mapping[str, Any], candidates: Sequence[str]) -> Any:
    for cand in candidates:
        if cand in metrics:
            return metrics[cand]
    for key, value in metrics.items():
        if any(key.endswith("/" + cand) for cand in candidates):
            return value
    return None


def format_console_line(step: int, metrics: Mapping[str, Any], total_steps: int | None = None) -> str:
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    if "stage" in metrics:
        parts.append(f"stage {metrics['stage']}")
    for label, candidates, fmt in _CONSOLE_FIELDS:
        value = _find(metrics, candidates)
        if value is not None and not isinstance(value, str):
            parts.append(f"{label} {fmt.format(_scalar(value))}")
    return " | ".join(parts)


def read_step_records(path: str) -> list[dict]:
    """The per-step records of a ``metrics.jsonl`` / ``samples.jsonl`` (objects with an int ``step``);
    a line cut short by a crash is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
    return out


class MetricsLogger:
    """Logs one record per step to the console, ``<out_dir>/metrics.jsonl`` and optionally wandb.

    ``resume_step`` (a resumed run) keeps the JSONL lines with step <= resume_step and drops the rest,
    so the file matches the checkpoint; without it a fresh file is started. wandb logs online (as verl
    does) unless ``WANDB_MODE`` chooses a mode; when the online start fails or times out (no network, no
    API key, server down) it warns once and logs offline under ``<out_dir>/wandb`` (``wandb sync``
    uploads it later), and the run goes on.
    """

    KNOWN_LOGGERS = ("console", "jsonl", "wandb")

    def __init__(
        self,
        out_dir: str | os.PathLike,
        loggers: Sequence[str] = ("console", "jsonl"),
        project: str = "megatron-gad",
        experiment: str | None = None,
        config_dict: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        resume_step: int | None = None,
    ):
        unknown = set(loggers) - set(self.KNOWN_LOGGERS)
        if unknown:
            raise ValueError(f"unknown loggers {sorted(unknown)}; choose from {self.KNOWN_LOGGERS}")
        self.out_dir = str(out_dir)
        self.loggers = tuple(loggers)
        self.total_steps = total_steps
        os.makedirs(self.out_dir, exist_ok=True)
        self.jsonl_path = os.path.join(self.out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(self.out_dir, "samples.jsonl")
        self._resume_step = resume_step
        self._samples = None
        self._jsonl = None
        self._bar = None
        self._wandb = None

        if "jsonl" in self.loggers:
            self._prepare_jsonl(resume_step)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if "console" in self.loggers and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, dynamic_ncols=True, file=sys.stdout)
        if "wandb" in self.loggers:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "logger 'wandb' was requested but wandb is not installed; "
                    "pip install 'megatron-gad[wandb]' or drop 'wandb' from the loggers"
                ) from e
            self._wandb = self._init_wandb(wandb, dict(project=project, name=experiment,
                                                       config=dict(config_dict or {}), dir=self.out_dir))

    def _init_wandb(self, wandb: Any, kwargs: dict) -> Any:
        mode = os.environ.get("WANDB_MODE")
        if mode:  # the person chose (offline, online, disabled): no fallback behind their back
            return wandb.init(mode=mode, **kwargs)
        online = dict(kwargs)
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            online["settings"] = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S)
        try:
            return wandb.init(mode="online", **online)
        except Exception as e:  # wandb raises its own CommError/UsageError/timeout types; any failure falls back
            reason = " ".join(str(e).split()) or type(e).__name__
            log.warning("wandb: cannot log online (%s: %s); logging offline to %s instead, the run goes on "
                        "(upload later with `wandb sync %s`; set WANDB_MODE=offline to skip the online attempt)",
                        type(e).__name__, reason, os.path.join(self.out_dir, "wandb"),
                        os.path.join(self.out_dir, "wandb", "offline-run-*"))
            return wandb.init(mode="offline", **kwargs)

    def _prepare_jsonl(self, resume_step: int | None, path: str | None = None) -> None:
        path = path or self.jsonl_path
        kept: list[str] = []
        if resume_step is not None and os.path.exists(path):
            kept = [json.dumps(r) + "\n" for r in read_step_records(path) if r["step"] <= resume_step]
        # Rewrite via a temp file so a crash here cannot lose the kept history.
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """The per-sample view: one ``samples.jsonl`` line per row (with the step), and a wandb Table
        when wandb is on. Like metrics.jsonl, a resumed run keeps the lines up to its checkpoint."""
        if self._samples is None:
            self._prepare_jsonl(self._resume_step, self.samples_path)
            self._samples = open(self.samples_path, "a", encoding="utf-8")
        for row in rows:
            self._samples.write(json.dumps({"step": int(step), **{k: _json_value(v) for k, v in row.items()}}) + "\n")
        self._samples.flush()
        if self._wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            self._wandb.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                            step=int(step))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._jsonl is not None:
            record = {"step": int(step)}
            record.update({k: _json_value(v) for k, v in metrics.items()})
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if "console" in self.loggers:
            line = format_console_line(step, metrics, self.total_steps)
            if self._bar is not None:
                self._bar.write(line)
                self._bar.n = step
                self._bar.refresh()
            else:
                print(line, flush=True)
        if self._wandb is not None:
            numeric = {k: _scalar(v) for k, v in metrics.items() if not isinstance(v, str)}
            self._wandb.log(numeric, step=int(step))

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()
            self._samples = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
