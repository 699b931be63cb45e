"""Actor worker: rollout (native Megatron sampling), log-probs, PPO update, SFT, reference model.

One instance per rank of the actor role. Methods take this rank's data-parallel share of the batch
(all ranks of one DP replica get the same share) and return results on every rank; the controller
reads them from one rank per replica.
"""

from __future__ import annotations

import torch

from megatron_gad import algos
from megatron_gad.config import GADConfig
from megatron_gad.engine.generate import generate
from megatron_gad.kernels.logprob import vocab_parallel_logprob
from megatron_gad.metrics import reduce_metrics
from megatron_gad.parallel import state
from megatron_gad.parallel.cpu_compat import cpu_device_mode
from megatron_gad.workers.batching import sequences, split_rows
from megatron_gad.workers.role import ModelRole, OptimSettings, RoleWorker


def optim_settings(o, total_steps: int) -> OptimSettings:
    return OptimSettings(lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad, betas=tuple(o.betas),
                         eps=o.eps, lr_warmup_steps=o.lr_warmup_steps, lr_scheduler=o.lr_scheduler,
                         min_lr=o.min_lr, total_steps=total_steps)


class ActorWorker(RoleWorker):
    def __init__(self, cfg: GADConfig, total_steps: int, eos_id: int, pad_id: int):
        self.cfg = cfg
        arr = cfg.actor_rollout_ref
        m = arr.actor.megatron
        self.eos_id, self.pad_id = eos_id, pad_id
        with cpu_device_mode():
            self.actor = ModelRole("actor", arr.model.path, m.tensor_model_parallel_size,
                                   m.pipeline_model_parallel_size, params_dtype=m.params_dtype,
                                   vocab_divisible_by=arr.model.make_vocab_size_divisible_by, seed=m.seed,
                                   optim=optim_settings(arr.actor.optim, total_steps))
            if cfg.trainer.init_actor_from:
                self.actor.load_weights(cfg.trainer.init_actor_from)
            # The reference is the starting policy, frozen: built only when a KL term needs it.
            self.ref = None
            if arr.actor.use_kl_loss:
                self.ref = ModelRole("actor", cfg.trainer.init_actor_from or arr.model.path,
                                     m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                                     params_dtype=m.params_dtype,
                                     vocab_divisible_by=arr.model.make_vocab_size_divisible_by,
                                     seed=m.seed, trainable=False)
        self.role = self.actor

    # ---------------------------------------------------------------- helpers
    def _token_logprob(self, role: ModelRole, logits: torch.Tensor, batch: dict, compute_entropy: bool,
                       training: bool = False):
        """Log-probs of the response tokens from this rank's vocab shard of the logits. In training the
        backward writes the logits gradient into the logits' own buffer (nothing reads them later),
        saving a [tokens, vocab/TP] allocation at the actor's memory peak."""
        P, R = batch["prompt_width"], batch["responses"].shape[1]
        resp_logits = logits[:, P - 1:P - 1 + R]  # position t predicts token t+1
        v_local = resp_logits.shape[-1]
        return vocab_parallel_logprob(
            resp_logits, batch["responses"], state.tp_group() if self.layout.tp_size > 1 else None,
            vocab_start=self.layout.tp_rank * v_local, vocab_size=role.arch.vocab_size,
            chunk_size=self.cfg.actor_rollout_ref.actor.logprob_chunk_size, compute_entropy=compute_entropy,
            inplace_backward=training)

    @staticmethod
    def _micro_batches(batch: dict, size: int, extra=()) -> list[dict]:
        """batch: prompt_ids/prompt_mask [B, P] + responses/response_mask [B, R] (+ extra keys)."""
        seq = sequences(batch["prompt_ids"], batch["prompt_mask"], batch["responses"], batch["response_mask"])
        rows = dict(seq, responses=batch["responses"], response_mask=batch["response_mask"],
                    **{k: batch[k] for k in extra})
        mbs = split_rows(rows, size)
        for mb in mbs:
            mb["prompt_width"] = batch["prompt_ids"].shape[1]
        return mbs

    # ---------------------------------------------------------------- rollout
    def generate(self, batch: dict, seed: int, temperature: float | None = None, greedy: bool = False) -> dict | None:
        r = self.cfg.actor_rollout_ref.rollout
        with cpu_device_mode():
            out = generate(self.actor, batch["prompt_ids"], batch["prompt_mask"],
                           max_new_tokens=self.cfg.data.max_response_length, eos_id=self.eos_id,
                           pad_id=self.pad_id, temperature=temperature or r.temperature, top_k=r.top_k,
                           top_p=r.top_p, greedy=greedy, seed=seed + 7919 * self.layout.dp_rank,
                           micro_batch_size=r.log_prob_micro_batch_size_per_gpu)
        return out if self.is_collector() else None

    # ---------------------------------------------------------------- log-probs
    def _log_prob(self, role: ModelRole, batch: dict, mb_size: int) -> dict | None:
        def loss_fn(logits, mb):
            lp, _ = self._token_logprob(role, logits, mb, compute_entropy=False)
            return lp.sum() * 0, {"log_prob": lp}

        with cpu_device_mode():
            res = role.forward(self._micro_batches(batch, mb_size), loss_fn)
        if not self.is_collector():
            return None
        return {"log_prob": torch.cat([r["log_prob"] for r in res], 0).cpu()}

    def compute_log_prob(self, batch: dict) -> dict | None:
        return self._log_prob(self.actor, batch, self.cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu)

    def compute_ref_log_prob(self, batch: dict) -> dict | None:
        if self.ref is None:
            raise RuntimeError("no reference model: set actor_rollout_ref.actor.use_kl_loss=true")
        return self._log_prob(self.ref, batch, self.cfg.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu)

    # ---------------------------------------------------------------- updates
    def update_actor(self, batch: dict, num_mini_batches: int) -> dict | None:
        """PPO-clip on GRPO advantages (+ optional KL to the reference), ppo_epochs x mini-batches."""
        a = self.cfg.actor_rollout_ref.actor
        policy_loss = algos.get_policy_loss(a.policy_loss)
        kl_fn = algos.get_kl_penalty(a.kl_loss_type) if a.use_kl_loss else None

        def loss_fn(logits, mb):
            lp, ent = self._token_logprob(self.actor, logits, mb, compute_entropy=a.entropy_coeff > 0, training=True)
            mask = mb["response_mask"]
            loss, m = policy_loss(mb["old_log_prob"], lp, mb["advantages"], mask,
                                  clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
                                  clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode)
            out = {f"actor/{k}": float(v) for k, v in m.items()}
            if kl_fn is not None:
                kl = algos.agg_loss(kl_fn(lp, mb["ref_log_prob"]), mask, a.loss_agg_mode)
                loss = loss + a.kl_loss_coef * kl
                out["actor/kl"] = float(kl)
            if ent is not None:
                e = algos.agg_loss(ent, mask, a.loss_agg_mode)
                loss = loss - a.entropy_coeff * e
                out["actor/entropy"] = float(e)
            return loss, out

        extra = ["old_log_prob", "advantages"] + (["ref_log_prob"] if kl_fn else [])
        return self._train(batch, extra, loss_fn, num_mini_batches, a.ppo_epochs)

    def sft_step(self, batch: dict) -> dict | None:
        """Cross-entropy on the teacher responses (the paper's warmup for the generator)."""
        a = self.cfg.actor_rollout_ref.actor

        def loss_fn(logits, mb):
            lp, _ = self._token_logprob(self.actor, logits, mb, compute_entropy=False, training=True)
            loss, m = algos.sft_loss(lp, mb["response_mask"], a.loss_agg_mode)
            return loss, {f"actor/{k}": float(v) for k, v in m.items()}

        b = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
             "responses": batch["teacher_response"], "response_mask": batch["teacher_response_mask"]}
        return self._train(b, [], loss_fn, 1, 1)

    def _train(self, batch, extra, loss_fn, num_mini_batches, epochs) -> dict | None:
        rows = batch["prompt_ids"].shape[0]
        mini = -(-rows // num_mini_batches)
        mb_size = self.cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu
        metrics: list[dict] = []
        with cpu_device_mode():
            for _ in range(epochs):
                for i in range(0, rows, mini):
                    part = {k: v[i:i + mini] for k, v in batch.items()}
                    results, info = self.actor.train_step(
                        self._micro_batches(part, mb_size, extra), loss_fn)
                    for r in results:
                        metrics.append(dict(r))
                    metrics.append({"actor/grad_norm": info["grad_norm"], "actor/lr": info["lr"]})
        if not self.is_collector():
            return None
        out = reduce_metrics(metrics)
        out["actor/optimizer_state_bytes"] = float(self.actor.optimizer_state_bytes())
        return out
