"""What every role's worker shares: its layout, the collector rank, checkpoints and probes.

A worker is the plain-Python object that serves one role on one rank (Ray hosts it in a
``WorkerProcess``; tests and tools construct it directly in spawned ranks). Its public methods are
declared with :func:`~megatron_gad.workers.dispatch.register`; nothing else is callable from the
controller.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_gad.engine.model_shard import ModelShard
from megatron_gad.parallel import state
from megatron_gad.workers.dispatch import Dispatch, register


class Worker:
    """Subclasses set ``self.shard`` (the role's trainable :class:`ModelShard`)."""

    shard: ModelShard

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
    def save(self, path: str, extra: dict) -> None:
        self.shard.save(path, extra, with_optimizer=self.shard.optimizer is not None)

    @register(Dispatch.ALL)
    def load(self, path: str) -> dict:
        return self.shard.load(path, with_optimizer=True)
