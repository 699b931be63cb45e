"""Discriminator worker: scores student sequences (the actor's reward) and trains on
teacher-vs-student pairs with the fused head + Bradley-Terry loss."""

from __future__ import annotations

import torch

from megatron_gad.config import GADConfig, critic_model_path
from megatron_gad.data import last_valid_index
from megatron_gad.kernels.disc_loss import disc_head_bt_loss, disc_head_scores, gather_last_hidden, resolve_impl
from megatron_gad.metrics import reduce_metrics
from megatron_gad.parallel.cpu_compat import cpu_device_mode
from megatron_gad.workers.actor import optim_settings
from megatron_gad.workers.batching import pad_right, sequences, split_rows
from megatron_gad.workers.role import ModelRole, RoleWorker


def _last_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] (GPTModel's output layout) -> [B, H] at each sequence's last valid token."""
    return gather_last_hidden(hidden.transpose(0, 1), last_valid_index(attention_mask))


class CriticWorker(RoleWorker):
    def __init__(self, cfg: GADConfig, total_steps: int):
        self.cfg = cfg
        c = cfg.critic
        m = c.megatron
        self.impl = resolve_impl(c.fused_loss)
        with cpu_device_mode():
            self.critic = ModelRole("critic", critic_model_path(cfg), m.tensor_model_parallel_size,
                                    m.pipeline_model_parallel_size, params_dtype=m.params_dtype,
                                    vocab_divisible_by=cfg.actor_rollout_ref.model.make_vocab_size_divisible_by,
                                    seed=m.seed, optim=optim_settings(c.optim, total_steps),
                                    head_init_std=c.head_init_std)
            if cfg.trainer.init_critic_from:  # e.g. the discriminator of a warmup run
                self.critic.load_weights(cfg.trainer.init_critic_from)
        self.role = self.critic

    def _head(self):
        head = self.critic.module.output_layer
        return head.weight, head.bias

    # ---------------------------------------------------------------- reward
    def compute_scores(self, batch: dict) -> dict | None:
        """D(student) for each sequence: the reward the actor maximises."""
        seq = sequences(batch["prompt_ids"], batch["prompt_mask"], batch["responses"], batch["response_mask"])

        def loss_fn(hidden, mb):
            w, b = self._head()
            s = disc_head_scores(_last_hidden(hidden, mb["attention_mask"]), w, b)
            return s.sum() * 0, {"scores": s.detach().float()}

        with cpu_device_mode():
            res = self.critic.forward(split_rows(seq, self.cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu),
                                      loss_fn)
        return {"scores": torch.cat([r["scores"] for r in res]).cpu()} if self.is_collector() else None

    # ---------------------------------------------------------------- update
    def _pair_micro_batches(self, batch: dict, n: int) -> list[dict]:
        """Each micro-batch: k prompts' teacher sequences followed by their k*n student samples,
        so every Bradley-Terry pair is scored in one forward pass."""
        k = self.cfg.critic.ppo_micro_batch_size_per_gpu
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
                                              score_reg_coef=self.cfg.critic.score_reg_coef)
            return loss, {f"{prefix}{k}": float(v) for k, v in m.items()}

        return loss_fn

    def evaluate_pairs(self, batch: dict, n: int) -> dict | None:
        """Held-out discriminator metrics (no update): ``val/d_loss``, ``val/d_acc``, ..."""
        with cpu_device_mode():
            res = self.critic.forward(self._pair_micro_batches(batch, n), self._pair_loss(n, "val/"))
        return reduce_metrics(res) if self.is_collector() else None

    def update_critic(self, batch: dict, n: int) -> dict | None:
        """batch: prompts [B, P], teacher responses [B, Rt], student responses [B, n, R]."""
        c = self.cfg.critic
        loss_fn = self._pair_loss(n, "critic/")
        metrics = []
        with cpu_device_mode():
            for epoch in range(c.ppo_epochs):
                results, info = self.critic.train_step(self._pair_micro_batches(batch, n), loss_fn)
                if epoch == 0:  # later passes score pairs already trained on: d_acc would look better
                    metrics += [dict(r) for r in results]
                metrics.append({"critic/grad_norm": info["grad_norm"], "critic/lr": info["lr"]})
        if not self.is_collector():
            return None
        return reduce_metrics(metrics)
