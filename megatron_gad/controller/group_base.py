"""What both worker groups share: a role's worker class, and calling a worker method as its
declaration says (``workers/dispatch.py``). Subclasses say only how the per-rank calls run — Ray
processes (``worker_group.WorkerGroup``) or this process (``local_group.LocalWorkerGroup``). No Ray here."""

from __future__ import annotations

from megatron_gad.parallel.state import Layout
from megatron_gad.workers.dispatch import collect, dispatch_spec, rank_args


def worker_paths(role: str, worker_kwargs: dict) -> list[tuple[str, str, str]]:
    """(config key, path, "model" | "checkpoint") of every path the role's worker reads itself."""
    cfg = worker_kwargs["config"]
    if role == "rollout":  # a vLLM engine reads the model's config.json (and its weights unless synced)
        return [("actor_rollout_ref.model.path", worker_kwargs["model_dir"], "model")]
    if role == "actor":
        out = [("actor_rollout_ref.model.path", cfg.model.path, "model")]
        key = "trainer.init_actor_from"
    else:
        model_key = "critic.model.path" if cfg.model.path else "actor_rollout_ref.model.path"
        out = [(model_key, worker_kwargs["model_path"], "model")]
        key = "trainer.init_critic_from"
    if worker_kwargs.get("init_from"):
        out.append((key, worker_kwargs["init_from"], "checkpoint"))
    return out


def check_worker_paths(role: str, worker_kwargs: dict, where: str) -> None:
    """The preflight checks (same messages, plus ``where``) of the paths the worker reads, run where
    it reads them: on a cluster a path can exist on the driver's node and not on a worker's, or only
    on the workers' nodes (then ``preflight.check_paths`` leaves it to this check)."""
    from megatron_gad.controller.preflight import check_checkpoint, check_model_dir
    from megatron_gad.errors import InputError

    for key, path, kind in worker_paths(role, worker_kwargs):
        try:
            if kind == "model":
                check_model_dir(key, path, need_tokenizer=False)
            else:
                check_checkpoint(key, path, role)
        except InputError as e:
            raise InputError(f"{e} (checked {where})") from None


def dist_timeout_s(worker_kwargs: dict) -> int:
    """The role's process-group timeout: its config section's ``nccl_timeout`` (verl's key; it applies to
    gloo groups on CPU as well)."""
    return worker_kwargs["config"].nccl_timeout


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
        if name.startswith("_") or name in ("role", "worker_cls", "layouts", "dp_size", "procs", "worker",
                                                  "context", "failed", "pids", "nodes"):
            raise AttributeError(name)
        spec = dispatch_spec(self.worker_cls, name)

        def call(*args, **kwargs):
            dp_ranks = [lay.dp_rank for lay in self.layouts]
            return collect(spec, self._execute(name, rank_args(spec, args, dp_ranks), kwargs), dp_ranks)

        call.__name__ = name
        return call
