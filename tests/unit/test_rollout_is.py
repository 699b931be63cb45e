"""Training-inference mismatch metrics and truncated importance weights, against fp64 formulas
written out here."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gad import algos


def _data():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    return old, rollout, mask


def test_logprob_mismatch():
    old, rollout, mask = _data()
    diffs = [abs(float(old[i, j] - rollout[i, j])) for i in range(3) for j in range(5) if mask[i, j]]
    m = algos.logprob_mismatch(old, rollout, mask)
    assert m["rollout/logprob_diff_max"] == pytest.approx(max(diffs), rel=1e-12)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_is_weights(level):
    old, rollout, mask = _data()
    w, m = algos.rollout_is_weights(old, rollout, mask, level, threshold=1.5)
    raw = []
    for i in range(3):
        seq = sum(float(old[i, j] - rollout[i, j]) for j in range(5) if mask[i, j])
        for j in range(5):
            if not mask[i, j]:
                assert w[i, j] == 0
                continue
            r = math.exp(seq if level == "sequence" else float(old[i, j] - rollout[i, j]))
            raw.append(r)
            assert float(w[i, j]) == pytest.approx(min(r, 1.5), rel=1e-12)
    assert m["rollout_is/max"] == pytest.approx(max(raw), rel=1e-12)
    assert m["rollout_is/truncated_frac"] == pytest.approx(sum(r > 1.5 for r in raw) / len(raw))
    assert m["rollout_is/mean"] == pytest.approx(sum(min(r, 1.5) for r in raw) / len(raw), rel=1e-12)


def test_is_weights_scale_the_policy_gradient_per_token():
    """With weights w, each token's PPO loss term is multiplied by w (loss and gradient)."""
    old, rollout, mask = _data()
    lp = (old + 0.05).clone().requires_grad_(True)
    adv = torch.linspace(-1, 1, 15, dtype=torch.float64).view(3, 5)
    w, _ = algos.rollout_is_weights(old, rollout, mask, "token", 2.0)
    loss_w, _ = algos.ppo_policy_loss(old, lp, adv, mask, loss_agg_mode="seq-mean-token-sum", is_weights=w)
    (g_w,) = torch.autograd.grad(loss_w, lp)
    # reference: the unweighted per-token loss of each token alone, times its weight
    ratio = torch.exp(lp.detach() - old)
    per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * 3.0), per_tok)
    want = (per_tok * w * mask).sum(-1).mean()
    assert float(loss_w) == pytest.approx(float(want), rel=1e-12)
    assert bool((g_w[mask == 0] == 0).all())
    assert not torch.allclose(g_w, torch.autograd.grad(algos.ppo_policy_loss(old, lp, adv, mask,
                              loss_agg_mode="seq-mean-token-sum")[0], lp)[0])


def test_bad_level():
    old, rollout, mask = _data()
    with pytest.raises(ValueError, match="token' or 'sequence"):
        algos.rollout_is_weights(old, rollout, mask, "batch", 2.0)
