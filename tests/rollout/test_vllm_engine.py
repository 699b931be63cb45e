"""vLLM as the rollout engine, against independent references.

* Greedy tokens of a mixed-length batch: vLLM == ``transformers`` (each prompt alone) == the native
  Megatron engine, for Llama (GQA, untied) and Qwen2 (qkv bias, tied).
* Sampled at T=0.8: vLLM's log-prob of each sampled token == log_softmax(logits / 0.8) of
  ``transformers`` on the same tokens (the distribution sampled from), and so does the native engine's.
* Weight sync from a TP2 Megatron actor (several buckets) into an engine started with placeholder
  weights: greedy tokens then equal ``transformers`` on those weights; a corrupted bucket is refused
  naming the parameter and leaves the engine refusing to sample.
"""

from __future__ import annotations

import pytest
import torch

from tests.rollout.helpers import in_fresh_process, make_model, needs_vllm

pytestmark = needs_vllm

LENGTHS = (3, 11, 3, 7, 16, 5)
NEW, EOS, PAD, T = 10, 2, 0, 0.8


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in LENGTHS]


def _vllm(path: str):
    """Greedy and sampled (T) outputs of one engine."""
    from megatron_gad.engine.vllm_engine import VLLMEngine

    eng = VLLMEngine(path, dtype="float32", max_model_len=64, seed=0)
    return [eng.generate(_prompts(), max_new_tokens=NEW, eos_id=EOS, seeds=list(range(len(LENGTHS))),
                         temperature=T, greedy=greedy) for greedy in (True, False)]


def _native(rank, world, path, greedy):
    from megatron_gad.data import pad_sequences
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard

    shard = ModelShard("actor", path, 1, 1, vocab_divisible_by=8, trainable=False)
    ids, mask = pad_sequences(_prompts(), PAD, left=True)
    out = generate(shard, ids, mask, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, temperature=T, greedy=greedy,
                   seed=0)
    return [(r[m.bool()].tolist(), lp[m.bool()].tolist())
            for r, m, lp in zip(out["responses"], out["response_mask"], out["rollout_log_prob"])]


def _hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(path: str) -> list[list[int]]:
    hf, out = _hf(path), []
    for p in _prompts():
        x = torch.tensor([p])
        g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                        pad_token_id=PAD)
        out.append(g[0, len(p):].tolist())
    return out


