import math

import pytest
import torch

from megatron_gad.algos import (
    agg_denominator,
    agg_loss,
    compute_grpo_advantages,
    compute_rloo_advantages,
    discriminator_loss,
    entropy_from_logits,
    get_adv_estimator,
    get_kl_penalty,
    get_policy_loss,
    kl_penalty,
    ppo_policy_loss,
    sft_loss,
)


def _sp(x):  # -logsigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


# ---- discriminator -------------------------------------------------------------------
def test_discriminator_loss_hand_values():
    t = torch.tensor([1.0, 0.0])  # N=2
    s = torch.tensor([0.0, 2.0, 0.0, -1.0])  # n=2: pairs (1,0) (1,2) (0,0) (0,-1)
    loss, m = discriminator_loss(s, t, n=2)
    want = (_sp(1.0) + _sp(-1.0) + _sp(0.0) + _sp(1.0)) / 4
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert float(m["d_loss"]) == pytest.approx(want, abs=1e-6)
    assert float(m["d_acc"]) == pytest.approx(0.625)  # 1>0, 0>-1 true; 1>2 false; 0=0 a tie counts half
    assert float(m["student_value_mean"]) == pytest.approx(0.25)
    assert float(m["teacher_value_mean"]) == pytest.approx(0.5)
    assert float(m["score_gap"]) == pytest.approx(0.25)
    assert float(m["score_reg"]) == 0.0


def test_discriminator_loss_reg_and_grad_direction():
    t = torch.tensor([1.0, 0.0], requires_grad=True)
    s = torch.tensor([0.0, 2.0, 0.0, -1.0], requires_grad=True)
    loss, m = discriminator_loss(s, t, n=2, score_reg_coef=0.1)
    reg = 0.1 * (1 + 0 + 0 + 4 + 0 + 1) / 6
    assert float(m["score_reg"]) == pytest.approx(reg, abs=1e-6)
    assert loss.item() == pytest.approx(float(m["d_loss"]) + reg, abs=1e-6)
    loss.backward()
    # without the reg term: teacher pushed up, students pushed down
    loss2, _ = discriminator_loss(s, t, n=2)
    gs, gt = torch.autograd.grad(loss2, [s, t])
    assert (gs > 0).all() and (gt < 0).all()


def test_discriminator_loss_shape_check():
    with pytest.raises(AssertionError):
        discriminator_loss(torch.zeros(5), torch.zeros(2), n=2)


# ---- advantages ----------------------------------------------------------------------
def test_grpo_hand_values_and_mask():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])  # groups (1,3), (5,5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]])
    adv, ret = compute_grpo_advantages(r, mask, n=2)
    std = math.sqrt(2.0)  # unbiased std of (1,3)
    a = 1.0 / (std + 1e-6)
    want = torch.tensor([[-a, -a, 0], [a, 0, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(adv, want)
    assert torch.equal(adv, ret)
    adv_nostd, _ = compute_grpo_advantages(r, mask, n=2, norm_by_std=False)
    assert adv_nostd[0, 0].item() == pytest.approx(-1.0)


def test_grpo_equal_rewards_zero_no_nan():
    adv, _ = compute_grpo_advantages(torch.full((8,), 0.7), torch.ones(8, 4), n=4)
    assert torch.isfinite(adv).all() and (adv == 0).all()


def test_n1_gives_zero_advantage():
    for fn in (compute_grpo_advantages, compute_rloo_advantages):
        adv, _ = fn(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, 2), n=1)
        assert (adv == 0).all() and torch.isfinite(adv).all()


def test_rloo_hand_values():
    r = torch.tensor([1.0, 2.0, 6.0])  # one group of 3
    adv, _ = compute_rloo_advantages(r, torch.ones(3, 1), n=3)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_adv_registry():
    assert get_adv_estimator("grpo") is compute_grpo_advantages
    assert get_adv_estimator("rloo") is compute_rloo_advantages
    with pytest.raises(ValueError, match="grpo"):
        get_adv_estimator("gae_typo")


# ---- aggregation -----------------------------------------------------------------------
def test_agg_modes_differ_as_expected():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(7 / 5)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((4 + 3) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1 + 3) / 2)
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(loss, mask, "bogus")


def test_agg_seq_mean_token_sum_norm_hand_value():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    # Dr. GRPO: token sums over sequences, divided by sequences x a constant horizon
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((4 + 3) / (2 * 4))
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", horizon=10).item() == pytest.approx(7 / 20)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_shares_sum_to_the_whole_batch_loss(mode):
    """With the mini-batch's denominator, micro-batch losses add up to the whole batch's loss — for
    any split, including very uneven ones (the over-weighting of short micro-batches is gone).
    Reference: the definitions written out in fp64."""
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(7, 9, generator=g, dtype=torch.float64)
    lens = torch.tensor([1, 9, 2, 8, 3, 5, 9])
    mask = (torch.arange(9)[None] < lens[:, None]).long()
    tok_sum = (loss * mask).sum(-1)
    want = {"token-mean": tok_sum.sum() / lens.sum(), "seq-mean-token-sum": tok_sum.mean(),
            "seq-mean-token-mean": (tok_sum / lens).mean(), "seq-mean-token-sum-norm": tok_sum.sum() / (7 * 12)}[mode]
    denom = agg_denominator(mask, mode, horizon=12)
    for split in ([7], [1, 6], [3, 1, 3], [1] * 7):
        parts = torch.split(torch.arange(7), split)
        got = sum(agg_loss(loss[p], mask[p], mode, denominator=denom, horizon=12) for p in parts)
        assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-12)


