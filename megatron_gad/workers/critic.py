"""Critic worker (GAD's discriminator): scores sequences (a student's score is the actor's reward)
and trains on teacher-vs-student pairs with the fused head + Bradley-Terry loss.

Both sides are scored under one end-of-response rule (``critic.eos_policy``, applied here to every
sequence the critic sees), so a student whose response ids equal the teacher's gets the teacher's
score, read at its last token or (``critic.score_pooling: mean``) averaged over its response. The
pair loss takes the saturation controls of ``algos.discriminator.pair_loss``; with any of them or
mean pooling on, ``fused_loss: auto`` runs the torch path (the fused kernel computes plain BT at
the last token)."""

from __future__ import annotations

import torch

from megatron_gad import algos
from megatron_gad.config import CriticConfig
from megatron_gad.config_checks import critic_controls_on
from megatron_gad.engine.model_shard import ModelShard, megatron_kwargs
from megatron_gad.kernels.disc_loss import (
    TE_HEAD_NOT_USED,
    disc_bt_loss_packed,
    resolve_impl,
    sequence_scores,
)
from megatron_gad.metrics import reduce_metrics
from megatron_gad.parallel import state
from megatron_gad.workers.base import PhaseMemory, Worker
from megatron_gad.workers.dispatch import Dispatch, register
from megatron_gad.workers.micro_batches import (
    Batching,
    apply_eos_policy,
    ends_with_eos,
    group_rows,
    pair_groups,
    pair_micro_batch,
    restore_order,
    row_lengths,
    scoring_micro_batches,
)


