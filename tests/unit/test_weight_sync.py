"""Weight-sync bookkeeping without vLLM: the HF tensor table, buckets, and the receiver's checks
(refusing a missing bucket or a corrupted payload, naming the parameter)."""

from __future__ import annotations

import pytest
import torch

from megatron_gad.engine.weight_sync import (
    WeightSyncError,
    check_manifest,
    describe,
    make_buckets,
    verified_items,
)
from megatron_gad.models.arch import arch_from_hf_config, read_hf_config
from megatron_gad.models.hf import hf_param_shapes, mcore_to_hf, read_hf_state_dict


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path_factory.mktemp(request.param)), request.param, seed=0)
    return path, read_hf_state_dict(path), arch_from_hf_config(read_hf_config(path))


def _manifest(sd: dict, bucket_bytes: int):
    buckets = list(make_buckets(sd.items(), bucket_bytes))
    return [describe(b, 0, k, len(buckets)) for k, b in enumerate(buckets)], buckets


def test_hf_param_shapes_match_transformers(model):
    """The table the receiver checks against equals the state dict transformers saves (the reference)."""
    _, sd, arch = model
    assert hf_param_shapes(arch) == {k: tuple(v.shape) for k, v in sd.items()}


def test_mcore_to_hf_round_trip(model):
    from megatron_gad.models.hf import hf_to_mcore

    _, sd, arch = model
    back = mcore_to_hf(hf_to_mcore(sd, arch, 8), arch)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_buckets_respect_size_and_order(model):
    _, sd, _ = model
    manifest, buckets = _manifest(sd, 4096)
    assert len(buckets) > 3
    assert [n for b in buckets for n in b] == list(sd)  # order kept, nothing lost or repeated
    for b in buckets:
        sizes = [t.numel() * t.element_size() for t in b.values()]
        assert len(b) == 1 or sum(sizes) <= 4096  # a bucket overflows only when one tensor alone is larger
    check_manifest(manifest, {k: tuple(v.shape) for k, v in sd.items()})


def test_missing_bucket_is_refused_naming_parameters(model):
    _, sd, arch = model
    manifest, _buckets = _manifest(sd, 4096)
    lost = manifest.pop(2)
    with pytest.raises(WeightSyncError) as e:
        check_manifest(manifest, hf_param_shapes(arch))
    msg = str(e.value)
    assert "pipeline stage 0 sent buckets" in msg and "(missing [3])" in msg
    assert f"parameters not received: {sorted(lost.names)[0]}" in msg


def test_shape_mismatch_is_refused(model):
    _, sd, arch = model
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(7)
    manifest, _ = _manifest(bad, 1 << 20)
    with pytest.raises(WeightSyncError, match=r"shape mismatch: model\.norm\.weight \(7,\)"):
        check_manifest(manifest, hf_param_shapes(arch))


def test_corrupted_payload_is_detected_while_streaming(model):
    _, sd, _ = model
    manifest, buckets = _manifest(sd, 4096)
    name = next(iter(buckets[1]))
    buckets[1][name] = buckets[1][name] + 1e-3  # changed after the manifest was written
    got = []
    with pytest.raises(WeightSyncError, match=rf"bucket 2/{len(buckets)} of pipeline stage 0: {name} is corrupted"):
        for item in verified_items(manifest, lambda k: buckets[k]):
            got.append(item)
    assert len(got) == len(buckets[0])  # the first bucket streamed, the bad one stopped the stream


def test_payload_missing_a_tensor_is_detected(model):
    _, sd, _ = model
    manifest, buckets = _manifest(sd, 4096)
    name = list(buckets[0])[-1]
    del buckets[0][name]
    with pytest.raises(WeightSyncError, match=rf"payload does not match its manifest; parameters not received: {name}"):
        list(verified_items(manifest, lambda k: buckets[k]))


