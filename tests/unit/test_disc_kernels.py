import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_gad.algos import discriminator_loss, discriminator_loss_paired
from megatron_gad.config import CriticConfig
from megatron_gad.kernels import disc_loss as dl
from megatron_gad.kernels.disc_loss import (
    disc_bt_loss_packed,
    disc_head_bt_loss,
    disc_head_scores,
    gather_last_hidden,
    resolve_impl,
)


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


def test_resolve_auto_never_picks_te(monkeypatch):
    # a GPU box with Transformer Engine: auto must still pick a kernel that runs on a plain weight
    monkeypatch.setattr(dl, "_te_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl("auto", "cpu") == "torch"  # CPU tensors on a CUDA box: Triton cannot run them
    monkeypatch.setattr(dl, "_has_module", lambda name: True)
    assert resolve_impl("auto", "cuda") == "triton"
    monkeypatch.setattr(dl, "_has_module", lambda name: name != "triton")
    assert resolve_impl("auto", "cuda") == "torch"


class _FakeShard:  # just the critic's value head: the loss function needs nothing else
    def __init__(self, *args, **kwargs):
        g = torch.Generator().manual_seed(3)
        head = torch.nn.Linear(8, 1)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, 8, generator=g))
        self.module = type("M", (), {"output_layer": head})()

    def offload(self, **kinds):  # the worker settles its memory at construction; nothing to move here
        pass


def _critic_mb(T=30, k=2, teacher_of=(0, 0, 0, 1, 1)):
    last = torch.tensor([4, 9, 13, 18, 22, 26, 29])[: k + len(teacher_of)]
    return {"last": last, "num_teachers": k, "teacher_of": torch.tensor(teacher_of),
            "pairs_total": float(len(teacher_of)), "share_scale": 1.0,
            "identical": torch.zeros(len(teacher_of), dtype=torch.bool),
            "eos_mismatch": torch.zeros(len(teacher_of), dtype=torch.bool)}


def test_critic_loss_with_te_installed(monkeypatch):
    """Defect 1: with TE + CUDA present, fused_loss=auto resolved to "te" and every critic loss
    raised on the plain ValueHead weight. Drives the worker's own __init__ and loss function."""
    from megatron_gad.workers import critic as critic_mod

    monkeypatch.setattr(dl, "_te_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(critic_mod, "ModelShard", _FakeShard)
    worker = critic_mod.CriticWorker(CriticConfig(score_reg_coef=0.1), model_path="unused", vocab_divisible_by=1,
                                     total_steps=1, eos_id=2)
    mb = _critic_mb()
    hidden = torch.randn(1, 30, 8, requires_grad=True)
    loss, metrics = worker._pair_loss("critic/")(hidden, mb)
    loss.backward()
    head = worker.shard.module.output_layer
    scores = (hidden[0, mb["last"]] @ head.weight.t()).squeeze(-1) + head.bias
    ref, ref_m = discriminator_loss_paired(scores[2:], scores[:2], mb["teacher_of"], 0.1)
    torch.testing.assert_close(loss, ref)
    assert metrics["critic/d_acc"] == pytest.approx(float(ref_m["d_acc"]))
    assert hidden.grad.abs().sum() > 0


def test_critic_refuses_te():
    from megatron_gad.workers.critic import CriticWorker

    with pytest.raises(ValueError, match="not used in training"):
        CriticWorker(CriticConfig(fused_loss="te"), model_path="unused", vocab_divisible_by=1, total_steps=1,
                    eos_id=2)
    hidden, w = torch.randn(1, 30, 8), torch.randn(1, 8)
    mb = _critic_mb()
    with pytest.raises(ValueError, match="not used in training"):
        disc_bt_loss_packed(hidden, mb["last"], 2, mb["teacher_of"], w, None, impl="te")


def test_paired_loss_counts_each_teacher_once():
    t = torch.tensor([1.0, -1.0])
    s = torch.tensor([0.0, 2.0, 1.0])  # teacher 0 has two students, teacher 1 one
    loss, m = discriminator_loss_paired(s, t, torch.tensor([0, 0, 1]), score_reg_coef=0.1)
    sp = lambda x: float(torch.nn.functional.softplus(torch.tensor(x)))
    bt = (sp(-1.0) + sp(1.0) + sp(2.0)) / 3
    assert float(m["d_loss"]) == pytest.approx(bt, abs=1e-6)
    assert float(m["score_reg"]) == pytest.approx(0.1 * (1 + 1 + 0 + 4 + 1) / 5, abs=1e-6)
    assert float(m["teacher_value_mean"]) == pytest.approx(0.0)
    assert float(m["d_acc"]) == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(bt + float(m["score_reg"]), abs=1e-6)
    # whole groups: the same as discriminator_loss
    s4 = torch.tensor([0.0, 2.0, 1.0, -3.0])
    a, ma = discriminator_loss_paired(s4, t, torch.tensor([0, 0, 1, 1]), 0.2)
    b, mb = discriminator_loss(s4, t, 2, 0.2)
    torch.testing.assert_close(a, b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_packed_torch_path_matches_gathered():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 40, 6, generator=g, requires_grad=True)
    w, b = torch.randn(1, 6, generator=g), torch.randn(1, generator=g)
    rows = torch.tensor([5, 11, 17, 23, 29, 35, 39])  # 2 teachers, 5 students (n = 0: ragged)
    teacher_of = torch.tensor([0, 0, 1, 1, 1])
    loss, _, t, s = disc_bt_loss_packed(hidden, rows, 2, teacher_of, w, b, "torch", 0.05)
    loss.backward()
    h = hidden.detach()[0, rows]
    torch.testing.assert_close(t, h[:2] @ w[0] + b)
    torch.testing.assert_close(s, h[2:] @ w[0] + b)
    others = torch.ones(40, dtype=torch.bool)
    others[rows] = False
    assert (hidden.grad[0, others] == 0).all() and (hidden.grad[0, rows] != 0).all()
    # whole groups: the gathered-rows API gives the same loss and metrics
    tw = torch.tensor([0, 0, 0, 1, 1, 1])
    rows6 = torch.tensor([1, 5, 11, 17, 23, 29, 35, 39])
    l1, m1, _, _ = disc_bt_loss_packed(hidden.detach(), rows6, 2, tw, w, b, "torch", 0.05)
    h6 = hidden.detach()[0, rows6]
    l2, m2, _, _ = disc_head_bt_loss(h6[:2], h6[2:], w, b, 3, "torch", 0.05)
    torch.testing.assert_close(l1, l2)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k])


