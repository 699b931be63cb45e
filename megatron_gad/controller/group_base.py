"""What both worker groups share: a role's worker class, and calling a worker method as its
declaration says (``workers/dispatch.py``). Subclasses say only how the per-rank calls run — Ray
processes (``worker_group.WorkerGroup``) or this process (``local_group.LocalWorkerGroup``). No Ray here."""

from __future__ import annotations

from megatron_gad.parallel.state import Layout
from megatron_gad.workers.dispatch import collect, dispatch_spec, rank_args


def worker_class(role: str) -> type:
    if role == "actor":
        from megatron_gad.workers.actor import ActorWorker

        return ActorWorker
    if role == "critic":
        from megatron_gad.workers.critic import CriticWorker

        return CriticWorker
    if role == "rollout":
        from megatron_gad.workers.rollout import RolloutWorker

        return RolloutWorker
    raise ValueError(f"role must be 'actor', 'critic' or 'rollout', got {role!r}")


class DeclaredGroup:
    """``group.<method>(*args)`` for any registered worker method: split the arguments per rank
    (``rank_args``), run them (``_execute``), merge what the collectors return (``collect``)."""

    role: str
    worker_cls: type
    layouts: list[Layout]
    dp_size: int

    def _execute(self, name: str, per_rank_args: list[tuple], kwargs: dict) -> list:
        """Every rank's return value of ``worker.name(*per_rank_args[r], **kwargs)``, rank order."""
        raise NotImplementedError

    def __getattr__(self, name: str):
        # only reached for names the instance lacks; attributes set in __init__ never get here
        if name.startswith("_") or name in ("role", "worker_cls", "layouts", "dp_size", "procs", "worker"):
            raise AttributeError(name)
        spec = dispatch_spec(self.worker_cls, name)

        def call(*args, **kwargs):
            dp_ranks = [lay.dp_rank for lay in self.layouts]
            return collect(spec, self._execute(name, rank_args(spec, args, dp_ranks), kwargs), dp_ranks)

        call.__name__ = name
        return call
