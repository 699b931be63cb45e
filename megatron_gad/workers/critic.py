"""Critic worker (GAD's discriminator): scores sequences (a student's score is the actor's reward)
and trains on teacher-vs-student pairs with the fused head + Bradley-Terry loss."""

from __future__ import annotations

from megatron_gad.config import CriticConfig
from megatron_gad.engine.model_shard import ModelShard, megatron_kwargs
from megatron_gad.kernels.disc_loss import TE_HEAD_NOT_USED, disc_bt_loss_packed, disc_head_scores, resolve_impl
from megatron_gad.metrics import reduce_metrics
from megatron_gad.parallel import state
from megatron_gad.workers.base import Worker
from megatron_gad.workers.dispatch import Dispatch, register
from megatron_gad.workers.micro_batches import (
    Batching,
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
                 init_from: str | None = None):
        self.config = config
        m = config.megatron
        if config.fused_loss == "te":  # config validation refuses it too; workers may be built directly
            raise ValueError(TE_HEAD_NOT_USED)
        # fails early for an explicit "triton" that cannot run; "auto" resolves per call on the
        # hidden states' device, so it never picks a kernel that cannot run there
        self.impl = resolve_impl(config.fused_loss)
        self.shard = ModelShard("critic", model_path, **megatron_kwargs(m), vocab_divisible_by=vocab_divisible_by,
                                optim=config.optim, total_steps=total_steps, head_init_std=config.head_init_std)
        # sequence parallelism splits a packed row's tokens evenly over the TP ranks
        self.align = m.tensor_model_parallel_size if m.sequence_parallel else 1
        # what goes to host memory after each pass (the shard reloads what a pass needs itself)
        self.offload = dict(params=m.param_offload, grads=m.grad_offload, optimizer=m.optimizer_offload)
        self.phase_bytes: dict[str, float] = {}  # device bytes in this step's passes (memory/critic/...)
        if init_from:  # e.g. the critic of a warmup run
            self.shard.load_weights(init_from)

    def _after(self, phase: str) -> None:
        """Record the device bytes the pass held, then offload what the config says."""
        self.phase_bytes[f"memory/critic/{phase}_bytes"] = float(sum(self.shard.held_bytes().values()))
        self.shard.offload(**self.offload)
        self.phase_bytes["memory/critic/idle_bytes"] = float(sum(self.shard.held_bytes().values()))

    def _head(self):
        head = self.shard.module.output_layer
        return head.weight, head.bias

    # ---------------------------------------------------------------- reward
    @register(Dispatch.DP, collect="concat")
    def compute_scores(self, batch: dict) -> dict:
        """D(sequence) for each row (prompt ids/mask + responses/response mask): a student sample's
        score is the reward the actor maximises. Packed: each row's score is read at its own last
        token, whatever else shares the micro-batch."""
        c = self.config
        b = Batching(c.forward_micro_batch_size_per_gpu, c.use_dynamic_bsz, c.forward_max_token_len_per_gpu,
                     self.align)
        groups = group_rows(row_lengths(batch["prompt_mask"], batch["response_mask"]), b)

        def loss_fn(hidden, mb):
            w, bias = self._head()
            s = disc_head_scores(hidden[0].index_select(0, mb["last"]), w, bias)
            return s.sum() * 0, {"scores": s.detach().float()}

        res = self.shard.forward(scoring_micro_batches(batch, groups, align=self.align), loss_fn)
        self._after("reward")
        if not res:  # not the last pipeline stage
            return {"scores": None}
        return {"scores": restore_order([r["scores"] for r in res], groups, batch["prompt_ids"].shape[0]).cpu()}

    # ---------------------------------------------------------------- update
    def _pair_micro_batches(self, batch: dict, n: int) -> list[dict]:
        """Packed micro-batches of teacher sequences followed by their student samples, so every
        Bradley-Terry pair is scored in one forward pass; each carries ``share_scale`` and
        ``pairs_total`` so its loss is its exact share of the mini-batch loss (see actor ``_train``)."""
        c = self.config
        b = Batching(c.ppo_micro_batch_size_per_gpu, c.use_dynamic_bsz, c.ppo_max_token_len_per_gpu, self.align)
        groups = self._equal_count(lambda k: pair_groups(batch, n, b, min_count=k), b.dynamic)
        mbs = [pair_micro_batch(batch, parts, align=self.align) for parts in groups]
        pairs_total = state.all_reduce_dp([float(batch["prompt_ids"].shape[0] * n)])[0]
        for mb in mbs:
            mb["share_scale"] = float(len(mbs) * self.layout.dp_size)
            mb["pairs_total"] = pairs_total
        return mbs

    def _pair_loss(self, prefix: str):
        def loss_fn(hidden, mb):
            # the fused loss reads each sequence's last token straight from the packed [1, T, H]
            # output; teacher_of pairs each student with its teacher (whole or split groups alike)
            w, b = self._head()
            k = mb["num_teachers"]
            loss, m, _, _ = disc_bt_loss_packed(hidden, mb["last"], k, mb["teacher_of"], w, b,
                                                impl=self.config.fused_loss,
                                                score_reg_coef=self.config.score_reg_coef)
            pairs = mb["teacher_of"].numel()
            share = pairs / mb["pairs_total"] * mb["share_scale"]  # mean over this micro-batch's pairs -> share
            out = {f"{prefix}{key}": float(v) * share for key, v in m.items()}
            return loss * share, out

        return loss_fn

    @register(Dispatch.DP, collect="mean")
    def evaluate_pairs(self, batch: dict, n: int) -> dict:
        """Held-out critic metrics (no update): ``val/d_loss``, ``val/d_acc``, ..."""
        out = reduce_metrics(self.shard.forward(self._pair_micro_batches(batch, n), self._pair_loss("val/")))
        self._after("evaluate")
        return out

    @register(Dispatch.DP, collect="mean")
    def update_critic(self, batch: dict, n: int) -> dict:
        """batch: prompts [B, P], teacher responses [B, Rt], student responses [B, n, R]."""
        loss_fn = self._pair_loss("critic/")
        metrics = []
        skipped = 0
        for epoch in range(self.config.ppo_epochs):
            results, info = self.shard.train_step(self._pair_micro_batches(batch, n), loss_fn)
            skipped += int(info["nonfinite"])
            if epoch == 0:  # later passes score pairs already trained on: d_acc would look better
                metrics += [dict(r) for r in results]
            metrics.append({"critic/grad_norm": info["grad_norm"], "critic/lr": info["lr"]})
        out = reduce_metrics(metrics)
        out["critic/nonfinite_updates"] = float(skipped)  # optimizer updates skipped (non-finite loss/grad)
        self._after("update_critic")
        out.update(self.phase_bytes)  # this step's reward pass (scored before the update) included
        return out