@torch.no_grad()
def _hf_tempered_logprobs(path: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    logits = _hf(path)(torch.tensor([prompt + tokens])).logits[0].double()
    lp = (logits / T).log_softmax(-1)
    return lp[len(prompt) - 1:len(prompt) - 1 + len(tokens)].gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_and_logprobs_match_transformers_and_native(tmp_path, family):
    from megatron_gad.parallel.launch import run_local

    path = make_model(str(tmp_path / family), family, seed=1)
    want = _hf_greedy(path)
    assert len({tuple(w) for w in want}) > 1, "degenerate reference"
    greedy, sampled = in_fresh_process(_vllm, path)
    assert [ids for ids, _ in greedy] == want
    (native,) = run_local(_native, 1, path, True)
    assert [ids for ids, _ in native] == want

    (native_s,) = run_local(_native, 1, path, False)
    assert [ids for ids, _ in sampled] != want, "sampling at T=0.8 looks greedy"
    worst = 0.0
    for engine in (sampled, native_s):
        for prompt, (ids, lps) in zip(_prompts(), engine):
            ref = _hf_tempered_logprobs(path, prompt, ids)
            worst = max(worst, float((torch.tensor(lps, dtype=torch.float64) - ref).abs().max()))
    assert worst < 1e-4, f"sampled-token log-probs differ from log_softmax(logits/T) by {worst}"


def _export_tp2(rank, world, path, bucket_bytes):
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.engine.weight_sync import describe, make_buckets, stream_hf_weights
    from megatron_gad.parallel import state

    shard = ModelShard("actor", path, 2, 1, vocab_divisible_by=8, trainable=False)
    items = stream_hf_weights(shard.module, shard.arch, state.tp_group(), 2, emit=shard.layout.tp_rank == 0)
    buckets = list(make_buckets(items, bucket_bytes))
    return {"manifest": [describe(b, 0, k, len(buckets)) for k, b in enumerate(buckets)], "buckets": buckets}


def _vllm_synced(path: str, sync_from: dict):
    """A rollout worker whose engine starts with placeholder weights: refused before any sync, a
    corrupted sync, refused after it, then a complete sync and greedy outputs."""
    from megatron_gad.config import RolloutConfig
    from megatron_gad.data import pad_sequences
    from megatron_gad.engine.weight_sync import WeightSyncError
    from megatron_gad.workers.rollout import RolloutWorker

    w = RolloutWorker(RolloutConfig(), rank=0, world=1, model_dir=path, load_weights=False, max_model_len=64,
                      max_response_length=NEW, eos_id=EOS, pad_id=PAD)
    batch = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
             "row_seed": torch.zeros(1, dtype=torch.long)}
    msgs = []
    try:
        w.generate(batch, seed=0)
    except WeightSyncError as e:
        msgs.append(str(e))
    manifest, buckets = sync_from["manifest"], [dict(b) for b in sync_from["buckets"]]
    name = next(iter(buckets[-1]))
    buckets[-1][name] = buckets[-1][name] * 2
    try:
        w.update_weights(manifest, buckets)
    except WeightSyncError as e:
        msgs.append(str(e))
    try:
        w.generate(batch, seed=0)
    except WeightSyncError as e:
        msgs.append(str(e))
    w.update_weights(manifest, sync_from["buckets"])  # a complete sync makes it usable again
    ids, mask = pad_sequences(_prompts(), PAD, left=True)
    out = w.generate({"prompt_ids": ids, "prompt_mask": mask, "row_seed": torch.arange(len(ids))}, seed=0, greedy=True)
    return msgs, name, [r[m.bool()].tolist() for r, m in zip(out["responses"], out["response_mask"])]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weight_sync_from_tp2_actor(tmp_path, family):
    """Engine started from model A's config with placeholder weights; the TP2 actor holds model B."""
    from megatron_gad.parallel.launch import run_local

    a = make_model(str(tmp_path / "a"), family, seed=1)
    b = make_model(str(tmp_path / "b"), family, seed=2)
    sync = run_local(_export_tp2, 2, b, 64 << 10)[0]
    assert len(sync["buckets"]) >= 3
    want = _hf_greedy(b)
    assert want != _hf_greedy(a)
    msgs, name, got = in_fresh_process(_vllm_synced, a, sync)
    assert got == want
    n = len(sync["buckets"])
    assert msgs[0] == ("rollout engine 0 refuses to sample: it started with placeholder weights and has not been "
                       "synced yet")
    assert msgs[1].startswith(f"bucket {n}/{n} of pipeline stage 0: {name} is corrupted")
    assert msgs[2] == "rollout engine 0 refuses to sample: a weight update failed part-way; it needs a complete sync"


def test_generate_cli_engines_agree_on_a_checkpoint(tmp_path):
    """``megatron-gad generate --engine vllm`` on a megatron-gad checkpoint (exported to HF on the way)
    gives the native engine's greedy tokens."""
    import json
    import subprocess
    import sys

    from megatron_gad.tools.convert import hf_to_mcore

    hf = make_model(str(tmp_path / "hf"), "qwen2", seed=3)
    ckpt = str(tmp_path / "ckpt")
    hf_to_mcore(hf, ckpt, tp=1, pp=1, role="actor", vocab_divisible_by=8)
    out = {}
    for engine in ("megatron", "vllm"):
        r = subprocess.run([sys.executable, "-m", "megatron_gad.cli", "generate", ckpt, "--prompt-ids", "5 9 14 7",
                            "--max-new-tokens", "12", "--greedy", "--json", "--engine", engine],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out[engine] = json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]
    assert out["vllm"] == out["megatron"]
    assert out["vllm"] == _hf_greedy_one(hf, [5, 9, 14, 7], 12)


def _hf_greedy_one(path: str, prompt: list[int], new: int) -> list[int]:
    x = torch.tensor([prompt])
    g = _hf(path).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                           eos_token_id=EOS, pad_token_id=PAD)
    return g[0, len(prompt):].tolist()
