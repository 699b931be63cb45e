"""Native rollout without a padding mask: a mixed-length batch (prompt lengths 3 .. 24, several rows
per length and some unique lengths) decodes exactly like each prompt alone.

For Llama (GQA, untied) and Qwen2 (qkv bias, tied), at TP x PP 1x1 and 2x2, with
``MEGATRON_GAD_EMULATE_TE_MASKING`` unset and set (set: attention sees only what Transformer
Engine's kernels see — causal, no padding mask, no mask in decode — so the result cannot depend on
a mask):
  * greedy tokens of the left-padded batch == ``transformers`` ``generate`` on each prompt alone
    (unpadded) == each prompt alone through our ``generate``;
  * KV-cached == recomputed, greedy and seeded sampling;
  * sampling does not depend on ``micro_batch_size`` (the grouping of rows into micro-batches).
All cases of a layout run in one set of spawned ranks.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.distributed

FAMILIES = ("llama", "qwen2")
EMULATE = "MEGATRON_GAD_EMULATE_TE_MASKING"
LENGTHS = (3, 17, 3, 9, 17, 3, 24, 5)  # 24 / 3 = 8x; three rows of 3, two of 17, unique 9, 24, 5
NEW, EOS, PAD = 8, 2, 0


def _batch():
    """Left-padded [B, P] prompts (ids 3..95, so no EOS/pad inside) and their masks."""
    g = torch.Generator().manual_seed(0)
    P = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(LENGTHS):
        ids[r, P - n:] = torch.randint(3, 96, (n,), generator=g)
        mask[r, P - n:] = 1
    return ids, mask


def _run(rank, world, paths, tp, pp):
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.models.packed_attention import PackedDotProductAttention

    ids, mask = _batch()
    out = {}
    for family, path in paths.items():
        role = ModelShard("actor", path, tp, pp, vocab_divisible_by=8)
        assert any(isinstance(m, PackedDotProductAttention) for m in role.module.modules())
        gen = lambda i, m, **kw: generate(role, i, m, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD,  # noqa: B023
                                          temperature=1.0, seed=3, **kw)
        for emulate in (False, True):
            os.environ[EMULATE] = "1" if emulate else ""  # read by the attention at every forward
            for kv in (True, False):
                for greedy in (True, False):
                    out[family, emulate, "batch", kv, greedy] = gen(ids, mask, greedy=greedy, micro_batch_size=2,
                                                                    use_kv_cache=kv)
            out[family, emulate, "mbs1", True, False] = gen(ids, mask, greedy=False, micro_batch_size=1)
            out[family, emulate, "mbs_all", True, False] = gen(ids, mask, greedy=False, micro_batch_size=len(ids))
            for r in range(len(ids)):  # each prompt alone, unpadded
                keep = mask[r].bool()
                out[family, emulate, "alone", r] = gen(ids[r:r + 1, keep], mask[r:r + 1, keep], greedy=True)
        os.environ.pop(EMULATE, None)
    return out


def _hf_greedy(path: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, mask = _batch()
    want = []
    for r in range(len(ids)):
        prompt = ids[r:r + 1, mask[r].bool()]
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)
        want.append(out[0, prompt.shape[1]:].tolist())
    return want


def _valid(res: dict, row: int) -> list[int]:
    return res["responses"][row][res["response_mask"][row].bool()].tolist()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_mixed_length_generation_needs_no_mask(tmp_path, tp, pp):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    paths = {f: make_hf_model(str(tmp_path / f), f, seed=1) for f in FAMILIES}
    res = run_local(_run, tp * pp, paths, tp, pp)[-1]
    ids, _ = _batch()
    for family in FAMILIES:
        want = _hf_greedy(paths[family])
        assert len({tuple(w) for w in want}) > 1, "degenerate reference: every prompt gives the same tokens"
        for emulate in (False, True):
            case = f"{family} emulate={emulate} tp={tp} pp={pp}"
            greedy = res[family, emulate, "batch", True, True]
            assert greedy["responses"].shape[0] == len(ids)
            for r in range(len(ids)):
                # both stop after EOS (kept) or NEW tokens
                assert _valid(greedy, r) == want[r], f"{case} row {r}: {_valid(greedy, r)} vs transformers {want[r]}"
                alone = res[family, emulate, "alone", r]
                assert _valid(alone, 0) == _valid(greedy, r), f"{case} row {r}: batch vs alone"
            for g in (True, False):
                kv, rec = res[family, emulate, "batch", True, g], res[family, emulate, "batch", False, g]
                assert torch.equal(kv["responses"], rec["responses"]), f"{case} greedy={g}: KV cache vs recompute"
                assert torch.equal(kv["response_mask"], rec["response_mask"]), case
            sampled = res[family, emulate, "batch", True, False]
            for key in ("mbs1", "mbs_all"):
                assert torch.equal(res[family, emulate, key, True, False]["responses"], sampled["responses"]), \
                    f"{case}: sampling depends on micro_batch_size ({key})"
            assert not torch.equal(sampled["responses"], greedy["responses"]), f"{case}: sampling looks greedy"
