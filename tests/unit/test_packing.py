"""Pure packing helpers: THD pack/unpack round trips, cu_seqlens, token-budget partitions."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megatron_gad.engine import packing as pk


def _rows(prompt_lens, resp_lens, P=6, R=7, seed=0):
    """Left-padded prompts [B, P] ++ right-padded responses [B, R] (as data.build_sequences)."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    prompt = torch.zeros(B, P, dtype=torch.long)
    pmask = torch.zeros(B, P, dtype=torch.long)
    resp = torch.zeros(B, R, dtype=torch.long)
    rmask = torch.zeros(B, R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        prompt[b, P - p:] = torch.randint(3, 90, (p,), generator=g)
        pmask[b, P - p:] = 1
        resp[b, :r] = torch.randint(3, 90, (r,), generator=g)
        rmask[b, :r] = 1
    ids = torch.cat([prompt, resp], 1)
    mask = torch.cat([pmask, rmask], 1)
    return ids, mask, rmask


def test_pack_sequences_cu_seqlens_positions():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    p = pk.pack_sequences(seqs)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.max_seqlen == 3 and p.seq_lens == [3, 1, 2] and p.num_pad == 0 and p.total_tokens == 6
    assert pk.last_token_indices(p).tolist() == [2, 3, 5]
    psp = p.packed_seq_params()
    assert psp.qkv_format == "thd" and psp.max_seqlen_q == psp.max_seqlen_kv == 3
    assert torch.equal(psp.cu_seqlens_q, p.cu_seqlens) and torch.equal(psp.cu_seqlens_kv, p.cu_seqlens)


def test_pack_alignment_tail_segment():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    p = pk.pack_sequences(seqs, align=4, pad_id=0)
    assert p.total_tokens == 8 and p.num_pad == 3
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert p.cu_seqlens.tolist() == [0, 3, 5, 8]  # pad is its own segment
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert p.max_seqlen == 3 and p.seq_lens == [3, 2]
    assert pk.last_token_indices(p).tolist() == [2, 4]
    # already aligned: no pad segment; a single sequence never gets max_seqlen == T with padding
    assert pk.pack_sequences(seqs, align=5).cu_seqlens.tolist() == [0, 3, 5]
    one = pk.pack_sequences([torch.arange(3, 8)], align=4)
    assert one.cu_seqlens.tolist() == [0, 5, 8] and one.max_seqlen == 5 < one.total_tokens


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        pk.pack_sequences([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pk.pack_sequences([torch.tensor([1]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="1-D"):
        pk.pack_sequences([torch.ones(2, 2, dtype=torch.long)])
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="row 1: valid tokens are not contiguous"):
        pk.pack_rows(ids, torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="row 0 has no valid token"):
        pk.pack_rows(ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


@pytest.mark.parametrize("align", [1, 2, 8])
def test_pack_rows_round_trip(align):
    ids, mask, _ = _rows([2, 6, 1, 4], [7, 1, 3, 0])
    p = pk.pack_rows(ids, mask, align=align)
    assert p.seq_lens == mask.sum(1).tolist() and p.total_tokens % align == 0
    # packed tokens are exactly the valid tokens, row by row
    assert p.input_ids[0, : sum(p.seq_lens)].tolist() == ids[mask.bool()].tolist()
    idx = p.packed_index()
    assert ((idx >= 0) == mask.bool()).all()
    # values that encode their own packed position come back where the tokens were
    vals = torch.arange(p.total_tokens, dtype=torch.float32)[:, None].repeat(1, 3)
    back = pk.unpack_to_rows(vals[None], p, fill=-5.0)
    assert back.shape == (4, 13, 3)
    assert torch.equal(back[..., 0], torch.where(mask.bool(), idx.float(), torch.tensor(-5.0)))
    # token ids round trip
    assert torch.equal(pk.unpack_to_rows(p.input_ids, p, fill=0), ids * mask)
    # per-sequence split
    parts = pk.unpack_sequences(p.input_ids[0], p)
    assert [t.tolist() for t in parts] == [ids[b][mask[b].bool()].tolist() for b in range(4)]
    # positions restart per row and equal build_sequences' positions on valid tokens
    pos_rows = pk.unpack_to_rows(p.position_ids, p, fill=-1)
    ref_pos = (mask.cumsum(1) - 1).clamp(min=0)
    assert torch.equal(pos_rows[mask.bool()], ref_pos[mask.bool()])


def test_next_token_targets_and_response_indices():
    P, R = 6, 7
    ids, mask, rmask = _rows([2, 6, 1, 4], [7, 1, 3, 0], P=P, R=R)
    p = pk.pack_rows(ids, mask, align=8)
    targets, valid = pk.next_token_targets(p)
    T = p.total_tokens
    assert targets.shape == valid.shape == (T,)
    assert valid.sum().item() == sum(n - 1 for n in p.seq_lens)
    assert not valid[pk.last_token_indices(p)].any() and not valid[sum(p.seq_lens):].any()
    # a fake "log-prob" that is the target token id: response positions must read each response token
    lp = torch.where(valid, targets.float(), torch.tensor(-1.0))
    ridx = pk.response_logit_indices(p, P, rmask)
    assert ridx.shape == (4, R)
    got = pk.gather_rows(lp, ridx, T, fill=0.0)
    assert torch.equal(got, (ids[:, P:] * rmask).float())
    assert ((ridx >= 0) == rmask.bool()).all()
    # same thing through the padded layout: lp at padded position p predicts token p+1
    lp_rows = pk.unpack_to_rows(lp, p, fill=0.0)
    assert torch.equal(lp_rows[:, P - 1:-1] * rmask, got)
    with pytest.raises(ValueError, match="row width"):
        pk.response_logit_indices(p, P + 1, rmask)


def test_response_without_prompt_is_refused():
    ids = torch.tensor([[0, 0, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1]])
    p = pk.pack_rows(ids, mask)
    with pytest.raises(ValueError, match="empty prompt"):
        pk.response_logit_indices(p, 2, torch.tensor([[1, 1]]))


def test_packed_batch_to_keeps_fields():
    ids, mask, _ = _rows([2, 3], [1, 2])
    p = pk.pack_rows(ids, mask, align=4)
    q = p.to("cpu")
    assert isinstance(q, pk.PackedRows) and q.row_first == p.row_first and q.row_width == p.row_width
    assert q.seq_lens == p.seq_lens and q.num_pad == p.num_pad and torch.equal(q.cu_seqlens, p.cu_seqlens)


# ---------------------------------------------------------------- token-budget partitions
def _check_partition(parts, lengths, budget, align=1):
    flat = sorted(itertools.chain.from_iterable(parts))
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    for b in parts:
        assert b == sorted(b) and b
        assert -(-sum(lengths[i] for i in b) // align) * align <= budget


@pytest.mark.parametrize("seed", range(6))
def test_balanced_partition_invariants(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 30), rng.randint(100, 400)]) for _ in range(rng.randint(1, 40))]
    budget = max(lengths) + rng.randint(0, 300)
    parts = pk.balanced_partition(lengths, budget)
    _check_partition(parts, lengths, budget)
    lower = -(-sum(lengths) // budget)
    assert len(parts) >= lower
    assert parts == pk.balanced_partition(list(lengths), budget)  # deterministic
    assert [b[0] for b in parts] == sorted(b[0] for b in parts)
    for align in (4, 8):
        budget_a = -(-max(lengths) // align) * align + 16
        _check_partition(pk.balanced_partition(lengths, budget_a, align=align), lengths, budget_a, align)


def test_balanced_partition_balances_and_minimum():
    lengths = [100, 90, 10, 10, 80, 20, 50, 40]  # total 400
    parts = pk.balanced_partition(lengths, 200)
    assert len(parts) == 2
    loads = sorted(sum(lengths[i] for i in b) for b in parts)
    assert loads == [200, 200]
    parts4 = pk.balanced_partition(lengths, 1000, min_num_micro_batches=4)
    assert len(parts4) == 4
    loads4 = [sum(lengths[i] for i in b) for b in parts4]
    assert max(loads4) - min(loads4) <= 20
    # LPT on ceil(24/12) = 2 bins gives {6,4,4}=14 and {5,5}=10: over budget, so a third is used
    tricky = [6, 5, 5, 4, 4]
    parts3 = pk.balanced_partition(tricky, 12)
    _check_partition(parts3, tricky, 12)
    assert len(parts3) == 3
    assert pk.balanced_partition([], 10) == []


def test_balanced_partition_errors():
    with pytest.raises(ValueError, match=r"sequence 2 has 513 tokens, more than the micro-batch token budget "
                                         r"max_token_len=512"):
        pk.balanced_partition([10, 20, 513, 5], 512)
    assert len(pk.balanced_partition([10, 505], 512, align=8)) == 2  # 505 -> 512 fits alone
    with pytest.raises(ValueError, match=r"sequence 1 has 510 tokens, more than .* max_token_len=511 \(with align=8\)"):
        pk.balanced_partition([10, 510], 511, align=8)  # 510 pads to 512
    with pytest.raises(ValueError, match="min_num_micro_batches=3"):
        pk.balanced_partition([1, 2], 10, min_num_micro_batches=3)
    with pytest.raises(ValueError, match="max_token_len"):
        pk.balanced_partition([1], 0)


def _check_groups(mbs, groups, budget, align=1):
    seen: dict[int, list[int]] = {}
    for mb in mbs:
        total = 0
        for part in mb:
            teacher, students = groups[part.group]
            total += teacher + sum(students[j] for j in part.students)
            seen.setdefault(part.group, []).extend(part.students)
        assert -(-total // align) * align <= budget
    for g, (_, students) in enumerate(groups):
        assert sorted(seen[g]) == list(range(len(students)))  # every student exactly once, teacher in every part


def test_grouped_partition_keeps_groups_and_splits_large_ones():
    # LMOps-like: budget 12,288, n=8, up to 3,584-token sequences
    groups = [(3584, [3584] * 8), (500, [300, 2000, 40, 100, 700, 50, 20, 900]), (100, [10] * 8)]
    budget = 12288
    mbs = pk.grouped_balanced_partition(groups, budget)
    _check_groups(mbs, groups, budget)
    parts0 = [p for mb in mbs for p in mb if p.group == 0]
    # 3584 + 8*3584 cannot fit: parts of teacher + 2 students (3*3584 = 10752 <= 12288)
    assert len(parts0) == 4 and all(len(p.students) == 2 for p in parts0)
    # small groups stay whole
    for g in (1, 2):
        parts = [p for mb in mbs for p in mb if p.group == g]
        assert len(parts) == 1 and parts[0].students == tuple(range(8))
    assert mbs == pk.grouped_balanced_partition(groups, budget)  # deterministic
    seqs = pk.group_part_sequences(parts0[0], teacher_index=100, student_indices=list(range(200, 208)))
    assert seqs[0] == 100 and seqs[1:] == [200 + j for j in parts0[0].students]


@pytest.mark.parametrize("seed", range(5))
def test_grouped_partition_random(seed):
    rng = random.Random(seed)
    groups = [(rng.randint(5, 200), [rng.randint(1, 300) for _ in range(rng.randint(0, 6))])
              for _ in range(rng.randint(1, 12))]
    budget = max(t + max(s, default=0) for t, s in groups) + rng.randint(0, 400)
    _check_groups(pk.grouped_balanced_partition(groups, budget), groups, budget)
    _check_groups(pk.grouped_balanced_partition(groups, budget + 8, align=8), groups, budget + 8, align=8)


def test_grouped_partition_errors():
    msg = (r"group 1: teacher sequence \(300 tokens\) plus student sample 2 \(250 tokens\) = 550 tokens, "
           r"more than the micro-batch token budget max_token_len=512")
    with pytest.raises(ValueError, match=msg):
        pk.grouped_balanced_partition([(10, [5]), (300, [100, 200, 250])], 512)
    with pytest.raises(ValueError, match=r"group 0: teacher sequence has 600 tokens.*max_token_len=512"):
        pk.grouped_balanced_partition([(600, [])], 512)
    with pytest.raises(ValueError, match="empty sequence"):
        pk.grouped_balanced_partition([(6, [0])], 512)
