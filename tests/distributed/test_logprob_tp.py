import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_gad.kernels.logprob import vocab_parallel_logprob
from megatron_gad.parallel.launch import free_port

V_PADDED, V_REAL, T = 64, 57, 21  # rank 1's shard ends in 7 padding columns


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)  # same full problem on every rank
        logits = torch.randn(3, T // 3, V_PADDED, generator=g) * 3
        target = torch.randint(0, V_REAL, (3, T // 3), generator=g)
        w_lp, w_ent = torch.randn(target.shape, generator=g), torch.randn(target.shape, generator=g)

        # TP=1 reference (our own kernel, already checked against naive in unit tests)
        full = logits.clone().requires_grad_()
        lp1, ent1 = vocab_parallel_logprob(full, target, vocab_size=V_REAL, chunk_size=4, compute_entropy=True)
        ((lp1 * w_lp).sum() + (ent1 * w_ent).sum()).backward()

        v_local = V_PADDED // world
        start = rank * v_local
        shard = logits[..., start : start + v_local].clone().requires_grad_()
        lp, ent = vocab_parallel_logprob(
            shard, target, tp_group=dist.group.WORLD, vocab_start=start, vocab_size=V_REAL,
            chunk_size=4, compute_entropy=True,
        )
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        torch.testing.assert_close(lp, lp1, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ent, ent1, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(shard.grad, full.grad[..., start : start + v_local], atol=1e-6, rtol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_logprob_tp2_matches_tp1():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
