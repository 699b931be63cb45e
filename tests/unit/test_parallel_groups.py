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
