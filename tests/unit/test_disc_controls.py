"""Discriminator saturation controls and the EOS policy, against formulas written out here (fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gad.algos.discriminator import discriminator_loss_paired, pair_loss
from megatron_gad.workers.micro_batches import apply_eos_policy, ends_with_eos


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


DIFFS = torch.tensor([2.5, -0.7, 0.0, 0.3, -3.0], dtype=torch.float64)


@pytest.mark.parametrize("tau,eps,m", [(1.0, 0.0, 0.0), (2.0, 0.0, 0.0), (1.0, 0.1, 0.0), (0.5, 0.05, 0.4)])
def test_bt_controls(tau, eps, m):
    got = pair_loss(DIFFS, temperature=tau, label_smoothing=eps, margin=m)
    for g, d in zip(got.tolist(), DIFFS.tolist()):
        z = (d - m) / tau
        assert g == pytest.approx(-(1 - eps) * _logsig(z) - eps * _logsig(-z), rel=1e-12)


def test_hinge_and_swap():
    swap = torch.tensor([False, True, False, True, False])
    got = pair_loss(DIFFS, margin=0.5, loss_type="hinge", swap=swap)
    for g, d, sw in zip(got.tolist(), DIFFS.tolist(), swap.tolist()):
        assert g == pytest.approx(max(0.0, 1 - ((-d if sw else d) - 0.5)), rel=1e-12)
    bt = pair_loss(DIFFS, swap=swap)
    for g, d, sw in zip(bt.tolist(), DIFFS.tolist(), swap.tolist()):
        assert g == pytest.approx(-_logsig(-d if sw else d), rel=1e-12)


def test_d_acc_ignores_controls_and_new_metrics():
    s = torch.tensor([0.1, 0.5, -0.2, 0.9], dtype=torch.float64)
    t = torch.tensor([0.3, 0.0], dtype=torch.float64)
    of = torch.tensor([0, 0, 1, 1])
    _, plain = discriminator_loss_paired(s, t, of)
    loss, m = discriminator_loss_paired(s, t, of, temperature=3.0, swap=torch.tensor([True, False, False, True]))
    assert float(m["d_acc"]) == float(plain["d_acc"]) == 0.5  # pairs 0.3>0.1 and 0.0>-0.2 ranked right
    diffs = [0.3 - 0.1, 0.3 - 0.5, 0.0 + 0.2, 0.0 - 0.9]
    assert float(m["score_diff_mean"]) == pytest.approx(sum(diffs) / 4)
    assert float(m["overlap"]) == pytest.approx(2 / 4)  # 0.5 and 0.9 above the teacher mean 0.15
    assert float(m["teacher_value_std"]) == pytest.approx(0.15)
    want = sum(-_logsig((-d if sw else d) / 3.0) for d, sw in zip(diffs, [True, False, False, True])) / 4
    assert float(loss) == pytest.approx(want, rel=1e-12)


EOS = 2


def _rows():
    # right-padded responses: ends with EOS / truncated (no EOS) / EOS only / EOS then padding
    r = torch.tensor([[5, 6, EOS, 0], [5, 6, 7, 8], [EOS, 0, 0, 0], [9, EOS, 0, 0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    return r, m


@pytest.mark.parametrize("policy,side,want_last", [
    ("append", "teacher", [1, 1, 1, 1]), ("append", "student", [1, 1, 1, 1]),
    ("strip", "teacher", [0, 1, 0, 0]), ("strip", "student", [0, 1, 0, 0]),
    ("none", "teacher", [0, 1, 0, 0]), ("none", "student", [1, 1, 1, 1]),
])
def test_eos_policy(policy, side, want_last):
    r, m = _rows()
    out = apply_eos_policy(r, m, EOS, policy, side)
    lengths = m.sum(-1)
    for i in range(4):
        keep = out[i, lengths[i] - 1].item()
        assert keep == want_last[i], (policy, side, i)
        assert torch.equal(out[i, :lengths[i] - 1], m[i, :lengths[i] - 1])  # only the final token can change
    assert ends_with_eos(r, m, EOS).tolist() == [True, False, True, True]
    # works on [B, n, R] too (the critic's student samples)
    out3 = apply_eos_policy(r.view(2, 2, 4), m.view(2, 2, 4), EOS, policy, side)
    assert torch.equal(out3.view(4, 4), out)


def test_config_refusals():
    from megatron_gad.config import ConfigError, load_config, validate

    for overrides, msg in [(["critic.swap_prob=0.5"], "critic.swap_prob=0.5 must be in [0, 0.5)"),
                           (["critic.bt_temperature=0"], "critic.bt_temperature=0.0 must be > 0"),
                           (["critic.label_smoothing=0.6"], "critic.label_smoothing=0.6 must be in [0, 0.5)"),
                           (["critic.margin=0.5", "critic.fused_loss=triton"],
                            "critic.fused_loss=triton: the fused kernel computes plain Bradley-Terry")]:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
            validate(load_config(None, overrides))
