"""Autoregressive sampling through the Megatron pipeline (native rollout engine), with no padding
mask anywhere.

Why no mask: on GPU the Transformer Engine layer spec runs ``attn_mask_type=causal`` attention,
which ignores ``attention_mask``, and in decode Megatron switches to ``no_mask``. A left-padded
batch would let prompts attend to pad tokens there, silently. So nothing here is padded:

* **Length buckets.** The prompts are grouped by their valid length (``prompt_mask.sum(1)``; the
  padding is stripped, whichever side it is on). Rows of one bucket have exactly the same length,
  and each bucket is split into micro-batches of at most ``micro_batch_size`` rows (rows in input
  order). One ``role.forward`` call per step runs every micro-batch that still has an unfinished
  row; micro-batches of one call may differ in length (``variable_seq_lengths=True``).
* **Prefill** (step 0, KV cache) feeds each micro-batch's whole prompt into its own Megatron
  ``StaticInferenceContext`` with ``attention_mask=None``: Megatron's attention keeps the layer's
  ``causal`` type at ``sequence_len_offset == 0``; the local spec's softmax then builds the plain
  causal mask itself (``sq == sk``) and TE applies its causal kernel — both exact, as no row has
  padding.
* **Decode** feeds only the newest token of every row of the micro-batch, in lockstep (all rows of a
  bucket have the same length at every step: a finished row keeps feeding ``pad_id``, and its outputs
  are ignored). Megatron switches to ``no_mask`` (``sequence_len_offset > 0``), the local softmax gets
  ``mask=None`` with ``sq == 1``: the new token attends to every cached key, all of which are this
  row's own prompt and generated tokens — exactly what TE does as well.
* **Without the KV cache** (``use_kv_cache=False``, the reference the cached path is tested
  against) each step re-runs every micro-batch's whole sequence, also with ``attention_mask=None``
  (plain causal).

Position ids are ``0 .. len-1`` per row (RoPE takes its positions from the cache offset, which is
then right as well, not shifted by padding).

Sampling: the last pipeline stage gathers the last position's logits across TP (the cached path
asks Megatron for gathered logits), scatters every micro-batch's rows back into one ``[B, V]``
tensor in input row order, and samples all ``B`` rows at once with one generator seeded with
``seed`` (identically on every TP rank). Rows of finished micro-batches get zero logits; their draws
are discarded (replaced by ``pad_id``). Each step therefore draws one ``[B, V]`` sample in row order
whatever the bucketing, ``micro_batch_size``, KV cache or TP/PP layout: the tokens depend only on the
seed, the batch and the model. The new tokens are broadcast over TP and to the other pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gad.parallel import state


def sample_next(logits: torch.Tensor, vocab_size: int, temperature: float, top_k: int, top_p: float,
                greedy: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V_padded] (full vocabulary) -> next token ids [B] and their log-probabilities [B]
    under the distribution sampled from (after temperature, top-k and top-p; greedy: the plain
    softmax); padded ids are never chosen."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")
    if greedy:
        nxt = logits.argmax(-1)
        return nxt, logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
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
    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return nxt, logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)


@dataclass
class _Group:
    """One micro-batch: rows of equal prompt length, unpadded, decoded in lockstep."""

    rows: torch.Tensor  # [n] indices into the batch (ascending)
    seq: torch.Tensor  # [n, len] prompt ++ generated tokens so far (pad_id after a row's EOS)
    context: object | None = None  # StaticInferenceContext (KV cache) or None (recompute)
    fed: int = 0  # tokens already in the cache

    def batch(self) -> dict:
        """The micro-batch of this step: no padding, so no attention mask (``mask_4d=None``)."""
        ids = self.seq[:, self.fed:] if self.context is not None else self.seq
        start = self.fed if self.context is not None else 0
        pos = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        mb = {"input_ids": ids, "position_ids": pos, "mask_4d": None}
        if self.context is not None:
            if self.fed > 0:
                self.context.enable_decode_mode()
            mb["inference_context"] = self.context
        return mb

    def advance(self, fed: int) -> None:
        if self.context is not None:
            self.context.sequence_len_offset += fed
            self.fed += fed


def length_groups(prompt_mask: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """Row indices grouped by valid prompt length (shortest first), each bucket split into chunks of
    at most ``micro_batch_size`` rows in input order."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    lengths = prompt_mask.long().sum(1).cpu()
    if bool((lengths == 0).any()):
        raise ValueError(f"empty prompts (no valid token) at rows {torch.nonzero(lengths == 0).flatten().tolist()}")
    groups = []
    for length in sorted(set(lengths.tolist())):
        rows = torch.nonzero(lengths == length).flatten()
        groups.extend(rows.split(micro_batch_size))
    return groups


