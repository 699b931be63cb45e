"""The planner's KV-cache bytes equal what the native rollout allocates: the contexts that
``engine.generate`` creates are captured and their key/value tensors summed, at TP 1 and TP 2."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

ROWS, PROMPT, NEW = 6, 5, 7


def _rollout(rank, world, path, tp):
    from megatron_gad.engine import generate as gen
    from megatron_gad.engine.model_shard import ModelShard

    contexts = []
    new_context = gen._new_context

    def capture(batch, max_len):  # the rollout's own contexts, recorded
        ctx = new_context(batch, max_len)
        contexts.append(ctx)
        return ctx

    gen._new_context = capture
    shard = ModelShard("actor", path, tp, 1, params_dtype="bfloat16", vocab_divisible_by=8)
    ids = torch.randint(3, 96, (ROWS, PROMPT), generator=torch.Generator().manual_seed(0))
    gen.generate(shard, ids, torch.ones_like(ids), max_new_tokens=NEW, eos_id=10**6, pad_id=0, greedy=True,
                 micro_batch_size=4)
    total = 0
    for ctx in contexts:
        for kv in ctx.key_value_memory_dict.values():
            total += sum(t.numel() * t.element_size() for t in kv if torch.is_tensor(t))
    return total


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_bytes_equal_the_rollout_allocation(tmp_path, tp):
    from megatron_gad.models.arch import load_arch
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.planner import kv_cache_bytes
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "llama", seed=0)
    measured = run_local(_rollout, tp, path, tp)
    planned = kv_cache_bytes(load_arch(path), tp, 1, ROWS, PROMPT + NEW, "bfloat16")
    assert measured == [planned] * tp
