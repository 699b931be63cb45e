"""Process groups for one role (actor or discriminator) — the only module touching parallel_state.

Each role runs in its own set of processes (Ray workers or locally spawned ranks), so Megatron's
process-global ``parallel_state`` describes exactly one TP x PP x DP layout per process. That is
what lets the actor and the discriminator use different layouts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gad.parallel.cpu_compat import cuda_available, enable_cpu_mode


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in its role's TP x PP x DP grid."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


# How long a collective may wait for the slowest rank before the process group fails the run. The
# roles' configs set it (``actor_rollout_ref.nccl_timeout``, ``critic.nccl_timeout``); this default
# serves tools and tests. A checkpoint save or weight export can keep the other ranks waiting minutes.
DEFAULT_TIMEOUT_S = 7200
_timeout_s = DEFAULT_TIMEOUT_S  # this process's, for the Megatron groups built after the default group


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     backend: str | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Join the role's process group (gloo on CPU, NCCL on GPU); ``timeout_s`` also applies to the
    TP / PP / DP groups :func:`init_model_parallel` builds."""
    global _timeout_s
    if dist.is_initialized():
        return
    _timeout_s = timeout_s
    backend = backend or ("nccl" if cuda_available() else "gloo")
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if master_addr.startswith("127.") else "")
        enable_cpu_mode()
        torch.set_num_threads(int(os.environ.get("MEGATRON_GAD_THREADS", "1")))
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(tp: int, pp: int, seed: int = 42) -> Layout:
    """Create Megatron's TP/PP/DP groups for this process and seed its model-parallel RNG."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP*PP = {tp}*{pp}")
    if ps.model_parallel_is_initialized():
        cur = layout()
        if (cur.tp_size, cur.pp_size) == (tp, pp):  # e.g. a reference model beside the actor
            return cur
        ps.destroy_model_parallel()
    # Megatron 0.16 also builds gloo copies of the data-parallel groups by default; only its
    # distributed optimizer uses them (we do not), and on GPUs across nodes they are one more
    # bootstrap over sockets that can hang. Only a gloo (CPU) run keeps them, where they cost nothing.
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 create_gloo_process_groups=uses_gloo_groups(),
                                 distributed_timeout_minutes=-(-_timeout_s // 60))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout()


def uses_gloo_groups() -> bool:
    """Whether this process's Megatron groups include gloo copies (the default group is gloo).
    ``get_megatron_optimizer(use_gloo_process_groups=...)`` must agree, or it asserts."""
    return dist.get_backend() == "gloo"


def layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
    )


def tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def pp_group():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def all_reduce_dp(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over this rank's data-parallel replicas, e.g. the token count of a
    mini-batch that every replica's loss is normalised by. Identity with one replica."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                    group=ps.get_data_parallel_group())
    return t.tolist()


def last_stage_global_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_last_rank()


def tp_src_global_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_src_rank()


def gather_tp_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a TP-sharded last dimension (e.g. vocab-parallel logits) across the TP group."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(t)


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """Give every pipeline stage the tensor held by the last stage (same shape/dtype everywhere)."""
    if layout().pp_size > 1:
        dist.broadcast(tensor, src=last_stage_global_rank(), group=pp_group())
    return tensor


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