# ---------------------------------------------------------------- checksums and host copies (issue 22)
def test_checksums_match_float64_reference():
    """float32 sums on the tensor's device agree with an fp64 reduction (the independent reference)
    within the receiver's tolerance, for the dtypes weights travel in."""
    from megatron_gad.engine.weight_sync import _tolerance, checksums

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(4096, 257, generator=g) * 0.02, (torch.randn(1000, generator=g) + 0.5).bfloat16(),
          torch.randn(3, 5, generator=g).half(), torch.zeros(7)]
    got = checksums(ts)
    assert got.shape == (4, 2) and got.dtype == torch.float32
    for t, (s, a) in zip(ts, got.tolist()):
        ref_s, ref_a = float(t.double().sum()), float(t.double().abs().sum())
        assert abs(s - ref_s) <= _tolerance(ref_a, t.numel()) and abs(a - ref_a) <= _tolerance(ref_a, t.numel())


def test_checksums_tolerate_another_reduction_order_but_not_another_tensor():
    """A receiver that reduces in another order (another device) accepts the payload; a payload of the
    same shape holding other values (a bucket of another step) or one changed element is refused."""
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(512, 384, generator=g), "b": torch.randn(384, generator=g)}
    manifest = [describe(sd, 0, 0, 1)]
    reordered = {"a": sd["a"].flip(0).flip(0).t().contiguous().t(), "b": sd["b"].clone()}
    assert [n for n, _ in verified_items(manifest, lambda k: reordered)] == ["a", "b"]
    other = {"a": torch.randn(512, 384, generator=g), "b": sd["b"]}
    with pytest.raises(WeightSyncError, match="a is corrupted"):
        list(verified_items(manifest, lambda k: other))
    # sums catch what moves them by more than the tolerance (1e-5 of the absolute sum, ~1.6 here): one
    # element gone wild, a NaN or an Inf; a single small change below it is not what they are for
    for bad in (100.0, float("nan"), float("inf")):
        one = {"a": sd["a"].clone(), "b": sd["b"]}
        one["a"][7, 7] = bad
        with pytest.raises(WeightSyncError, match="a is corrupted"):
            list(verified_items(manifest, lambda k, one=one: one))


def test_pack_buckets_ship_exact_bytes_without_needless_copies():
    """A whole contiguous CPU tensor is sent as is (no copy); a view into a larger storage (a QKV
    split) is copied so that pickling it ships its own bytes only; checksums are those of the host
    tensors; the buckets equal ``make_buckets``' grouping."""
    from megatron_gad.engine.weight_sync import _tolerance, export_buckets, pack_buckets

    fused = torch.randn(12, 16)
    whole = torch.randn(64, 16)
    items = [("q", fused[:4]), ("k", fused[4:8]), ("w", whole)]
    (bucket, sums), = list(pack_buckets(items, 1 << 20))
    assert bucket["w"].data_ptr() == whole.data_ptr()
    for n in ("q", "k"):
        assert bucket[n].untyped_storage().nbytes() == 4 * 16 * 4 and torch.equal(bucket[n], dict(items)[n])
    for (s, a), (_, t) in zip(sums.tolist(), items):  # fp64 reference; float32 sums agree within tolerance
        tol = _tolerance(float(t.double().abs().sum()), t.numel())
        assert abs(s - float(t.double().sum())) <= tol and abs(a - float(t.double().abs().sum())) <= tol
    info, _ = export_buckets(items, 4 * 16 * 4, stage=1)[1]
    assert (info.stage, info.index, info.count, info.names) == (1, 1, 3, ("k",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pack_buckets_from_gpu_pinned_and_verified_on_gpu():
    from megatron_gad.engine.weight_sync import export_buckets

    items = [("a", torch.randn(1024, 1024, device="cuda").bfloat16()), ("b", torch.randn(333, device="cuda"))]
    packed = export_buckets(items, 1 << 30, 0)
    (info, bucket), = packed
    assert all(t.device.type == "cpu" and t.is_pinned() for t in bucket.values())
    assert all(torch.equal(bucket[n].cuda(), t) for n, t in items)
    got = list(verified_items([info], lambda k: bucket, device="cuda"))
    assert [t.device.type for _, t in got] == ["cuda", "cuda"]
