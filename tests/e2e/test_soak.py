"""The CI soak: ``benchmarks/soak.py`` at 40 steps (checkpoints every 10, two worker kills and resumes).
Asserts that the interrupted run's metrics equal the straight run's, and that each stop named the killed
role, rank and step; reports the RSS slope of every process (asserting only a generous leak bound:
the slope is noisy over 40 steps, the 200-step benchmark is the measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEAK_BOUND_MB_PER_STEP = 2.0  # a real leak of a batch's tensors per step is far above this


@pytest.mark.slow
def test_soak_40_steps(tmp_path):
    out = tmp_path / "soak"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--steps", "40", "--save-freq", "10",
                           "--warmup", "10", "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "soak.json").read_text())
    assert r["metrics_identical"] and r["mismatched_steps"] == []
    assert r["metric_rows"] == {"straight": 40, "interrupted": 40}
    assert r["kill_steps"] == [13, 27]
    stops = [s["stopped"] for s in r["segments"]]
    assert [(s["role"], s["rank"], s["step"], s["method"]) for s in stops[1:3]] == [
        ("critic", 0, 13, "update_critic"), ("critic", 0, 27, "update_critic")]
    assert stops[0] is None and stops[3] is None
    # resumed from the checkpoints at 10 and 20, redoing 11..13 and 21..27
    assert [(s["from_step"], s["last_step"]) for s in r["segments"]] == [(1, 40), (1, 12), (11, 26), (21, 40)]
    procs = {k for k in r["rss"] if k.startswith("straight/")}
    assert procs == {"straight/driver", "straight/actor:0", "straight/critic:0"}
    report = {k: v["slope_mb_per_step"] for k, v in r["rss"].items()}
    print("RSS slope (MB/step) after step 10:", json.dumps(report, indent=1))
    for k in procs:
        assert r["rss"][k]["samples"] == 40
        assert abs(report[k]) < LEAK_BOUND_MB_PER_STEP, (k, report[k])