@torch.no_grad()
def generate(role, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
             greedy: bool = False, seed: int = 0, micro_batch_size: int = 64, use_kv_cache: bool = True) -> dict:
    """prompt_ids/prompt_mask [B, P] (padded, usually on the left) -> {"responses": [B, R],
    "response_mask": [B, R]}, rows in the input's order.

    A response ends with its EOS token (kept, mask 1) or at ``max_new_tokens``; after that it is
    right-padded with ``pad_id`` (mask 0). On the last pipeline stage also ``rollout_log_prob``
    [B, R]: each sampled token's log-probability under the sampling distribution (0 at padding).
    ``R`` is the number of steps run: generation stops when every row is done. See the module
    docstring for bucketing, masking and seeding.
    """
    B = prompt_ids.shape[0]
    dev = state.device()  # NCCL broadcasts need device tensors
    gen = torch.Generator(device=dev).manual_seed(seed)
    ids, valid = prompt_ids.to(dev), prompt_mask.to(dev).bool()
    groups = []
    for rows in length_groups(prompt_mask, micro_batch_size):
        rows = rows.to(dev)
        seq = ids[rows][valid[rows]].view(len(rows), -1)  # strip the padding (equal lengths)
        ctx = _new_context(len(rows), seq.shape[1] + max_new_tokens) if use_kv_cache else None
        groups.append(_Group(rows, seq, ctx))
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out_tokens, out_mask, out_logp = [], [], []  # log-probs: last stage only
    lay = role.layout

    def last_logits(output, batch):
        last = output[:, -1, :]  # every row of a micro-batch ends at the same (latest) position
        full = last if "inference_context" in batch else state.gather_tp_last_dim(last)
        return full.sum() * 0, {"logits": full}

    for _step in range(max_new_tokens):
        active = [g for g in groups if not bool(done[g.rows].all())]
        mbs = [g.batch() for g in active]
        results = role.forward(mbs, last_logits)
        for g, mb in zip(active, mbs):
            g.advance(mb["input_ids"].shape[1])
        nxt = torch.zeros(B, dtype=torch.long, device=dev)
        if lay.is_last_stage:
            logits = results[0]["logits"].new_zeros(B, results[0]["logits"].shape[-1])
            for g, r in zip(active, results):
                logits[g.rows] = r["logits"].to(logits.dtype)
            nxt, nxt_logp = sample_next(logits, role.arch.vocab_size, temperature, top_k, top_p, greedy, gen)
            out_logp.append(nxt_logp.masked_fill(done, 0.0))
        if lay.tp_size > 1:  # identical already; make it explicit and robust
            dist.broadcast(nxt, src=state.tp_src_global_rank(), group=state.tp_group())
        nxt = state.broadcast_from_last_stage(nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out_tokens.append(nxt)
        out_mask.append((~done).long())
        for g in active:  # finished rows feed pad_id: their bucket stays in lockstep
            g.seq = torch.cat([g.seq, nxt[g.rows][:, None]], 1)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
    if not out_tokens:
        empty = torch.zeros(B, 0, dtype=torch.long)
        return {"responses": empty, "response_mask": empty.clone(), "rollout_log_prob": torch.zeros(B, 0)}
    out = {"responses": torch.stack(out_tokens, 1).cpu(), "response_mask": torch.stack(out_mask, 1).cpu()}
    if out_logp:
        out["rollout_log_prob"] = torch.stack(out_logp, 1).cpu()
    return out


def _new_context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)
