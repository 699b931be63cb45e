"""Autoregressive sampling through the Megatron model (native rollout engine): one forward per decode
step for all rows of a bucket, exact per-row positions, and no padding mask anywhere.

Why no mask: on GPU the Transformer Engine layer spec runs ``attn_mask_type=causal`` attention, which
ignores ``attention_mask``, and in decode Megatron switches to ``no_mask``. A left-padded batch would
let prompts attend to pad tokens there, silently. So nothing here is padded — Megatron's own static
algorithm (its ``StaticInferenceContext``), per length bucket (``engine/rollout_plan.py``):

* **Prefill** the bucket up to its shortest prompt ``m``: every row has at least ``m`` valid tokens,
  so ``[rows, m]`` has no padding; ``attention_mask=None`` at ``sequence_len_offset == 0`` keeps the
  layer's causal attention (the local softmax builds the plain causal mask itself, TE applies its
  causal kernel). Rows with the same first ``m`` tokens (a prompt's ``n`` samples) are prefilled once
  and their cache rows copied to the others.
* **Lockstep decode**: step ``t`` feeds position ``t`` of every row (``[rows, 1]``, one forward): the
  row's own prompt token while ``t`` is inside its prompt, else its sampled token (``pad_id`` once it
  is done). The bucket's rows are sorted by prompt length, so the rows that have produced their last
  position (``length + max_new_tokens - 1``, known on the host) form a prefix of the cache: later
  forwards skip them through the context's batch offset. Megatron switches to ``no_mask`` (offset >
  0): the new token attends to every cached key, all of which are this row's own tokens at positions
  ``0 .. t`` — so every row sees exactly its unpadded sequence, with its true positions (RoPE takes
  them from the cache offset), what TE does too. The logits of a row still inside its prompt are not
  sampled from (its next token is forced).
* **Without the KV cache** (``use_kv_cache=False``, the reference the cached path is tested against)
  each step re-runs ``[rows, t + 1]`` from position 0, also with ``attention_mask=None``.

Per-step overhead: the model is put in ``eval()`` once and, at PP = 1, called directly (no pipeline
schedule); at PP > 1 the rows of a bucket go through the schedule as PP micro-batches sharing one
cache (each at its own batch offset) so the pipeline stays full. Tokens, log-probs and masks live in
buffers preallocated per bucket on the device; the only host synchronisation is the "all rows done?"
check, made every ``done_check_every`` steps (a bucket may run up to that many steps past its end;
those steps produce padding only).

Sampling (``engine/sampling.py``): a row's ``j``-th response token is drawn with a uniform keyed on
``(seed, row key, j)``, so the tokens depend only on the seed, the row keys (``row_ids``, default the
row index) and the model — not on the bucketing, ``micro_batch_size``, KV cache or TP/PP layout. All
TP ranks compute the same gathered logits and tokens (broadcast from the TP source rank anyway); the
last pipeline stage samples and broadcasts the tokens to the other stages.
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist

from megatron_gad.engine.rollout_plan import FORWARD_COST_ROWS, left_align, plan_buckets, shared_prefixes
from megatron_gad.engine.sampling import row_uniforms, sample_next
from megatron_gad.parallel import state

DONE_CHECK_EVERY = 8


class _Runner:
    """Runs one bucket's forwards: the model directly at PP = 1, the pipeline schedule otherwise."""

    def __init__(self, role, use_kv_cache: bool, stats: dict):
        self.role, self.kv, self.stats = role, use_kv_cache, stats
        self.lay = role.layout
        self.ctx = None

    def start(self, rows: int, max_len: int) -> None:
        self.ctx = _new_context(rows, max_len) if self.kv else None

    def forward(self, tokens: torch.Tensor, start: int, positions: torch.Tensor, first_row: int = 0):
        """tokens [b, s] at positions ``start .. start+s-1`` of the cache rows ``first_row ..
        first_row+b-1`` (KV cache: appended; recompute: start is 0) -> the last position's logits
        [b, V_padded] gathered over TP (last stage; None elsewhere)."""
        b, s = tokens.shape
        pos = positions[start:start + s].expand(b, s)
        self.stats["forwards"] += 1
        if self.lay.pp_size == 1:
            out = self._call(tokens, pos, first_row)
        else:
            out = self._pipelined(tokens, pos, first_row)
        if self.ctx is not None:
            self.ctx.sequence_len_offset += s
            if s > 0 and not self.ctx.decode_mode:
                self.ctx.enable_decode_mode()
        return out

    def _last(self, output: torch.Tensor) -> torch.Tensor:
        last = output[:, -1, :]
        return last if self.ctx is not None else state.gather_tp_last_dim(last)

    def _call(self, tokens, pos, batch_offset: int) -> torch.Tensor:
        if self.ctx is None:
            return self._last(self.role.model(tokens, pos, None))
        self.ctx.batch_size_offset = batch_offset
        return self._last(self.role.model(tokens, pos, None, inference_context=self.ctx, runtime_gather_output=True))

    def _pipelined(self, tokens, pos, first_row: int) -> torch.Tensor | None:
        from megatron_gad.engine.forward_backward import forward_backward

        chunks = torch.arange(tokens.shape[0]).tensor_split(min(self.lay.pp_size, tokens.shape[0]))
        mbs = []
        for c in chunks:
            mb = {"input_ids": tokens[c[0]:c[-1] + 1], "position_ids": pos[c[0]:c[-1] + 1], "mask_4d": None}
            if self.ctx is not None:
                mb.update(inference_context=self.ctx, batch_offset=first_row + int(c[0]))
            mbs.append(mb)

        def loss_fn(output, mb):
            last = self._last(output)
            return last.sum() * 0, {"logits": last}

        res = forward_backward(self.role.model, mbs, loss_fn, forward_only=True)
        return torch.cat([r["logits"] for r in res]) if res else None

    def share_prefill(self, source: torch.Tensor, length: int) -> None:
        """Cache rows ``source[i]`` -> row i for positions ``0 .. length-1`` (every layer of this stage)."""
        for key, value in self.ctx.key_value_memory_dict.values():
            key[:length, :len(source)] = key[:length, source]
            value[:length, :len(source)] = value[:length, source]


