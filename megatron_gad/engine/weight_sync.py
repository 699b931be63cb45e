"""Megatron -> rollout-engine weight sync: Hugging Face-named tensors in buckets, with a manifest
the receiver checks before and while it loads.

Sender (every rank of the actor, in step; ``stream_hf_weights``): each parameter of the stage is
gathered over TP one at a time (``models.hf.iter_full_params``); a decoder layer is converted to HF
names (QKV split per query group, fc1 into gate/up) as soon as all its tensors are in, and the
stage's *leader* (TP rank 0 of data-parallel replica 0) packs the HF tensors into buckets of about
``bucket_bytes`` (``make_buckets``). Every pipeline stage sends its own layers, so the receiver gets
the whole model from PP leaders without any stage holding all of it. The receiver's tensor
parallelism does not matter: it gets full tensors and its own loaders shard them (vLLM's
``weight_loader``), so actor and rollout TP sizes may differ.

Receiver (``check_manifest`` then ``verified_items``): the set of names the manifest promises must
equal the HF tensors the architecture has (``models.hf.hf_param_shapes``, computed from the
receiver's own config, not from the sender), with the same shapes, and every stage's buckets must be
numbered 0..k-1 without a gap — all checked before a single tensor is loaded. While streaming, each
bucket's tensors must match its manifest entry (names, shapes, dtype, checksums). Any failure raises
:class:`WeightSyncError` naming the bucket and parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from megatron_gad.models import hf as hfmap
from megatron_gad.models.arch import Arch


class WeightSyncError(RuntimeError):
    """A weight sync that is incomplete or does not match the receiving model."""


@dataclass(frozen=True)
class BucketInfo:
    """What one bucket holds: its place (pipeline stage, index among the stage's ``count``
    buckets) and, per tensor, name, shape, dtype and two checksums."""

    stage: int
    index: int
    count: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    sums: tuple[float, ...]
    abs_sums: tuple[float, ...]
    nbytes: int

    @property
    def label(self) -> str:
        return f"bucket {self.index + 1}/{self.count} of pipeline stage {self.stage}"


def _sums(t: torch.Tensor) -> torch.Tensor:
    """[2] float32 on t's device: sum and sum of |t|, without a float32 copy of t. On the CPU the
    1-norm runs over rows of 4096 elements and sums the rows (torch's CPU 1-norm accumulates one
    long run in float32: ~1e-4 relative error on a million elements, vs ~1e-7 this way)."""
    t = t.detach()
    if not (t.is_floating_point() or t.is_complex()):  # integer buffers (rare, small): via float32
        t = t.float()
    if t.is_cuda or t.numel() < 8192:
        return torch.stack([t.sum(dtype=torch.float32), torch.linalg.vector_norm(t, 1, dtype=torch.float32)])
    x = t.reshape(-1)
    cut = x.numel() // 4096 * 4096
    a = torch.linalg.vector_norm(x[:cut].view(-1, 4096), 1, dim=1, dtype=torch.float32).sum()
    a = a + torch.linalg.vector_norm(x[cut:], 1, dtype=torch.float32)
    return torch.stack([x.sum(dtype=torch.float32), a])


def checksums(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """[k, 2] float32 on the host: each tensor's sum and sum of absolute values, reduced where the
    tensor lives (on a GPU: one fused reduction per quantity, no fp32 copy of the tensor; on the CPU:
    torch's multi-threaded reductions) in float32, then one small device->host copy for the whole
    list. Replaces two float64 passes on one CPU thread per tensor (~8 s/GB of bf16)."""
    rows = [_sums(t) for t in tensors]
    if not rows:
        return torch.zeros(0, 2)
    return torch.stack([r.to(rows[0].device) for r in rows]).cpu()


def _tolerance(abs_sum: float, numel: int) -> float:
    """How far two float32 reductions of the same tensor may differ (different devices or reduction
    orders): float32 rounding grows with log2 of the length at worst for tree reductions; 1e-5 of the
    absolute sum is ~20x that for a billion elements, while a corrupted payload (a bucket of another
    step, a shifted or truncated tensor) moves the sums by far more."""
    return 1e-5 * max(abs_sum, 1.0) + 1e-6 * numel ** 0.5


def describe(bucket: dict[str, torch.Tensor], stage: int, index: int, count: int,
             sums: torch.Tensor | None = None) -> BucketInfo:
    """``sums``: the bucket's ``checksums`` when already computed (on the sender's device, before the
    host copy: ``pack_buckets``)."""
    sums = checksums(bucket.values()) if sums is None else sums
    return BucketInfo(stage, index, count, tuple(bucket), tuple(tuple(t.shape) for t in bucket.values()),
                      tuple(str(t.dtype).removeprefix("torch.") for t in bucket.values()),
                      tuple(float(s) for s in sums[:, 0]), tuple(float(a) for a in sums[:, 1]),
                      sum(t.numel() * t.element_size() for t in bucket.values()))


# ---------------------------------------------------------------- sender
def stream_hf_weights(module, arch: Arch, tp_group, tp_size: int, emit: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's weights as (HF name, full tensor), a decoder layer at a time. Every TP rank of
    the stage must iterate (the gathers are collective); only ``emit`` ranks get items."""
    names = [hfmap.global_name(module, n) for n, _ in module.named_parameters()]
    per_layer: dict[int, int] = {}
    for n in names:
        m = hfmap.LAYER_RE.match(n)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + 1
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in hfmap.iter_full_params(module, tp_group, tp_size):
        if not emit:
            continue
        m = hfmap.LAYER_RE.match(name)
        if m is None:
            yield from hfmap.mcore_global_to_hf(name, t, arch).items()
            continue
        i = int(m.group(1))
        layer = pending.setdefault(i, {})
        layer[m.group(2)] = t
        if len(layer) == per_layer[i]:
            yield from hfmap.mcore_layer_to_hf(i, pending.pop(i), arch).items()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host tensor that owns exactly its bytes. From a GPU: a non-blocking copy into pinned memory
    (the caller synchronizes once per bucket). On the CPU no copy unless ``t`` is a view into a larger
    storage (a QKV split, a slice): pickling a view (the object store) would ship the whole storage."""
    t = t.detach()
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def pack_buckets(items: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Consecutive items grouped into buckets of at least one tensor and at most ``bucket_bytes``
    (a tensor larger than that is a bucket of its own), each with its ``checksums`` [k, 2] computed
    on the tensors' device before they move to host memory (the sums cover exactly what was sent).
    A device tensor is released as soon as its host copy is queued, so at most one stage tensor and
    one bucket's host copy are live at a time."""
    bucket: dict[str, torch.Tensor] = {}
    sums: list[torch.Tensor] = []
    size = 0
    cuda = False

    def done():
        if cuda:
            torch.cuda.synchronize()  # the pinned copies of this bucket have landed
        return bucket, torch.stack([x.to(sums[0].device) for x in sums]).cpu()

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield done()
            bucket, sums, size, cuda = {}, [], 0, False
        sums.append(_sums(t))  # on t's device; moved to the host once per bucket
        cuda = cuda or t.is_cuda
        bucket[name] = _to_host(t)
        size += nbytes
    if bucket:
        yield done()


