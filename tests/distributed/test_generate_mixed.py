"""Native rollout on mixed-length batches of 1, 7 and 64 rows with 1-300-token prompts, at TP2 x PP2,
under ``MEGATRON_GAD_EMULATE_TE_MASKING=1`` (attention sees only what Transformer Engine sees: no
padding mask, none in decode), against independent references:

* greedy tokens == ``transformers`` ``generate`` on each prompt alone, whatever the bucketing: the cost
  model's split, one bucket for every row (a 299-token spread: short rows decode while long rows are
  still fed their prompt, lockstep), rows per bucket capped (``micro_batch_size``), KV cache or not;
* the 64 rows are 16 prompts x 4 samples (a prompt's samples share one prefill): sampled tokens of a
  row are the same in every batch it is part of (1, 7 or 64 rows, any bucketing) given its key, and
  each sampled token's ``rollout_log_prob`` == ``log_softmax(logits / T)`` of ``transformers`` on the
  row's own sequence (the sampling-distribution contract vLLM keeps too).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NEW, EOS, PAD, T = 8, 2, 0, 0.9
PROMPTS, SAMPLES = 16, 4


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 300, 2, 150] + torch.randint(1, 301, (PROMPTS - 4,), generator=g).tolist()
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def _rows() -> list[list[int]]:
    return [p for p in _prompts() for _ in range(SAMPLES)]


def _padded(rows: list[list[int]]):
    from megatron_gad.data import pad_sequences

    return pad_sequences(rows, PAD, left=True)


SUBSETS = {"one": [5], "seven": [0, 9, 13, 22, 40, 41, 63], "all": list(range(PROMPTS * SAMPLES))}


def _run(rank, world, path):
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard

    os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = "1"
    role = ModelShard("actor", path, 2, 2, vocab_divisible_by=8, trainable=False)
    rows = _rows()
    out = {}
    variants = {"model": {}, "one_bucket": {"single_bucket": True}, "capped": {"micro_batch_size": 5}}
    for name, subset in SUBSETS.items():
        ids, mask = _padded([rows[r] for r in subset])
        keys = torch.tensor(subset) * 1_000_003
        for vname, kw in variants.items():
            stats: dict = {}
            out[name, vname, "greedy"] = generate(role, ids, mask, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD,
                                                  greedy=True, row_ids=keys, stats=stats, **kw)
            out[name, vname, "stats"] = stats
            out[name, vname, "sampled"] = generate(role, ids, mask, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD,
                                                   temperature=T, seed=11, row_ids=keys, **kw)
        if name == "seven":
            out[name, "recompute", "greedy"] = generate(role, ids, mask, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD,
                                                        greedy=True, use_kv_cache=False)
    return out


def _valid(res: dict, i: int) -> list[int]:
    return res["responses"][i][res["response_mask"][i].bool()].tolist()


@torch.no_grad()
def test_mixed_lengths_tp2_pp2_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "qwen2", seed=2, max_position_embeddings=512)
    res = run_local(_run, 4, path)[-1]  # the last rank: last pipeline stage (log-probs)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = []
    for p in _prompts():
        x = torch.tensor([p])
        g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                        pad_token_id=PAD)[0, len(p):].tolist()
        want.append(g[: g.index(EOS) + 1] if EOS in g else g)
    assert len({tuple(w) for w in want}) > 1, "degenerate reference"
    rows = _rows()
    sampled_by_row: dict[int, list[int]] = {}
    for name, subset in SUBSETS.items():
        for vname in ("model", "one_bucket", "capped") + (("recompute",) if name == "seven" else ()):
            greedy = res[name, vname, "greedy"]
            for i, r in enumerate(subset):
                assert _valid(greedy, i) == want[r // SAMPLES], f"{name}/{vname} row {r}: greedy != transformers"
            if vname == "recompute":
                continue
            sampled = res[name, vname, "sampled"]
            for i, r in enumerate(subset):
                got = _valid(sampled, i)
                assert sampled_by_row.setdefault(r, got) == got, f"{name}/{vname} row {r}: sample depends on batch"
    st = res["all", "one_bucket", "stats"]
    assert st["buckets"] == 1 and st["prefill_rows"] == PROMPTS, st  # one prefill per prompt
    # one forward per decode step for all 64 rows: the prefill, then one per lockstep step but the last
    # (at most spread 299 + NEW steps; fewer when every row met EOS early)
    assert st["forwards"] == st["steps"] <= 299 + NEW, st
    assert st["host_syncs"] <= st["steps"] // 8 + 1, st
    # a prompt's samples differ (own keys), and every sampled token's log-prob is transformers'
    # log_softmax(logits / T) at that position
    assert len({tuple(sampled_by_row[r]) for r in range(SAMPLES)}) > 1, "a prompt's samples are identical"
    sampled = res["all", "model", "sampled"]
    worst = 0.0
    for r in range(0, PROMPTS * SAMPLES, 5):
        toks = _valid(sampled, r)
        seq = torch.tensor([rows[r] + toks])
        lp = (hf(seq).logits[0].double() / T).log_softmax(-1)
        ref = lp[len(rows[r]) - 1:-1].gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        got = sampled["rollout_log_prob"][r][: len(toks)].double()
        worst = max(worst, float((got - ref).abs().max()))
    assert worst < 1e-4, f"rollout_log_prob differs from log_softmax(logits / T) by {worst}"