def test_agg_all_masked_is_zero_not_nan():
    z = agg_loss(torch.ones(2, 3), torch.zeros(2, 3), "token-mean")
    assert z.item() == 0.0


# ---- PPO ------------------------------------------------------------------------------
def _ppo(ratio, adv, **kw):
    ratio = torch.tensor([ratio])[None]
    old = torch.zeros_like(ratio)
    return ppo_policy_loss(old, ratio.log(), torch.tensor([[adv]]), torch.ones_like(ratio), **kw)


def test_ppo_positive_advantage_clip_boundaries():
    # A > 0: loss = -A * min(r, 1.2)
    loss, m = _ppo(1.1, 2.0)
    assert loss.item() == pytest.approx(-2.2, rel=1e-6) and float(m["pg_clipfrac"]) == 0.0
    loss, m = _ppo(1.5, 2.0)
    assert loss.item() == pytest.approx(-2.4, rel=1e-6) and float(m["pg_clipfrac"]) == 1.0
    loss, m = _ppo(0.5, 2.0)  # below the low bound: not clipped for A > 0
    assert loss.item() == pytest.approx(-1.0, rel=1e-6) and float(m["pg_clipfrac"]) == 0.0


def test_ppo_negative_advantage_and_dual_clip():
    loss, m = _ppo(0.5, -1.0)  # clipped at 0.8
    assert loss.item() == pytest.approx(0.8, rel=1e-6) and float(m["pg_clipfrac"]) == 1.0
    loss, m = _ppo(2.0, -1.0)  # between 1.2 and c=3: unclipped
    assert loss.item() == pytest.approx(2.0, rel=1e-6) and float(m["pg_clipfrac_lower"]) == 0.0
    loss, m = _ppo(10.0, -1.0)  # dual clip caps at c * |A|
    assert loss.item() == pytest.approx(3.0, rel=1e-6) and float(m["pg_clipfrac_lower"]) == 1.0
    # capped loss passes no gradient
    lp = torch.tensor([[math.log(10.0)]], requires_grad=True)
    loss, _ = ppo_policy_loss(torch.zeros(1, 1), lp, torch.tensor([[-1.0]]), torch.ones(1, 1))
    loss.backward()
    assert lp.grad.item() == 0.0


def test_ppo_asymmetric_clip_and_metrics():
    loss, _ = _ppo(1.5, 1.0, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(-1.28, rel=1e-6)
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.1, -0.2, 0.0]])
    _, m = ppo_policy_loss(old, lp, torch.ones(1, 3), torch.tensor([[1, 1, 0]]))
    assert float(m["ppo_kl"]) == pytest.approx((-0.1 + 0.2) / 2, abs=1e-6)


def test_policy_registry():
    assert get_policy_loss("vanilla") is ppo_policy_loss
    assert get_policy_loss("ppo") is ppo_policy_loss
    with pytest.raises(ValueError, match="vanilla"):
        get_policy_loss("nope")


# ---- KL / entropy / SFT ---------------------------------------------------------------
def test_kl_kinds_hand_values():
    lp, ref = torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "kl"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "mse"), torch.tensor([0.5, 0.5]))
    k3 = torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1])
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), k3)
    torch.testing.assert_close(get_kl_penalty("k3")(lp, ref), k3)


def test_k3_nonnegative_and_clamped():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    k3 = kl_penalty(lp, ref, "k3")
    assert (k3 >= 0).all() and (k3 <= 10).all() and torch.isfinite(k3).all()
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([100.0]), "k3").item() == 10.0
    with pytest.raises(ValueError, match="low_var_kl"):
        get_kl_penalty("k9")


def test_entropy_from_logits():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 4)), torch.full((2,), math.log(4)))
    x = torch.tensor([[1000.0, 1000.0, float("-inf")]])  # large and masked entries: no overflow/NaN
    torch.testing.assert_close(entropy_from_logits(x), torch.tensor([math.log(2)]))
    y = torch.randn(3, 7)
    p = y.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(y), -(p * p.log()).sum(-1))


def test_sft_loss():
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(2.0) and float(m["sft_loss"]) == pytest.approx(2.0)
    loss, _ = sft_loss(lp, mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((1.5 + 3.0) / 2)
