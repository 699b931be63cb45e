"""The fused Triton discriminator kernel compiled for a GPU (the CPU tests run it interpreted)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_packed_matches_torch(dtype):
    pytest.importorskip("triton")
    from megatron_gad.kernels.disc_loss import disc_bt_loss_packed

    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, k = 8192, 4096, 4
    teacher_of = torch.arange(k, device="cuda").repeat_interleave(8)[:-3]  # the last group split: ragged
    rows = torch.randperm(T, device="cuda", generator=g)[: k + teacher_of.numel()]
    base = [torch.randn(1, T, H, device="cuda", generator=g).to(dtype),
            (torch.randn(1, H, device="cuda", generator=g) * 0.02).to(dtype),
            torch.zeros(1, device="cuda", dtype=dtype)]
    res = []
    for impl in ("torch", "triton"):
        xs = [x.clone().requires_grad_() for x in base]
        loss, _, t, s = disc_bt_loss_packed(xs[0], rows, k, teacher_of, xs[1], xs[2], impl, 0.01)
        loss.backward()
        res.append([loss, t, s] + [x.grad for x in xs])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}  # cuBLAS may use TF32 for the reference
    for a, c in zip(*res):
        torch.testing.assert_close(c, a, **tol)