# Triton in the interpreter, in a fresh process: TRITON_INTERPRET must precede `import triton`.
_TRITON_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from megatron_gad.kernels.disc_loss import disc_bt_loss_packed, disc_head_bt_loss

    TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: {}}  # {}: torch's bf16 tolerances
    worst = {}

    def case(name, T, H, k, teacher_of, dtype, bias, coef, seed, layout="1TH"):
        g = torch.Generator().manual_seed(seed)
        P = len(teacher_of)
        rows = torch.randperm(T, generator=g)[: k + P]  # distinct last-token rows, any order
        teacher_of = torch.tensor(teacher_of)
        base = [torch.randn(T, H, generator=g).to(dtype), (torch.randn(1, H, generator=g) * 0.3).to(dtype),
                torch.randn(1, generator=g).to(dtype)]
        res = {}
        for impl in ("torch", "triton", "triton"):
            hid, w, b = (x.clone().requires_grad_() for x in base)
            # the critic hands over [1, T, H]; [T, 1, H] transposed is a strided view of the same
            x = {"1TH": hid[None], "TH": hid, "T1H": hid[:, None].transpose(0, 1)}[layout]
            loss, m, t, s = disc_bt_loss_packed(x, rows, k, teacher_of, w, b if bias else None, impl, coef)
            loss.backward()
            out = [loss, t, s, hid.grad, w.grad] + ([b.grad] if bias else [])
            if impl in res:  # a second run: bit-identical (no atomics anywhere)
                assert all(torch.equal(u, v) for u, v in zip(out, res[impl][0])), name
            res[impl] = (out, m)
        (ref, mref), (got, mgot) = res["torch"], res["triton"]
        others = torch.ones(T, dtype=torch.bool)
        others[rows] = False
        assert (got[3][others] == 0).all(), f"{name}: dh written outside the gathered rows"
        names = ["loss", "t", "s", "dh", "dw", "db"]
        for nm, u, v in zip(names, ref, got):
            assert u.dtype == v.dtype and u.shape == v.shape, (name, nm, u.dtype, v.dtype, u.shape, v.shape)
            torch.testing.assert_close(v, u, **TOL[dtype], msg=lambda m: f"{name} {nm}: {m}")
            key = f"{dtype}".split(".")[1]
            worst[key] = max(worst.get(key, 0.0), float((v.double() - u.double()).abs().max()))
        assert mref.keys() == mgot.keys()
        for key in mref:
            torch.testing.assert_close(mgot[key], mref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} {key}: {m}")

    whole = [i for i in range(3) for _ in range(4)]  # 3 teachers x n=4
    ragged = [1] * 17 + [0, 0] + [2] + [1] * 3  # split groups: 2, 20 (two student blocks), 1 students
    for dtype in (torch.float32, torch.bfloat16):
        case("whole", 64, 40, 3, whole, dtype, bias=True, coef=0.0, seed=0)  # H not a block multiple
        case("whole-reg", 64, 40, 3, whole, dtype, bias=False, coef=0.1, seed=1, layout="TH")
        case("ragged", 96, 300, 3, ragged, dtype, bias=True, coef=0.05, seed=2)  # 3 H blocks
        case("ragged-noreg", 96, 136, 3, ragged, dtype, bias=False, coef=0.0, seed=3, layout="T1H")
        case("one-pair", 8, 8, 1, [0], dtype, bias=True, coef=0.02, seed=4)

    # the gathered-rows API routes impl="triton" through the same kernels
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 24, generator=g), torch.randn(6, 24, generator=g), torch.randn(1, 24, generator=g),
          torch.randn(1, generator=g)]
    grads = []
    for impl in ("torch", "triton"):
        ys = [x.clone().requires_grad_() for x in xs]
        loss, m, t, s = disc_head_bt_loss(*ys, 3, impl, 0.1)
        loss.backward()
        grads.append([loss, t, s] + [y.grad for y in ys])
    for u, v in zip(*grads):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)
    print("TRITON_OK", json.dumps(worst))
    """
)


def test_triton_interpreted_matches_torch():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "TRITON_OK" in r.stdout, r.stdout + r.stderr
    print(r.stdout.strip())  # max |triton - torch| over loss, scores and all gradients, per dtype


def test_gather_last_hidden_grad():
    hidden = torch.randn(4, 3, 2, requires_grad=True)
    last = torch.tensor([3, 0, 2])
    g = torch.randn(3, 2)
    (gather_last_hidden(hidden, last) * g).sum().backward()
    want = torch.zeros(4, 3, 2)
    for b in range(3):
        want[last[b], b] = g[b]
    assert torch.equal(hidden.grad, want)


def test_pooled_head_scores_matches_fp64_mean_of_hidden():
    """critic.score_pooling=mean: the packed per-token-score path == head(mean of the response's hidden
    states) computed per sequence in fp64, values and gradients; an empty response falls back to the
    last token."""
    from megatron_gad.kernels.disc_loss import pooled_head_scores

    g = torch.Generator().manual_seed(3)
    lens, resp = [5, 9, 3, 7], [2, 9, 0, 4]  # sequence lengths in the packed row; response tokens of each
    T, H = sum(lens) + 2, 6  # + a tail segment of padding
    hidden = torch.randn(1, T, H, generator=g, requires_grad=True)
    w, b = torch.randn(1, H, generator=g, requires_grad=True), torch.randn(1, generator=g, requires_grad=True)
    last = torch.tensor(lens).cumsum(0) - 1
    got = pooled_head_scores(hidden, last, torch.tensor(resp), w, b)

    h64, w64, b64 = hidden.detach().double()[0].requires_grad_(), w.detach().double().requires_grad_(), \
        b.detach().double().requires_grad_()
    want = []
    for end, r in zip(last.tolist(), resp):
        rows = h64[end - max(r, 1) + 1:end + 1]  # the response's tokens (the last token when it has none)
        want.append(rows.mean(0) @ w64[0] + b64[0])
    want = torch.stack(want)
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    up = torch.randn(len(lens), generator=g)
    got.backward(up)
    want.backward(up.double())
    assert torch.allclose(hidden.grad[0].double(), h64.grad, atol=1e-6)
    assert torch.allclose(w.grad.double(), w64.grad, atol=1e-5)
    assert torch.allclose(b.grad.double(), b64.grad, atol=1e-6)
    assert not hidden.grad[0, sum(lens):].any()  # padding receives no gradient


def test_pooled_identical_segments_bitwise_equal():
    from megatron_gad.kernels.disc_loss import pooled_head_scores

    seg = torch.randn(11, 8)
    hidden = torch.cat([torch.randn(4, 8), seg, torch.randn(3, 8), seg])  # the same 11-token sequence twice
    last = torch.tensor([3, 14, 17, 28])
    s = pooled_head_scores(hidden, last, torch.tensor([2, 7, 1, 7]), torch.randn(1, 8), torch.zeros(1))
    assert s[1].item() == s[3].item()


def test_packed_loss_mean_pooling_torch_only():
    from megatron_gad.kernels.disc_loss import disc_bt_loss_packed, pooled_head_scores

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 4, generator=g)
    rows, pool = torch.tensor([4, 9, 14, 19]), torch.tensor([3, 2, 4, 5])
    w, b = torch.randn(1, 4, generator=g), torch.zeros(1)
    loss, _, t, s = disc_bt_loss_packed(hidden, rows, 2, torch.tensor([0, 1]), w, b, impl="torch", pool_len=pool)
    scores = pooled_head_scores(hidden, rows, pool, w, b)
    assert torch.equal(t, scores[:2]) and torch.equal(s, scores[2:])
    ref, _ = discriminator_loss_paired(scores[2:], scores[:2], torch.tensor([0, 1]))
    assert torch.allclose(loss, ref)
    with pytest.raises(ValueError, match="mean pooling"):
        disc_bt_loss_packed(hidden, rows, 2, torch.tensor([0, 1]), w, b, impl="triton", pool_len=pool)
