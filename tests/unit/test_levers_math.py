"""The levers' math (megatron_gad.algos) against independent float64 / per-element computations:
the BCE discriminator loss, the bounded reward, the reward mix, the GRPO std floor and the group filter."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_gad import algos


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_loss_is_the_gan_classifier_loss():
    torch.manual_seed(0)
    N, n = 3, 4
    t, s = torch.randn(N, dtype=torch.float64), torch.randn(N * n, dtype=torch.float64)
    loss, m = algos.discriminator_loss(s, t, n, loss_type="bce")
    # per pair: -log sig(t) - log(1 - sig(s)), averaged over the N*n pairs
    want = sum(-math.log(_sig(float(t[j // n]))) - math.log(1 - _sig(float(s[j]))) for j in range(N * n)) / (N * n)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    # = E_teacher[-log D] + E_student[-log(1 - D)] when every teacher has n students
    split = statistics.fmean(-math.log(_sig(float(x))) for x in t) + \
        statistics.fmean(-math.log(1 - _sig(float(x))) for x in s)
    assert float(loss) == pytest.approx(split, rel=1e-12)
    assert float(m["d_acc"]) == pytest.approx(statistics.fmean(float(t[j // n] > s[j]) for j in range(N * n)))


def test_bce_is_not_shift_invariant_and_smooths_labels():
    t, s = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5, -0.5], dtype=torch.float64)
    a, _ = algos.discriminator_loss(s, t, 2, loss_type="bce")
    b, _ = algos.discriminator_loss(s + 3, t + 3, 2, loss_type="bce")
    assert float(a) != pytest.approx(float(b))  # unlike Bradley-Terry, which sees only the gap
    eps = 0.1
    c, _ = algos.discriminator_loss(s, t, 2, loss_type="bce", label_smoothing=eps, temperature=2.0)
    want = statistics.fmean(
        -(1 - eps) * math.log(_sig(1.0 / 2)) - eps * math.log(1 - _sig(1.0 / 2))
        - (1 - eps) * math.log(1 - _sig(x / 2)) - eps * math.log(_sig(x / 2)) for x in (0.5, -0.5))
    assert float(c) == pytest.approx(want, rel=1e-12)


def test_bce_gradient_matches_finite_differences():
    t = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.1, 0.7, -1.0, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: algos.discriminator_loss(b, a, 2, loss_type="bce")[0], (t, s))


def test_sigmoid_gap_reward():
    s = torch.tensor([0.0, 2.0, -1.0, 5.0])
    t = torch.tensor([1.0, -2.0])
    got = algos.get_critic_shape("sigmoid_gap")(s, t, 2)
    want = [_sig(0.0 - 1.0), _sig(2.0 - 1.0), _sig(-1.0 + 2.0), _sig(5.0 + 2.0)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert bool(((got > 0) & (got < 1)).all())
    assert torch.equal(algos.get_critic_shape("score")(s, None, 2), s)
    with pytest.raises(ValueError, match="teacher scores"):
        algos.get_critic_shape("sigmoid_gap")(s, None, 2)


def test_mix_rewards_weights():
    d, v = torch.tensor([1.0, -2.0]), torch.tensor([1.0, 0.0])
    assert algos.mix_rewards(d, 0.5, v, 2.0).tolist() == [0.5 * 1 + 2.0, 0.5 * -2 + 0.0]
    assert algos.mix_rewards(d, 0.0, v, 1.0).tolist() == [1.0, 0.0]  # checker-only: D has no say


@pytest.mark.parametrize("floor", [0.0, 0.5, 3.0])
def test_grpo_std_floor(floor):
    r = torch.tensor([1.0, 1.1, 0.9, 1.0, 0.0, 4.0, 2.0, 6.0])
    adv, _ = algos.compute_grpo_advantages(r, torch.ones(8, 2), 4, std_floor=floor)
    for g in range(2):
        vals = r[4 * g:4 * g + 4].tolist()
        mu, sd = statistics.fmean(vals), statistics.stdev(vals)
        for j, x in enumerate(vals):
            assert float(adv[4 * g + j, 0]) == pytest.approx((x - mu) / (max(sd, floor) + 1e-6), rel=1e-5)


def test_filter_groups_keeps_spread_and_rounds_to_the_dp_size():
    r = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0, 0.0, 0.5, 7.0, 7.0])  # 5 groups of 2
    stds = [statistics.stdev(r[2 * g:2 * g + 2].tolist()) for g in range(5)]
    assert algos.filter_groups(r, 2).tolist() == [sd > 0 for sd in stds]  # [F, T, F, T, F]
    assert algos.filter_groups(r, 2, min_std=0.5).tolist() == [False, True, False, False, False]
    # 2 kept, multiple 3: one dropped group comes back (all spreads 0: the first of them)
    assert algos.filter_groups(r, 2, multiple=3).tolist() == [True, True, False, True, False]
    assert not algos.filter_groups(torch.ones(4), 2, multiple=2).any()  # nothing to learn: keep none


def _group(p_len, t_len, r_len, fill, n=2):
    """One prompt group of a critic pair batch with given unpadded lengths, ids = fill."""
    return {"prompt_ids": torch.full((1, p_len), fill), "prompt_mask": torch.ones(1, p_len, dtype=torch.long),
            "teacher_response": torch.full((1, t_len), fill),
            "teacher_response_mask": torch.ones(1, t_len, dtype=torch.long),
            "responses": torch.full((1, n, r_len), fill), "response_mask": torch.ones(1, n, r_len, dtype=torch.long)}


def test_replay_pads_each_side_and_keeps_the_newest():
    a, b = _group(2, 3, 1, 7), _group(4, 1, 3, 8)
    out = algos.cat_pair_batches([a, b], pad_id=0)
    assert out["prompt_ids"].tolist() == [[0, 0, 7, 7], [8, 8, 8, 8]]  # prompts: left padding
    assert out["prompt_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out["teacher_response"].tolist() == [[7, 7, 7], [8, 0, 0]]  # responses: right padding
    assert out["response_mask"][0].tolist() == [[1, 0, 0], [1, 0, 0]]
    buf = algos.ReplayBuffer(capacity=2, groups_per_step=5, seed=0)
    assert buf.mix(a, 0) == (a, 0)  # empty: nothing replayed
    for fill in (1, 2, 3):
        buf.add(_group(1, 1, 1, fill))
    mixed, k = buf.mix(a, 0)
    assert k == 2 and sorted(int(x) for x in mixed["prompt_ids"][1:, -1]) == [2, 3]  # capacity 2: the newest
    assert mixed["prompt_ids"][0].tolist() == [7, 7]  # this step's groups first


def test_r1_penalty_against_the_analytic_gradient():
    """D(sequence) = sum over its tokens of v . tanh(A e_t): dD/de_t = A^T (v * (1 - tanh^2(A e_t)))."""
    torch.manual_seed(0)
    H, T = 3, 5
    A, v = torch.randn(4, H, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    e = torch.randn(T, H, dtype=torch.float64, requires_grad=True)

    def scores(A, v, e):  # tokens 0-2: teacher 0; 3-4: teacher 1
        tok = torch.tanh(e @ A.T) @ v
        return torch.stack([tok[:3].sum(), tok[3:].sum()])

    pen = algos.r1_penalty(scores(A, v, e), e, coef=2.0, denominator=2)
    want = 0.0
    for t in range(T):
        z = A @ e[t].detach()
        g = A.T @ (v * (1 - torch.tanh(z) ** 2))
        want += float(g @ g)
    assert float(pen) == pytest.approx(0.5 * 2.0 * want / 2, rel=1e-12)
    # its gradient reaches D's own weights (double backward), checked against finite differences
    Av = (A.clone().requires_grad_(True), v.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda A, v: algos.r1_penalty(scores(A, v, e), e, 2.0, 2), Av)