@torch.no_grad()
def generate(role, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
             greedy: bool = False, seed: int = 0, micro_batch_size: int | None = None, use_kv_cache: bool = True,
             row_ids: torch.Tensor | None = None, forward_cost_rows: float | None = None, single_bucket: bool = False,
             done_check_every: int = DONE_CHECK_EVERY, stats: dict | None = None) -> dict:
    """prompt_ids/prompt_mask [B, P] (padded on either side) -> {"responses": [B, R],
    "response_mask": [B, R]}, rows in the input's order.

    A response ends with its EOS token (kept, mask 1) or at ``max_new_tokens``; after that it is
    right-padded with ``pad_id`` (mask 0). On the last pipeline stage also ``rollout_log_prob`` [B, R]:
    each sampled token's log-probability under the sampling distribution (0 at padding). ``R`` is the
    longest response. ``micro_batch_size``: at most this many rows per bucket (None: all rows may
    share one); ``row_ids`` [B]: each row's sampling key (default ``0 .. B-1``);
    ``forward_cost_rows``: the bucketing cost model's fixed cost of a forward (default by device,
    ``rollout_plan.FORWARD_COST_ROWS``); ``single_bucket``: every row in one lockstep bucket (Megatron's
    plain static algorithm; ``micro_batch_size`` still caps it); ``stats``: filled with forwards, steps,
    host syncs, buckets.
    See the module docstring.
    """
    B = prompt_ids.shape[0]
    dev = state.device()
    lay = role.layout
    stats = stats if stats is not None else {}
    stats.update(forwards=0, steps=0, host_syncs=0, buckets=0, prefill_rows=0)
    keys = (torch.arange(B) if row_ids is None else torch.as_tensor(row_ids).long().cpu()).to(dev)
    aligned, lengths = left_align(prompt_ids.cpu(), prompt_mask.cpu(), pad_id)
    if forward_cost_rows is None:
        forward_cost_rows = FORWARD_COST_ROWS[dev.type if dev.type in FORWARD_COST_ROWS else "cuda"]
    if single_bucket:
        order = torch.argsort(lengths, stable=True)
        buckets = list(order.split(micro_batch_size or B)) if B else []
    else:
        buckets = plan_buckets(lengths, max_new_tokens, forward_cost_rows, micro_batch_size)
    stats["buckets"] = len(buckets)
    responses = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
    logp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
    role.reload("params")
    role.module.eval()  # once per rollout
    runner = _Runner(role, use_kv_cache, stats)
    sampling = dict(vocab_size=role.arch.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    for rows in buckets if max_new_tokens > 0 else []:
        lens = lengths[rows]  # ascending (plan_buckets sorts each bucket by length)
        out = _decode_bucket(runner, aligned[rows].to(dev), lens.to(dev), lens.tolist(), keys[rows.to(dev)],
                             max_new_tokens, eos_id, pad_id, seed, sampling, done_check_every)
        idx = rows.to(dev)
        responses[idx], mask[idx] = out[0], out[1]
        if out[2] is not None:
            logp[idx] = out[2]
    runner.ctx = None
    R = int(mask.sum(1).max()) if B and max_new_tokens > 0 else 0  # the one sync at the end
    stats["host_syncs"] += 1
    res = {"responses": responses[:, :R].cpu(), "response_mask": mask[:, :R].long().cpu()}
    if lay.is_last_stage:
        res["rollout_log_prob"] = logp[:, :R].cpu()
    return res


def _decode_bucket(runner: _Runner, prompts: torch.Tensor, lens: torch.Tensor, host_lens: list[int],
                   keys: torch.Tensor, new: int, eos_id: int, pad_id: int, seed: int, sampling: dict, check_every: int):
    """One bucket (rows sorted by prompt length, ``host_lens`` their lengths) -> responses, mask
    [b, new] and log-probs (last stage; else None), aligned at each row's first response token."""
    lay, stats = runner.lay, runner.stats
    b, dev = prompts.shape[0], prompts.device
    m, M = host_lens[0], host_lens[-1]
    T = M + new  # positions 0 .. T-1: the longest prompt and its last response token
    tokens = torch.full((b, T), pad_id, dtype=torch.long, device=dev)
    tokens[:, :M] = prompts[:, :M]
    steps = torch.arange(T, device=dev)
    in_prompt = steps[None] < lens[:, None]  # [b, T]: forced positions
    end = lens + new  # a row's response occupies positions lens .. end-1
    last = [n + new - 1 for n in host_lens]  # ascending: each row's last response position
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    gen_mask = torch.zeros(b, T, dtype=torch.bool, device=dev)
    lp_buf = torch.zeros(b, T, dtype=torch.float32, device=dev) if lay.is_last_stage else None
    runner.start(b, T)
    if runner.kv:  # prefill each distinct prefix once, then copy its cache rows
        first, inverse = shared_prefixes(prompts[:, :m])
        stats["prefill_rows"] += len(first)
        logits = runner.forward(tokens[first.to(dev), :m], 0, steps)
        if len(first) < b:
            runner.share_prefill(inverse.to(dev), m)
            logits = logits[inverse.to(dev)] if logits is not None else None
    else:
        stats["prefill_rows"] += b
        logits = runner.forward(tokens[:, :m], 0, steps)
    lo = 0  # rows lo .. b-1 take part in this step; rows before lo have produced their last position
    for t in range(m, T):
        stats["steps"] += 1
        forced, done_now, rows_end = in_prompt[lo:, t], done[lo:], end[lo:]
        if lay.is_last_stage:
            u = None if sampling["greedy"] else row_uniforms(seed, keys[lo:], (t - lens[lo:]).clamp(min=0))
            nxt, nxt_lp = sample_next(logits, uniforms=u, **sampling)
        else:
            nxt = torch.empty(b - lo, dtype=torch.long, device=dev)
        if lay.tp_size > 1:  # identical already (same gathered logits and keys); explicit and robust
            dist.broadcast(nxt, src=state.tp_src_global_rank(), group=state.tp_group())
        nxt = state.broadcast_from_last_stage(nxt)
        gen = ~forced & ~done_now
        tokens[lo:, t] = torch.where(forced, tokens[lo:, t], torch.where(done_now, pad_id, nxt))
        gen_mask[lo:, t] = gen
        if lp_buf is not None:
            lp_buf[lo:, t] = torch.where(gen, nxt_lp, 0.0)
        done_now |= gen & ((nxt == eos_id) | (t + 1 >= rows_end))
        if t == T - 1:
            break
        if (t - m) % check_every == check_every - 1:
            stats["host_syncs"] += 1
            if bool(done.all()):
                break
        lo = bisect.bisect_right(last, t)  # known on the host: no sync
        if runner.kv:
            logits = runner.forward(tokens[lo:, t:t + 1], t, steps, first_row=lo)
        else:
            logits = runner.forward(tokens[lo:, :t + 1], 0, steps)
    runner.ctx = None  # free this bucket's cache before the next one
    idx = lens[:, None] + torch.arange(new, device=dev)[None]
    lp = lp_buf.gather(1, idx) if lp_buf is not None else None
    return tokens.gather(1, idx), gen_mask.gather(1, idx), lp


def _new_context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_len)
