"""A frozen shard (the KL reference) keeps its parameters' host copy across offloads (issue 22): the
first offload copies device->host, later ones only free the device memory, and every reload brings
back exactly the weights it was built with; loading other weights drops the kept copy."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed


def _run(rank, world, path, other):
    from megatron_gad.engine.model_shard import ModelShard

    out = {}
    for trainable in (False, True):
        shard = ModelShard("actor", path, 1, 1, vocab_divisible_by=8, trainable=trainable)
        ref = {n: p.detach().clone() for n, p in shard.module.named_parameters()}
        hosts, same = [], []
        for _ in range(3):
            shard.offload(params=True)
            assert all(p.untyped_storage().nbytes() == 0 for p in shard.module.parameters())
            hosts.append([h for _, h, _ in shard._offloaded["params"]])
            shard.reload("params")
            same.append(all(torch.equal(p, ref[n]) for n, p in shard.module.named_parameters()))
        reused = [all(a is b for a, b in zip(hosts[0], h)) for h in hosts[1:]]
        out[trainable] = {"same": same, "reused": reused}
        if not trainable:
            shard.load_weights(other)
            shard.offload(params=True)
            fresh = [h for _, h, _ in shard._offloaded["params"]]
            shard.reload("params")
            out["after_load"] = {"reused": any(a is b for a, b in zip(hosts[0], fresh)),
                                 "changed": not all(torch.equal(p, ref[n]) for n, p in shard.module.named_parameters())}
    return out


def test_frozen_shard_keeps_its_host_copy(tmp_path):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "qwen2", seed=0)
    other = make_hf_model(str(tmp_path / "o"), "qwen2", seed=1)
    got = run_local(_run, 1, path, other)[0]
    assert got[False] == {"same": [True] * 3, "reused": [True, True]}  # frozen: copied once
    assert got[True] == {"same": [True] * 3, "reused": [False, False]}  # trainable: copied every time
    assert got["after_load"] == {"reused": False, "changed": True}
