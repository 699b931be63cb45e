"""How a weight sync's buckets travel from the actor's stage leaders to the rollout engines.

The manifest (``weight_sync.BucketInfo`` per bucket, with checksums) always goes through the
controller and is checked by every engine before anything loads; a transport only moves the bucket
payloads, and every payload is verified against its manifest entry as it arrives
(``weight_sync.verified_items``), whichever transport carried it. Three transports:

* ``ObjectStore`` (Ray's object store; today's path): each bucket is ``ray.put`` once on the sender
  and fetched by every engine. Works everywhere, costs a serialization and one copy per reader.
* ``Broadcast``: a collective broadcast in a process group of one stage leader (rank 0) and the
  engines (ranks 1..E), built on its own TCP store so it is independent of Megatron's and vLLM's
  groups — gloo on CPU (tested), NCCL between GPUs. A bucket is one flat byte buffer: the sender's
  bytes reach every engine in one collective, with no object-store copy. Sender and engines call
  ``send`` / ``fetch`` in manifest order at the same time (the controller starts both).
* ``CudaIpc``: engines colocated with the actor rank on the same GPU get a CUDA IPC handle per
  bucket (a flat device buffer the sender keeps alive until ``release``): no copy leaves the GPU
  and the engine's loader copies device to device. GPU only (``gpu``-marked test).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable

import torch

from megatron_gad.engine.weight_sync import BucketInfo, from_transport, to_transport


def flatten(bucket: dict[str, torch.Tensor]) -> torch.Tensor:
    """The bucket's tensors as one contiguous uint8 buffer (in the bucket's order)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in bucket.values()])


def unflatten(buf: torch.Tensor, info: BucketInfo) -> dict[str, torch.Tensor]:
    """Views of ``buf`` named and shaped as the manifest entry says (no copy)."""
    if buf.numel() != info.nbytes:
        raise ValueError(f"{info.label}: {buf.numel()} bytes arrived, the manifest describes {info.nbytes}")
    out, off = {}, 0
    for name, shape, dtype in zip(info.names, info.shapes, info.dtypes):
        dt = getattr(torch, dtype)
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
        out[name] = buf[off:off + n].view(dt).view(shape)
        off += n
    return out


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ObjectStore:
    """Today's transport: payloads are object references (or the buckets themselves outside Ray)."""

    name = "object_store"

    def send(self, buckets: list[dict[str, torch.Tensor]]) -> list:
        return [to_transport(b) for b in buckets]

    def fetcher(self, manifest: list[BucketInfo], payloads: list) -> Callable[[int], dict[str, torch.Tensor]]:
        return lambda k: from_transport(payloads[k])


class Broadcast:
    """One stage leader (group rank 0) broadcasting to ``world - 1`` engines. ``join`` blocks until
    every member joined (the store's rendezvous)."""

    name = "broadcast"

    def __init__(self, group, rank: int, device: str, store=None):
        self.group, self.rank, self.device = group, rank, device
        self.store = store  # rank 0 hosts the store's server: it lives as long as the group

    @classmethod
    def join(cls, host: str, port: int, rank: int, world: int, stage: int = 0, backend: str = "gloo",
             timeout_s: float = 600.0) -> Broadcast:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = torch.distributed.TCPStore(host, port, world, rank == 0, timeout=timeout)
        prefix = torch.distributed.PrefixStore(f"megatron_gad/weight_sync/stage{stage}", store)
        if backend == "nccl":
            group = torch.distributed.ProcessGroupNCCL(prefix, rank, world)
            device = f"cuda:{torch.cuda.current_device()}"
        else:
            group = torch.distributed.ProcessGroupGloo(prefix, rank, world, timeout)
            device = "cpu"
        return cls(group, rank, device, store)

    def send(self, buckets: list[dict[str, torch.Tensor]]) -> list:
        """Broadcast each bucket (rank 0 only); the payloads for the manifest are placeholders."""
        if self.rank != 0:
            raise RuntimeError("only the stage leader (group rank 0) sends")
        for b in buckets:
            self.group.broadcast(flatten(b).to(self.device), 0).wait()
        return [None] * len(buckets)

    def fetcher(self, manifest: list[BucketInfo], payloads: list | None = None):
        """Receive bucket k (in order: k = 0, 1, ...) into a buffer sized from the manifest."""
        expected = iter(range(len(manifest)))

        def fetch(k: int) -> dict[str, torch.Tensor]:
            if k != next(expected):
                raise RuntimeError("a broadcast sync receives the buckets in manifest order")
            buf = torch.empty(manifest[k].nbytes, dtype=torch.uint8, device=self.device)
            self.group.broadcast(buf, 0).wait()
            return unflatten(buf, manifest[k])

        return fetch

    def close(self) -> None:
        self.group = self.store = None


class CudaIpc:
    """Sender: each bucket flattened into a device buffer, shared by a CUDA IPC handle (the payload);
    the buffers stay alive until ``release`` (after the engines loaded). Receiver: opens the handle
    on the same GPU (no copy) and reads the bucket as views."""

    name = "cuda_ipc"

    def __init__(self):
        self.kept: list[torch.Tensor] = []

    def send(self, buckets: list[dict[str, torch.Tensor]]) -> list:
        from torch.multiprocessing.reductions import reduce_tensor

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA IPC weight sync needs GPUs")
        out = []
        for b in buckets:
            buf = flatten({n: t.cuda() for n, t in b.items()})
            self.kept.append(buf)
            out.append(reduce_tensor(buf))  # (rebuild function, args): picklable
        torch.cuda.synchronize()
        return out

    def release(self) -> None:
        self.kept.clear()

    def fetcher(self, manifest: list[BucketInfo], payloads: list):
        def fetch(k: int) -> dict[str, torch.Tensor]:
            rebuild, args = payloads[k]
            args = list(args)
            args[6] = torch.cuda.current_device()  # the receiver's ordinal of the same GPU
            return unflatten(rebuild(*args), manifest[k])

        return fetch
