"""Packed micro-batches for the workers' model passes (pure torch on top of ``engine/packing.py``).

Every training and scoring pass packs its rows: a micro-batch is one row of the rows' valid tokens
back to back (``PackedRows``) — no pad token is computed and no padding mask exists, so the same
code is right under Transformer Engine's causal kernels. Rows are grouped into micro-batches either
by count (``*_micro_batch_size_per_gpu``, contiguous rows) or, with ``use_dynamic_bsz``, by a token
budget (``*_max_token_len_per_gpu``) balanced by token count; results come back in the input's row
order either way.

Alignment: ``align`` rounds each packed row up to a multiple (a tail segment of pad tokens that no
real token attends to). It is 1 except under sequence parallelism (the critic's
``critic.megatron.sequence_parallel``), which needs the TP size: it splits the packed tokens evenly
over the TP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gad.data import build_sequences
from megatron_gad.engine.packing import (
    GroupPart,
    balanced_partition,
    grouped_balanced_partition,
    last_token_indices,
    pack_rows,
    pack_sequences,
    response_logit_indices,
)


@dataclass(frozen=True)
class Batching:
    """How one pass groups rows: ``micro_batch_size`` rows each, or (``dynamic``) at most
    ``max_token_len`` tokens each."""

    micro_batch_size: int
    dynamic: bool = False
    max_token_len: int = 0
    align: int = 1


def row_lengths(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> list[int]:
    return (prompt_mask.sum(-1) + response_mask.sum(-1)).tolist()


def group_rows(lengths: list[int], b: Batching, min_count: int = 1) -> list[list[int]]:
    """Row indices of each micro-batch. ``min_count``: at least this many micro-batches (dynamic
    only; e.g. the most any data-parallel replica needs, so replicas run equal counts)."""
    n = len(lengths)
    if not b.dynamic:
        return [list(range(i, min(i + b.micro_batch_size, n))) for i in range(0, n, b.micro_batch_size)]
    return balanced_partition(lengths, b.max_token_len, min(max(1, min_count), n), b.align)


def actor_micro_batches(batch: dict, groups: list[list[int]], extra: tuple[str, ...] = (), align: int = 1,
                        pad_id: int = 0) -> list[dict]:
    """batch: prompt_ids/prompt_mask [B, P] (left-padded) + responses/response_mask [B, R] (+ extra
    [B, ...] keys). Each micro-batch: ``packed`` (its rows' prompt ++ response tokens), ``resp_index``
    [b, R] (packed position of the logits predicting each response token, -1 at padding), its rows of
    ``responses``/``response_mask``/extra keys, and ``rows`` (indices into the batch)."""
    ids, mask, _ = build_sequences(batch["prompt_ids"], batch["prompt_mask"], batch["responses"],
                                   batch["response_mask"])
    P = batch["prompt_ids"].shape[1]
    out = []
    for rows in groups:
        r = torch.tensor(rows, dtype=torch.long)
        packed = pack_rows(ids[r], mask[r], align=align, pad_id=pad_id)
        mb = {"packed": packed, "rows": r,
              "resp_index": response_logit_indices(packed, P, batch["response_mask"][r]),
              "responses": batch["responses"][r], "response_mask": batch["response_mask"][r]}
        mb.update({k: batch[k][r] for k in extra})
        out.append(mb)
    return out


def scoring_micro_batches(batch: dict, groups: list[list[int]], align: int = 1, pad_id: int = 0) -> list[dict]:
    """Rows to score (prompt ++ response); each micro-batch: ``packed``, ``last`` (packed position of
    each row's last token), ``resp_len`` (its response tokens: mean pooling), ``rows``."""
    ids, mask, _ = build_sequences(batch["prompt_ids"], batch["prompt_mask"], batch["responses"],
                                   batch["response_mask"])
    out = []
    for rows in groups:
        r = torch.tensor(rows, dtype=torch.long)
        packed = pack_rows(ids[r], mask[r], align=align, pad_id=pad_id)
        out.append({"packed": packed, "last": last_token_indices(packed), "rows": r,
                    "resp_len": batch["response_mask"][r].sum(-1)})
    return out


def restore_order(parts: list[torch.Tensor], groups: list[list[int]], num_rows: int) -> torch.Tensor:
    """Per-micro-batch results (rows in ``groups`` order) -> one tensor in the batch's row order."""
    rows = torch.tensor([i for g in groups for i in g], dtype=torch.long)
    cat = torch.cat(parts, 0)
    out = cat.new_zeros((num_rows, *cat.shape[1:]))
    out[rows] = cat
    return out


# ------------------------------------------------------------------------------------------ critic pairs
def pair_groups(batch: dict, n: int, b: Batching, min_count: int = 1) -> list[list[GroupPart]]:
    """Micro-batches of (teacher, n students) groups. Fixed: ``micro_batch_size`` whole groups each.
    Dynamic: token budget; a group larger than the budget is split into parts that each repeat the
    teacher sequence (the loss is normalised by the global pair count, so it is unchanged)."""
    B = batch["prompt_ids"].shape[0]
    if not b.dynamic:
        return [[GroupPart(g, tuple(range(n))) for g in range(i, min(i + b.micro_batch_size, B))]
                for i in range(0, B, b.micro_batch_size)]
    p = batch["prompt_mask"].sum(-1)
    t = (p + batch["teacher_response_mask"].sum(-1)).tolist()
    s = (p[:, None] + batch["response_mask"].sum(-1)).tolist()  # [B, n]
    groups = list(zip(t, s))
    fewest = grouped_balanced_partition(groups, b.max_token_len, 1, b.align)
    if len(fewest) >= min_count:
        return fewest
    units = sum(len(mb) for mb in fewest)  # group parts: the most micro-batches there can be
    return grouped_balanced_partition(groups, b.max_token_len, min(min_count, units), b.align)


def pair_micro_batch(batch: dict, parts: list[GroupPart], align: int = 1, pad_id: int = 0) -> dict:
    """One packed critic micro-batch: the parts' teacher sequences, then their student samples.
    ``teacher_of`` [pairs] says which teacher (position among this micro-batch's teachers) each
    student is paired with (the loss reads it, whole or split groups alike)."""
    def tokens(prompt_ids, prompt_mask, resp, resp_mask):
        return torch.cat([prompt_ids[prompt_mask.bool()], resp[resp_mask.bool()]])

    pi, pm = batch["prompt_ids"], batch["prompt_mask"]
    seqs, teacher_of, students, t_len, s_len = [], [], [], [], []
    for k, part in enumerate(parts):
        g = part.group
        seqs.append(tokens(pi[g], pm[g], batch["teacher_response"][g], batch["teacher_response_mask"][g]))
        t_len.append(int(batch["teacher_response_mask"][g].sum()))
        for j in part.students:
            students.append(tokens(pi[g], pm[g], batch["responses"][g, j], batch["response_mask"][g, j]))
            s_len.append(int(batch["response_mask"][g, j].sum()))
            teacher_of.append(k)
    packed = pack_sequences(seqs + students, align=align, pad_id=pad_id)
    return {"packed": packed, "last": last_token_indices(packed), "num_teachers": len(parts),
            "teacher_of": torch.tensor(teacher_of, dtype=torch.long),
            "resp_len": torch.tensor(t_len + s_len, dtype=torch.long)}


def apply_eos_policy(responses: torch.Tensor, mask: torch.Tensor, eos_id: int, policy: str, side: str) -> torch.Tensor:
    """The response mask the critic scores with (``critic.eos_policy``; valid tokens left-aligned,
    [..., R]): ``append`` keeps both sides as they are (the teacher's one EOS from the data pipeline,
    the student's sampled EOS), ``strip`` drops a final EOS on both sides, ``none`` drops the
    teacher's only. A truncated student (no EOS) is unchanged by every policy."""
    if policy not in ("append", "strip", "none"):
        raise ValueError(f"eos_policy must be append, strip or none, got {policy!r}")
    if side not in ("teacher", "student"):
        raise ValueError(f"side must be 'teacher' or 'student', got {side!r}")
    if policy == "append" or (policy == "none" and side == "student"):
        return mask
    last = mask.sum(-1, keepdim=True) - 1  # [..., 1]
    ends = (last >= 0) & (responses.gather(-1, last.clamp(min=0)) == eos_id)
    out = mask.clone()
    out.scatter_(-1, last.clamp(min=0), torch.where(ends, torch.zeros_like(last), out.gather(-1, last.clamp(min=0))))
    return out


def ends_with_eos(responses: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    last = mask.sum(-1, keepdim=True) - 1
    return ((last >= 0) & (responses.gather(-1, last.clamp(min=0)) == eos_id)).squeeze(-1)
