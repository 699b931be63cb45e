"""Sequence packing (THD) and token-budget micro-batching — pure torch / Python helpers.

A packed micro-batch is one row ``input_ids [1, T]`` holding several sequences back to back, plus
``cu_seqlens`` (int32, ``[0, l0, l0+l1, ...]``) that Megatron-Core passes as ``PackedSeqParams``
(``qkv_format="thd"``) to attention and RoPE. Nothing pads a sequence: attention is causal *within*
each sequence (``models/packed_attention.py`` on CPU, Transformer Engine on GPU) and RoPE positions
restart at 0 at every ``cu_seqlens`` boundary (Megatron ignores ``position_ids`` for RoPE; we still
provide per-sequence positions for anything that reads them).

Alignment padding
-----------------
``pack_sequences(..., align=k)`` rounds ``T`` up to a multiple of ``k``. Sequence parallelism
scatters the ``[T, 1, H]`` activations along ``T`` over the TP ranks, so with SP ``T`` must divide by
the TP size (use ``align=tp``; TE's THD kernels with context parallelism need more, e.g. ``2*cp``
per sequence, which we do not use). The pad tokens form **their own tail segment** in
``cu_seqlens`` rather than being appended to the last sequence: both leave the real tokens'
results unchanged under causal attention (no real token sees a later pad), but a separate segment
also keeps every real sequence's attention problem — its length in ``cu_seqlens`` and hence the
kernel's tiling — identical whatever the alignment, and keeps ``cu_seqlens`` equal to the real
lengths (no extra bookkeeping for losses). The tail segment is only added when padding is needed.

Mind Megatron's RoPE for THD (``rope_utils._apply_rotary_pos_emb_thd``): when the frequency table
length ``max(max_seqlen_q, max_seqlen_kv)`` equals ``cu_seqlens[-1]`` it switches to "offset" mode
(positions do **not** restart per sequence). That only coincides with restarting positions when a
single segment spans the row, so ``max_seqlen`` must be the exact longest segment and no segment may
be empty — both enforced here.

Token-budget partitioning
-------------------------
:func:`balanced_partition` splits sequences into as few micro-batches as the budget allows (at least
``min_num_micro_batches``), balanced by token count (longest-processing-time greedy); it raises for a
sequence that alone exceeds the budget. :func:`grouped_balanced_partition` does the same for
discriminator groups (one teacher sequence + its n student samples), splitting an oversized group
into parts that each repeat the teacher sequence. Both are deterministic and return index lists.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass
class PackedBatch:
    """One packed row. ``seq_lens`` are the real sequences; ``num_pad`` alignment tokens (a separate
    tail segment of ``cu_seqlens``) follow them."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, 0.. per segment
    cu_seqlens: torch.Tensor  # [num_segments + 1] int32 (real sequences, then the pad segment if any)
    max_seqlen: int  # longest segment (pad segment included)
    seq_lens: list[int] = field(default_factory=list)
    num_pad: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def total_tokens(self) -> int:
        """T: real tokens plus alignment padding."""
        return int(self.input_ids.shape[-1])

    @property
    def seq_starts(self) -> torch.Tensor:
        """[num_seqs] long: packed index of each real sequence's first token."""
        return self.cu_seqlens[: self.num_seqs].long()

    def packed_seq_params(self):
        """Megatron's ``PackedSeqParams`` (THD) for this row; move the batch first (``.to``)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, list(self.seq_lens), self.num_pad)


def pack_sequences(seqs: Sequence[torch.Tensor], align: int = 1, pad_id: int = 0) -> PackedBatch:
    """Concatenate 1-D token tensors into one ``[1, T]`` row with ``cu_seqlens`` and per-sequence
    positions; ``T`` is padded up to a multiple of ``align`` with a tail segment of ``pad_id``."""
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    lens = []
    for i, s in enumerate(seqs):
        if s.dim() != 1:
            raise ValueError(f"sequence {i} must be 1-D, got shape {tuple(s.shape)}")
        if s.numel() == 0:
            raise ValueError(f"sequence {i} is empty (an empty segment would break THD RoPE positions)")
        lens.append(int(s.numel()))
    total = sum(lens)
    num_pad = _round_up(total, align) - total
    parts = [s.to(torch.long) for s in seqs]
    seg_lens = list(lens)
    if num_pad:
        parts.append(torch.full((num_pad,), pad_id, dtype=torch.long, device=parts[0].device))
        seg_lens.append(num_pad)
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seg_lens, dtype=torch.int32).cumsum(0)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in seg_lens]).to(parts[0].device)
    return PackedBatch(input_ids=torch.cat(parts)[None], position_ids=positions[None],
                       cu_seqlens=cu.to(parts[0].device), max_seqlen=max(seg_lens), seq_lens=lens, num_pad=num_pad)


def _valid_span(mask_row: torch.Tensor, row: int) -> tuple[int, int]:
    idx = torch.nonzero(mask_row, as_tuple=False).flatten()
    if idx.numel() == 0:
        raise ValueError(f"row {row} has no valid token")
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 != idx.numel():
        raise ValueError(f"row {row}: valid tokens are not contiguous (a hole inside the sequence); "
                         "expected left-padded prompt ++ right-padded response")
    return first, last + 1


def rows_to_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Valid tokens of each ``[B, S]`` row (one contiguous run of ones, e.g. left-padded prompt ++
    right-padded response from ``data.build_sequences``) and each row's first valid column."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [B, S]")
    seqs, firsts = [], []
    mask = attention_mask.bool()
    for b in range(input_ids.shape[0]):
        first, end = _valid_span(mask[b], b)
        seqs.append(input_ids[b, first:end])
        firsts.append(first)
    return seqs, firsts


@dataclass
class PackedRows(PackedBatch):
    """A packed batch built from padded rows: remembers where each row's tokens came from."""

    row_first: list[int] = field(default_factory=list)  # first valid column of each row in [B, S]
    row_width: int = 0  # S

    def to(self, device) -> PackedRows:
        base = PackedBatch.to(self, device)
        return PackedRows(**{**base.__dict__, "row_first": list(self.row_first), "row_width": self.row_width})

    def packed_index(self) -> torch.Tensor:
        """[B, S] long: the packed position of each padded-row token, -1 where the row is padding."""
        B, S = self.num_seqs, self.row_width
        cols = torch.arange(S, device=self.cu_seqlens.device)[None].expand(B, S)
        first = torch.tensor(self.row_first, device=cols.device)[:, None]
        lens = torch.tensor(self.seq_lens, device=cols.device)[:, None]
        rel = cols - first
        idx = self.seq_starts.to(cols.device)[:, None] + rel
        return torch.where((rel >= 0) & (rel < lens), idx, torch.full_like(idx, -1))


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, align: int = 1, pad_id: int = 0) -> PackedRows:
    """Pack padded ``[B, S]`` rows (any padding side, one contiguous valid run per row)."""
    seqs, firsts = rows_to_sequences(input_ids, attention_mask)
    p = pack_sequences(seqs, align=align, pad_id=pad_id)
    return PackedRows(**p.__dict__, row_first=firsts, row_width=int(input_ids.shape[1]))