def make_buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """``pack_buckets`` without the checksums (host tensors only)."""
    for bucket, _ in pack_buckets(items, bucket_bytes):
        yield bucket


def export_buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, stage: int):
    """(BucketInfo, host bucket) for every bucket of a stage, numbered ``0..count-1``."""
    packed = list(pack_buckets(items, bucket_bytes))
    return [(describe(b, stage, k, len(packed), sums), b) for k, (b, sums) in enumerate(packed)]


# ---------------------------------------------------------------- receiver
def _names(xs: Iterable[str], limit: int = 6) -> str:
    xs = sorted(xs)
    return ", ".join(xs[:limit]) + (f" (+{len(xs) - limit} more)" if len(xs) > limit else "")


def check_manifest(manifest: list[BucketInfo], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse an incomplete or mismatched sync before anything is loaded."""
    problems = []
    by_stage: dict[int, list[BucketInfo]] = {}
    for info in manifest:
        by_stage.setdefault(info.stage, []).append(info)
    for stage, infos in sorted(by_stage.items()):
        have = sorted(i.index for i in infos)
        want = list(range(infos[0].count))
        if have != want:
            gone = sorted(set(want) - set(have))
            problems.append(f"pipeline stage {stage} sent buckets {[h + 1 for h in have]} of {infos[0].count}"
                            + (f" (missing {[g + 1 for g in gone]})" if gone else " (duplicates)"))
    promised: dict[str, tuple[int, ...]] = {}
    for info in manifest:
        for name, shape in zip(info.names, info.shapes):
            if name in promised:
                problems.append(f"{name} sent twice")
            promised[name] = tuple(shape)
    missing = set(expected) - set(promised)
    if missing:
        problems.append(f"parameters not received: {_names(missing)}")
    extra = set(promised) - set(expected)
    if extra:
        problems.append(f"parameters the model does not have: {_names(extra)}")
    bad = [f"{n} {promised[n]} (model: {expected[n]})" for n in sorted(set(promised) & set(expected))
           if tuple(promised[n]) != tuple(expected[n])]
    if bad:
        problems.append(f"shape mismatch: {_names(bad)}")
    if problems:
        raise WeightSyncError("weight sync refused before loading: " + "; ".join(problems))


def verified_items(manifest: list[BucketInfo], fetch: Callable[[int], dict[str, torch.Tensor]],
                   device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of every bucket (``fetch(k)``: the k-th manifest entry's payload), each checked
    against its manifest entry as it is read. ``device``: move each bucket there first (one copy the
    loader would make anyway) and checksum it there."""
    for k, info in enumerate(manifest):
        bucket = fetch(k)
        if not isinstance(bucket, dict) or list(bucket) != list(info.names):
            got = list(bucket) if isinstance(bucket, dict) else type(bucket).__name__
            missing = [n for n in info.names if not isinstance(bucket, dict) or n not in bucket]
            raise WeightSyncError(f"{info.label}: payload does not match its manifest"
                                  + (f"; parameters not received: {_names(missing)}" if missing else f"; got {got}"))
        for name, shape, dtype in zip(info.names, info.shapes, info.dtypes):
            t = bucket[name]
            if tuple(t.shape) != tuple(shape) or str(t.dtype).removeprefix("torch.") != dtype:
                raise WeightSyncError(f"{info.label}: {name} arrived as {tuple(t.shape)} {t.dtype}, "
                                      f"manifest says {tuple(shape)} {dtype}")
        if device is not None:
            bucket = {n: t.to(device, non_blocking=True) for n, t in bucket.items()}
        got = checksums(bucket.values())
        for (name, t), s, a, (s2, a2) in zip(bucket.items(), info.sums, info.abs_sums, got.tolist()):
            tol = _tolerance(a, t.numel())
            if not (abs(s2 - s) <= tol and abs(a2 - a) <= tol):  # so that a NaN or Inf payload fails too
                raise WeightSyncError(f"{info.label}: {name} is corrupted (checksum {s2:.6g}/{a2:.6g}, "
                                      f"sent {s:.6g}/{a:.6g})")
        yield from bucket.items()


# ---------------------------------------------------------------- transport
def to_transport(bucket: dict[str, torch.Tensor]):
    """Inside Ray: an object reference, so the bucket goes from the sender's process to the engine's
    without passing through the controller; elsewhere the bucket itself."""
    try:
        import ray
    except ImportError:
        return bucket
    return ray.put(bucket) if ray.is_initialized() else bucket


def from_transport(payload) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict):
        return payload
    import ray

    return ray.get(payload)
