import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_gad.algos import discriminator_loss
from megatron_gad.kernels import disc_loss as dl
from megatron_gad.kernels.disc_loss import disc_head_bt_loss, disc_head_scores, gather_last_hidden, resolve_impl


def _case(N=3, n=4, H=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    return mk(N, H), mk(N * n, H), mk(1, H), mk(1)


def test_gather_last_hidden_left_and_right_padding():
    S, B, H = 5, 3, 2
    hidden = torch.arange(S * B * H, dtype=torch.float32).view(S, B, H)
    # right padding: last valid token varies; left padding: always S-1
    for last in (torch.tensor([2, 4, 0]), torch.full((B,), S - 1)):
        out = gather_last_hidden(hidden, last)
        assert out.shape == (B, H)
        for b in range(B):
            assert torch.equal(out[b], hidden[last[b], b])


def test_torch_path_matches_algos_on_scores():
    ht, hs, w, b = _case()
    loss, m, t, s = disc_head_bt_loss(ht, hs, w, b, n=4, impl="torch", score_reg_coef=0.05)
    t_ref = (ht @ w.t()).squeeze(-1) + b
    s_ref = (hs @ w.t()).squeeze(-1) + b
    loss_ref, m_ref = discriminator_loss(s_ref, t_ref, 4, 0.05)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(t, t_ref.detach())
    torch.testing.assert_close(disc_head_scores(hs, w, b), s_ref)
    assert not t.requires_grad and not s.requires_grad
    assert m.keys() == m_ref.keys()
    for k in m:
        torch.testing.assert_close(m[k], m_ref[k])


@pytest.mark.parametrize("with_bias,coef", [(True, 0.0), (False, 0.1)])
def test_torch_path_gradcheck_float64(with_bias, coef):
    ht, hs, w, b = _case(N=2, n=3, H=5, dtype=torch.float64)
    fn = lambda ht, hs, w, *bb: disc_head_bt_loss(ht, hs, w, bb[0] if bb else None, 3, "torch", coef)[0]
    inputs = (ht, hs, w, b) if with_bias else (ht, hs, w)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_resolve_impl_cpu(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dl._logged.clear()
    with caplog.at_level(logging.INFO, logger="megatron_gad"):
        assert resolve_impl("auto") == "torch"
        assert resolve_impl("auto") == "torch"
    assert len([r for r in caplog.records if "disc loss" in r.message]) == 1  # logged once
    assert resolve_impl("torch") == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        resolve_impl("triton")
    with pytest.raises(RuntimeError, match="transformer_engine"):
        resolve_impl("te")
    with pytest.raises(ValueError, match="auto"):
        resolve_impl("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dl._has_module("triton"):
        assert resolve_impl("auto") == "triton"


# Triton in the interpreter, in a fresh process: TRITON_INTERPRET must precede `import triton`.
_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from megatron_gad.kernels.disc_loss import disc_head_bt_loss
    from megatron_gad.kernels.triton_disc import TritonBTFromScores
    from megatron_gad.algos import discriminator_loss

    def run(N, n, H, bias, coef, seed):
        g = torch.Generator().manual_seed(seed)
        base = [torch.randn(N, H, generator=g), torch.randn(N * n, H, generator=g),
                torch.randn(1, H, generator=g) * 0.3, torch.randn(1, generator=g)]
        res = {}
        for impl in ("torch", "triton"):
            xs = [x.clone().requires_grad_() for x in base]
            loss, m, t, s = disc_head_bt_loss(xs[0], xs[1], xs[2], xs[3] if bias else None, n, impl, coef)
            loss.backward()
            res[impl] = [loss, t, s] + [x.grad for x in xs[: 4 if bias else 3]] + [m]
        a, b = res["torch"], res["triton"]
        for x, y in zip(a[:-1], b[:-1]):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        assert a[-1].keys() == b[-1].keys()
        for k in a[-1]:
            torch.testing.assert_close(b[-1][k], a[-1][k], atol=1e-5, rtol=1e-5)

    run(N=3, n=4, H=40, bias=True, coef=0.0, seed=0)    # H not a multiple of the block
    run(N=2, n=3, H=300, bias=False, coef=0.1, seed=1)  # n not a power of 2, 2 H blocks
    run(N=4, n=1, H=8, bias=True, coef=0.02, seed=2)    # n = 1

    # scores-only kernel (used by the TE path)
    t = torch.randn(3, requires_grad=True); s = torch.randn(9, requires_grad=True)
    loss = TritonBTFromScores.apply(t, s, 3, 0.1); loss.backward()
    t2 = t.detach().clone().requires_grad_(); s2 = s.detach().clone().requires_grad_()
    ref, _ = discriminator_loss(s2, t2, 3, 0.1); ref.backward()
    torch.testing.assert_close(loss, ref); torch.testing.assert_close(t.grad, t2.grad)
    torch.testing.assert_close(s.grad, s2.grad)
    print("TRITON_OK")
    """
)


def test_triton_interpreted_matches_torch():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "TRITON_OK" in r.stdout, r.stdout + r.stderr


def test_gather_last_hidden_grad():
    hidden = torch.randn(4, 3, 2, requires_grad=True)
    last = torch.tensor([3, 0, 2])
    g = torch.randn(3, 2)
    (gather_last_hidden(hidden, last) * g).sum().backward()
    want = torch.zeros(4, 3, 2)
    for b in range(3):
        want[last[b], b] = g[b]
    assert torch.equal(hidden.grad, want)