# ----------------------------------------------------------------------------------------------
# Unpacking
# ----------------------------------------------------------------------------------------------


def _flat(values: torch.Tensor, total: int) -> torch.Tensor:
    """Accept [T, ...] or [1, T, ...] (GPTModel's batch-first output)."""
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == total:
        values = values[0]
    if values.shape[0] != total:
        raise ValueError(f"packed values have {values.shape[0]} positions, the packed batch {total}")
    return values


def unpack_sequences(values: torch.Tensor, packed: PackedBatch) -> list[torch.Tensor]:
    """Per-token packed values ``[T, ...]`` (or ``[1, T, ...]``) -> one tensor per real sequence."""
    values = _flat(values, packed.total_tokens)
    return list(torch.split(values[: sum(packed.seq_lens)], packed.seq_lens))


def unpack_to_rows(values: torch.Tensor, packed: PackedRows, fill: float = 0.0) -> torch.Tensor:
    """Per-token packed values back to the padded ``[B, S, ...]`` layout (``fill`` at padding)."""
    values = _flat(values, packed.total_tokens)
    idx = packed.packed_index()
    out = values[idx.clamp(min=0)]
    keep = (idx >= 0).reshape(*idx.shape, *([1] * (values.dim() - 1)))
    return torch.where(keep, out, torch.as_tensor(fill, dtype=values.dtype, device=values.device))


