"""Critic worker (GAD's discriminator): scores sequences (a student's score is the actor's reward)
and trains on teacher-vs-student pairs with the fused head + Bradley-Terry loss."""

from __future__ import annotations

import torch

from megatron_gad.config import CriticConfig
from megatron_gad.data import last_valid_index
from megatron_gad.engine.model_shard import ModelShard
from megatron_gad.kernels.disc_loss import disc_head_bt_loss, disc_head_scores, gather_last_hidden, resolve_impl
from megatron_gad.metrics import reduce_metrics
from megatron_gad.workers.base import Worker
from megatron_gad.workers.batching import cat_results, pad_right, sequences, split_rows
from megatron_gad.workers.dispatch import Dispatch, register


def _last_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] (GPTModel's output layout) -> [B, H] at each sequence's last valid token."""
    return gather_last_hidden(hidden.transpose(0, 1), last_valid_index(attention_mask))


class CriticWorker(Worker):
    """Reads only the ``critic`` section of the config; ``model_path`` (critic.model.path, else the
    actor's) and ``vocab_divisible_by`` (the actor's, so both embed the same vocabulary) are passed
    in. ``init_from``: a checkpoint whose weights replace the path's (trainer.init_critic_from)."""

    def __init__(self, config: CriticConfig, *, model_path: str, vocab_divisible_by: int, total_steps: int,
                 init_from: str | None = None):
        self.config = config
        m = config.megatron
        self.impl = resolve_impl(config.fused_loss)
        self.shard = ModelShard("critic", model_path, m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                                params_dtype=m.params_dtype, vocab_divisible_by=vocab_divisible_by, seed=m.seed,
                                optim=config.optim, total_steps=total_steps, head_init_std=config.head_init_std)
        if init_from:  # e.g. the critic of a warmup run
            self.shard.load_weights(init_from)

    def _head(self):
        head = self.shard.module.output_layer
        return head.weight, head.bias

    # ---------------------------------------------------------------- reward
    @register(Dispatch.DP, collect="concat")
    def compute_scores(self, batch: dict) -> dict:
        """D(sequence) for each row (prompt ids/mask + responses/response mask): a student sample's
        score is the reward the actor maximises."""
        seq = sequences(batch["prompt_ids"], batch["prompt_mask"], batch["responses"], batch["response_mask"])

        def loss_fn(hidden, mb):
            w, b = self._head()
            s = disc_head_scores(_last_hidden(hidden, mb["attention_mask"]), w, b)
            return s.sum() * 0, {"scores": s.detach().float()}

        res = self.shard.forward(split_rows(seq, self.config.forward_micro_batch_size_per_gpu), loss_fn)
        return {"scores": cat_results(res, "scores")}

    # ---------------------------------------------------------------- update
    def _pair_micro_batches(self, batch: dict, n: int) -> list[dict]:
        """Each micro-batch: k prompts' teacher sequences followed by their k*n student samples,
        so every Bradley-Terry pair is scored in one forward pass."""
        k = self.config.ppo_micro_batch_size_per_gpu
        responses, response_mask = batch["responses"].flatten(0, 1), batch["response_mask"].flatten(0, 1)
        R = max(responses.shape[1], batch["teacher_response"].shape[1])
        prompts = batch["prompt_ids"].shape[0]
        mbs = []
        for i in range(0, prompts, k):
            j = slice(i, i + k)
            js = slice(i * n, (i + k) * n)
            P, Pm = batch["prompt_ids"][j], batch["prompt_mask"][j]
            teacher = sequences(P, Pm, pad_right(batch["teacher_response"][j], R),
                                pad_right(batch["teacher_response_mask"][j], R))
            student = sequences(P.repeat_interleave(n, 0), Pm.repeat_interleave(n, 0),
                                pad_right(responses[js], R), pad_right(response_mask[js], R))
            mb = {key: torch.cat([teacher[key], student[key]], 0) for key in teacher}
            mb["num_prompts"] = P.shape[0]
            mbs.append(mb)
        return mbs

    def _pair_loss(self, n: int, prefix: str):
        def loss_fn(hidden, mb):
            h = _last_hidden(hidden, mb["attention_mask"])
            p = mb["num_prompts"]
            w, b = self._head()
            loss, m, _, _ = disc_head_bt_loss(h[:p], h[p:], w, b, n, impl=self.impl,
                                              score_reg_coef=self.config.score_reg_coef)
            return loss, {f"{prefix}{k}": float(v) for k, v in m.items()}

        return loss_fn

    @register(Dispatch.DP, collect="mean")
    def evaluate_pairs(self, batch: dict, n: int) -> dict:
        """Held-out critic metrics (no update): ``val/d_loss``, ``val/d_acc``, ..."""
        return reduce_metrics(self.shard.forward(self._pair_micro_batches(batch, n), self._pair_loss(n, "val/")))

    @register(Dispatch.DP, collect="mean")
    def update_critic(self, batch: dict, n: int) -> dict:
        """batch: prompts [B, P], teacher responses [B, Rt], student responses [B, n, R]."""
        loss_fn = self._pair_loss(n, "critic/")
        metrics = []
        for epoch in range(self.config.ppo_epochs):
            results, info = self.shard.train_step(self._pair_micro_batches(batch, n), loss_fn)
            if epoch == 0:  # later passes score pairs already trained on: d_acc would look better
                metrics += [dict(r) for r in results]
            metrics.append({"critic/grad_norm": info["grad_norm"], "critic/lr": info["lr"]})
        return reduce_metrics(metrics)
