"""Launch N local ranks of a function (CLI tools and tests; the trainer uses Ray workers instead).

Each spawned rank is a process entry: it joins the process group and runs the function inside the
device mode (``cpu_compat.cpu_device_mode``), so the function's code is the same on CPU and GPU."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_gad.errors import DistributedRunError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    from megatron_gad.parallel import state
    from megatron_gad.parallel.cpu_compat import cpu_device_mode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        state.init_distributed(rank, world, "127.0.0.1", port)
        with cpu_device_mode():  # the process entry: rank code never enters the device mode itself
            result = fn(rank, world, *args)
        # Plain pickle copies tensor data: torch's shared-memory handles die with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # report, don't hang the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    finally:
        try:
            state.destroy()
        except Exception:
            pass


def run_local(fn: Callable[..., Any], world_size: int, *args) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined in one
    process group; return every rank's return value (rank order). A failure on any rank raises
    with that rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    while len(results) + len(errors) < world_size:
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            import time

            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank}: {payload}")
            for p in procs:  # the others would wait forever in a collective
                if p.is_alive():
                    p.terminate()
    for p in procs:
        p.join(timeout=30)
    if errors:
        raise DistributedRunError("distributed run failed:\n" + "\n".join(errors))
    if len(results) < world_size:
        codes = [p.exitcode for p in procs]
        raise DistributedRunError(f"distributed run ended without results (exit codes {codes})")
    return [results[r] for r in range(world_size)]
