"""The planner's weight / gradient / optimizer bytes equal what real ModelShards hold after one
optimizer step, rank by rank, for several layouts, both roles, fp32 and bf16, with and without the
distributed optimizer. The measurement walks the tensors itself (parameter storages, DDP's
``main_grad`` buffers, the inner torch optimizer's state and its non-model parameters, i.e. fp32
master copies) rather than trusting ``ModelShard.held_bytes``, which is checked against it too."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

# (tp, pp) on 4 ranks -> DP 2, 2, 4, 1
LAYOUTS = [(2, 1), (1, 2), (1, 1), (2, 2)]
# (role, dtype, distributed optimizer): each layout runs all four
CASES = [("actor", "float32", False), ("actor", "bfloat16", True), ("critic", "bfloat16", False),
         ("critic", "float32", True)]


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


def _measure(shard) -> dict:
    params = list(shard.module.parameters())
    weights = _storages(params)
    grads = _storages([p.main_grad for p in params])
    optimizer = 0
    for opt in getattr(shard.optimizer, "chained_optimizers", [shard.optimizer]):
        inner = opt.optimizer
        stepped = [p for g in inner.param_groups for p in g["params"]]
        # a stepped tensor that is not (a view of) model storage is a master copy the optimizer owns
        optimizer += sum(s for ptr, s in _storages(stepped).items() if ptr not in weights)
        for state in inner.state.values():
            optimizer += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": optimizer}


def _loss(shard):
    def fn(output, mb):
        if shard.role == "critic":  # the head is applied by the loss (ValueHead passes hidden states)
            head = shard.module.output_layer
            output = output.float() @ head.weight.float().t() + head.bias.float()
        loss = output.float().logsumexp(-1).mean() if shard.role == "actor" else output.mean()
        return loss, {"loss": loss.detach()}
    return fn


def _run(rank, world, paths):
    from megatron_gad.engine.model_shard import ModelShard

    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    mb = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    out = []
    for tp, pp in LAYOUTS:
        for role, dtype, dist_opt in CASES:
            shard = ModelShard(role, paths[role], tp, pp, params_dtype=dtype, vocab_divisible_by=8,
                               use_distributed_optimizer=dist_opt)
            shard.train_step(mb, _loss(shard))
            lay = shard.layout
            out.append(dict(tp=tp, pp=pp, role=role, dtype=dtype, dist_opt=dist_opt, pp_rank=lay.pp_rank,
                            dp=lay.dp_size, dp_rank=lay.dp_rank, measured=_measure(shard), held=shard.held_bytes()))
    return out


def test_planner_bytes_equal_measured(tmp_path):
    from megatron_gad.config import padded_vocab_size
    from megatron_gad.models.arch import load_arch
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.planner import rank_state_bytes, stage_params
    from megatron_gad.tools.tiny_models import make_hf_model

    # qwen2: tied embeddings (the actor's PP>1 shared copy) and QKV bias; the critic from qwen3 (GQA and no
    # bias as llama, plus the per-head q/k norms)
    paths = {"actor": make_hf_model(str(tmp_path / "q"), "qwen2", seed=1),
             "critic": make_hf_model(str(tmp_path / "l"), "qwen3", seed=2)}
    rows = [r for rank in run_local(_run, 4, paths) for r in rank]
    assert len(rows) == 4 * len(LAYOUTS) * len(CASES)
    for r in rows:
        arch = load_arch(paths[r["role"]])
        params = stage_params(arch, r["role"], r["tp"], r["pp"], r["pp_rank"], padded_vocab_size(arch.vocab_size, 8))
        plan = rank_state_bytes(params, r["dtype"], r["dp"], r["dp_rank"], r["dist_opt"]).as_dict()
        assert r["measured"] == plan, r
        assert r["held"] == plan, r
    # the distributed optimizer shards Adam state: at DP 4 each rank holds about a quarter
    dp4 = [r for r in rows if r["dp"] == 4 and r["dist_opt"]]
    assert dp4 and all(r["measured"]["optimizer"] < 0.3 * _full_opt(r, paths) for r in dp4)


def _full_opt(r, paths) -> int:
    from megatron_gad.config import padded_vocab_size
    from megatron_gad.models.arch import load_arch
    from megatron_gad.planner import rank_state_bytes, stage_params

    arch = load_arch(paths[r["role"]])
    params = stage_params(arch, r["role"], r["tp"], r["pp"], r["pp_rank"], padded_vocab_size(arch.vocab_size, 8))
    return rank_state_bytes(params, r["dtype"], 1, 0, False).optimizer
