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
