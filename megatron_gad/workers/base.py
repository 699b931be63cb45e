"""What every role's worker shares: its layout, the collector rank, checkpoints and probes.

A worker is the plain-Python object that serves one role on one rank (Ray hosts it in a
``WorkerProcess``; tests and tools construct it directly in spawned ranks). Its public methods are
declared with :func:`~megatron_gad.workers.dispatch.register`; nothing else is callable from the
controller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megatron_gad.engine.model_shard import ModelShard
from megatron_gad.parallel import state
from megatron_gad.workers.dispatch import Dispatch, register

GiB = 2**30


class PhaseMemory:
    """Device memory of one role's models per pass, and what goes to host memory between passes.

    ``offloads``: each model with the state kinds it keeps on the host between passes (``params``,
    ``grads``, ``optimizer``; a pass reloads what it needs itself). ``with memory.phase("update"):``
    records ``memory/<role>/<phase>_bytes`` (the weights, gradients and optimizer state the role's
    models hold on the device at the pass's end, walked storage by storage: the CPU twin of the GPU
    number) and, on GPU, ``memory/<role>/<phase>_peak_gb`` (the allocator's peak during the pass,
    activations included); then it offloads and records ``memory/<role>/idle_bytes``."""

    def __init__(self, role: str, offloads: list[tuple[ModelShard, dict[str, bool]]]):
        self.role = role
        self.offloads = offloads
        self.metrics: dict[str, float] = {}  # the latest value per phase (memory_metrics())

    def held_bytes(self) -> int:
        return sum(sum(shard.held_bytes().values()) for shard, _ in self.offloads)

    def settle(self) -> None:
        """Move what the config says to host memory (after a pass, a checkpoint save or load)."""
        for shard, kinds in self.offloads:
            shard.offload(**kinds)

    @contextlib.contextmanager
    def phase(self, name: str):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        yield
        prefix = f"memory/{self.role}/"
        self.metrics[f"{prefix}{name}_bytes"] = float(self.held_bytes())
        if cuda:
            self.metrics[f"{prefix}{name}_peak_gb"] = torch.cuda.max_memory_allocated() / GiB
        self.settle()
        self.metrics[f"{prefix}idle_bytes"] = float(self.held_bytes())


class Worker:
    """Subclasses set ``self.shard`` (the role's trainable :class:`ModelShard`) and ``self.memory``
    (its :class:`PhaseMemory`)."""

    shard: ModelShard
    memory: PhaseMemory

    @property
    def layout(self):
        return self.shard.layout

    def is_collector(self) -> bool:
        """One rank per data-parallel replica (TP rank 0, last stage) holds complete outputs."""
        return self.layout.tp_rank == 0 and self.layout.is_last_stage

    def _equal_count(self, partition: Callable[[int], list], sync: bool) -> list:
        """``partition(min_count)``'s micro-batches. With ``sync`` (token budgets) every data-parallel
        replica runs as many as the replica that needs most: balanced work, and per-micro-batch metrics
        weigh the same everywhere. Partitions once; again only when another replica needs more."""
        parts = partition(1)
        if sync:
            need = int(state.all_reduce_dp([len(parts)], op="max")[0])
            if need > len(parts):
                parts = partition(need)
        return parts

    @register(Dispatch.ALL)
    def optimizer_state_bytes(self) -> int:
        return self.shard.optimizer_state_bytes()

    @register(Dispatch.ALL)
    def weights_fingerprint(self) -> float:
        return self.shard.weights_sum()

    @register(Dispatch.ALL)
    def memory_metrics(self) -> dict[str, float]:
        """``memory/<role>/...`` of the latest pass of each phase (see :class:`PhaseMemory`)."""
        return dict(self.memory.metrics)

    @register(Dispatch.ALL)
    def save(self, path: str, extra: dict) -> None:
        self.shard.save(path, extra, with_optimizer=self.shard.optimizer is not None)
        self.memory.settle()  # saving brought everything back; the next phase may be another role's

    @register(Dispatch.ALL)
    def load(self, path: str) -> dict:
        extra = self.shard.load(path, with_optimizer=True)
        self.memory.settle()
        return extra
