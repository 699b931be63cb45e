"""A role's worker hosted in the controller's own process: the worker group without Ray.

``LocalWorkerGroup`` is :class:`~megatron_gad.controller.worker_group.WorkerGroup` at world size 1:
one worker, built in this process, called through the same declared dispatch (``rank_args`` /
``collect`` of ``workers/dispatch.py``), so ``group.update_critic(batch, n)`` returns what the Ray
group would. It needs no Ray at all, which is what a machine without Ray (the GPU check machine,
``benchmarks/gpu_check.py``) and quick single-device runs use (``trainer.workers=local``).

Both roles may live in one process: at TP = PP = 1 the second ``ModelShard`` finds Megatron's
model-parallel state already built for its layout and reuses it (``parallel/state.py:
init_model_parallel``); other layouts need one process per role (the Ray groups). The process
group (world size 1, gloo on CPU, NCCL on a GPU) is joined on first use and left to the process.

Every call is a process entry in the sense of ``docs/architecture.md``: it enters
``cpu_device_mode()`` (a no-op with CUDA), as ``WorkerProcess.setup`` / ``execute`` do.
"""

from __future__ import annotations

import gc

import torch

from megatron_gad.controller.group_base import DeclaredGroup, check_worker_paths, dist_timeout_s, worker_class
from megatron_gad.parallel.state import Layout


def ensure_single_process_group(timeout_s: int | None = None) -> None:
    """Join a world-size-1 process group on this host unless one exists (the first role's
    ``nccl_timeout`` then serves both)."""
    import torch.distributed as dist

    from megatron_gad.parallel import state
    from megatron_gad.parallel.launch import free_port

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"a local worker group needs a world-size-1 process group, found "
                               f"{dist.get_world_size()} ranks; use the Ray worker groups")
        return
    state.init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=timeout_s or state.DEFAULT_TIMEOUT_S)


class LocalWorkerGroup(DeclaredGroup):
    """One rank of ``role`` in this process. ``group.<method>(...)`` calls the worker method of that
    name as its declaration says (world size 1: one replica, whose collector is this rank)."""

    def __init__(self, role: str, worker_kwargs: dict):
        from megatron_gad.parallel.cpu_compat import cpu_device_mode

        self.role = role
        self.worker_cls = worker_class(role)
        self.context: dict = {}  # the trainer's step (kept for the same interface as the Ray group)
        check_worker_paths(role, worker_kwargs, where="in the trainer's process")
        ensure_single_process_group(dist_timeout_s(worker_kwargs))
        with cpu_device_mode():
            self.worker = self.worker_cls(**worker_kwargs)
        self.layouts: list[Layout] = [self.worker.layout]
        if self.layouts[0].world_size != 1:
            raise RuntimeError(f"{role}: a local worker group holds one rank, got layout {self.layouts[0]}")
        self.dp_size = self.layouts[0].dp_size

    def _execute(self, name: str, per_rank_args: list[tuple], kwargs: dict) -> list:
        from megatron_gad.parallel.cpu_compat import cpu_device_mode

        (args,) = per_rank_args  # world size 1: one rank
        with cpu_device_mode():
            return [getattr(self.worker, name)(*args, **kwargs)]

    def shutdown(self) -> None:
        """Drop the worker (and its GPU memory); the process group stays for the process."""
        self.__dict__.pop("worker", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