class CriticWorker(Worker):
    """Reads only the ``critic`` section of the config; ``model_path`` (critic.model.path, else the
    actor's) and ``vocab_divisible_by`` (the actor's, so both embed the same vocabulary) are passed
    in. ``init_from``: a checkpoint whose weights replace the path's (trainer.init_critic_from)."""

    def __init__(self, config: CriticConfig, *, model_path: str, vocab_divisible_by: int, total_steps: int,
                 eos_id: int, init_from: str | None = None):
        self.config = config
        self.eos_id = eos_id
        m = config.megatron
        if config.fused_loss == "te":  # config validation refuses it too; workers may be built directly
            raise ValueError(TE_HEAD_NOT_USED)
        self.controls = {"temperature": config.bt_temperature, "label_smoothing": config.label_smoothing,
                         "margin": config.margin, "loss_type": config.loss_type}
        self.loss_impl = config.fused_loss
        if critic_controls_on(config):
            if config.fused_loss == "triton":
                raise ValueError("critic.fused_loss=triton computes plain Bradley-Terry at the last token only; use "
                                 "auto or torch with critic.loss_type/bt_temperature/label_smoothing/margin/swap_prob "
                                 "or score_pooling=mean")
            self.loss_impl = "torch"
        # fails early for an explicit "triton" that cannot run; "auto" resolves per call on the
        # hidden states' device, so it never picks a kernel that cannot run there
        self.impl = resolve_impl(self.loss_impl)
        self.shard = ModelShard("critic", model_path, **megatron_kwargs(m), vocab_divisible_by=vocab_divisible_by,
                                optim=config.optim, total_steps=total_steps, head_init_std=config.head_init_std)
        # sequence parallelism splits a packed row's tokens evenly over the TP ranks
        self.align = m.tensor_model_parallel_size if m.sequence_parallel else 1
        # what goes to host memory after each pass (the shard reloads what a pass needs itself)
        self.memory = PhaseMemory("critic", [(self.shard, dict(params=m.param_offload, grads=m.grad_offload,
                                                                optimizer=m.optimizer_offload))])
        if init_from:  # e.g. the critic of a warmup run
            self.shard.load_weights(init_from)
        self.memory.settle()  # off the device until its first pass (the first rollout runs before it)
        self._embeddings = None  # critic.r1_coef: the last forward's input embeddings (a graph node)
        if config.r1_coef > 0:
            self.shard.module.embedding.register_forward_hook(lambda m, i, out: setattr(self, "_embeddings", out))

    def _head(self):
        head = self.shard.module.output_layer
        return head.weight, head.bias

    # ---------------------------------------------------------------- reward
    @register(Dispatch.DP, collect="concat")
    def compute_scores(self, batch: dict, side: str = "student") -> dict:
        """D(sequence) for each row (prompt ids/mask + responses/response mask): a student sample's
        score is the reward the actor maximises. Packed: each row's score is read at its own last
        token, whatever else shares the micro-batch. ``side``: whose responses these are (the
        EOS policy treats teacher and student texts alike but may need to know which is which)."""
        c = self.config
        batch = dict(batch, response_mask=apply_eos_policy(batch["responses"], batch["response_mask"], self.eos_id,
                                                           c.eos_policy, side))
        b = Batching(c.forward_micro_batch_size_per_gpu, c.use_dynamic_bsz, c.forward_max_token_len_per_gpu,
                     self.align)
        groups = group_rows(row_lengths(batch["prompt_mask"], batch["response_mask"]), b)

        def loss_fn(hidden, mb):
            w, bias = self._head()
            s = sequence_scores(hidden, mb["last"], w, bias, mb["resp_len"] if c.score_pooling == "mean" else None)
            return s.sum() * 0, {"scores": s.detach().float()}

        with self.memory.phase("reward"):
            res = self.shard.forward(scoring_micro_batches(batch, groups, align=self.align), loss_fn)
        if not res:  # not the last pipeline stage
            return {"scores": None}
        return {"scores": restore_order([r["scores"] for r in res], groups, batch["prompt_ids"].shape[0]).cpu()}

    # ---------------------------------------------------------------- update
    def _pair_micro_batches(self, batch: dict, n: int) -> list[dict]:
        """Packed micro-batches of teacher sequences followed by their student samples, so every
        Bradley-Terry pair is scored in one forward pass; each carries ``share_scale`` and
        ``pairs_total`` so its loss is its exact share of the mini-batch loss (see actor ``_train``)."""
        c = self.config
        eos = self.eos_id
        t_mask = apply_eos_policy(batch["teacher_response"], batch["teacher_response_mask"], eos, c.eos_policy,
                                  "teacher")
        s_mask = apply_eos_policy(batch["responses"], batch["response_mask"], eos, c.eos_policy, "student")
        batch = dict(batch, teacher_response_mask=t_mask, response_mask=s_mask)
        b = Batching(c.ppo_micro_batch_size_per_gpu, c.use_dynamic_bsz, c.ppo_max_token_len_per_gpu, self.align)
        groups = self._equal_count(lambda k: pair_groups(batch, n, b, min_count=k), b.dynamic)
        mbs = [pair_micro_batch(batch, parts, align=self.align) for parts in groups]
        pairs_total, teachers_total = state.all_reduce_dp([float(batch["prompt_ids"].shape[0] * n),
                                                           float(batch["prompt_ids"].shape[0])])
        t_eos = ends_with_eos(batch["teacher_response"], t_mask, eos)  # [B]
        s_eos = ends_with_eos(batch["responses"], s_mask, eos)  # [B, n]
        for mb, parts in zip(mbs, groups):
            mb["share_scale"] = float(len(mbs) * self.layout.dp_size)
            mb["pairs_total"], mb["teachers_total"] = pairs_total, teachers_total
            # per pair (teacher_of order): identical scored token ids, and EOS on one side only
            ident, mismatch = [], []
            for part in parts:
                g = part.group
                t_ids = batch["teacher_response"][g][t_mask[g].bool()]
                for j in part.students:
                    s_ids = batch["responses"][g, j][s_mask[g, j].bool()]
                    ident.append(bool(t_ids.shape == s_ids.shape and torch.equal(t_ids, s_ids)))
                    mismatch.append(bool(t_eos[g] != s_eos[g, j]))
            mb["identical"] = torch.tensor(ident, dtype=torch.bool)
            mb["eos_mismatch"] = torch.tensor(mismatch, dtype=torch.bool)
            # where each scored sequence belongs in [B] teachers / [B, n] students (``_scores``)
            mb["teacher_rows"] = torch.tensor([part.group for part in parts], dtype=torch.long)
            mb["student_rows"] = torch.tensor([part.group * n + j for part in parts for j in part.students],
                                              dtype=torch.long)
        return mbs

    @staticmethod
    def _scores(results: list[dict], rows: int, n: int) -> dict:
        """Pop the per-sequence scores the pair loss kept (``_pair_loss(keep_scores=True)``) from
        the micro-batches' results and place them: teacher [rows], student [rows, n]."""
        t = torch.zeros(rows, dtype=torch.float32)
        s = torch.zeros(rows * n, dtype=torch.float32)
        for r in results:
            t[r.pop("_teacher_rows")] = r.pop("_teacher_scores")
            s[r.pop("_student_rows")] = r.pop("_student_scores")
        return {"teacher_scores": t, "student_scores": s.view(rows, n)}

    def _pair_loss(self, prefix: str, swap: bool = False, keep_scores: bool = False):
        """``swap``: draw this step's swapped pairs (training only; ``critic.swap_prob``).
        ``keep_scores``: each micro-batch's result also holds its sequences' scores from this forward
        (before any optimizer step: the rewards, ``update_critic(return_scores=True)``)."""
        gen = None
        if swap and self.config.swap_prob > 0:  # reproducible: seed, update count, replica
            gen = torch.Generator().manual_seed(self.config.megatron.seed * 1_000_003
                                                + self.shard.train_calls * 101 + self.layout.dp_rank)

        def loss_fn(hidden, mb):
            # the fused loss reads each sequence's last token straight from the packed [1, T, H]
            # output; teacher_of pairs each student with its teacher (whole or split groups alike)
            w, b = self._head()
            k = mb["num_teachers"]
            pairs = mb["teacher_of"].numel()
            controls = dict(self.controls)
            if gen is not None:
                controls["swap"] = (torch.rand(pairs, generator=gen) < self.config.swap_prob).to(hidden.device)
            pool = mb["resp_len"] if self.config.score_pooling == "mean" else None
            loss, m, t, s = disc_bt_loss_packed(hidden, mb["last"], k, mb["teacher_of"], w, b,
                                                impl=self.loss_impl, score_reg_coef=self.config.score_reg_coef,
                                                pool_len=pool, **(controls if self.loss_impl == "torch" else {}))
            gap = (t.index_select(0, mb["teacher_of"].to(t.device)) - s).abs().cpu()
            ident = mb["identical"]
            m = dict(m, identical_pairs=ident.float().mean(), eos_mismatch=mb["eos_mismatch"].float().mean(),
                     identical_pair_gap=gap[ident].max() if bool(ident.any()) else torch.zeros(()))
            share = pairs / mb["pairs_total"] * mb["share_scale"]  # mean over this micro-batch's pairs -> share
            extra = 0.0
            if self.config.r1_coef > 0 and torch.is_grad_enabled():  # training only: R1 on the teachers
                t_live = sequence_scores(hidden, mb["last"][:k], w, b, pool[:k] if pool is not None else None)
                r1 = algos.r1_penalty(t_live, self._embeddings, self.config.r1_coef, mb["teachers_total"])
                extra = r1 * mb["share_scale"]  # its share of the mean over the mini-batch's teachers
                m["r1_penalty"] = r1.detach() * mb["teachers_total"] / k if k else r1.detach()
            out = {f"{prefix}{key}": float(v) * share for key, v in m.items()}
            if "swap" in controls:
                out[f"{prefix}swapped_pairs"] = float(controls["swap"].float().mean()) * share
            if keep_scores:
                out.update(_teacher_scores=t.float().cpu(), _teacher_rows=mb["teacher_rows"],
                           _student_scores=s.float().cpu(), _student_rows=mb["student_rows"])
            return loss * share + extra, out

        return loss_fn

    @register(Dispatch.DP, collect="mean_concat")
    def evaluate_pairs(self, batch: dict, n: int, return_scores: bool = False) -> dict:
        """Held-out critic metrics (no update): ``val/d_loss``, ``val/d_acc``, ... ``return_scores``:
        also ``teacher_scores`` [B] and ``student_scores`` [B, n] (as ``compute_scores`` gives them)."""
        with self.memory.phase("evaluate"):
            results = self.shard.forward(self._pair_micro_batches(batch, n),
                                         self._pair_loss("val/", keep_scores=return_scores))
        scores = self._scores(results, batch["prompt_ids"].shape[0], n) if return_scores else {}
        return dict(reduce_metrics(results), **scores)

    @register(Dispatch.DP, collect="mean_concat")
    def update_critic(self, batch: dict, n: int, lr_scale: float = 1.0, return_scores: bool = False) -> dict:
        """batch: prompts [B, P], teacher responses [B, Rt], student responses [B, n, R].
        ``lr_scale``: this update's learning rate times this (the saturation guard).
        ``return_scores``: also ``teacher_scores`` [B] and ``student_scores`` [B, n] read from the
        first forward, which precedes every optimizer step of this call: the scores of the critic
        before this update, i.e. what ``compute_scores`` returns (the rewards), without its pass."""
        metrics = []
        skipped = 0
        scores = {}
        with self.memory.phase("update_critic"):
            for epoch in range(self.config.ppo_epochs):
                keep = return_scores and epoch == 0
                results, info = self.shard.train_step(self._pair_micro_batches(batch, n),
                                                      self._pair_loss("critic/", swap=True, keep_scores=keep), lr_scale)
                if keep:
                    scores = self._scores(results, batch["prompt_ids"].shape[0], n)
                skipped += int(info["nonfinite"])
                if epoch == 0:  # later passes score pairs already trained on: d_acc would look better
                    metrics += [dict(r) for r in results]
                metrics.append({"critic/grad_norm": info["grad_norm"], "critic/lr": info["lr"]})
        out = reduce_metrics(metrics)
        out["critic/nonfinite_updates"] = float(skipped)  # optimizer updates skipped (non-finite loss/grad)
        out.update(self.memory.metrics)  # this step's reward pass (scored before the update) included
        return dict(out, **scores)
