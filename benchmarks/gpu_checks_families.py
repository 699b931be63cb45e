"""``gpu_check`` row ``families``: Qwen3 and Llama-3.1 shapes on Megatron-Core vs ``transformers``.

On a GPU: two layers of Qwen3-8B's shape (hidden 4096, 32 heads / 8 KV heads of head_dim 128, q/k RMSNorm;
vocabulary 32,768) and of Llama-3.1-8B's (llama3-scaled RoPE: factor 8, original window 8192, theta 5e5) with random
weights, one packed batch whose longest row (8,500 tokens) runs past Llama 3.1's original RoPE window. With
``--smoke`` (CPU): the tiny ``tools/tiny_models.py`` models of both families (original window 64, rows past it).

Reference: the HF model in fp32 on this device, each sequence alone. Megatron runs the rows packed (THD, the
production path) in fp32 (max |diff| <= ``logits_fp32_abs``) and bf16 (max |diff| / max |ref| <=
``logits_bf16_rel``; the HF model in bf16 is reported beside it for scale); greedy KV-cached decoding in fp32
equals transformers token for token. Imported by ``gpu_check.py`` (the check runs in its own child process).
"""

from __future__ import annotations

import os
import tempfile

# Two layers of each published shape (configs/archs/qwen3-8b, llama-3.1-8b): the per-layer math at full width;
# the vocabulary cut to 32,768 (a random model's creation and save on the host dominate the check otherwise)
GPU_SHAPES = {
    "qwen3": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 2, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768, "max_position_embeddings": 40960,
              "rope_theta": 1000000.0},
    "llama31": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 131072,
                "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}},
}


def _rows(smoke: bool, vocab: int):
    """Left-padded prompts ++ right-padded responses; the longest row passes the original RoPE window
    (64 tokens for the tiny llama31, 8192 for Llama 3.1)."""
    import torch

    from megatron_gad.data import pad_sequences

    g = torch.Generator().manual_seed(0)
    p_lens, r_lens = ([2, 40, 9], [3, 50, 20]) if smoke else ([3, 4000, 60], [2, 4500, 190])
    prompts = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in p_lens]
    resps = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in r_lens]
    pi, pm = pad_sequences(prompts, 0, left=True)
    ri, rm = pad_sequences(resps, 0, left=False)
    return {"prompt_ids": pi, "prompt_mask": pm, "responses": ri, "response_mask": rm}


def check_families(rec, smoke: bool) -> None:
    import gpu_check as g  # the helpers and thresholds (this module is imported by it)
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gad.data import build_sequences
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.engine.packing import unpack_to_rows
    from megatron_gad.tools.tiny_models import make_hf_model
    from megatron_gad.workers.micro_batches import actor_micro_batches

    dev = g._device()
    root = tempfile.mkdtemp(prefix="gpu_check_families_")

    def capture(out, mb):
        return out.sum() * 0, {"logits": out.float()}

    with g._megatron_process():
        for fam in ("qwen3", "llama31"):
            size = {} if smoke else GPU_SHAPES[fam]
            path = make_hf_model(os.path.join(root, fam), fam, seed=3, **size)
            vocab = size.get("vocab_size", 96)
            rows = _rows(smoke, vocab)
            ids, mask, _ = build_sequences(rows["prompt_ids"], rows["prompt_mask"], rows["responses"],
                                           rows["response_mask"])
            seqs = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
            lens = [len(s) for s in seqs]
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
            with torch.no_grad():
                ref = [hf(s[None].to(dev)).logits[0].float().cpu() for s in seqs]
                hf.to(torch.bfloat16)
                hf_bf16_rel = max(g._rel(hf(s[None].to(dev)).logits[0].float().cpu(), r) for s, r in zip(seqs, ref))
            del hf
            for dtype in ("float32", "bfloat16"):
                shard = ModelShard("actor", path, 1, 1, params_dtype=dtype, vocab_divisible_by=8)
                mb = actor_micro_batches(rows, [list(range(len(seqs)))])
                as_rows = unpack_to_rows(shard.forward(mb, capture)[0]["logits"].cpu(), mb[0]["packed"])
                got = [as_rows[b][mask[b].bool()][:, :vocab] for b in range(len(seqs))]
                case = f"{fam}_{dtype}_packed"
                if dtype == "float32":
                    err = max(float((a - r).abs().max()) for a, r in zip(got, ref))
                    rec.check_le(case + "_max_abs", err, g.TOL["logits_fp32_abs"], lengths=str(lens))
                    g._greedy(rec, fam, shard, path, rows, dev)
                else:
                    err = max(g._rel(a, r) for a, r in zip(got, ref))
                    rec.check_le(case + "_max_rel", err, g.TOL["logits_bf16_rel"], hf_bf16_rel=hf_bf16_rel,
                                 lengths=str(lens))
                del shard, as_rows, got
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            del ref
