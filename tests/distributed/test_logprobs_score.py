"""``megatron-gad logprobs`` and ``megatron-gad score`` against ``transformers``.

One tiny Llama (HF dir), its actor and critic checkpoints (``convert hf-to-mcore`` bodies; the critic
gets a random head so scores mean something) and a JSONL file whose rows differ in length by 10x+.
* the rows' token ids are exactly training's (``GADDataset``: template and EOS policy);
* per-token log-probs == ``transformers`` on each row alone (unpadded prompt ++ response ids, as
  printed) to 1e-5, at TP x PP 1x1 (console script, HF dir) and 2x2 (actor checkpoint);
  sum / mean / NLL per token / perplexity consistent with them;
* scores == the HF backbone's final-norm hidden state at each sequence's last token @ head weight +
  bias, at 1x1 (console script) and 2x2; d_acc recomputed from the printed scores.
Spawns cost most of the time: one launch prepares everything, one runs both 2x2 passes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed

TOL = 1e-5
# (prompt words, teacher words, student words or None): responses from 1 to 70 words (+ EOS)
SHAPES = [(1, 1, 3), (40, 70, 20), (3, 2, None), (12, 30, 30), (2, 45, 1), (25, 4, None), (6, 9, 60)]


def _write_data(path) -> None:
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(3, 96)}" for _ in range(n))

    with open(path, "w") as f:
        for p, t, s in SHAPES:
            row = {"content": words(p), "teacher_response": words(t)}
            if s is not None:
                row["student_response"] = words(s)
            f.write(json.dumps(row) + "\n")


def _setup_rank(rank, world, hf, actor_dir, raw_critic, critic_dir):
    """Actor and critic checkpoints via the ``convert`` body; the critic's zero head gets random values."""
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.tools.convert import HfToMcoreJob, hf_to_mcore_on_rank

    hf_to_mcore_on_rank(HfToMcoreJob(hf, actor_dir))
    hf_to_mcore_on_rank(HfToMcoreJob(hf, raw_critic, role="critic"))
    shard = ModelShard("critic", raw_critic, 1, 1, trainable=False)
    head = shard.module.output_layer
    assert not head.weight.any(), "convert --role critic zero-initialises the head"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.fill_(0.25)
    shard.save(critic_dir, with_optimizer=False)
    return head.weight.detach().clone(), head.bias.detach().clone()


def _passes_rank(rank, world, lp_job, score_job):
    from megatron_gad.tools.logprobs import logprobs_on_rank
    from megatron_gad.tools.score import scores_on_rank

    lp = logprobs_on_rank(lp_job)
    scores = scores_on_rank(score_job)
    assert (lp is None) == (scores is None)
    return None if lp is None else (lp, scores)


def _args(model, data, tp, pp, **kw):
    return argparse.Namespace(model=model, data=data, tp=tp, pp=pp, prompt_key="content",
                              response_key="teacher_response", student_key="student_response", batch_size=3,
                              json=True, **kw)


