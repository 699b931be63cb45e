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


def _checksums(t: torch.Tensor) -> tuple[float, float]:
    x = t.detach().double()
    return float(x.sum()), float(x.abs().sum())


def describe(bucket: dict[str, torch.Tensor], stage: int, index: int, count: int) -> BucketInfo:
    sums = [_checksums(t) for t in bucket.values()]
    return BucketInfo(stage, index, count, tuple(bucket), tuple(tuple(t.shape) for t in bucket.values()),
                      tuple(str(t.dtype).removeprefix("torch.") for t in bucket.values()),
                      tuple(s for s, _ in sums), tuple(a for _, a in sums),
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


def make_buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive items grouped into buckets of at least one tensor and at most ``bucket_bytes``
    (a tensor larger than that is a bucket of its own). Tensors are copied to host memory."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t.detach().to("cpu", copy=True).contiguous()
        size += nbytes
    if bucket:
        yield bucket


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
                   rtol: float = 1e-6) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of every bucket (``fetch(k)``: the k-th manifest entry's payload), each checked
    against its manifest entry as it is read."""
    for k, info in enumerate(manifest):
        bucket = fetch(k)
        if not isinstance(bucket, dict) or list(bucket) != list(info.names):
            got = list(bucket) if isinstance(bucket, dict) else type(bucket).__name__
            missing = [n for n in info.names if not isinstance(bucket, dict) or n not in bucket]
            raise WeightSyncError(f"{info.label}: payload does not match its manifest"
                                  + (f"; parameters not received: {_names(missing)}" if missing else f"; got {got}"))
        for name, shape, dtype, s, a in zip(info.names, info.shapes, info.dtypes, info.sums, info.abs_sums):
            t = bucket[name]
            if tuple(t.shape) != tuple(shape) or str(t.dtype).removeprefix("torch.") != dtype:
                raise WeightSyncError(f"{info.label}: {name} arrived as {tuple(t.shape)} {t.dtype}, "
                                      f"manifest says {tuple(shape)} {dtype}")
            s2, a2 = _checksums(t)
            if abs(s2 - s) > rtol * max(a, 1.0) or abs(a2 - a) > rtol * max(a, 1.0):
                raise WeightSyncError(f"{info.label}: {name} is corrupted (checksum {s2:.6g}/{a2:.6g}, "
                                      f"sent {s:.6g}/{a:.6g})")
            yield name, t


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
