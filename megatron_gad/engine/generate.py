"""Autoregressive sampling through the Megatron pipeline (native rollout engine).

Every rank of one data-parallel replica calls :func:`generate` with the same prompts. With the KV
cache (default) the prompt is encoded once (prefill) into a Megatron ``StaticInferenceContext`` per
micro-batch and each later step feeds only the newest token; without it each step re-runs the whole
sequence (the reference the cached path is tested against). The last stage gathers the last
position's logits across TP, samples with a generator seeded identically on every TP rank, and the
new tokens are broadcast to the other pipeline stages. Left padding is handled with explicit
attention masks (padded keys hidden), so a batch of prompts of different lengths decodes exactly
like each prompt alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gad.engine.forward_backward import attention_mask_4d
from megatron_gad.parallel import state


def sample_next(logits: torch.Tensor, vocab_size: int, temperature: float, top_k: int, top_p: float,
                greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V_padded] (full vocabulary) -> next token ids [B]; padded ids are never chosen."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, vocab_size), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(role, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
             greedy: bool = False, seed: int = 0, micro_batch_size: int = 64, use_kv_cache: bool = True) -> dict:
    """prompt_ids/prompt_mask [B, P] left-padded -> {"responses": [B, R], "response_mask": [B, R]}.

    A response ends with its EOS token (kept, mask 1) or at ``max_new_tokens``; after that it is
    right-padded with ``pad_id`` (mask 0).
    """
    B = prompt_ids.shape[0]
    dev = state.device()  # NCCL broadcasts need device tensors
    gen = torch.Generator(device=dev).manual_seed(seed)
    seq, mask = prompt_ids.to(dev), prompt_mask.to(dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out_tokens, out_mask = [], []
    lay = role.layout

    def last_logits(output, batch):
        last = output[:, -1, :]  # every row ends at the same (latest) position: left padding
        full = last if "inference_context" in batch else state.gather_tp_last_dim(last)
        return full.sum() * 0, {"logits": full}

    starts = list(range(0, B, micro_batch_size))
    contexts = [_new_context(min(micro_batch_size, B - i), prompt_ids.shape[1] + max_new_tokens)
                for i in starts] if use_kv_cache else None
    for step in range(max_new_tokens):
        if not use_kv_cache:
            mbs = [{"input_ids": seq[i:i + micro_batch_size], "attention_mask": mask[i:i + micro_batch_size]}
                   for i in starts]
        else:
            mbs = [_cached_step_batch(seq[i:i + micro_batch_size], mask[i:i + micro_batch_size], ctx, step == 0)
                   for i, ctx in zip(starts, contexts)]
        results = role.forward(mbs, last_logits)
        if use_kv_cache:
            for mb, ctx in zip(mbs, contexts):
                ctx.sequence_len_offset += mb["input_ids"].shape[1]
        nxt = torch.zeros(B, dtype=torch.long, device=dev)
        if lay.is_last_stage:
            logits = torch.cat([r["logits"] for r in results], 0)
            nxt = sample_next(logits, role.arch.vocab_size, temperature, top_k, top_p, greedy, gen)
        if lay.tp_size > 1:  # identical already; make it explicit and robust
            dist.broadcast(nxt, src=state.tp_src_global_rank(), group=state.tp_group())
        nxt = state.broadcast_from_last_stage(nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out_tokens.append(nxt)
        out_mask.append((~done).long())
        seq = torch.cat([seq, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
    return {"responses": torch.stack(out_tokens, 1).cpu(), "response_mask": torch.stack(out_mask, 1).cpu()}


def _new_context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)


def _cached_step_batch(seq: torch.Tensor, mask: torch.Tensor, ctx, prefill: bool) -> dict:
    """Prefill: the whole prompt with a causal + padding mask. Decode: only the newest token, which
    may attend to every valid cached key."""
    if prefill:
        mask_4d = attention_mask_4d(mask)  # [B, 1, S, S], True = hidden
        ids = seq
    else:
        mask_4d = ~mask.bool()[:, None, None, :]  # [B, 1, 1, t]
        ids = seq[:, -1:]
        ctx.enable_decode_mode()
    pos = torch.arange(ctx.sequence_len_offset, ctx.sequence_len_offset + ids.shape[1],
                       device=seq.device).expand(ids.shape[0], -1)
    return {"input_ids": ids, "attention_mask": mask[:, -ids.shape[1]:], "position_ids": pos,
            "mask_4d": mask_4d, "inference_context": ctx}