def _cli(argv):
    """The console script's JSON lines: (row objects, summary object); stdout holds nothing else."""
    proc = subprocess.run([sys.executable, "-m", "megatron_gad.cli", *argv, "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    objs = [json.loads(line) for line in proc.stdout.strip("\n").split("\n")]
    assert f"[megatron-gad] {argv[0]}:" in proc.stderr
    assert objs[-1]["summary"] is True and not any("summary" in o for o in objs[:-1])
    return objs[:-1], objs[-1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.logprobs import PassJob, prepare
    from megatron_gad.tools.score import score_records
    from megatron_gad.tools.tiny_models import make_hf_model

    base = tmp_path_factory.mktemp("passes")
    w = {"hf": make_hf_model(str(base / "hf"), "llama", seed=3), "data": str(base / "data.jsonl"),
         "actor": str(base / "actor"), "critic": str(base / "critic")}
    _write_data(w["data"])
    ((w["weight"], w["bias"]),) = run_local(_setup_rank, 1, w["hf"], w["actor"], str(base / "critic_raw"),
                                            w["critic"])
    # 2x2 through the parent-side preparation and the per-rank bodies, one launch for both passes
    _, rows, lp_settings = prepare(_args(w["actor"], w["data"], 2, 2), "logprobs")
    _, _, sc_settings = prepare(_args(w["critic"], w["data"], 2, 2), "score")
    have = [i for i, s in enumerate(rows.responses["student_response"]) if s is not None]
    lp_job = PassJob(prompts=rows.prompts, responses=rows.responses["teacher_response"], **lp_settings)
    sc_job = PassJob(prompts=rows.prompts + [rows.prompts[i] for i in have],
                     responses=rows.responses["teacher_response"] + [rows.responses["student_response"][i]
                                                                      for i in have], **sc_settings)
    w["rows"] = rows
    ((w["lp_2x2"], scores),) = [r for r in run_local(_passes_rank, 4, lp_job, sc_job) if r is not None]
    w["score_2x2"] = score_records(rows, "teacher_response", "student_response", scores)
    # 1x1 through the console script
    w["lp_cli"] = _cli(["logprobs", w["hf"], "--data", w["data"], "--batch-size", "2"])
    w["score_cli"] = _cli(["score", w["critic"], "--data", w["data"]])
    return w


def _hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained


@torch.no_grad()
def _hf_row(model, prompt_ids, response_ids):
    """(per-token log-probs of the response, final-norm hidden state at the last token) of one
    unpadded row, run alone."""
    ids = torch.tensor([prompt_ids + response_ids])
    out = model(ids, output_hidden_states=True)
    lp = torch.log_softmax(out.logits[0, len(prompt_ids) - 1:-1].double(), -1)
    return lp.gather(-1, torch.tensor(response_ids)[:, None])[:, 0], out.hidden_states[-1][0, -1]


def test_rows_are_tokenized_like_training(work):
    from megatron_gad.data import GADDataset

    ds = GADDataset(work["data"], work["hf"], max_prompt_length=10**6, max_response_length=10**6)
    rows, _ = work["lp_cli"]
    assert [r["prompt_ids"] for r in rows] == ds.prompt_ids
    assert [r["response_ids"] for r in rows] == ds.teacher_response_ids
    lengths = [len(r["response_ids"]) for r in rows]
    assert max(lengths) >= 10 * min(lengths) and all(r["response_ids"][-1] == 2 for r in rows)  # EOS


def test_logprobs_match_transformers(work):
    model = _hf()(work["hf"], dtype=torch.float32).eval()
    cli_rows, summary = work["lp_cli"]
    assert len(cli_rows) == len(SHAPES) == len(work["lp_2x2"])
    err_cli = err_2x2 = 0.0
    for row, lp_2x2 in zip(cli_rows, work["lp_2x2"]):
        ref, _ = _hf_row(model, row["prompt_ids"], row["response_ids"])
        assert len(row["logprobs"]) == len(lp_2x2) == len(row["response_ids"])
        err_cli = max(err_cli, (torch.tensor(row["logprobs"], dtype=torch.float64) - ref).abs().max().item())
        err_2x2 = max(err_2x2, (torch.tensor(lp_2x2, dtype=torch.float64) - ref).abs().max().item())
        assert row["sum"] == pytest.approx(math.fsum(row["logprobs"]), abs=1e-9)
        assert row["mean"] == pytest.approx(row["sum"] / len(row["logprobs"]), abs=1e-12)
    print(f"\n  logprobs max abs diff vs transformers: 1x1 (CLI, HF dir) {err_cli:.2e}, "
          f"2x2 (actor checkpoint) {err_2x2:.2e}")
    assert err_cli < TOL and err_2x2 < TOL
    tokens = sum(len(r["logprobs"]) for r in cli_rows)
    nll = -sum(r["sum"] for r in cli_rows) / tokens
    assert summary["rows"] == len(SHAPES) and summary["tokens"] == tokens
    assert summary["nll_per_token"] == pytest.approx(nll, rel=1e-12)
    assert summary["perplexity"] == pytest.approx(math.exp(nll), rel=1e-12)


def test_scores_match_hidden_state_dot_head(work):
    model = _hf()(work["hf"], dtype=torch.float32).eval()
    w, b = work["weight"].reshape(-1).double(), work["bias"].double()

    def ref(prompt_ids, response_ids):
        _, h = _hf_row(model, prompt_ids, response_ids)
        return float(h.double() @ w + b)

    cli_rows, cli_summary = work["score_cli"]
    rows_2x2, summary_2x2 = work["score_2x2"]
    err = {"1x1": 0.0, "2x2": 0.0}
    pairs = []
    for row, row_2x2 in zip(cli_rows, rows_2x2):
        assert row["prompt_ids"] == row_2x2["prompt_ids"]
        assert row["teacher_response_ids"] == row_2x2["teacher_response_ids"]
        assert row["student_response_ids"] == row_2x2["student_response_ids"]
        for side in ("teacher", "student"):
            ids = row[f"{side}_response_ids"]
            if ids is None:
                assert row["student_score"] is None and row_2x2["student_score"] is None
                continue
            expected = ref(row["prompt_ids"], ids)
            err["1x1"] = max(err["1x1"], abs(row[f"{side}_score"] - expected))
            err["2x2"] = max(err["2x2"], abs(row_2x2[f"{side}_score"] - expected))
        if row["student_score"] is not None:
            pairs.append((row["teacher_score"], row["student_score"]))
    print(f"\n  scores max abs diff vs transformers hidden @ head: 1x1 (CLI) {err['1x1']:.2e}, 2x2 {err['2x2']:.2e} "
          f"(scores span {min(min(p) for p in pairs):.2f} .. {max(max(p) for p in pairs):.2f})")
    assert err["1x1"] < TOL and err["2x2"] < TOL
    assert len(pairs) == sum(s is not None for _, _, s in SHAPES) == cli_summary["pairs"]
    d_acc = sum(1.0 if t > s else 0.5 if t == s else 0.0 for t, s in pairs) / len(pairs)
    assert cli_summary["d_acc"] == pytest.approx(d_acc, abs=1e-12)
    assert summary_2x2["d_acc"] == pytest.approx(d_acc, abs=1e-12)
    assert cli_summary["student_score_mean"] == pytest.approx(sum(s for _, s in pairs) / len(pairs), abs=1e-9)
    assert cli_summary["teacher_score_mean"] == pytest.approx(
        sum(r["teacher_score"] for r in cli_rows) / len(cli_rows), abs=1e-9)
