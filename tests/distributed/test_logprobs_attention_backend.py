"""``megatron-gad logprobs`` gives the same log-probs with every CPU attention backend.

The console script runs on a tiny Llama (GQA) and rows whose lengths differ by 10x+, once per
``MEGATRON_GAD_ATTENTION_BACKEND`` (eager, sdpa): every per-token log-prob equals eager's within
1e-5 and ``transformers`` on each row alone within 1e-5 (the independent reference); the chosen backend
is logged once for the role, naming the environment override. An unknown value is one clear error
(exit 2) before any rank starts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL = 1e-5
SHAPES = [(1, 3), (40, 70), (3, 2), (12, 30), (2, 45)]  # (prompt words, response words)


def _cli(argv, backend):
    env = {**os.environ, "MEGATRON_GAD_ATTENTION_BACKEND": backend}
    return subprocess.run([sys.executable, "-m", "megatron_gad.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from megatron_gad.tools.tiny_models import make_hf_model

    base = tmp_path_factory.mktemp("lp_backend")
    hf = make_hf_model(str(base / "hf"), "llama", seed=4)
    data = base / "data.jsonl"
    rng = random.Random(1)
    with open(data, "w") as f:
        for p, r in SHAPES:
            f.write(json.dumps({"content": " ".join(f"w{rng.randrange(3, 96)}" for _ in range(p)),
                                "teacher_response": " ".join(f"w{rng.randrange(3, 96)}" for _ in range(r))}) + "\n")
    out = {}
    for backend in ("eager", "sdpa"):  # flex: tests/distributed/test_attention_backends.py
        proc = _cli(["logprobs", hf, "--data", str(data), "--batch-size", "3", "--json"], backend)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in proc.stdout.strip("\n").split("\n")][:-1]
        out[backend] = (rows, proc.stderr)
    return hf, str(data), out


def test_logprobs_equal_across_backends(work):
    from transformers import AutoModelForCausalLM

    hf, _, out = work
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    eager_rows = out["eager"][0]
    assert len(eager_rows) == len(SHAPES)
    diffs = {}
    for backend, (rows, stderr) in out.items():
        # logged once for the actor role, with the override named
        lines = [ln for ln in stderr.splitlines() if f"actor attention backend {backend}" in ln]
        assert len(lines) == 1 and "MEGATRON_GAD_ATTENTION_BACKEND" in lines[0], stderr[-2000:]
        d_eager = d_hf = 0.0
        for row, ref_row in zip(rows, eager_rows):
            assert row["response_ids"] == ref_row["response_ids"]
            got = torch.tensor(row["logprobs"], dtype=torch.float64)
            d_eager = max(d_eager, (got - torch.tensor(ref_row["logprobs"], dtype=torch.float64)).abs().max().item())
            ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(row["prompt_ids"]) - 1:-1].double()
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(row["response_ids"])[:, None])[:, 0]
            d_hf = max(d_hf, (got - ref).abs().max().item())
        diffs[backend] = (d_eager, d_hf)
    print("\n  max |log-prob diff| (vs eager, vs transformers): " + ", ".join(
        f"{b} {e:.1e} / {h:.1e}" for b, (e, h) in diffs.items()))
    assert all(e <= TOL and h <= TOL for e, h in diffs.values()), diffs


def test_unknown_backend_is_a_clear_error(work):
    hf, data, _ = work
    proc = _cli(["logprobs", hf, "--data", data], "fast")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MEGATRON_GAD_ATTENTION_BACKEND='fast'" in proc.stderr and "Traceback" not in proc.stderr
