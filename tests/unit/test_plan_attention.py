"""The memory plan's activation estimate follows the attention backend: eager keeps [heads/TP, s, s]
score matrices per layer (the S^2 term), the fused kernels none."""

from __future__ import annotations

import pytest

from tests.unit.test_plan import _cfg


def test_score_copies_per_backend():
    from megatron_gad.planner import attention_score_copies

    assert attention_score_copies("auto", "bfloat16") == 0  # auto on a GPU in bf16: a fused kernel
    assert attention_score_copies("auto", "float32") == 1  # auto in fp32: eager, fp32 probabilities
    assert attention_score_copies("eager", "bfloat16") == 3  # fp32 probabilities (2) + their bf16 cast
    for fused in ("sdpa", "varlen", "flex", "flash"):
        assert attention_score_copies(fused, "bfloat16") == attention_score_copies(fused, "float32") == 0


def test_eager_adds_exactly_the_score_matrices(monkeypatch):
    from megatron_gad.tools.plan import GPUS, build_plan, load_archs

    monkeypatch.delenv("MEGATRON_GAD_ATTENTION_BACKEND", raising=False)
    cfg = _cfg("actor_rollout_ref.actor.megatron.params_dtype=bfloat16")
    archs = load_archs(cfg)
    fused = {p["phase"]: p for p in build_plan(cfg, archs, GPUS["h100-80gb"])["phases"]}
    eager_cfg = _cfg("actor_rollout_ref.actor.megatron.params_dtype=bfloat16",
                     "actor_rollout_ref.actor.megatron.attention_backend=eager")
    eager = {p["phase"]: p for p in build_plan(eager_cfg, archs, GPUS["h100-80gb"])["phases"]}
    m, a, d = cfg.actor_rollout_ref.actor.megatron, archs["actor"], cfg.data
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    seq = d.max_prompt_length + d.max_response_length
    tokens = cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu if cfg.actor_rollout_ref.actor.use_dynamic_bsz \
        else cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu * seq
    full, rest = divmod(tokens, seq)
    s2 = full * seq * seq + rest * rest
    # 3 bf16-sized copies of [heads/TP, s, s] per sequence, every layer of the first stage, PP in flight
    expected = 3 * (a.num_heads / tp) * s2 * (a.num_layers // pp) * 2 * pp
    assert eager["actor_update"]["transient"] - fused["actor_update"]["transient"] == pytest.approx(expected, rel=1e-9)
    assert expected > 2**30  # not a rounding error: GiBs at GAD lengths
    # the environment override wins, as in the model build
    monkeypatch.setenv("MEGATRON_GAD_ATTENTION_BACKEND", "eager")
    env = {p["phase"]: p for p in build_plan(cfg, archs, GPUS["h100-80gb"])["phases"]}
    assert env["actor_update"]["transient"] == eager["actor_update"]["transient"]
