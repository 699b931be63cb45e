"""``trainer.lean_step`` (issue 22): rewards read from the critic update's forward and, on-policy, no
old log-prob pass — the same numbers as the step with both separate passes (``lean_step=false``),
bit for bit: rewards, advantages, every metric the step logs, and the trained weights of both roles.

The reference is the separate-pass step run in its own process on the same config and seed (the
same data, samples and initial weights); nothing is compared against the lean path itself."""

from __future__ import annotations

import json
import os

import pytest
from local_setup import local_overrides

pytestmark = pytest.mark.distributed


def _run(rank, world, overrides):
    import torch

    from megatron_gad.config import load_config, validate
    from megatron_gad.controller import trainer as trainer_mod
    from megatron_gad.controller.trainer import GADTrainer

    cfg = load_config(None, overrides)
    validate(cfg)
    seen = {"rewards": [], "advantages": []}
    real = trainer_mod.algos.get_adv_estimator

    def recording(name):
        est = real(name)

        def run(rewards, mask, n, **kw):
            adv = est(rewards, mask, n, **kw)
            seen["rewards"].append(rewards.clone())
            seen["advantages"].append(adv[0].clone())
            return adv

        return run

    trainer_mod.algos.get_adv_estimator = recording
    try:
        tr = GADTrainer(cfg)
        tr.fit()
        phases = list(tr.phases)
        weights = {role: {n: p.detach().clone() for n, p in g.worker.shard.module.named_parameters()}
                   for role, g in (("actor", tr.actor), ("critic", tr.critic))}
        tr.shutdown()
    finally:
        trainer_mod.algos.get_adv_estimator = real
    return {"phases": phases, "weights": weights, **seen, "torch": torch.__version__}


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/", "time"))} for r in rows]


@pytest.mark.parametrize("extra", [[], ["algorithm.rollout_is=token", "algorithm.rollout_is_threshold=1.01"],
                                   ["trainer.sample_log_freq=1"]], ids=["kl", "rollout_is", "samples"])
def test_lean_step_is_bit_identical_to_separate_passes(assets, tmp_path, extra):
    import torch

    from megatron_gad.parallel.launch import run_local

    out = {}
    for lean in (False, True):
        run = str(tmp_path / f"lean_{lean}")
        ov = [*local_overrides(assets, run, kl=True), *extra, f"trainer.lean_step={str(lean).lower()}",
              "trainer.total_training_steps=4"]
        out[lean] = (run_local(_run, 1, ov)[0], _metrics(run))
    (ref, ref_m), (lean, lean_m) = out[False], out[True]
    assert ref["phases"][:4] == ["gen", "reward", "old_log_prob", "ref"]
    assert "old_log_prob" not in lean["phases"] and lean["phases"][:2] == ["gen", "update_critic"]
    assert len(ref["rewards"]) == len(lean["rewards"]) == 3
    for a, b in zip(ref["rewards"] + ref["advantages"], lean["rewards"] + lean["advantages"]):
        assert torch.equal(a, b)
    for role in ("actor", "critic"):
        for name, p in ref["weights"][role].items():
            assert torch.equal(p, lean["weights"][role][name]), (role, name)
    # every logged metric, bit for bit (timings aside; the separate passes' own memory metrics go)
    for a, b in zip(ref_m, lean_m):
        gone = {k for k in set(a) - set(b) if k.startswith(("memory/critic/reward", "memory/actor/log_prob"))}
        diff = {k: (a.get(k), b.get(k)) for k in (set(a) | set(b)) - gone if a.get(k) != b.get(k)}
        assert not diff, diff
    if extra and "sample_log_freq" in extra[0]:
        rows = [open(os.path.join(str(tmp_path / f"lean_{x}"), "samples.jsonl")).read() for x in (False, True)]
        assert rows[0] == rows[1]
