"""Ray actors hosting one role's ranks, and data-parallel dispatch/collection.

A role (actor or discriminator) is ``world`` Ray actors that join one process group and build
Megatron's TP x PP x DP grid among themselves. The controller sends each data-parallel replica its
share of a batch (every TP/PP rank of the replica gets the same share) and reads the results from
the replica's collector rank (TP rank 0 on the last pipeline stage).
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from megatron_gad.parallel.state import Layout

_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


@ray.remote
class RankActor:
    """One rank: joins the role's process group, then hosts an ActorWorker or CriticWorker."""

    def node_ip_and_port(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def setup(self, kind: str, rank: int, world: int, addr: str, port: int, kwargs: dict) -> Layout:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
        from megatron_gad.parallel import state

        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        state.init_distributed(rank, world, addr, port)
        if kind == "actor":
            from megatron_gad.workers.actor import ActorWorker

            self.worker = ActorWorker(**kwargs)
        else:
            from megatron_gad.workers.critic import CriticWorker

            self.worker = CriticWorker(**kwargs)
        return self.worker.layout

    def call(self, method: str, *args, **kwargs):
        torch.set_num_threads(1)
        return getattr(self.worker, method)(*args, **kwargs)


def _split(batch: dict, parts: int) -> list[dict]:
    """Contiguous row chunks (uneven allowed) of every tensor in ``batch``."""
    keys = list(batch)
    chunks = {k: torch.tensor_split(batch[k], parts) for k in keys}
    return [{k: chunks[k][i] for k in keys} for i in range(parts)]


class RoleGroup:
    def __init__(self, kind: str, world: int, worker_kwargs: dict, use_gpu: bool,
                 placement_group=None, bundle_offset: int = 0, gpu_fraction: float = 1.0):
        # CPU: no reservation (gloo ranks share the cores). GPU: colocated roles split each bundle's
        # GPU and CPU in half.
        opts = {"num_cpus": gpu_fraction if use_gpu else 0.01, "num_gpus": gpu_fraction if use_gpu else 0,
                "runtime_env": {"env_vars": _ENV}}
        actors = []
        for r in range(world):
            o = dict(opts)
            if placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=bundle_offset + r)
            actors.append(RankActor.options(**o).remote())
        self.kind = kind
        self.actors = actors
        addr, port = ray.get(actors[0].node_ip_and_port.remote())
        self.layouts: list[Layout] = ray.get(
            [a.setup.remote(kind, r, world, addr, port, worker_kwargs) for r, a in enumerate(actors)])
        self.dp_size = self.layouts[0].dp_size

    def run_all(self, method: str, *args, **kwargs) -> list:
        """Same call on every rank; every rank's return value."""
        return ray.get([a.call.remote(method, *args, **kwargs) for a in self.actors])

    def run_dp(self, method: str, batch: dict, *args, **kwargs) -> list:
        """Each DP replica gets its share of ``batch``; collector results in DP order."""
        shares = _split(batch, self.dp_size)
        refs = [a.call.remote(method, shares[lay.dp_rank], *args, **kwargs)
                for a, lay in zip(self.actors, self.layouts)]
        out = ray.get(refs)
        by_dp = {}
        for res, lay in zip(out, self.layouts):
            if res is not None:
                by_dp[lay.dp_rank] = res
        return [by_dp[d] for d in range(self.dp_size)]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
