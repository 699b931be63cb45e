"""Packed (THD) model passes through the workers, against independent references.

* Per-token log-probs (actor) and critic scores equal `transformers` run on each sequence alone
  (unpadded) to 1e-5, at TP x PP 1x1, 2x1, 1x2, 2x2, Llama and Qwen2, on rows whose lengths differ
  by more than 10x — with and without ``MEGATRON_GAD_EMULATE_TE_MASKING=1`` (the attention then
  sees only what Transformer Engine's kernels see: causal within each packed sequence, no mask).
* Batch-composition invariance: a row's results do not depend on what is packed beside it.
* One update's gradient is the same (relative 1e-6) for micro-batches of 1, 2, all rows and a token
  budget, and for DP 1 vs 2 — global token-mean for the actor, global pair-mean for the critic,
  including critic groups split across micro-batches.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.distributed

MODES = ("0", "1")  # MEGATRON_GAD_EMULATE_TE_MASKING


def _rows(n_groups: int = 3, n: int = 2, seed: int = 0):
    """Prompts of 2..24 tokens and responses of 1..30 (left-padded prompts, right-padded responses)."""
    from megatron_gad.data import pad_sequences

    g = torch.Generator().manual_seed(seed)
    p_lens = [2, 24, 7][:n_groups]
    t_lens = [30, 3, 12][:n_groups]
    s_lens = [[1, 28], [17, 2], [9, 30]][:n_groups]
    prompts = [torch.randint(3, 96, (k,), generator=g).tolist() for k in p_lens]
    teachers = [torch.randint(3, 96, (k,), generator=g).tolist() for k in t_lens]
    students = [[torch.randint(3, 96, (k,), generator=g).tolist() for k in row[:n]] for row in s_lens]
    pi, pm = pad_sequences(prompts, 0, left=True)
    tr, tm = pad_sequences(teachers, 0, left=False)
    flat = [s for row in students for s in row]
    sr, sm = pad_sequences(flat, 0, left=False)
    pairs = {"prompt_ids": pi, "prompt_mask": pm, "teacher_response": tr, "teacher_response_mask": tm,
             "responses": sr.view(n_groups, n, -1), "response_mask": sm.view(n_groups, n, -1)}
    rows = {"prompt_ids": pi.repeat_interleave(n, 0), "prompt_mask": pm.repeat_interleave(n, 0),
            "responses": sr, "response_mask": sm}
    return rows, pairs


T = 0.7  # rollout temperature: the actor's log-probs are those of softmax(logits / T)


def _cfg(path, tp, pp, *extra):
    from megatron_gad.config import load_config

    return load_config(None, [f"actor_rollout_ref.model.path={path}",
                              "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
                              f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
                              f"actor_rollout_ref.actor.megatron.pipeline_model_parallel_size={pp}",
                              f"critic.megatron.tensor_model_parallel_size={tp}",
                              f"critic.megatron.pipeline_model_parallel_size={pp}",
                              "actor_rollout_ref.actor.optim.lr=0.0", "actor_rollout_ref.actor.optim.clip_grad=0.0",
                              "critic.optim.lr=0.0", "critic.optim.clip_grad=0.0", "critic.fused_loss=torch",
                              "actor_rollout_ref.actor.logprob_chunk_size=7",
                              f"actor_rollout_ref.rollout.temperature={T}", *extra])


def _actor(cfg):
    from megatron_gad.workers.actor import ActorWorker

    return ActorWorker(cfg.actor_rollout_ref, max_response_length=32, total_steps=1, eos_id=2, pad_id=0)


def _critic(cfg, head: torch.Tensor):
    from megatron_gad.workers.critic import CriticWorker

    w = CriticWorker(cfg.critic, model_path=cfg.actor_rollout_ref.model.path, vocab_divisible_by=8, total_steps=1,
                     eos_id=2)
    if w.layout.is_last_stage:  # a fixed head (it starts at zero): scores then test the backbone
        w.shard.module.output_layer.weight.data.copy_(head[None])
    return w


# ------------------------------------------------------------------------------------------ equality
def _passes(rank, world, paths, tp, pp, rows, head):
    out = {}
    for fam, path in paths.items():
        cfg = _cfg(path, tp, pp, "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
                   "critic.forward_micro_batch_size_per_gpu=5")
        actor, critic = _actor(cfg), _critic(cfg, head)
        for mode in MODES:
            os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = mode
            lp = actor.compute_log_prob(rows)
            sc = critic.compute_scores(rows)
            # batch composition: row 0 alone, and the rows in reverse order
            alone = actor.compute_log_prob({k: v[:1] for k, v in rows.items()})
            rev = critic.compute_scores({k: v.flip(0) for k, v in rows.items()})
            if lp is not None:
                out[(fam, mode)] = (lp["log_prob"], sc["scores"], alone["log_prob"], rev["scores"])
        os.environ.pop("MEGATRON_GAD_EMULATE_TE_MASKING")
    return out


def _hf_reference(path, rows, head):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lps, scores = [], []
    for b in range(rows["prompt_ids"].shape[0]):
        p = rows["prompt_ids"][b][rows["prompt_mask"][b].bool()]
        r = rows["responses"][b][rows["response_mask"][b].bool()]
        ids = torch.cat([p, r])[None]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].double() / T, -1)  # the policy: the sampling distribution
        pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        lps.append(logp[pos, r].float())
        scores.append(float(out.hidden_states[-1][0, -1].double() @ head.double()))
    return lps, torch.tensor(scores)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_gad.tools.tiny_models import make_hf_model

    root = tmp_path_factory.mktemp("packed")
    return {fam: make_hf_model(str(root / fam), fam, seed=3) for fam in ("llama", "qwen2")}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_packed_logprobs_and_scores_equal_transformers(models, tp, pp):
    from megatron_gad.parallel.launch import run_local

    rows, _ = _rows()
    lens = (rows["prompt_mask"].sum(-1) + rows["response_mask"].sum(-1)).tolist()
    assert max(lens) >= 10 * min(lens)
    head = torch.randn(32, generator=torch.Generator().manual_seed(5)) * 0.3
    got = [r for r in run_local(_passes, tp * pp, models, tp, pp, rows, head) if r]
    assert len(got) == 1
    got = got[0]
    for fam, path in models.items():
        ref_lp, ref_sc = _hf_reference(path, rows, head)
        for mode in MODES:
            lp, sc, alone, rev = got[(fam, mode)]
            mask = rows["response_mask"].bool()
            for b, ref in enumerate(ref_lp):
                assert (lp[b][mask[b]] - ref).abs().max() < 1e-5, (fam, mode, b)
                assert torch.all(lp[b][~mask[b]] == 0)
            assert (sc - ref_sc).abs().max() < 1e-5, (fam, mode)
            assert (alone[0] - lp[0]).abs().max() < 1e-6  # same row, packed alone
            assert (rev.flip(0) - sc).abs().max() < 1e-6  # same rows, other neighbours


# ------------------------------------------------------------------------------------------ gradients
def _grad(shard) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().flatten().double() for p in shard.module.parameters()])


def _update_grads(rank, world, path, settings, rows, pairs, adv, old):
    os.environ["MEGATRON_GAD_EMULATE_TE_MASKING"] = "1"
    head = torch.linspace(-0.5, 0.5, 32)
    share = torch.tensor_split(torch.arange(rows["prompt_ids"].shape[0] // 2), world)[rank]  # this replica's groups
    rows_idx = torch.cat([torch.arange(2 * g, 2 * g + 2) for g in share.tolist()])
    out = {}
    for name, extra in settings.items():
        cfg = _cfg(path, 1, 1, *extra)
        actor, critic = _actor(cfg), _critic(cfg, head)
        batch = {k: v[rows_idx] for k, v in rows.items()}
        batch.update(old_log_prob=old[rows_idx], advantages=adv[rows_idx])
        actor.update_actor(batch, num_mini_batches=1)
        critic.update_critic({k: v[share] for k, v in pairs.items()}, 2)
        out[name] = (_grad(actor.shard), _grad(critic.shard))
    return out


SETTINGS = {
    "mb1": ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", "critic.ppo_micro_batch_size_per_gpu=1"],
    "mb2": ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2"],
    "all": ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=6", "critic.ppo_micro_batch_size_per_gpu=3"],
    # budgets that force uneven packed micro-batches and split critic groups (teacher repeated)
    "dynamic": ["actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=60",
                "critic.use_dynamic_bsz=true", "critic.ppo_max_token_len_per_gpu=70"],
}


def test_update_gradient_invariant_to_micro_batching_and_dp(models):
    from megatron_gad.parallel.launch import run_local

    rows, pairs = _rows()
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(rows["responses"].shape, generator=g)
    old = -torch.rand(rows["responses"].shape, generator=g)  # ratio != 1: the clipped surrogate is exercised
    path = models["qwen2"]
    dp1 = run_local(_update_grads, 1, path, SETTINGS, rows, pairs, adv, old)[0]
    dp2 = run_local(_update_grads, 2, path, {"mb1": SETTINGS["mb1"], "dynamic": SETTINGS["dynamic"]},
                    rows, pairs, adv, old)
    ref_actor, ref_critic = dp1["all"]
    assert ref_actor.abs().max() > 0 and ref_critic.abs().max() > 0

    def close(a, b):
        return float((a - b).abs().max() / b.abs().max()) < 1e-6

    for name, (ga, gc) in dp1.items():
        assert close(ga, ref_actor), name
        assert close(gc, ref_critic), name
    for rank_out in dp2:  # after DDP's all-reduce every replica holds the full gradient
        for name, (ga, gc) in rank_out.items():
            assert close(ga, ref_actor), ("dp2", name)
            assert close(gc, ref_critic), ("dp2", name)
