"""``<role>.megatron.attention_backend`` and ``MEGATRON_GAD_ATTENTION_BACKEND``: accepted values, the
config errors for a value that cannot run with ``trainer.device=cpu``, and the resolution order."""

from __future__ import annotations

import pytest

from megatron_gad.config import ConfigError, load_config, validate

ACTOR = "actor_rollout_ref.actor.megatron.attention_backend"


def test_values_load_and_default_to_auto(monkeypatch):
    monkeypatch.delenv("MEGATRON_GAD_ATTENTION_BACKEND", raising=False)
    cfg = load_config(None)
    assert cfg.actor_rollout_ref.actor.megatron.attention_backend == "auto"
    assert cfg.critic.megatron.attention_backend == "auto"
    assert cfg.actor_rollout_ref.ref.megatron.attention_backend is None  # the actor's
    cfg = load_config(None, [f"{ACTOR}=sdpa", "critic.megatron.attention_backend=flex",
                             "actor_rollout_ref.ref.megatron.attention_backend=eager"])
    validate(cfg)
    with pytest.raises(ConfigError, match="attention_backend"):
        load_config(None, [f"{ACTOR}=fast"])


@pytest.mark.parametrize("override,env", [(f"{ACTOR}=varlen", ""), ("critic.megatron.attention_backend=flash", ""),
                                          (None, "varlen")])
def test_cuda_only_backends_refused_on_cpu(monkeypatch, override, env):
    monkeypatch.setenv("MEGATRON_GAD_ATTENTION_BACKEND", env)
    cfg = load_config(None, ["trainer.device=cpu"] + ([override] if override else []))
    with pytest.raises(ConfigError, match="runs only on a CUDA device"):
        validate(cfg)


def test_environment_overrides_the_config(monkeypatch):
    from megatron_gad.models.attention import requested_backend

    monkeypatch.delenv("MEGATRON_GAD_ATTENTION_BACKEND", raising=False)
    assert requested_backend("sdpa") == "sdpa"
    monkeypatch.setenv("MEGATRON_GAD_ATTENTION_BACKEND", "Eager ")
    assert requested_backend("sdpa") == "eager"
    monkeypatch.setenv("MEGATRON_GAD_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="MEGATRON_GAD_ATTENTION_BACKEND='nope'"):
        requested_backend("auto")


def test_forced_backend_unavailable_names_the_reason():
    import torch

    from megatron_gad.models.attention import AttentionBackendError, announce, unavailable_reason

    assert "CUDA" in unavailable_reason("varlen", "cpu", torch.bfloat16)
    assert "bf16/fp16" in unavailable_reason("varlen", "cuda", torch.float32)
    assert "no backward on CPU" in unavailable_reason("flex", "cpu", torch.float32, needs_grad=True)
    assert unavailable_reason("flex", "cpu", torch.float32) is None
    if not torch.cuda.is_available():
        with pytest.raises(AttentionBackendError, match="actor: attention backend 'flash' unavailable"):
            announce("actor", "flash", torch.bfloat16, 128)
