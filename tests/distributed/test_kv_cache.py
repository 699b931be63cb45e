"""KV-cached sampling equals full recomputation (greedy and seeded sampling, left-padded prompts),
and greedy decoding equals transformers, at TP x PP 1x1 and 2x2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(rank, world, path, tp, pp, ids, mask):
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard

    role = ModelShard("actor", path, tp, pp, vocab_divisible_by=8)
    return {(kv, greedy): generate(role, ids, mask, max_new_tokens=8, eos_id=2, pad_id=0, greedy=greedy,
                                   temperature=1.0, seed=3, micro_batch_size=2, use_kv_cache=kv)
            for kv in (False, True) for greedy in (True, False)}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_kv_cache_equals_recompute_and_hf(tmp_path, tp, pp):
    from transformers import AutoModelForCausalLM

    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "qwen2", seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # a left-padded prompt in the batch
    res = run_local(_run, tp * pp, path, tp, pp, ids, mask)[-1]
    for greedy in (True, False):
        assert torch.equal(res[(True, greedy)]["responses"], res[(False, greedy)]["responses"])
        assert torch.equal(res[(True, greedy)]["response_mask"], res[(False, greedy)]["response_mask"])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for row in range(3):
        start = int((mask[row] == 0).sum())
        out = hf.generate(ids[row:row + 1, start:], max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
        got = res[(True, True)]["responses"][row]
        want = out[0, 6 - start:]
        assert got[: len(want)].tolist() == want.tolist()
