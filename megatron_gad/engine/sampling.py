"""Token choice for the native rollout: greedy or sampled with counter-based per-row randomness.

A sampled token depends only on its distribution and one uniform number ``u`` keyed on
``(seed, row key, response index)`` (:func:`row_uniforms`, a stateless integer hash computed on the
device, no generator state): a row's tokens therefore do not depend on which other rows share its
batch, how the rows are bucketed or split into micro-batches, the TP/PP layout or the KV cache — only
on the seed, the row's key and the model. The token is the inverse CDF at ``u`` (one uniform per row
and step, unlike an exponential race that needs one per vocabulary entry: a [rows, V] hash per step
costs as much as a small forward on a CPU).

The returned log-probability is the chosen token's under the distribution sampled from (after
temperature, top-k and top-p; greedy: the plain softmax) — the contract the vLLM engine keeps as well
(``logprobs_mode="processed_logprobs"``) and that ``rollout/logprob_diff_*`` and rollout importance
sampling compare against the actor's ``log_softmax(logits / T)``.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) without signed overflow (c split in halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (C. Wellons' "lowbias32"): avalanching, bijective on [0, 2**32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seed: int, rows: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """Uniforms in (0, 1), float64, one per row: a pure function of (``seed``, ``rows[i]``, ``index``)
    (non-negative integers; ``index`` a scalar or per row)."""
    rows = rows.long()
    idx = torch.as_tensor(index, dtype=torch.long, device=rows.device).expand_as(rows)
    h = _hash32(idx + 0x9E3779B9)
    for word in ((rows & _M32), (rows >> 32) & _M32, seed & _M32, (seed >> 32) & _M32):
        h = _hash32(h ^ word)
    return (h.double() + 0.5) / 2.0**32


def process_logits(logits: torch.Tensor, vocab_size: int, temperature: float, top_k: int, top_p: float,
                   greedy: bool) -> torch.Tensor:
    """[B, V_padded] -> float32 logits of the distribution sampled from (padded ids at -inf)."""
    logits = logits.float()
    if logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if greedy:
        return logits
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, vocab_size), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, vocab_size: int, temperature: float, top_k: int, top_p: float,
                greedy: bool, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V_padded] (full vocabulary) -> next token ids [B] and their log-probabilities [B]
    under the distribution sampled from; padded ids are never chosen. ``uniforms`` [B] in (0, 1)
    (:func:`row_uniforms`): the inverse CDF picks the token (unused when greedy)."""
    logits = process_logits(logits, vocab_size, temperature, top_k, top_p, greedy)
    if greedy:  # no [B, V] log-softmax written: the chosen logit minus the log-partition
        nxt = logits.argmax(-1)
        return nxt, logits.gather(-1, nxt[:, None]).squeeze(-1) - logits.logsumexp(-1)
    logp = logits.log_softmax(-1)
    # float64 running sum: its total is exact enough that u * total stays inside the last kept bin
    cdf = logp.exp().double().cumsum(-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]
    # first id whose cumulative mass exceeds the target: a zero-probability id (flat cdf) never is
    nxt = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(vocab_size - 1)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)
