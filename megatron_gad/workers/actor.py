"""Actor worker: rollout (native Megatron sampling), log-probs, PPO update, SFT, reference model,
and the weight export a separate rollout engine (vLLM) syncs from.

The policy's probabilities are those of the distribution the rollout samples from: old, reference
and current log-probs, the PPO ratio, KL and entropy all use ``logits / rollout.temperature`` (as
verl does), so a sampled token's old log-prob equals what the engine reports for it. SFT on the
teacher text is plain cross-entropy (T = 1).

One instance per rank of the actor role; it reads only the ``actor_rollout_ref`` section of the
config (plus the shared values passed to it). Methods take this replica's share of a batch (see
``workers.dispatch``); their declarations say how the controller splits and collects.
"""

from __future__ import annotations

import torch

from megatron_gad import algos
from megatron_gad.config import ActorRolloutRefConfig
from megatron_gad.engine.generate import generate
from megatron_gad.engine.model_shard import ModelShard, megatron_kwargs
from megatron_gad.engine.weight_sync import export_buckets, stream_hf_weights
from megatron_gad.engine.weight_transport import ObjectStore
from megatron_gad.kernels.lm_head import hidden_head, lm_head_logprob, output_weight
from megatron_gad.metrics import reduce_metrics
from megatron_gad.parallel import state
from megatron_gad.workers.base import PhaseMemory, Worker
from megatron_gad.workers.dispatch import Dispatch, register
from megatron_gad.workers.micro_batches import (
    Batching,
    actor_micro_batches,
    group_rows,
    restore_order,
    row_lengths,
)


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
            return ModelShard("actor", path, **{**megatron_kwargs(m), **kw},
                              vocab_divisible_by=config.model.make_vocab_size_divisible_by)

        self.shard = shard(config.model.path, optim=config.actor.optim, total_steps=total_steps)
        if init_from:
            self.shard.load_weights(init_from)
        ref_attn = config.ref.megatron.attention_backend or m.attention_backend  # null: the actor's
        self.ref = (shard(init_from or config.model.path, trainable=False, attention_backend=ref_attn)
                    if config.actor.use_kl_loss else None)
        # between passes: the policy's state as actor.megatron.*_offload says; the frozen reference's
        # weights (it has nothing else) per ref.megatron.param_offload. A pass reloads what it needs.
        offloads = [(self.shard, dict(params=m.param_offload, grads=m.grad_offload, optimizer=m.optimizer_offload))]
        if self.ref is not None:
            offloads.append((self.ref, dict(params=config.ref.megatron.param_offload)))
        self.memory = PhaseMemory("actor", offloads)
        self.memory.settle()  # before the first rollout

    # ---------------------------------------------------------------- helpers
    def _token_logprob(self, shard: ModelShard, hidden: torch.Tensor, mb: dict, compute_entropy: bool,
                       temperature: float = 1.0):
        """Log-probs (and entropy) [b, R] of the response tokens of a packed micro-batch, from the final
        hidden states [1, T, H] (the model's output under ``hidden_head``). Only the positions that
        predict a response token go through the LM head, in vocabulary chunks with the temperature
        folded in (``kernels.lm_head``): no [T, V/TP] logits exist. Padding is 0.
        ``temperature``: log-probs of softmax(logits / T), the distribution the rollout samples."""
        idx = mb["resp_index"]
        valid = idx >= 0
        weight = output_weight(shard.module)  # [V/TP, H], this rank's vocabulary shard
        lp, ent = lm_head_logprob(
            hidden[0].index_select(0, idx[valid]), weight, mb["responses"][valid],
            state.tp_group() if self.layout.tp_size > 1 else None, vocab_start=self.layout.tp_rank * weight.shape[0],
            vocab_size=shard.arch.vocab_size, temperature=temperature,
            token_chunk=self.config.actor.logprob_chunk_size, compute_entropy=compute_entropy)

        def rows(flat):
            return None if flat is None else flat.new_zeros(idx.shape).masked_scatter(valid, flat)

        return rows(lp), rows(ent)

    def _groups(self, batch: dict, b: Batching, sync_count: bool) -> list[list[int]]:
        """Micro-batch rows; with ``sync_count`` every data-parallel replica runs as many micro-batches
        as the one that needs most (balanced work, and per-micro-batch metrics weigh the same)."""
        lengths = row_lengths(batch["prompt_mask"], batch["response_mask"])
        return self._equal_count(lambda k: group_rows(lengths, b, min_count=k), b.dynamic and sync_count)

    # ---------------------------------------------------------------- rollout
    @register(Dispatch.DP, collect="concat")
    def generate(self, batch: dict, seed: int, temperature: float | None = None, greedy: bool = False) -> dict:
        """batch: prompt_ids/prompt_mask [B, P] (one row per sample) -> responses/response_mask [B, R]
        and the sampled tokens' ``rollout_log_prob`` (R: this replica's longest response; the
        controller pads replicas to one width). With ``row_seed`` [B] in the batch (the controller's
        per-row keys, as the vLLM engines get them) a row's sample depends only on (seed, its key,
        the model), wherever it lands; without, rows are keyed by their index in this replica's share.
        All rows of the share may decode together: ``rollout.micro_batch_size`` bounds a bucket."""
        r = self.config.rollout
        keys = batch.get("row_seed")
        with self.memory.phase("generate"):
            self.shard.reload("params")
            return generate(self.shard, batch["prompt_ids"], batch["prompt_mask"],
                            max_new_tokens=self.max_response_length, eos_id=self.eos_id,
                            pad_id=self.pad_id, temperature=temperature or r.temperature, top_k=r.top_k,
                            top_p=r.top_p, greedy=greedy,
                            seed=seed if keys is not None else seed + 7919 * self.layout.dp_rank,
                            row_ids=keys, micro_batch_size=r.micro_batch_size)

    @register(Dispatch.ALL)
    def export_weights(self, bucket_mb: int) -> list[tuple]:
        """The policy's weights for a rollout engine, as (BucketInfo, payload) per bucket: HF-named
        full tensors from each pipeline stage's leader (TP rank 0 of replica 0; other ranks return
        nothing after taking part in their stage's TP gathers). Inside Ray a payload is an object
        reference (the engine fetches it directly), else the bucket itself (``engine.weight_sync``)."""
        lay = self.layout
        if lay.dp_rank != 0:  # every replica holds the same weights: replica 0 sends them
            return []
        with self.memory.phase("export_weights"):
            self.shard.reload("params")
            items = stream_hf_weights(self.shard.module, self.shard.arch,
                                      state.tp_group() if lay.tp_size > 1 else None, lay.tp_size, emit=lay.tp_rank == 0)
            packed = export_buckets(items, bucket_mb << 20, lay.pp_rank)
        payloads = ObjectStore().send([bucket for _, bucket in packed])  # engine/weight_transport.py
        return list(zip([info for info, _ in packed], payloads))

    # ---------------------------------------------------------------- log-probs
    def _log_prob(self, shard: ModelShard, batch: dict, b: Batching) -> dict:
        temperature = self.config.rollout.temperature

        def loss_fn(hidden, mb):
            lp, _ = self._token_logprob(shard, hidden, mb, compute_entropy=False, temperature=temperature)
            return lp.sum() * 0, {"log_prob": lp}

        groups = self._groups(batch, b, sync_count=False)
        with hidden_head(shard.module):
            res = shard.forward(actor_micro_batches(batch, groups, pad_id=self.pad_id), loss_fn)
        if not res:  # not the last pipeline stage: nothing to return
            return {"log_prob": None}
        lp = restore_order([r["log_prob"] for r in res], groups, batch["prompt_ids"].shape[0])
        return {"log_prob": lp.cpu()}

    @register(Dispatch.DP, collect="concat")
    def compute_log_prob(self, batch: dict) -> dict:
        """Per-token log-probs [B, R] of the responses under the current policy (the PPO 'old')."""
        r = self.config.rollout
        with self.memory.phase("log_prob"):
            return self._log_prob(self.shard, batch, Batching(r.log_prob_micro_batch_size_per_gpu,
                                                              r.log_prob_use_dynamic_bsz,
                                                              r.log_prob_max_token_len_per_gpu))

    @register(Dispatch.DP, collect="concat")
    def compute_ref_log_prob(self, batch: dict) -> dict:
        if self.ref is None:
            raise RuntimeError("no reference model: set actor_rollout_ref.actor.use_kl_loss=true")
        r = self.config.ref
        with self.memory.phase("ref_log_prob"):
            return self._log_prob(self.ref, batch, Batching(r.log_prob_micro_batch_size_per_gpu,
                                                            r.log_prob_use_dynamic_bsz,
                                                            r.log_prob_max_token_len_per_gpu))

    # ---------------------------------------------------------------- updates
    @register(Dispatch.DP, collect="mean_concat")
    def update_actor(self, batch: dict, num_mini_batches: int, on_policy: bool = False,
                     rollout_is: tuple[str, float] | None = None) -> dict:
        """PPO-clip on GRPO advantages (+ optional KL to the reference), ppo_epochs x mini-batches.
        ``on_policy`` (one epoch, one mini-batch: the policy at the update's forward is the one the
        old log-probs would be computed with): no ``old_log_prob`` in the batch; the update's own
        log-probs, detached, stand in for them (verl's on-policy shortcut), ``rollout_is`` = (level,
        threshold) weights are computed from them per micro-batch (they are per row), and the
        result carries them as ``log_prob`` [B, R] (the controller's ``rollout/logprob_diff_*``)."""
        a = self.config.actor
        policy_loss = algos.get_policy_loss(a.policy_loss)
        kl_fn = algos.get_kl_penalty(a.kl_loss_type) if a.use_kl_loss else None
        if on_policy and (a.ppo_epochs != 1 or num_mini_batches != 1):
            raise ValueError(f"on_policy needs one epoch and one mini-batch, got ppo_epochs={a.ppo_epochs}, "
                             f"{num_mini_batches} mini-batches")
        temperature = self.config.rollout.temperature
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # on-policy: (rows, log-probs) per micro-batch

        def loss_fn(hidden, mb):
            lp, ent = self._token_logprob(self.shard, hidden, mb, compute_entropy=a.entropy_coeff > 0,
                                          temperature=temperature)
            mask, agg = mb["response_mask"], mb["agg"]  # agg: this mini-batch's global denominators
            old, is_weights = mb.get("old_log_prob"), mb.get("rollout_is_weights")
            if on_policy:
                old = lp.detach()
                kept.append((mb["rows"], old.cpu()))
                if rollout_is is not None:
                    is_weights, _ = algos.rollout_is_weights(old, mb["rollout_log_prob"].to(old.device), mask,
                                                             *rollout_is)
            loss, m = policy_loss(old, lp, mb["advantages"], mask,
                                  clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
                                  clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode,
                                  is_weights=is_weights, **agg)
            out = {f"actor/{k}": float(v) for k, v in m.items()}
            out["actor/pg_loss"] = float(loss) * mb.get("metric_scale", mb["share_scale"])
            if kl_fn is not None:
                kl = algos.agg_loss(kl_fn(lp, mb["ref_log_prob"]), mask, a.loss_agg_mode, **agg)
                loss = loss + a.kl_loss_coef * kl
                out["actor/kl"] = float(kl) * mb["share_scale"]
            if ent is not None:
                e = algos.agg_loss(ent, mask, a.loss_agg_mode, **agg)
                loss = loss - a.entropy_coeff * e
                out["actor/entropy"] = float(e) * mb["share_scale"]
            return loss * mb["share_scale"], out

        extra = (["rollout_log_prob"] if rollout_is else []) if on_policy else ["old_log_prob"]
        extra += ["advantages"] + (["ref_log_prob"] if kl_fn else [])
        extra += ["rollout_is_weights"] if "rollout_is_weights" in batch else []
        sft = self._sft_companion(batch)  # actor.sft_loss_coef: teacher rows ride along (sft_* keys)
        with self.memory.phase("update"):
            out = self._train(batch, extra, loss_fn, num_mini_batches, a.ppo_epochs, sft)
        if on_policy and kept:  # the last pipeline stage: every row's log-probs, in the batch's order
            lp = torch.zeros(batch["responses"].shape, dtype=kept[0][1].dtype)
            for rows, x in kept:
                lp[rows] = x
            out["log_prob"] = lp
        return out

    def _sft_companion(self, batch: dict):
        """``actor.sft_loss_coef`` > 0: the step's teacher responses (``sft_*`` keys of ``batch``, one row
        per prompt, removed from it) and the loss they add to every policy mini-batch: coef x their
        token-mean NLL (T = 1, as ``sft_step``), in the same optimizer step as the policy loss."""
        rows = {k[4:]: batch.pop(k) for k in [k for k in batch if k.startswith("sft_")]}
        coef = self.config.actor.sft_loss_coef
        if not rows or coef == 0:
            return None
        a = self.config.actor

        def loss_fn(hidden, mb):
            lp, _ = self._token_logprob(self.shard, hidden, mb, compute_entropy=False)
            loss, _ = algos.sft_loss(lp, mb["response_mask"], a.loss_agg_mode, **mb["agg"])
            return coef * loss * mb["share_scale"], {"actor/sft_mix_loss": float(loss) * mb["metric_scale"]}

        return rows, loss_fn

    @register(Dispatch.DP, collect="mean")
    def sft_step(self, batch: dict) -> dict:
        """Cross-entropy on the teacher responses (the paper's warmup for the generator)."""
        a = self.config.actor

        def loss_fn(hidden, mb):
            lp, _ = self._token_logprob(self.shard, hidden, mb, compute_entropy=False)
            loss, _ = algos.sft_loss(lp, mb["response_mask"], a.loss_agg_mode, **mb["agg"])
            return loss * mb["share_scale"], {"actor/sft_loss": float(loss) * mb["share_scale"]}

        b = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
             "responses": batch["teacher_response"], "response_mask": batch["teacher_response_mask"]}
        with self.memory.phase("sft"):
            return self._train(b, [], loss_fn, 1, 1)

    def _train(self, batch, extra, loss_fn, num_mini_batches, epochs, companion=None) -> dict:
        """``epochs`` x mini-batches, one optimizer step each. A micro-batch's loss is its exact share
        of the mini-batch loss (``agg_loss`` with the mini-batch's denominator summed over every
        micro-batch and data-parallel replica), times ``share_scale`` = micro-batches x replicas,
        which undoes Megatron's mean over micro-batches and DDP's mean over replicas: the gradient is
        that of the whole mini-batch at once, whatever the micro-batching (token-mean weighs every
        token equally, not every micro-batch). ``companion``: (rows, loss_fn) of a second loss split into
        the same number of mini-batches, whose micro-batches join each policy mini-batch's optimizer step
        (``_sft_companion``); each loss keeps its own denominator."""
        a = self.config.actor
        b = Batching(a.ppo_micro_batch_size_per_gpu, a.use_dynamic_bsz, a.ppo_max_token_len_per_gpu)
        rows = batch["prompt_ids"].shape[0]
        mini = -(-rows // num_mini_batches)
        metrics: list[dict] = []
        skipped = 0
        for _ in range(epochs):
            for i in range(0, rows, mini):
                part = {k: v[i:i + mini] for k, v in batch.items()}
                groups = self._groups(part, b, sync_count=True)
                denom = algos.agg_denominator(part["response_mask"], a.loss_agg_mode, self.max_response_length)
                agg = {"denominator": state.all_reduce_dp([denom])[0], "horizon": self.max_response_length}
                mbs = actor_micro_batches(part, groups, tuple(extra), pad_id=self.pad_id)
                for mb in mbs:
                    mb["agg"], mb["share_scale"] = agg, float(len(mbs) * self.layout.dp_size)
                fn = loss_fn
                if companion is not None:
                    mbs, fn = self._with_companion(mbs, loss_fn, companion, i // mini, num_mini_batches, b)
                with hidden_head(self.shard.module):  # loss_fn gets hidden states, applies the head itself
                    results, info = self.shard.train_step(mbs, fn)
                skipped += int(info["nonfinite"])
                metrics += [dict(r) for r in results]
                metrics.append({"actor/grad_norm": info["grad_norm"], "actor/lr": info["lr"]})
        out = reduce_metrics(metrics)
        out["actor/nonfinite_updates"] = float(skipped)  # optimizer updates skipped (non-finite loss/grad)
        out["actor/optimizer_state_bytes"] = float(self.shard.optimizer_state_bytes())
        return out

    def _with_companion(self, mbs, loss_fn, companion, index, count, b):
        """Mini-batch ``index`` of ``count``: the policy's micro-batches plus the companion rows' share,
        every micro-batch scaled by the joint count (Megatron averages over all of them), each loss's
        metric by its own count (so it reads as that loss)."""
        rows, extra_fn = companion
        n = rows["prompt_ids"].shape[0]
        step = -(-n // count)
        part = {k: v[index * step:(index + 1) * step] for k, v in rows.items()}
        groups = self._groups(part, b, sync_count=True)
        denom = algos.agg_denominator(part["response_mask"], self.config.actor.loss_agg_mode, self.max_response_length)
        agg = {"denominator": state.all_reduce_dp([denom])[0], "horizon": self.max_response_length}
        more = actor_micro_batches(part, groups, (), pad_id=self.pad_id)
        dp = self.layout.dp_size
        for mb in mbs:
            mb["metric_scale"] = float(len(mbs) * dp)
        for mb in more:
            mb["agg"], mb["metric_scale"], mb["companion"] = agg, float(len(more) * dp), True
        for mb in mbs + more:
            mb["share_scale"] = float((len(mbs) + len(more)) * dp)
        return mbs + more, lambda hidden, mb: (extra_fn if mb.get("companion") else loss_fn)(hidden, mb)
