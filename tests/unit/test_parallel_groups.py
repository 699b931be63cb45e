"""``parallel.state.init_model_parallel`` asks Megatron for gloo copies of its groups only when the
process group is gloo (CPU): on NCCL (GPU) runs they are unused and, across nodes, a start-up hang
risk. Megatron's entry points are replaced by recorders (``monkeypatch``), so no process group runs."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("backend,gloo_groups", [("nccl", False), ("gloo", True)])
def test_gloo_groups_only_on_gloo(monkeypatch, backend, gloo_groups):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_gad.parallel import state

    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: calls.append(kw))
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: None)
    monkeypatch.setattr(state, "layout", lambda: "layout")

    assert state.init_model_parallel(2, 2) == "layout"
    (kw,) = calls
    # the keyword must be passed: Megatron 0.16's default is True
    assert kw.get("create_gloo_process_groups", True) is gloo_groups
    assert state.uses_gloo_groups() is gloo_groups


def test_process_group_timeout_reaches_every_group(monkeypatch):
    """``init_distributed(timeout_s=...)`` gives the default group that timeout, and the Megatron
    groups built after it (TP / PP / DP) the same, rounded up to whole minutes (Megatron's unit)."""
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_gad.parallel import state

    inits, groups = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: inits.append(kw))
    monkeypatch.setattr(state, "enable_cpu_mode", lambda: None)
    monkeypatch.setattr(state.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(state, "_timeout_s", state._timeout_s)  # restored after the test
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    state.init_distributed(0, 1, "127.0.0.1", 1, backend="gloo", timeout_s=4321)
    assert inits[0]["timeout"] == datetime.timedelta(seconds=4321)

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: groups.append(kw))
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: None)
    monkeypatch.setattr(state, "layout", lambda: "layout")
    state.init_model_parallel(1, 1)
    assert groups[0]["distributed_timeout_minutes"] == 73  # ceil(4321 / 60)


def test_default_timeout_outlasts_a_large_checkpoint_save():
    from megatron_gad.config import GADConfig
    from megatron_gad.parallel import state

    cfg = GADConfig()
    assert cfg.actor_rollout_ref.nccl_timeout == cfg.critic.nccl_timeout == state.DEFAULT_TIMEOUT_S >= 3600