def next_token_targets(packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [T], valid [T]): the token each packed position predicts (the next token of its own
    sequence) and whether there is one — False at each sequence's last token and over padding."""
    ids = packed.input_ids[0]
    T = ids.shape[0]
    targets = torch.zeros_like(ids)
    targets[:-1] = ids[1:]
    valid = torch.zeros(T, dtype=torch.bool, device=ids.device)
    valid[: sum(packed.seq_lens)] = True
    valid[last_token_indices(packed)] = False
    return targets.masked_fill(~valid, 0), valid


def last_token_indices(packed: PackedBatch) -> torch.Tensor:
    """[num_seqs] long: packed index of each real sequence's last token (discriminator scoring)."""
    return packed.cu_seqlens[1 : packed.num_seqs + 1].long() - 1


def response_logit_indices(packed: PackedRows, prompt_width: int, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, R] long: packed index of the logits that predict each response token (rows laid out as
    ``[B, P]`` left-padded prompt ++ ``[B, R]`` right-padded response), -1 where the response is
    padding. Response token r of row b is predicted by the token just before it: packed
    ``index(b, P + r) - 1``, which lies in the same sequence because every prompt has a token."""
    idx = packed.packed_index()
    R = response_mask.shape[1]
    if prompt_width + R != packed.row_width:
        raise ValueError(f"prompt width {prompt_width} + response width {R} != row width {packed.row_width}")
    resp = idx[:, prompt_width:]
    ok = response_mask.bool().to(resp.device) & (resp >= 0)
    if (ok & (resp == packed.seq_starts.to(resp.device)[:, None])).any():
        raise ValueError("a response token is the first token of its sequence (empty prompt): nothing predicts it")
    return torch.where(ok, resp - 1, torch.full_like(resp, -1))


def gather_rows(values: torch.Tensor, index: torch.Tensor, total: int, fill: float = 0.0) -> torch.Tensor:
    """``values[index]`` for an index tensor with -1 holes (filled with ``fill``); ``values`` is
    ``[T, ...]`` or ``[1, T, ...]``."""
    values = _flat(values, total)
    out = values[index.clamp(min=0)]
    keep = (index >= 0).reshape(*index.shape, *([1] * (values.dim() - 1)))
    return torch.where(keep, out, torch.as_tensor(fill, dtype=values.dtype, device=values.device))


# ----------------------------------------------------------------------------------------------
# Token-budget micro-batches
# ----------------------------------------------------------------------------------------------


def _lpt(costs: Sequence[int], k: int) -> list[list[int]]:
    """Longest-processing-time greedy: items by decreasing cost (ties: lower index first) onto the
    lightest bin (ties: lower bin)."""
    bins: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, b) for b in range(k)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return bins


def _partition(costs: Sequence[int], max_token_len: int, min_bins: int, align: int) -> list[list[int]]:
    n = len(costs)
    k = max(min_bins, -(-sum(costs) // max_token_len), 1)
    while True:
        bins = _lpt(costs, k)
        if all(_round_up(sum(costs[i] for i in b), align) <= max_token_len for b in bins):
            break
        k += 1  # k == n always fits: every single item was checked against the budget
        assert k <= n
    bins = [sorted(b) for b in bins]
    return sorted(bins, key=lambda b: b[0])


def balanced_partition(lengths: Sequence[int], max_token_len: int, min_num_micro_batches: int = 1,
                       align: int = 1) -> list[list[int]]:
    """Split sequence indices into micro-batches of at most ``max_token_len`` tokens (each batch's
    total rounded up to ``align``, as :func:`pack_sequences` pads it), as few as the budget allows
    but at least ``min_num_micro_batches`` (e.g. equal counts across data-parallel ranks), balanced
    by token count. Indices inside a micro-batch ascend; micro-batches are ordered by first index."""
    lengths = [int(n) for n in lengths]
    if max_token_len < 1:
        raise ValueError(f"max_token_len must be >= 1, got {max_token_len}")
    if not lengths:
        return []
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"sequence {i} has {n} tokens")
        if _round_up(n, align) > max_token_len:
            raise ValueError(f"sequence {i} has {n} tokens, more than the micro-batch token budget "
                             f"max_token_len={max_token_len}" + (f" (with align={align})" if align > 1 else ""))
    if min_num_micro_batches > len(lengths):
        raise ValueError(f"min_num_micro_batches={min_num_micro_batches} is more than the {len(lengths)} sequences")
    return _partition(lengths, max_token_len, min_num_micro_batches, align)


@dataclass(frozen=True)
class GroupPart:
    """Part of a discriminator group in a micro-batch: the group's teacher sequence (always present,
    repeated in every part of a split group) and the listed student samples (indices within the group)."""

    group: int
    students: tuple[int, ...]


def _split_group(g: int, teacher: int, students: Sequence[int], max_token_len: int, align: int) -> list[GroupPart]:
    if not students:
        return [GroupPart(g, ())]
    total = teacher + sum(students)
    if _round_up(total, align) <= max_token_len:
        return [GroupPart(g, tuple(range(len(students))))]
    room = max_token_len - teacher
    k = -(-sum(students) // room)
    while True:
        parts = _lpt(students, k)
        if all(_round_up(teacher + sum(students[i] for i in p), align) <= max_token_len for p in parts):
            break
        k += 1
        assert k <= len(students)
    return [GroupPart(g, tuple(sorted(p))) for p in sorted(parts, key=lambda p: min(p))]


def grouped_balanced_partition(groups: Sequence[tuple[int, Sequence[int]]], max_token_len: int,
                               min_num_micro_batches: int = 1, align: int = 1) -> list[list[GroupPart]]:
    """Micro-batches of discriminator groups ``(teacher_len, [student_len, ...])`` within the token
    budget, balanced by tokens. A group is kept whole when it fits; a larger group is split into
    parts (as few as fit), each carrying the teacher sequence again, so teacher–student pairs stay
    in one micro-batch (the pairwise loss is unchanged when normalised by the global pair count).
    A teacher plus one student over the budget is an error naming both numbers."""
    if max_token_len < 1:
        raise ValueError(f"max_token_len must be >= 1, got {max_token_len}")
    units: list[GroupPart] = []
    costs: list[int] = []
    for g, (teacher, students) in enumerate(groups):
        teacher, students = int(teacher), [int(s) for s in students]
        if teacher < 1 or any(s < 1 for s in students):
            raise ValueError(f"group {g} has an empty sequence (lengths {teacher}, {students})")
        if _round_up(teacher, align) > max_token_len:
            raise ValueError(f"group {g}: teacher sequence has {teacher} tokens, more than the micro-batch token "
                             f"budget max_token_len={max_token_len}")
        for j, s in enumerate(students):
            if _round_up(teacher + s, align) > max_token_len:
                raise ValueError(f"group {g}: teacher sequence ({teacher} tokens) plus student sample {j} ({s} tokens) "
                                 f"= {teacher + s} tokens, more than the micro-batch token budget "
                                 f"max_token_len={max_token_len}")
        for part in _split_group(g, teacher, students, max_token_len, align):
            units.append(part)
            costs.append(teacher + sum(students[j] for j in part.students))
    if not units:
        return []
    if min_num_micro_batches > len(units):
        raise ValueError(f"min_num_micro_batches={min_num_micro_batches} is more than the {len(units)} group parts")
    bins = _partition(costs, max_token_len, min_num_micro_batches, align)
    return [[units[i] for i in b] for b in bins]


def group_part_sequences(part: GroupPart, teacher_index: int, student_indices: Sequence[int]) -> list[int]:
    """Flat sequence indices of one part: the teacher's, then its students' (``student_indices[j]``
    is the global index of student j of this group)."""
    return [teacher_index] + [student_indices[j] for j in part.students]
