"""End to end: ``megatron-gad demo --quick`` (SFT -> frozen warmup -> GAD, and SFT continued) on CPU."""

from __future__ import annotations

import argparse
import json
import os

import pytest


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    from megatron_gad.demo.run import QUICK, main_demo

    out = tmp_path / "demo"
    rc = main_demo(argparse.Namespace(seeds=1, out=str(out), quick=True))
    assert rc == 0

    with open(out / "demo_report.json", encoding="utf-8") as f:
        r = json.load(f)
    for key in ("teacher_score", "sft_score", "sft_continued_score", "gad_score", "warmup_d_acc",
                "actor_frozen_during_warmup", "timings", "settings"):
        assert key in r, key
    assert r["quick"] is True and r["seeds"] == [0]
    assert r["settings"]["warmup_steps"] == QUICK.warmup_steps

    # The teacher's responses pass the same checker: exactly 1.0 (computed, not hard-coded).
    assert r["teacher_score"] == [1.0]
    for key in ("sft_score", "sft_continued_score", "gad_score"):
        assert len(r[key]) == 1 and all(0.0 <= x <= 1.0 for x in r[key]), (key, r[key])
    for group in ("greedy", "distinct_valid"):
        for xs in r[group].values():
            assert all(0.0 <= x <= 1.0 for x in xs)

    # The frozen warmup left the actor bit-identical and allocated no optimizer state.
    assert r["actor_frozen_during_warmup"] == [True]
    fp = r["actor_fingerprint"][0]
    assert fp["warmup_start"] == fp["warmup_end"] == fp["sft_end"]
    assert fp["warmup_optimizer_state_bytes"] == 0

    # One d_acc per configured step; the zero-initialised head starts blind (ties count half).
    assert [len(x) for x in r["warmup_d_acc"]] == [QUICK.warmup_steps]
    assert [len(x) for x in r["gad_d_acc"]] == [QUICK.gad_steps]
    assert r["warmup_d_acc"][0][0] == pytest.approx(0.5)
    assert all(0.0 <= v <= 1.0 for v in r["warmup_d_acc"][0] + r["gad_d_acc"][0])
    probe = r["critic_probe"]["after_warmup"][0]
    assert 0.0 <= probe["heldout_d_acc"] <= 1.0

    # Stage checkpoints and metrics exist where the report says the stages ran.
    seed_dir = out / "seed0"
    steps = {"sft": QUICK.sft_steps, "warmup": QUICK.warmup_steps, "gad": QUICK.gad_steps,
             "sft_cont": QUICK.gad_steps}
    for stage, n in steps.items():
        assert os.path.isdir(seed_dir / stage / f"global_step_{n}" / "actor"), stage
        with open(seed_dir / stage / "metrics.jsonl", encoding="utf-8") as f:
            assert sum(1 for line in f if line.strip()) == n, stage
        assert r["timings"][0][stage]["fit_s"] > 0
    assert os.path.isdir(seed_dir / "warmup" / f"global_step_{QUICK.warmup_steps}" / "critic")

    printed = capsys.readouterr()
    assert "SFT continued" in printed.out and "GAD" in printed.out
    # the GAD stage logs the task's checker as a weight-0 verifier: D's ranking of valid samples per step
    diag = r["gad_diagnostics"][0]
    assert diag["controls"]["verifier_weight"] == 0.0 and diag["controls"]["eos_policy"] == "append"
    assert len(diag["series"]["critic/verifier_auc"]) == QUICK.gad_steps
    assert all(v is None or 0.0 <= v <= 1.0 for v in diag["series"]["critic/verifier_auc"])
    assert all(v == 0.0 for v in diag["series"]["critic/identical_pair_gap"])  # same tokens, same score
    assert "GAD discriminator controls: eos_policy=append" in printed.out
    assert "verifier AUC (D ranks valid samples first)" in printed.out
    assert "[demo] seed 0 | warmup" in printed.err
