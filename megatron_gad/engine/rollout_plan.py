"""How the native rollout groups rows: length buckets chosen by a cost model, and shared prefills.

The sampler (``engine/generate.py``) decodes each bucket in lockstep, Megatron's static algorithm: the
bucket's rows are prefilled up to its shortest prompt ``m``, then every step runs **one forward for all
rows of the bucket** that still have a token to produce, feeding a row's own prompt token while it is
still inside its prompt and its sampled token after. A bucket whose prompts span ``spread`` tokens
therefore runs ``spread + new`` forwards; a row of length ``l`` takes part in ``l - m + new`` of them
(rows are sorted by length, so the rows whose last response position has passed form a prefix of the
cache and are dropped from the forward by its batch offset). One bucket for everything costs the fewest
forwards (what a host-bound GPU step pays for); on a CPU, where every row-step costs compute, a large
spread is cheaper split. The cost model:

    cost(bucket) = (spread + new) * forward_cost_rows + sum over its rows of (l - m + new)

``forward_cost_rows``: the fixed cost of one forward (launches, Python, collectives) in units of one
row's compute — small on a CPU (compute-bound), large on a GPU (host-bound). Buckets are contiguous
ranges of the rows sorted by prompt length; the split with the least total cost is found exactly by
dynamic programming over the boundaries between distinct lengths (and, with a row limit, every row).
"""

from __future__ import annotations

import torch

# fixed cost of one forward in row-steps (see the module docstring); orders of magnitude: a 2-core CPU
# spends ~2.5 ms per row-step of a 40M model and tens of ms per forward (Python, small matmuls less
# efficient than large ones); an H200 ~20 ms of host time per forward of a 24-layer model, microseconds
# per row
FORWARD_COST_ROWS = {"cpu": 32.0, "cuda": 4096.0}


def plan_buckets(lengths: torch.Tensor, new_tokens: int, forward_cost_rows: float,
                 max_rows: int | None = None) -> list[torch.Tensor]:
    """lengths [B] (CPU ints) -> buckets: row-index tensors (each sorted by length, then by row), the
    split minimising the summed cost; every bucket has at most ``max_rows`` rows (None: no limit)."""
    B = int(lengths.numel())
    if B == 0:
        return []
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {max_rows}")
    order = torch.argsort(lengths, stable=True)
    srt = lengths[order].tolist()
    limit = max_rows or B
    # candidate bucket ends (exclusive): where the length changes, or anywhere when a row limit applies
    if limit >= B:
        cuts = [i for i in range(1, B) if srt[i] != srt[i - 1]] + [B]
    else:
        cuts = list(range(1, B + 1))
    starts = [0] + cuts[:-1]
    prefix = [0]
    for n in srt:
        prefix.append(prefix[-1] + n)
    best = {0: (0.0, -1)}  # end -> (cost of rows [0, end), previous end)
    for end in cuts:
        cand = None
        for start in reversed(starts):
            if start >= end:
                continue
            if end - start > limit:
                break
            if start not in best:
                continue
            m = srt[start]
            rows = prefix[end] - prefix[start] - (end - start) * (m - new_tokens)
            cost = best[start][0] + (srt[end - 1] - m + new_tokens) * forward_cost_rows + rows
            if cand is None or cost < cand[0]:
                cand = (cost, start)
        best[end] = cand
    buckets, end = [], B
    while end > 0:
        start = best[end][1]
        buckets.append(order[start:end])
        end = start
    return buckets[::-1]


def bucket_cost(lengths: list[int], new_tokens: int, forward_cost_rows: float) -> float:
    """The cost model of one bucket (for reports and tests)."""
    m = min(lengths)
    return (max(lengths) - m + new_tokens) * forward_cost_rows + sum(n - m + new_tokens for n in lengths)


def left_align(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] padded prompts (padding on either side) -> ([B, P] each row's valid tokens first, then
    ``pad_id``; lengths [B]). Raises on a row without any valid token."""
    valid = prompt_mask.bool()
    lengths = valid.long().sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"empty prompts (no valid token) at rows {torch.nonzero(lengths == 0).flatten().tolist()}")
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid positions first, in order
    aligned = prompt_ids.gather(1, order).masked_fill(~valid.gather(1, order), pad_id)
    return aligned, lengths


def shared_prefixes(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, m] -> (first row of each distinct prefix [U] ascending, row -> its distinct index [b]):
    a prompt's n samples are prefilled once and the cache copied to the others."""
    uniq, inverse = torch.unique(tokens.cpu(), dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), tokens.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(tokens.shape[0]), reduce="amin")
    # renumber the distinct prefixes in order of their first row, so the prefill rows stay ascending
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel())
    return first.sort().values, rank[inverse]
