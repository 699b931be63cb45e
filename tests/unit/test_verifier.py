"""Hybrid reward pieces: the ranking AUC (against a brute-force fp64 count), the reward-hacking
monitor's rule, loading a verl-style reward function, and the config checks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megatron_gad.algos import ranking_auc
from megatron_gad.controller.verifier import HackingMonitor, Verifier, load_reward_function
from megatron_gad.errors import InputError


def _brute(scores, labels):
    won = total = 0.0
    for i, j in itertools.permutations(range(len(scores)), 2):
        if labels[i] > labels[j]:
            total += 1
            won += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return won / total if total else None


@pytest.mark.parametrize("seed", range(5))
def test_ranking_auc_matches_pair_count(seed):
    rng = random.Random(seed)
    n = rng.randrange(2, 40)
    scores = [rng.choice([0.0, 0.5, 1.0, rng.gauss(0, 1)]) for _ in range(n)]  # ties included
    labels = [rng.choice([0.0, 1.0]) if seed % 2 else rng.choice([0.0, 0.3, 0.7, 1.0]) for _ in range(n)]
    got = ranking_auc(torch.tensor(scores), torch.tensor(labels))
    want = _brute(scores, labels)
    assert (got is None and want is None) or got == pytest.approx(want, abs=1e-12)


def test_ranking_auc_edges():
    assert ranking_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) is None  # one class: undefined
    assert ranking_auc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])) == 1.0
    assert ranking_auc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.0
    with pytest.raises(ValueError):
        ranking_auc(torch.zeros(3), torch.zeros(2))


def test_hacking_monitor_needs_low_auc_and_rising_reward(caplog):
    m = HackingMonitor(threshold=0.55, window=3)
    # good ranking while the reward rises: progress, no warning
    assert [m.observe(0.8, r)["reward/hacking_warning"] for r in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    m = HackingMonitor(threshold=0.55, window=3)
    with caplog.at_level("WARNING", logger="megatron_gad"):
        flags = [m.observe(0.4, r)["reward/hacking_warning"] for r in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert sum("possible reward hacking" in r.message for r in caplog.records) == 2  # at start, then every window
    m2 = HackingMonitor(threshold=0.55, window=3)
    assert [m2.observe(0.4, r)["reward/hacking_warning"] for r in (3.0, 2.0, 1.0)] == [0.0, 0.0, 0.0]  # falling
    m3 = HackingMonitor(threshold=0.55, window=3)
    m3.load_state_dict(m.state_dict())
    assert m3.observe(0.4, 7.0) == m.observe(0.4, 7.0)


def test_reward_function_signatures(tmp_path):
    f = tmp_path / "rf.py"
    f.write_text(
        "def plain(prompt, response):\n    return len(response) - len(prompt)\n"
        "def verl(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return {'score': float(solution_str == ground_truth) + (0.5 if extra_info['prompt'] == 'p1' else 0)}\n"
        "def bad(prompt, response):\n    return 'yes'\n")
    rows = [{"content": "p0", "reward_model": {"ground_truth": "ab"}}, {"content": "p1", "ground_truth": "c"}]
    v = Verifier(load_reward_function(str(f), "plain"), rows, "content")
    assert v([0, 1], ["abc", "x", "", "cccc"], 2).tolist() == [1.0, -1.0, -2.0, 2.0]
    v = Verifier(load_reward_function(str(f), "verl"), rows, "content")
    assert v.verl_style and v([1, 0], ["c", "ab"], 1).tolist() == [1.5, 1.0]
    with pytest.raises(InputError, match="must return a number"):
        Verifier(load_reward_function(str(f), "bad"), rows, "content")([0], ["x"], 1)
    with pytest.raises(InputError, match=r"has no function 'missing'.*bad, plain, verl"):
        load_reward_function(str(f), "missing")
    with pytest.raises(InputError, match="no such file"):
        load_reward_function(str(tmp_path / "nope.py"), "plain")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(InputError, match="importing it failed: ModuleNotFoundError"):
        load_reward_function(str(tmp_path / "broken.py"), "f")


def test_config_checks():
    from megatron_gad.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"reward\.verifier_weight=0\.5 needs a verifier"):
        validate(load_config(None, ["reward.verifier_weight=0.5"]))
    with pytest.raises(ConfigError, match=r"reward\.hacking_auc=0\.3"):
        validate(load_config(None, ["reward.hacking_auc=0.3"]))
    cfg = load_config(None, ["custom_reward_function.path=/x/rf.py", "custom_reward_function.name=f"])
    assert (cfg.custom_reward_function.path, cfg.custom_reward_function.name) == ("/x/rf.py", "f")
