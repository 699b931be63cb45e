import pytest
import torch

pytestmark = pytest.mark.gpu


def _inputs(N=4, n=8, H=256, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ht = torch.randn(N, H, device="cuda", generator=g)
    hs = torch.randn(N * n, H, device="cuda", generator=g)
    return ht, hs


def test_te_head_matches_torch():
    pytest.importorskip("transformer_engine")
    from megatron_gad.kernels.disc_loss import disc_head_bt_loss
    from megatron_gad.kernels.te_disc import TEDiscHead

    N, n, H = 4, 8, 256
    head = TEDiscHead(H, bias=True).cuda()
    with torch.no_grad():
        head.proj.weight[0].normal_(0, 0.05)
        head.proj.bias[0] = 0.3
    w = head.weight.detach().clone().requires_grad_()
    b = head.proj.bias[:1].detach().clone().requires_grad_()
    ht, hs = _inputs(N, n, H)
    ht1, hs1 = ht.clone().requires_grad_(), hs.clone().requires_grad_()
    loss, m, t, s = disc_head_bt_loss(ht1, hs1, head, None, n, impl="te", score_reg_coef=0.01)
    loss.backward()
    ht2, hs2 = ht.clone().requires_grad_(), hs.clone().requires_grad_()
    loss2, m2, t2, s2 = disc_head_bt_loss(ht2, hs2, w, b, n, impl="torch", score_reg_coef=0.01)
    loss2.backward()
    tol = dict(atol=1e-3, rtol=1e-3)  # TE may use TF32 GEMMs
    torch.testing.assert_close(loss, loss2, **tol)
    torch.testing.assert_close(t, t2, **tol)
    torch.testing.assert_close(s, s2, **tol)
    torch.testing.assert_close(ht1.grad, ht2.grad, **tol)
    torch.testing.assert_close(hs1.grad, hs2.grad, **tol)
    torch.testing.assert_close(head.proj.weight.grad[:1], w.grad, **tol)
    assert (head.proj.weight.grad[1:] == 0).all()  # padding rows never move
    torch.testing.assert_close(float(m["d_acc"]), float(m2["d_acc"]))


def test_triton_cuda_matches_torch():
    pytest.importorskip("triton")
    from megatron_gad.kernels.disc_loss import disc_head_bt_loss

    N, n, H = 8, 8, 2048
    ht, hs = _inputs(N, n, H, seed=1)
    w = (torch.randn(1, H, device="cuda") * 0.02)
    b = torch.zeros(1, device="cuda")
    res = []
    for impl in ("torch", "triton"):
        xs = [x.clone().requires_grad_() for x in (ht, hs, w, b)]
        loss, _, t, s = disc_head_bt_loss(*xs, n, impl=impl)
        loss.backward()
        res.append([loss, t, s] + [x.grad for x in xs])
    for a, c in zip(*res):
        torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
