"""vLLM (CPU) as the rollout engine of the new student families: an engine started from model A's config with
placeholder weights, synced from a TP2 Megatron actor holding model B (Qwen3's q/k norms among the synced
tensors; Llama 3.1's llama3 RoPE applied by vLLM from the config), gives ``transformers``' greedy tokens on B."""

from __future__ import annotations

import pytest

from tests.rollout.helpers import VLLM_SHAPE, in_fresh_process, needs_vllm
from tests.rollout.test_vllm_engine import _export_tp2, _hf_greedy, _vllm_synced

pytestmark = [needs_vllm, pytest.mark.slow]

# vLLM's CPU attention needs head_dim >= 32: 64 for every family (hidden 128, 2 heads)
FAMILIES = {"qwen3": {"head_dim": 64}, "llama31": {}, "mistral": {"head_dim": 64}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weight_sync_from_tp2_actor_per_family(tmp_path, family):
    from megatron_gad.models.arch import load_arch
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    a = make_hf_model(str(tmp_path / "a"), family, seed=1, **VLLM_SHAPE, **FAMILIES[family])
    b = make_hf_model(str(tmp_path / "b"), family, seed=2, **VLLM_SHAPE, **FAMILIES[family])
    assert load_arch(b).head_dim == 64
    sync = run_local(_export_tp2, 2, b, 64 << 10)[0]
    names = {n for bucket in sync["buckets"] for n in bucket}
    if family == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in names
    want = _hf_greedy(b)
    assert want != _hf_greedy(a)
    _, _, got = in_fresh_process(_vllm_synced, a, sync)
    assert got == want
