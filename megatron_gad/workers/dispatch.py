"""The dispatch contract between the controller and a role's workers, declared on worker methods.

A role runs as one worker per rank (TP x PP x DP ranks). The controller never names a worker method
by string: it calls ``group.update_critic(batch, n)`` on a :class:`~megatron_gad.controller.
worker_group.WorkerGroup`, which reads the method's declaration and

* **splits** the arguments: ``Dispatch.ALL`` sends the same arguments to every rank;
  ``Dispatch.DP`` splits the first argument (a dict of tensors, rows along dim 0) into contiguous
  shares, one per data-parallel replica, and every TP/PP rank of replica ``r`` gets share ``r``;
* **collects** the results: with ``Dispatch.ALL`` every rank's value (rank order); with
  ``Dispatch.DP`` one value per replica — from its *collector rank* (TP rank 0 on the last pipeline
  stage, the rank that holds complete outputs) — merged by the method's ``collect`` rule:
  ``"concat"`` (dicts of tensors concatenated along dim 0 in replica order, so row order is the
  input's; replicas' results of different widths are right-padded with 0 to the widest, masks mark
  what is valid) or ``"mean"`` (metric dicts averaged over replicas), or ``"mean_concat"`` (both in
  one dict: tensors with a row dimension concatenated, scalars averaged).

On a rank, a ``Dispatch.DP`` method returns ``None`` except on the collector, so a method body never
checks which rank it runs on. Only the pure split/merge functions live here (no Ray, no Megatron):
tests and tools drive workers directly from spawned ranks with the same semantics.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_gad.metrics import reduce_metrics


class Dispatch(enum.Enum):
    ALL = "all"  # same arguments on every rank; every rank's result
    DP = "dp"  # first argument split over data-parallel replicas; each replica's collector result


COLLECT_RULES = ("list", "concat", "mean", "mean_concat")


@dataclass(frozen=True)
class DispatchSpec:
    mode: Dispatch
    collect: str


def register(mode: Dispatch, collect: str = "list") -> Callable:
    """Declare how the controller calls a worker method (see the module docstring)."""
    if collect not in COLLECT_RULES:
        raise ValueError(f"collect must be one of {COLLECT_RULES}, got {collect!r}")
    if mode is Dispatch.ALL and collect != "list":
        raise ValueError("Dispatch.ALL returns every rank's result: collect='list'")
    if mode is Dispatch.DP and collect == "list":
        raise ValueError("Dispatch.DP needs a merge rule: collect='concat' or 'mean'")
    spec = DispatchSpec(mode, collect)

    def wrap(fn: Callable) -> Callable:
        if mode is Dispatch.ALL:
            fn.__dispatch__ = spec
            return fn

        @functools.wraps(fn)
        def on_rank(self, *args, **kwargs):
            out = fn(self, *args, **kwargs)
            return out if self.is_collector() else None

        on_rank.__dispatch__ = spec
        return on_rank

    return wrap


def dispatch_spec(cls: type, name: str) -> DispatchSpec:
    """The declaration of ``cls.name``; a clear error for methods that are not dispatchable."""
    fn = getattr(cls, name, None)
    spec = getattr(fn, "__dispatch__", None)
    if spec is None:
        exposed = sorted(n for n in dir(cls) if getattr(getattr(cls, n, None), "__dispatch__", None))
        raise AttributeError(f"{cls.__name__}.{name} is not a registered worker method; "
                             f"registered: {', '.join(exposed)}")
    return spec


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Contiguous row shares (uneven allowed) of every tensor in ``batch``, one per replica."""
    keys = list(batch)
    chunks = {k: torch.tensor_split(batch[k], parts) for k in keys}
    return [{k: chunks[k][i] for k in keys} for i in range(parts)]


def rank_args(spec: DispatchSpec, args: tuple, dp_ranks: list[int]) -> list[tuple]:
    """The positional arguments each rank receives (``dp_ranks[r]``: rank r's replica)."""
    if spec.mode is Dispatch.ALL:
        return [args] * len(dp_ranks)
    if not args or not isinstance(args[0], dict):
        raise TypeError("a Dispatch.DP method takes the batch (a dict of tensors) as its first argument")
    shares = split_batch(args[0], max(dp_ranks) + 1)
    return [(shares[d], *args[1:]) for d in dp_ranks]


def collect(spec: DispatchSpec, results: list[Any], dp_ranks: list[int]) -> Any:
    """Every rank's return value (rank order) -> what the controller gets."""
    if spec.mode is Dispatch.ALL:
        return results
    by_replica = {d: r for r, d in zip(results, dp_ranks) if r is not None}
    missing = sorted(set(dp_ranks) - set(by_replica))
    if missing:
        raise RuntimeError(f"no collector result from data-parallel replica(s) {missing}")
    return merge(spec.collect, [by_replica[d] for d in sorted(by_replica)])


def merge(collect: str, per_replica: list[Any]) -> Any:
    """Merge the collector results of the replicas (in replica order) by the declared rule."""
    if collect == "mean":
        return reduce_metrics(per_replica)
    if collect == "concat":
        return {k: _cat_ragged([r[k] for r in per_replica]) for k in per_replica[0]}
    if collect == "mean_concat":  # metrics (scalars) averaged, per-row tensors concatenated
        rows = [k for k, v in per_replica[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0]
        out = reduce_metrics([{k: v for k, v in r.items() if k not in rows} for r in per_replica])
        return dict(out, **{k: _cat_ragged([r[k] for r in per_replica]) for k in rows})
    return per_replica


def _cat_ragged(parts: list[torch.Tensor]) -> torch.Tensor:
    if parts[0].dim() > 1:
        width = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1])) for p in parts]
    return torch.cat(parts, 0)
