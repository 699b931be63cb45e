"""vLLM test helpers: skip without vLLM, tiny models vLLM's CPU attention accepts (head_dim 64), and
running a function in a fresh process (vLLM sets up its own torch.distributed world, which must not
leak into the pytest process)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import pytest

from megatron_gad.engine.vllm_engine import vllm_unavailable_reason

REASON = vllm_unavailable_reason()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"vLLM unavailable: {REASON}")

# hidden 128 with 2 query heads / 1 kv head: head_dim 64 (vLLM's CPU attention refuses 16)
VLLM_SHAPE = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 256,
              "num_hidden_layers": 2}


def make_model(path: str, family: str, seed: int = 0) -> str:
    from megatron_gad.tools.tiny_models import make_hf_model

    return make_hf_model(path, family, seed=seed, **VLLM_SHAPE)


def in_fresh_process(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result(timeout=900)
