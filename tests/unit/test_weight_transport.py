"""Weight-sync transports (``engine/weight_transport.py``): a bucket's bytes arrive unchanged, and the
manifest's checks still refuse a corrupted payload, whichever transport carried it. The reference is
the state dict transformers saved (read back from disk), not the transport's own output."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from megatron_gad.engine.weight_sync import check_manifest, export_buckets, verified_items
from megatron_gad.engine.weight_transport import Broadcast, CudaIpc, flatten, free_port, unflatten


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from megatron_gad.models.arch import arch_from_hf_config, read_hf_config
    from megatron_gad.models.hf import hf_param_shapes, read_hf_state_dict
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2", seed=0)
    return read_hf_state_dict(path), hf_param_shapes(arch_from_hf_config(read_hf_config(path)))


def test_flatten_round_trip_mixed_dtypes():
    b = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(4).bfloat16()}
    (info, _), = export_buckets(b.items(), 1 << 20, 0)
    back = unflatten(flatten(b), info)
    assert list(back) == list(b) and all(torch.equal(back[k], b[k]) and back[k].dtype == b[k].dtype for k in b)
    with pytest.raises(ValueError, match="bytes arrived"):
        unflatten(flatten(b)[:-4], info)


def _bytes(tensors: dict) -> bytes:
    """Tensors through a queue as bytes (a tensor's shared memory goes when its process exits)."""
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _tensors(data):
    import io

    return torch.load(io.BytesIO(data)) if isinstance(data, bytes) else data


def _member(rank, world, port, manifest, buckets, expected, queue):
    try:
        t = Broadcast.join("127.0.0.1", port, rank, world, timeout_s=120)
        if rank == 0:
            t.send(buckets)
            queue.put((rank, None))
            return
        check_manifest(manifest, expected)
        got = {n: x.clone() for n, x in verified_items(manifest, t.fetcher(manifest))}
        queue.put((rank, _bytes(got)))
    except Exception as e:  # reported to the test, which names the failure
        queue.put((rank, f"{type(e).__name__}: {e}"))


def _broadcast(manifest, buckets, expected, engines=2):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_member, args=(r, engines + 1, port, manifest, buckets if r == 0 else None,
                                                expected, queue)) for r in range(engines + 1)]
    for p in procs:
        p.start()
    out = {r: _tensors(x) for r, x in (queue.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    return out


def test_gloo_broadcast_delivers_every_tensor_bit_exact(model):
    sd, expected = model
    packed = export_buckets(sd.items(), 64 << 10, 0)
    assert len(packed) > 2
    out = _broadcast([i for i, _ in packed], [b for _, b in packed], expected)
    for rank in (1, 2):
        assert set(out[rank]) == set(sd)
        for name, t in sd.items():
            assert torch.equal(out[rank][name], t), (rank, name)


def test_gloo_broadcast_corruption_is_refused(model):
    sd, expected = model
    packed = export_buckets(sd.items(), 64 << 10, 0)
    buckets = [dict(b) for _, b in packed]
    name = next(iter(buckets[1]))
    buckets[1][name] = buckets[1][name] * 1.5  # changed after its manifest entry was written
    out = _broadcast([i for i, _ in packed], buckets, expected, engines=1)
    assert isinstance(out[1], str) and f"WeightSyncError: bucket 2/{len(packed)} of pipeline stage 0: {name} is " \
        "corrupted" in out[1]


def _ipc_receiver(manifest, payloads, queue):
    got = {n: x.cpu().clone() for n, x in verified_items(manifest, CudaIpc().fetcher(manifest, payloads),
                                                         device="cuda")}
    queue.put(_bytes(got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_to_a_colocated_engine(model):
    sd, _ = model
    packed = export_buckets(((n, t.cuda()) for n, t in sd.items()), 64 << 10, 0)
    sender = CudaIpc()
    payloads = sender.send([b for _, b in packed])
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_ipc_receiver, args=([i for i, _ in packed], payloads, queue))
    p.start()
    got = _tensors(queue.get(timeout=300))
    p.join(timeout=60)
    sender.release()
    assert set(got) == set(sd) and all(torch.equal(got[n], t) for n, t in sd.items())
