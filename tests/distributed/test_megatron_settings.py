"""Per-role Megatron settings change memory, not results: the critic worker's gradients with
sequence parallelism (TP 2) or activation recompute equal those without; the distributed optimizer
at DP 2 gives the weights and losses of the plain optimizer, holds about half the optimizer bytes (the
planner's count exactly), and its checkpoint resumes bit-identically."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.test_packed_passes import _rows

pytestmark = pytest.mark.distributed

FULL_UNIFORM = "{recompute_granularity: full, recompute_method: uniform, recompute_num_layers: 1}"
FULL_BLOCK = "{recompute_granularity: full, recompute_method: block, recompute_num_layers: 2}"
TP2_SETTINGS = {
    "base": [],
    "sequence_parallel": ["critic.megatron.sequence_parallel=true"],
    "recompute_full_uniform": [f"critic.megatron.override_transformer_config={FULL_UNIFORM}"],
    "recompute_full_block": [f"critic.megatron.override_transformer_config={FULL_BLOCK}"],
    "recompute_selective": ["critic.megatron.override_transformer_config={recompute_granularity: selective}"],
}


def _cfg(path, tp, *extra):
    from megatron_gad.config import load_config

    return load_config(None, [f"actor_rollout_ref.model.path={path}",
                              "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
                              f"critic.megatron.tensor_model_parallel_size={tp}", "critic.fused_loss=torch",
                              "critic.ppo_micro_batch_size_per_gpu=2", "critic.forward_micro_batch_size_per_gpu=3",
                              *extra])


def _critic(cfg):
    from megatron_gad.workers.critic import CriticWorker

    w = CriticWorker(cfg.critic, model_path=cfg.actor_rollout_ref.model.path, vocab_divisible_by=8, total_steps=4,
                     eos_id=2)
    if w.layout.is_last_stage:  # a non-zero head, so the backbone's gradient is not zero
        w.shard.module.output_layer.weight.data.copy_(torch.linspace(-0.5, 0.5, 32)[None])
    return w


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def _run(rank, world, path, rows, pairs, ckpt_dir):
    from megatron_gad.errors import InputError

    os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = "1"
    out = {"tp2": {}, "dp2": {}}
    # TP 2 (DP 1): one update with lr 0 leaves the gradient in DDP's buffer; scores too
    for name, extra in TP2_SETTINGS.items():
        w = _critic(_cfg(path, 2, "critic.optim.lr=0.0", *extra))
        metrics = w.update_critic(pairs, 2)
        scores = w.compute_scores(rows)
        out["tp2"][name] = (_flat(p.main_grad for p in w.shard.module.parameters()),
                            scores["scores"] if scores else None, metrics)
    # TP 1, DP 2: two real updates (each replica its share of the prompts), plain vs distributed optimizer
    share = torch.tensor_split(torch.arange(pairs["prompt_ids"].shape[0]), world)[rank]
    mine = {k: v[share] for k, v in pairs.items()}
    opts = ["critic.optim.lr=0.01", "critic.optim.clip_grad=1.0"]
    for name, extra in (("plain", []), ("distributed", ["critic.megatron.use_distributed_optimizer=true"])):
        w = _critic(_cfg(path, 1, *opts, *extra))
        losses = [w.update_critic(mine, 2) for _ in range(2)]
        lay = w.shard.layout
        out["dp2"][name] = dict(weights=_flat(w.shard.module.parameters()), losses=losses,
                                named={n: p.detach().clone() for n, p in w.shard.module.named_parameters()},
                                held=w.shard.held_bytes(), dp=lay.dp_size, dp_rank=lay.dp_rank)
        if name == "distributed":  # resume: save, load into a fresh shard, one more step on both
            w.shard.save(ckpt_dir)
            again = _critic(_cfg(path, 1, *opts, *extra))
            again.shard.load(ckpt_dir, with_optimizer=True)
            out["resume"] = [(x.update_critic(mine, 2), _flat(x.shard.module.parameters())) for x in (w, again)]
            plain = _critic(_cfg(path, 1, *opts))  # the other optimizer cannot read this state: refused
            try:
                plain.shard.load(ckpt_dir, with_optimizer=True)
                out["refused"] = None
            except InputError as e:
                out["refused"] = str(e)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("settings")
    path = make_hf_model(str(tmp / "qwen2"), "qwen2", seed=3)
    rows, pairs = _rows()
    return path, run_local(_run, 2, path, rows, pairs, str(tmp / "ckpt"))


@pytest.mark.parametrize("name", [n for n in TP2_SETTINGS if n != "base"])
def test_sequence_parallel_and_recompute_keep_gradients_and_scores(results, name):
    _, ranks = results
    for rank in ranks:
        g_ref, s_ref, m_ref = rank["tp2"]["base"]
        g, s, m = rank["tp2"][name]
        assert g_ref.abs().max() > 0
        assert float((g - g_ref).abs().max() / g_ref.abs().max()) < 1e-6, name
        if m_ref is not None:  # the collector rank (TP rank 0 of the last stage) returns results
            assert abs(m["critic/d_loss"] - m_ref["critic/d_loss"]) < 1e-6
            assert (s - s_ref).abs().max() < 1e-6


SHIFT_INVARIANT = ("output_layer.bias", "self_attention.linear_qkv.bias")


def test_distributed_optimizer_equals_plain_and_holds_planned_bytes(results):
    from megatron_gad.config import padded_vocab_size
    from megatron_gad.models.arch import load_arch
    from megatron_gad.planner import rank_state_bytes, stage_params

    path, ranks = results
    arch = load_arch(path)
    params = stage_params(arch, "critic", 1, 1, 0, padded_vocab_size(arch.vocab_size, 8))
    for rank in ranks:
        plain, dist = rank["dp2"]["plain"], rank["dp2"]["distributed"]
        for name, p in plain["named"].items():
            diff = float((p.double() - dist["named"][name].double()).abs().max())
            if name.endswith(SHIFT_INVARIANT):
                # no gradient in exact arithmetic (BT ignores a shift of every score; softmax ignores a shift
                # of a query's keys): its gradient is summation-order noise, which Adam scales up to
                # lr-sized steps, so the two optimizers' sums leave it anywhere within lr x steps
                assert diff <= 2 * 0.01, name
            else:
                assert diff < 1e-6, name
        for a, b in zip(plain["losses"], dist["losses"]):
            assert abs(a["critic/d_loss"] - b["critic/d_loss"]) < 1e-6
        assert dist["held"] == rank_state_bytes(params, "float32", 2, dist["dp_rank"], True).as_dict()
        assert dist["held"]["optimizer"] < 0.55 * plain["held"]["optimizer"]
    # the replicas agree (the distributed optimizer all-gathers the updated shards)
    assert torch.equal(ranks[0]["dp2"]["distributed"]["weights"], ranks[1]["dp2"]["distributed"]["weights"])


def test_distributed_optimizer_checkpoint_resumes_exactly(results):
    _, ranks = results
    for rank in ranks:
        (m_a, w_a), (m_b, w_b) = rank["resume"]
        assert m_a["critic/d_loss"] == m_b["critic/d_loss"]
        assert torch.equal(w_a, w_b)


def test_checkpoint_of_the_other_optimizer_is_refused_clearly(results):
    _, ranks = results
    for rank in ranks:
        assert "use_distributed_optimizer=true" in rank["refused"] and "resume with" in rank["refused"]


DIST_OPTS = ["critic.optim.lr=0.01", "critic.optim.clip_grad=1.0", "critic.megatron.use_distributed_optimizer=true"]


def _save_dp2(rank, world, path, pairs, ckpt_dir):
    os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = "1"
    w = _critic(_cfg(path, 1, *DIST_OPTS))
    w.update_critic(pairs, 2)  # every replica the whole batch: DP 1 then sees the same gradient
    w.shard.save(ckpt_dir)
    m = w.update_critic(pairs, 2)
    return m and m["critic/d_loss"], _flat(w.shard.module.parameters())


def _resume_dp1(rank, world, path, pairs, ckpt_dir):
    os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = "1"
    w = _critic(_cfg(path, 1, *DIST_OPTS))
    w.shard.load(ckpt_dir, with_optimizer=True)
    return w.update_critic(pairs, 2)["critic/d_loss"], _flat(w.shard.module.parameters())


def test_distributed_optimizer_checkpoint_reshards_over_dp(results, tmp_path):
    """Saved at DP 2, resumed at DP 1 (Megatron's dp_reshardable format): the next step matches."""
    from megatron_gad.parallel.launch import run_local

    path, _ = results
    _, pairs = _rows()
    (loss2, w2), _ = run_local(_save_dp2, 2, path, pairs, str(tmp_path / "ckpt"))
    [(loss1, w1)] = run_local(_resume_dp1, 1, path, pairs, str(tmp_path / "ckpt"))
    assert loss1 == loss2
    assert (w1 - w2).abs().max() < 1e-6
