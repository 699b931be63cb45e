"""Actor worker: rollout (native Megatron sampling), log-probs, PPO update, SFT, reference model.

One instance per rank of the actor role; it reads only the ``actor_rollout_ref`` section of the
config (plus the shared values passed to it). Methods take this replica's share of a batch (see
``workers.dispatch``); their declarations say how the controller splits and collects.
"""

from __future__ import annotations

import torch

from megatron_gad import algos
from megatron_gad.config import ActorRolloutRefConfig
from megatron_gad.engine.generate import generate
from megatron_gad.engine.model_shard import ModelShard
from megatron_gad.kernels.logprob import vocab_parallel_logprob
from megatron_gad.metrics import reduce_metrics
from megatron_gad.parallel import state
from megatron_gad.workers.base import Worker
from megatron_gad.workers.batching import cat_results, sequences, split_rows
from megatron_gad.workers.dispatch import Dispatch, register


class ActorWorker(Worker):
    """``init_from``: a checkpoint whose weights replace the model path's (trainer.init_actor_from);
    the reference, built only when a KL term needs it, is the same starting policy, frozen."""

    def __init__(self, config: ActorRolloutRefConfig, *, max_response_length: int, total_steps: int,
                 eos_id: int, pad_id: int, init_from: str | None = None):
        self.config = config
        m = config.actor.megatron
        self.max_response_length = max_response_length
        self.eos_id, self.pad_id = eos_id, pad_id

        def shard(path: str, **kw) -> ModelShard:
            return ModelShard("actor", path, m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                              params_dtype=m.params_dtype,
                              vocab_divisible_by=config.model.make_vocab_size_divisible_by, seed=m.seed, **kw)

        self.shard = shard(config.model.path, optim=config.actor.optim, total_steps=total_steps)
        if init_from:
            self.shard.load_weights(init_from)
        self.ref = shard(init_from or config.model.path, trainable=False) if config.actor.use_kl_loss else None

    # ---------------------------------------------------------------- helpers
    def _token_logprob(self, shard: ModelShard, logits: torch.Tensor, batch: dict, compute_entropy: bool,
                       training: bool = False):
        """Log-probs of the response tokens from this rank's vocab shard of the logits. In training the
        backward writes the logits gradient into the logits' own buffer (nothing reads them later),
        saving a [tokens, vocab/TP] allocation at the actor's memory peak."""
        P, R = batch["prompt_width"], batch["responses"].shape[1]
        resp_logits = logits[:, P - 1:P - 1 + R]  # position t predicts token t+1
        v_local = resp_logits.shape[-1]
        return vocab_parallel_logprob(
            resp_logits, batch["responses"], state.tp_group() if self.layout.tp_size > 1 else None,
            vocab_start=self.layout.tp_rank * v_local, vocab_size=shard.arch.vocab_size,
            chunk_size=self.config.actor.logprob_chunk_size, compute_entropy=compute_entropy,
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
    @register(Dispatch.DP, collect="concat")
    def generate(self, batch: dict, seed: int, temperature: float | None = None, greedy: bool = False) -> dict:
        """batch: prompt_ids/prompt_mask [B, P] (one row per sample) -> responses/response_mask [B, R]
        (R: this replica's longest response; the controller pads replicas to one width)."""
        r = self.config.rollout
        return generate(self.shard, batch["prompt_ids"], batch["prompt_mask"],
                        max_new_tokens=self.max_response_length, eos_id=self.eos_id,
                        pad_id=self.pad_id, temperature=temperature or r.temperature, top_k=r.top_k,
                        top_p=r.top_p, greedy=greedy, seed=seed + 7919 * self.layout.dp_rank,
                        micro_batch_size=r.log_prob_micro_batch_size_per_gpu)

    # ---------------------------------------------------------------- log-probs
    def _log_prob(self, shard: ModelShard, batch: dict, mb_size: int) -> dict:
        def loss_fn(logits, mb):
            lp, _ = self._token_logprob(shard, logits, mb, compute_entropy=False)
            return lp.sum() * 0, {"log_prob": lp}

        return {"log_prob": cat_results(shard.forward(self._micro_batches(batch, mb_size), loss_fn), "log_prob")}

    @register(Dispatch.DP, collect="concat")
    def compute_log_prob(self, batch: dict) -> dict:
        """Per-token log-probs [B, R] of the responses under the current policy (the PPO 'old')."""
        return self._log_prob(self.shard, batch, self.config.rollout.log_prob_micro_batch_size_per_gpu)

    @register(Dispatch.DP, collect="concat")
    def compute_ref_log_prob(self, batch: dict) -> dict:
        if self.ref is None:
            raise RuntimeError("no reference model: set actor_rollout_ref.actor.use_kl_loss=true")
        return self._log_prob(self.ref, batch, self.config.ref.log_prob_micro_batch_size_per_gpu)

    # ---------------------------------------------------------------- updates
    @register(Dispatch.DP, collect="mean")
    def update_actor(self, batch: dict, num_mini_batches: int) -> dict:
        """PPO-clip on GRPO advantages (+ optional KL to the reference), ppo_epochs x mini-batches."""
        a = self.config.actor
        policy_loss = algos.get_policy_loss(a.policy_loss)
        kl_fn = algos.get_kl_penalty(a.kl_loss_type) if a.use_kl_loss else None

        def loss_fn(logits, mb):
            lp, ent = self._token_logprob(self.shard, logits, mb, compute_entropy=a.entropy_coeff > 0, training=True)
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

    @register(Dispatch.DP, collect="mean")
    def sft_step(self, batch: dict) -> dict:
        """Cross-entropy on the teacher responses (the paper's warmup for the generator)."""
        a = self.config.actor

        def loss_fn(logits, mb):
            lp, _ = self._token_logprob(self.shard, logits, mb, compute_entropy=False, training=True)
            loss, m = algos.sft_loss(lp, mb["response_mask"], a.loss_agg_mode)
            return loss, {f"actor/{k}": float(v) for k, v in m.items()}

        b = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
             "responses": batch["teacher_response"], "response_mask": batch["teacher_response_mask"]}
        return self._train(b, [], loss_fn, 1, 1)

    def _train(self, batch, extra, loss_fn, num_mini_batches, epochs) -> dict:
        rows = batch["prompt_ids"].shape[0]
        mini = -(-rows // num_mini_batches)
        mb_size = self.config.actor.ppo_micro_batch_size_per_gpu
        metrics: list[dict] = []
        for _ in range(epochs):
            for i in range(0, rows, mini):
                part = {k: v[i:i + mini] for k, v in batch.items()}
                results, info = self.shard.train_step(self._micro_batches(part, mb_size, extra), loss_fn)
                metrics += [dict(r) for r in results]
                metrics.append({"actor/grad_norm": info["grad_norm"], "actor/lr": info["lr"]})
        out = reduce_metrics(metrics)
        out["actor/optimizer_state_bytes"] = float(self.shard.optimizer_state_bytes())
        return out
