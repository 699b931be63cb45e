"""demo/brackets.py (the experiment's task): the teacher's sampler and its exact log-probability agree,
the checker, and the out-of-distribution completion prompts. References: brute-force enumeration of
every string over ( ) [ ] and Monte Carlo frequencies."""

from __future__ import annotations

import collections
import itertools
import json
import math
import random

import pytest

from megatron_gad.demo import brackets as bt


def _all(n):
    return ("".join(s) for s in itertools.product("()[]", repeat=n))


@pytest.mark.parametrize("prompt,n", [("len 8", 8), ("len 8 ((", 6), ("len 10 ([]", 7)])
def test_logprob_is_a_distribution_over_valid_answers(prompt, n):
    total = 0.0
    for s in _all(n):
        lp = bt.teacher_logprob(prompt, s)
        assert (lp > -math.inf) <= bt.is_valid(prompt, s)  # the teacher writes valid answers only
        total += math.exp(lp)
    assert total == pytest.approx(1.0, abs=1e-12)


def test_sampler_matches_the_logprob():
    rng, style = random.Random(0), bt.Style()
    draws = 20000
    counts = collections.Counter(bt.teacher_response(8, rng, style) for _ in range(draws))
    for s, c in counts.most_common(5):  # frequent strings: frequency within 4 sigma of the exact probability
        p = math.exp(bt.teacher_logprob("len 8", s, style))
        assert abs(c / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)


def test_style_is_visible_and_answers_are_long_and_valid():
    rng = random.Random(1)
    for L in (8, 24, 40):
        for _ in range(50):
            s = bt.teacher_response(L, rng)
            assert bt.is_valid(f"len {L}", s) and bt.compute_score(f"len {L}", s) == 1.0
    # depth-parity style ("(" at even depth, "[" at odd): an unstyled teacher would rate both the same
    assert bt.teacher_logprob("len 8", "([])([])") - bt.teacher_logprob("len 8", "(())(())") == \
        pytest.approx(2 * math.log(0.8 / 0.2))  # the two depth-1 openings differ: 2 x the style's log-odds
    assert bt.teacher_logprob("len 8", "((") == -math.inf and not bt.is_valid("len 8", "(((())))x")


def test_prompts_and_completions():
    assert bt.parse_prompt("len 12 ([") == (12, "([") and bt.parse_prompt("len 40") == (40, "")
    assert bt.is_valid("len 6 ([", "])()") and not bt.is_valid("len 6 ([", ")]()")
    with pytest.raises(ValueError):
        bt.make_prompt(8, "((((((")  # six open brackets cannot close in two symbols
    with pytest.raises(ValueError):
        bt.make_prompt(42)


def test_dataset_keeps_ood_prompts_out_of_training(tmp_path):
    paths = bt.write_dataset(tmp_path, n_train=200, n_val=20, n_test=20, n_ood=50, seed=3)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("train", "val", "test", "ood_test")] == [200, 20, 20, 50]
    for split, rs in rows.items():
        for r in rs:
            assert bt.is_valid(r["content"], r["teacher_response"]), (split, r)
            assert (bt.parse_prompt(r["content"])[1] != "") == (split == "ood_test")
    assert bt.write_dataset(tmp_path / "again", n_train=200, n_val=20, n_test=20, n_ood=50, seed=3) and \
        open(tmp_path / "again" / "train.jsonl").read() == open(paths["train"]).read()  # reproducible
