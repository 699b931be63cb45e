"""The native rollout's pure parts against independent references: the counter-based uniforms (a
pure-Python lowbias32), inverse-CDF sampling (empirical frequencies vs the fp64 distribution), the
bucketing cost model (brute force over every split) and the prompt alignment / shared prefixes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_gad.engine import rollout_plan as rp
from megatron_gad.engine import sampling as smp


def _py_hash32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _py_uniform(seed: int, row: int, index: int) -> float:
    m = 0xFFFFFFFF
    h = _py_hash32(index + 0x9E3779B9)
    for word in (row & m, (row >> 32) & m, seed & m, (seed >> 32) & m):
        h = _py_hash32(h ^ word)
    return (h + 0.5) / 2.0**32


def test_uniforms_equal_a_pure_python_hash_and_depend_only_on_their_keys():
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randint(0, 2**62, (50,), generator=g), torch.tensor([0, 1, 2**32 - 1, 2**32])])
    for seed, index in ((0, 0), (123456789, 7), (2**40 + 3, 1000)):
        got = smp.row_uniforms(seed, rows, index)
        want = torch.tensor([_py_uniform(seed, int(r), index) for r in rows], dtype=torch.float64)
        assert torch.equal(got, want)
    # a row's draw does not depend on its neighbours; per-row indices work too
    a = smp.row_uniforms(5, torch.tensor([3, 9, 4]), torch.tensor([0, 2, 1]))
    assert float(a[1]) == _py_uniform(5, 9, 2) and float(a[2]) == _py_uniform(5, 4, 1)


def test_uniforms_look_uniform_and_independent():
    u = smp.row_uniforms(11, torch.arange(200_000), 3)
    assert 0 < float(u.min()) and float(u.max()) < 1
    # Kolmogorov-Smirnov statistic against U(0, 1): 1.95 / sqrt(n) is the 0.1 % critical value
    srt = u.sort().values
    n = len(srt)
    ks = float(torch.maximum(torch.arange(1, n + 1) / n - srt, srt - torch.arange(n) / n).max())
    assert ks < 1.95 / math.sqrt(n), ks
    v = smp.row_uniforms(11, torch.arange(200_000), 4)  # next position of the same rows
    corr = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
    assert abs(corr) < 0.01, corr
    assert not torch.equal(u, smp.row_uniforms(12, torch.arange(200_000), 3))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.0, 5, 1.0), (1.0, -1, 0.6)])
def test_inverse_cdf_sampling_matches_the_processed_distribution(temperature, top_k, top_p):
    V, Vp, N = 12, 16, 120_000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    # the fp64 reference distribution (temperature, top-k, top-p by their definitions)
    z = logits / temperature
    p = z.softmax(-1)
    keep = torch.ones(V, dtype=torch.bool)
    if top_k > 0:
        keep &= z >= z.sort(descending=True).values[top_k - 1]
    if top_p < 1:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        keep[order[before > top_p]] = False
    ref = torch.where(keep, p, 0.0)
    ref = ref / ref.sum()
    padded = torch.cat([logits, torch.full((Vp - V,), 50.0, dtype=torch.float64)])  # padded ids: never chosen
    batch = padded.float()[None].expand(N, -1)
    u = smp.row_uniforms(0, torch.arange(N), 0)
    tok, lp = smp.sample_next(batch, V, temperature, top_k, top_p, greedy=False, uniforms=u)
    assert int(tok.max()) < V
    freq = torch.bincount(tok, minlength=V).double() / N
    assert bool((freq[~keep] == 0).all()), "a token outside top-k / top-p was sampled"
    assert float((freq - ref).abs().max()) < 4 * math.sqrt(0.25 / N), (freq, ref)
    assert torch.allclose(lp.double(), ref.log()[tok], atol=1e-5)


def test_greedy_takes_the_argmax_with_the_plain_log_softmax():
    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    logits[:, 12:] = 100.0  # padded ids
    tok, lp = smp.sample_next(logits, 12, 0.5, 3, 0.5, greedy=True, uniforms=None)
    assert torch.equal(tok, logits[:, :12].argmax(-1))
    assert torch.allclose(lp.double(), logits[:, :12].double().log_softmax(-1).gather(1, tok[:, None])[:, 0])


def _brute_best(lengths: list[int], new: int, F: float, limit: int) -> float:
    srt = sorted(lengths)
    n = len(srt)
    best = math.inf
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            parts = [srt[a:b] for a, b in itertools.pairwise(bounds)]
            if any(len(p) > limit for p in parts):
                continue
            best = min(best, sum(rp.bucket_cost(p, new, F) for p in parts))
    return best


@pytest.mark.parametrize("case", range(12))
def test_bucketing_is_the_cheapest_split(case):
    g = torch.Generator().manual_seed(case)
    n = int(torch.randint(1, 9, (1,), generator=g))
    lengths = torch.randint(1, 300, (n,), generator=g)
    new = int(torch.randint(1, 64, (1,), generator=g))
    F = [0.0, 8.0, 4096.0][case % 3]
    limit = None if case % 2 else int(torch.randint(1, n + 1, (1,), generator=g))
    buckets = rp.plan_buckets(lengths, new, F, limit)
    assert sorted(torch.cat(buckets).tolist()) == list(range(n))  # every row exactly once
    assert all(len(b) <= (limit or n) for b in buckets)
    got = sum(rp.bucket_cost(lengths[b].tolist(), new, F) for b in buckets)
    assert got == pytest.approx(_brute_best(lengths.tolist(), new, F, limit or n))


def test_one_bucket_on_a_host_bound_device_and_a_split_on_a_cpu():
    lengths = torch.tensor([16 + 23 * k for k in range(9)] * 8)  # 9 prompts x 8 samples, 16 .. 200 tokens
    # forwards: one bucket 184 + 32, one per length 9 * 32; row-steps: 72 * 32 + 8 * (0 + 23 + ... + 184) vs 72 * 32
    assert len(rp.plan_buckets(lengths, 32, rp.FORWARD_COST_ROWS["cuda"])) == 1
    assert len(rp.plan_buckets(lengths, 32, rp.FORWARD_COST_ROWS["cpu"])) > 1
    assert len(rp.plan_buckets(lengths, 32, 0.0)) == 9  # forwards free: no forced prompt token is worth it
    assert len(rp.plan_buckets(torch.tensor([16] * 8 + [200] * 8), 32, rp.FORWARD_COST_ROWS["cuda"])) == 2
    with pytest.raises(ValueError, match="micro_batch_size"):
        rp.plan_buckets(lengths, 32, 8.0, 0)


def test_left_align_and_shared_prefixes():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0], [0, 5, 6, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    aligned, lens = rp.left_align(ids, mask, pad_id=-1)
    assert aligned.tolist() == [[5, 6, -1, -1], [7, 8, 9, -1], [5, 6, -1, -1], [1, 2, 3, 4]]
    assert lens.tolist() == [2, 3, 2, 4]
    with pytest.raises(ValueError, match="empty prompts"):
        rp.left_align(ids, mask * torch.tensor([[1], [0], [1], [1]]), 0)
    first, inverse = rp.shared_prefixes(aligned[:, :2])
    assert first.tolist() == [0, 1, 3]  # rows 0 and 2 share "5 6"
    assert inverse.tolist() == [0, 1, 0, 2]
    for r in range(4):
        assert torch.equal(aligned[first[inverse[r]], :2], aligned[r, :2])


def test_rollout_micro_batch_size_key():
    from megatron_gad.config import ConfigError, load_config, validate

    assert load_config(None, []).actor_rollout_ref.rollout.micro_batch_size is None  # all rows of the rank
    assert load_config(None, ["actor_rollout_ref.rollout.micro_batch_size=64"]).actor_rollout_ref.rollout \
        .micro_batch_size == 64
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.rollout\.micro_batch_size"):
        validate(load_config(None, ["actor_rollout_ref.rollout.micro_batch_size=0"]))
