"""The CPU adaptation of Megatron-Core (applied only without CUDA)."""

import pytest
import torch

from megatron_gad.parallel.cpu_compat import cpu_device_mode, enable_cpu_mode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the adaptation is a no-op with CUDA")


def test_cuda_allocations_and_moves_stay_on_cpu():
    with cpu_device_mode():
        a = torch.zeros(3, device="cuda")
        b = torch.ones(2, device=torch.device("cuda", 0)).cuda()
        c = torch.arange(4).to("cuda")
        d = torch.empty(2, 2, device=torch.cuda.current_device())
    assert {a.device.type, b.device.type, c.device.type, d.device.type} == {"cpu"}
    assert torch.equal(c, torch.arange(4)) and torch.equal(b, torch.ones(2))


def test_megatron_rng_tracker_and_type_checks():
    enable_cpu_mode()
    enable_cpu_mode()  # idempotent
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    cpu_state = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        pass
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the fork touches no CPU RNG state
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # what Megatron's optimizer asserts
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64
