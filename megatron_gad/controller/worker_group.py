"""A role's workers as Ray processes, called through the methods the workers declare.

A role (actor or critic) is ``world`` Ray processes (``WorkerProcess``) that join one process group
and build Megatron's TP x PP x DP grid among themselves; each hosts the role's worker. The
controller calls ``group.<method>(...)`` for any worker method declared with
``workers.dispatch.register``: the declaration says how arguments are split over the ranks and
how results are collected (see ``workers/dispatch.py``).

A call waits for the ranks' results as they arrive, not for all of them: when a rank dies or fails,
the call stops within seconds instead of waiting on peers blocked in a collective, stops the role's
other processes and raises (``controller/faults.py``). A group that failed refuses further calls.
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from megatron_gad.controller import faults
from megatron_gad.controller.group_base import DeclaredGroup, check_worker_paths, dist_timeout_s, worker_class
from megatron_gad.parallel.state import Layout

_ENV = {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore"}


def worker_env(use_gpu: bool, single_node: bool) -> dict[str, str]:
    """Environment of every worker process. Gloo is pinned to loopback only for a CPU run on one
    node (gloo is then the role's only backend, and loopback avoids picking an unroutable
    interface in containers). Across nodes, or on GPUs, no override: gloo bound to loopback
    cannot reach another node, and a multi-node run hangs at start-up."""
    env = dict(_ENV)
    if not use_gpu and single_node:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    # debug hooks set in the driver after Ray started still reach the workers created now
    env.update({k: os.environ[k] for k in faults.DEBUG_ENV if k in os.environ})
    return env


@ray.remote
class WorkerProcess:
    """One rank of a role: joins the role's process group, then hosts its worker. Every call into
    the process (``setup``, ``execute``) is a process entry: it enters the device mode there, so
    worker code never does."""

    def node_ip_and_port(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def pid_and_node(self) -> tuple[int, str]:
        return os.getpid(), ray.util.get_node_ip_address()

    def setup(self, role: str, rank: int, world: int, addr: str, port: int, kwargs: dict) -> Layout:
        import logging
        import warnings

        from megatron_gad.parallel import state
        from megatron_gad.parallel.cpu_compat import cpu_device_mode

        warnings.filterwarnings("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
        cls = worker_class(role)
        self._kill = faults.kill_points(os.environ.get(faults.KILL_ENV), role, rank)
        self._calls: dict[str, int] = {}
        # the paths this worker reads, checked here: on a cluster they may exist only on the workers' nodes
        check_worker_paths(role, kwargs, where=f"on the {role} worker's node {ray.util.get_node_ip_address()} "
                                               f"(rank {rank})")
        if not getattr(cls, "joins_process_group", True):  # e.g. a vLLM engine: it sets up its own
            self.worker = cls(rank=rank, world=world, **kwargs)
            return self.worker.layout
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        state.init_distributed(rank, world, addr, port, timeout_s=dist_timeout_s(kwargs))
        with cpu_device_mode():
            self.worker = cls(**kwargs)
        return self.worker.layout

    def execute(self, method: str, *args, **kwargs):
        from megatron_gad.parallel.cpu_compat import cpu_device_mode

        faults.maybe_kill(self._kill, self._calls, method)
        if not getattr(self.worker, "joins_process_group", True):
            return getattr(self.worker, method)(*args, **kwargs)  # not a Megatron rank: no device mode
        torch.set_num_threads(1)
        with cpu_device_mode():
            return getattr(self.worker, method)(*args, **kwargs)


class WorkerGroup(DeclaredGroup):
    """The ``world`` ranks of one role. ``group.update_critic(batch, n)`` calls the worker method of
    that name on every rank as its declaration says."""

    def __init__(self, role: str, world: int, worker_kwargs: dict, use_gpu: bool,
                 placement_group=None, bundles: list[int] | None = None, gpu_fraction: float = 1.0,
                 extra_env: dict[str, str] | None = None):
        """``bundles``: the placement-group bundle of each rank (``controller/placement.py``
        keeps each TP group on one node)."""
        # CPU: no reservation (gloo ranks share the cores). GPU: colocated roles split each bundle's
        # GPU and CPU in half.
        single_node = len([n for n in ray.nodes() if n.get("Alive")]) <= 1
        opts = {"num_cpus": gpu_fraction if use_gpu else 0.01, "num_gpus": gpu_fraction if use_gpu else 0,
                "runtime_env": {"env_vars": {**worker_env(use_gpu, single_node), **(extra_env or {})}}}
        procs = []
        for r in range(world):
            o = dict(opts)
            if placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=bundles[r])
            procs.append(WorkerProcess.options(**o).remote())
        self.role = role
        self.worker_cls = worker_class(role)
        self.procs = procs
        self.context: dict = {}  # set by the trainer (step, run_dir) for the messages of failed calls
        self.failed: BaseException | None = None
        self.pids: list[int | None] = [None] * world
        self.nodes: list[str | None] = [None] * world
        ids = self._gather("start", [p.pid_and_node.remote() for p in procs])
        self.pids, self.nodes = [i[0] for i in ids], [i[1] for i in ids]
        addr, port = ray.get(procs[0].node_ip_and_port.remote())
        self.layouts: list[Layout] = self._gather(
            "setup", [p.setup.remote(role, r, world, addr, port, worker_kwargs) for r, p in enumerate(procs)])
        self.dp_size = self.layouts[0].dp_size

    def _gather(self, name: str, refs: list) -> list:
        """The ranks' results of one call; at the first failure, stop the role's processes and raise
        (``faults.gather``)."""

        def on_failure(failures: dict) -> None:
            self._kill_all()
            try:
                faults.raise_failure(self.role, name, failures, self.pids, self.nodes, self.context)
            except BaseException as e:
                self.failed = e
                raise

        return faults.gather(refs, on_failure)

    def _kill_all(self) -> None:
        for p in self.procs:
            ray.kill(p, no_restart=True)

    def _execute(self, name: str, per_rank_args: list[tuple], kwargs: dict) -> list:
        stored: dict[int, ray.ObjectRef] = {}  # a replica's share goes to the object store once

        def put(x):
            if not isinstance(x, dict):
                return x
            if id(x) not in stored:
                stored[id(x)] = ray.put(x)
            return stored[id(x)]

        if self.failed is not None:  # its processes are gone: say why, not "actor died" again
            raise RuntimeError(f"the {self.role} worker group stopped earlier: {self.failed}")
        return self._gather(name, [p.execute.remote(name, *[put(x) for x in a], **kwargs)
                                   for p, a in zip(self.procs, per_rank_args)])

    def shutdown(self) -> None:
        self._kill_all()
