"""The single-controller GAD loop (reads top to bottom: one global step is ``_step``).

Step order (the spec): rollout -> reward (= critic scores of the student samples) ->
old log-probs -> reference log-probs (KL on) -> GRPO advantages -> update critic (every
step) -> update actor (GAD steps only). During a *frozen* warmup the actor only samples: no
reward pass, no old/ref log-prob passes, no backward and no optimizer state (allocated lazily at
the first real update). A *sft* warmup trains the actor on the teacher responses instead.

Rollout engine (``actor_rollout_ref.rollout.name``): the actor's own Megatron model (nothing to
sync), or vLLM engines in their own workers (``workers/rollout.py``), whose weights are synced
from the actor (``engine/weight_sync.py``) right after every step that changed them — so a frozen
warmup syncs nothing — plus once at start when the engines cannot load the starting weights
themselves (a Megatron checkpoint, ``init_actor_from``, a resumed run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

import torch

from megatron_gad import algos
from megatron_gad import checkpoint as ckpt
from megatron_gad.config import GADConfig, actor_dp, critic_dp, critic_model_path, dump_yaml, to_dict
from megatron_gad.controller import levers
from megatron_gad.controller.evaluation import TrainerEvaluation
from megatron_gad.controller.samples import sample_rows, teacher_rows
from megatron_gad.controller.saturation import SaturationGuard
from megatron_gad.controller.step_plan import lean_passes, rollout_checks, split_scores, update_actor
from megatron_gad.controller.verifier import HybridReward, verifier_row_keys
from megatron_gad.controller.warmup import WarmupSchedule
from megatron_gad.data import GADDataset, PromptLoader, collate_prompts
from megatron_gad.errors import RunFailure
from megatron_gad.metrics import MetricsLogger, Timer, fullest_rank, reduce_metrics

log = logging.getLogger("megatron_gad")


# Exit code of `train` after it saved a checkpoint because SIGUSR1 asked it to (SLURM's warning before the
# time limit); the rendered sbatch script requeues the job on it (EX_TEMPFAIL: "try again later").
SAVED_ON_SIGNAL_EXIT = 75


class NonFiniteError(RunFailure, RuntimeError):
    """A role's loss or gradient stayed non-finite for trainer.max_nonfinite_steps steps in a row."""


def _use_gpu(cfg: GADConfig) -> bool:
    if cfg.trainer.device == "auto":
        return torch.cuda.is_available()
    return cfg.trainer.device == "cuda"


def rollout_engine(cfg: GADConfig) -> str:
    """"vllm" or "megatron": ``rollout.name``, with ``auto`` = vLLM on GPUs where it imports (a clear
    error when vllm is asked for and cannot run here)."""
    from megatron_gad.engine.vllm_engine import vllm_unavailable_reason
    from megatron_gad.errors import InputError

    name = cfg.actor_rollout_ref.rollout.name
    if name == "megatron" or (name == "auto" and (not _use_gpu(cfg) or cfg.trainer.workers == "local")):
        return "megatron"
    reason = vllm_unavailable_reason()
    if reason is None:
        return "vllm"
    if name == "auto":
        log.warning("rollout.name=auto: sampling with the native Megatron engine (%s)", reason)
        return "megatron"
    raise InputError(f"actor_rollout_ref.rollout.name=vllm: {reason}; or set actor_rollout_ref.rollout.name=megatron")


class GADTrainer(TrainerEvaluation):
    def __init__(self, cfg: GADConfig):
        from megatron_gad.tokenizer import load_tokenizer

        self.cfg = cfg
        t, d = cfg.trainer, cfg.data
        self.rollout_name = rollout_engine(cfg)
        self.run_dir = t.default_local_dir
        os.makedirs(self.run_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(self.run_dir, "config.resolved.yaml"))

        self.tokenizer = load_tokenizer(cfg.actor_rollout_ref.model.path)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        cache = (d.cache_dir or os.path.join(t.default_local_dir, ".cache", "data")) if d.use_cache else None
        data_args = (self.tokenizer, d.prompt_key, d.teacher_response_key, d.max_prompt_length,
                     d.max_response_length, d.on_bad_row)
        data_kw = {"cache_dir": cache, "num_workers": d.tokenize_workers, "truncation": d.truncation}
        verifier_keys = verifier_row_keys(cfg)  # () without a verifier: the dataset keeps no raw fields
        self.dataset = GADDataset(d.train_files, *data_args, verifier_keys, **data_kw)
        self.hybrid = HybridReward(cfg, self.dataset.rows) if verifier_keys else None  # verifier mix
        self.loader = PromptLoader(self.dataset, d.train_batch_size, d.shuffle, d.seed)
        self.val_dataset = GADDataset(d.val_files, *data_args, **data_kw) if d.val_files and t.test_freq > 0 else None
        self.total_steps = t.total_training_steps or len(self.loader) * t.total_epochs
        self.n = cfg.actor_rollout_ref.rollout.n
        self.warmup = WarmupSchedule(t.critic_warmup, t.warmup.until_d_acc, t.warmup.patience, t.warmup.max_steps,
                                     t.warmup.critic_only_steps)
        g = cfg.critic.saturation_guard
        self.guard = SaturationGuard(g.enable, g.upper, g.lower, g.window, g.action, g.lr_scale, g.extra_steps)
        self.step = 0
        self.phases: list[str] = []
        self.nonfinite = {"actor": 0, "critic": 0}  # steps with a skipped (non-finite) update, per role
        self.nonfinite_run = {"actor": 0, "critic": 0}  # ... of them in a row, up to this step
        self.syncs = {"weight_syncs": 0, "initial_syncs": 0}  # Megatron -> vLLM weight syncs so far

        world_actor = actor_dp(cfg) * cfg.actor_rollout_ref.actor.megatron.tensor_model_parallel_size \
            * cfg.actor_rollout_ref.actor.megatron.pipeline_model_parallel_size
        world_critic = critic_dp(cfg) * cfg.critic.megatron.tensor_model_parallel_size \
            * cfg.critic.megatron.pipeline_model_parallel_size
        log.info("starting %d actor ranks and %d critic ranks (%s, %s workers; %s rollout)", world_actor,
                 world_critic, t.placement, t.workers, self.rollout_name)
        group = self._local_group if t.workers == "local" else self._ray_group_factory(world_actor, world_critic)
        # Each worker gets its own role's section plus the few shared values, named explicitly.
        arr = cfg.actor_rollout_ref
        self.actor = group("actor", world_actor, dict(
            config=arr, max_response_length=d.max_response_length, total_steps=self.total_steps,
            eos_id=self.eos_id, pad_id=self.pad_id, init_from=t.init_actor_from))
        self.critic = None
        if t.mode == "gad":
            self.critic = group("critic", world_critic, dict(
                config=cfg.critic, model_path=critic_model_path(cfg), total_steps=self.total_steps,
                vocab_divisible_by=arr.model.make_vocab_size_divisible_by, init_from=t.init_critic_from,
                eos_id=self.eos_id))
        self.vllm = None  # the vLLM engines' worker group (rollout.name=vllm)
        self.vllm_stale = False  # the engines' weights differ from the actor's (a sync is due)
        if self.rollout_name == "vllm" and t.mode == "gad":
            self.vllm, self.vllm_stale = self._start_vllm(group, world_actor)
        self.logger = None

    def _start_vllm(self, group, world_actor: int):
        """One vLLM engine per ``rollout.tensor_model_parallel_size`` actor ranks. They load an HF
        model path themselves; from a Megatron checkpoint (or with ``init_actor_from``) they start with
        placeholder weights and take the actor's by the initial sync."""
        from megatron_gad import checkpoint as ckpt_mod

        cfg, arr = self.cfg, self.cfg.actor_rollout_ref
        path = arr.model.path
        own_weights = not ckpt_mod.is_megatron_checkpoint(path) and not cfg.trainer.init_actor_from
        d = cfg.data
        engines = max(1, world_actor // arr.rollout.tensor_model_parallel_size)
        engines_group = group("rollout", engines, dict(
            config=arr.rollout, model_dir=path, load_weights=own_weights,
            max_model_len=d.max_prompt_length + d.max_response_length, max_response_length=d.max_response_length,
            eos_id=self.eos_id, pad_id=self.pad_id, dtype=arr.actor.megatron.params_dtype, seed=cfg.trainer.seed))
        return engines_group, not own_weights

    @staticmethod
    def _local_group(role: str, world: int, worker_kwargs: dict):
        """trainer.workers=local: the role's one rank in this process (no Ray; world size 1)."""
        from megatron_gad.controller.local_group import LocalWorkerGroup

        if world != 1:
            raise ValueError(f"trainer.workers=local hosts one rank per role, but the {role} has {world}")
        return LocalWorkerGroup(role, worker_kwargs)

    def _ray_group_factory(self, world_actor: int, world_critic: int):
        """trainer.workers=ray: each role's ranks as Ray processes (placement on GPUs)."""
        from megatron_gad.controller.faults import init_ray
        from megatron_gad.controller.worker_group import WorkerGroup

        cfg = self.cfg
        init_ray(cfg.ray.address, cfg.ray.num_cpus)  # a failure to start Ray is one line, exit 3
        gpu = _use_gpu(cfg)
        pg, actor_bundles, critic_bundles, frac = self._placement(gpu, world_actor, world_critic)

        started: list[WorkerGroup] = []

        def group(role: str, world: int, worker_kwargs: dict):
            if role == "rollout":  # engines share the actor's bundles (one engine per actor GPU)
                from megatron_gad.engine.vllm_engine import worker_env as vllm_env

                return WorkerGroup(role, world, worker_kwargs, gpu, pg, actor_bundles, frac, extra_env=vllm_env())
            bundles = actor_bundles if role == "actor" else critic_bundles
            try:
                started.append(WorkerGroup(role, world, worker_kwargs, gpu, pg, bundles, frac))
            except BaseException:
                for g in started:  # a role that fails to start leaves no processes of the other behind
                    g.shutdown()
                raise
            return started[-1]

        return group

    def _placement(self, gpu: bool, world_actor: int, world_critic: int):
        """GPU bundles: colocated roles share each GPU (half each); split gives each its own GPUs.
        Returns the placement group, each role's bundle per rank and the GPU fraction per rank."""
        if not gpu:
            return None, None, None, 1.0
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        from megatron_gad.controller.placement import BUNDLE, placement_request, rank_bundles

        req = placement_request(world_actor, world_critic, self.cfg.trainer.placement == "colocate",
                                self.cfg.trainer.mode == "gad", self.rollout_name == "vllm")
        pg = placement_group([dict(BUNDLE)] * req.bundles, strategy="PACK")
        ray.get(pg.ready())
        # PACK numbers bundles in no node order: map ranks node by node so TP groups stay on one node
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        tp_actor = self.cfg.actor_rollout_ref.actor.megatron.tensor_model_parallel_size
        tp_critic = self.cfg.critic.megatron.tensor_model_parallel_size
        actor = rank_bundles(nodes, world_actor, tp_actor, req.actor_start, "actor")
        critic = rank_bundles(nodes, world_critic, tp_critic, req.critic_start, "critic") \
            if req.critic_start is not None else None
        return pg, actor, critic, req.gpu_fraction

    # ------------------------------------------------------------------ one global step
    @contextlib.contextmanager
    def _phase(self, timer: Timer, name: str):
        """Time a phase and record the order (``self.phases``: this step's phases, for tests/debug)."""
        self.phases.append(name)
        with timer(name):
            yield

    def _sft_step(self, batch: dict, timer: Timer) -> dict:
        with self._phase(timer, "sft"):
            return dict(self.actor.sft_step(batch), stage="sft")

    def _step(self, batch: dict, timer: Timer) -> dict:
        cfg, n = self.cfg, self.n
        if cfg.trainer.mode == "sft":
            return self._sft_step(batch, timer)
        warm = self.warmup.active()
        stage = "warmup" if warm else "gad"
        metrics: dict = {"stage": stage}
        B = batch["prompt_ids"].shape[0]
        gad_step = not warm
        joint = warm and cfg.trainer.warmup.mode == "sft" and self.warmup.sft_due()  # SFT beside the critic
        with self._phase(timer, "gen"):  # rollout: n samples per prompt
            student = self._rollout(batch, n, seed=cfg.trainer.seed * 1_000_003 + self.step,
                                    sync_follows=gad_step or joint)
        metrics.update(self._length_metrics(student, "response_length/"))

        lean = lean_passes(cfg, B)  # which passes this step can take from another's forward
        scores = None  # the critic's scores before its update, when its update provides them
        if lean.rewards_from_update:  # critic first: its update's forward gives the rewards
            with self._phase(timer, "update_critic"):
                pairs, m = levers.critic_pairs(self, self._pairs(batch, student))  # + critic.replay
                metrics.update(m)
                critic_m, scores = split_scores(self._update_critic(pairs, gad_step, True))
            metrics.update(critic_m)
        if gad_step:
            # D(student), before this step's critic update: a pass of its own, or read from the update
            phase = "reward" if scores is None else "verifier" if self.hybrid is not None else None
            with self._phase(timer, phase) if phase else contextlib.nullcontext():
                d_scores = scores["student_scores"].reshape(-1) if scores is not None else \
                    self.critic.compute_scores(student)["scores"]
                teacher = scores["teacher_scores"].reshape(-1) if scores is not None else None
                # reward.critic_shape / critic_weight (sigmoid_gap: the teachers scored by the same critic)
                rewards, m = levers.critic_reward(self, batch, d_scores, teacher)
                metrics.update(m)
                if self.hybrid is not None:  # + the verifier's score (custom_reward_function)
                    texts = [self.decode(i, m) for i, m in zip(student["responses"], student["response_mask"])]
                    rewards, m = self.hybrid(batch["index"].tolist(), texts, rewards, n)
                    metrics.update(m)
            if not lean.on_policy:
                with self._phase(timer, "old_log_prob"):
                    student["old_log_prob"] = self.actor.compute_log_prob(student)["log_prob"]
                metrics.update(rollout_checks(cfg, student, student["old_log_prob"]))
            if cfg.actor_rollout_ref.actor.use_kl_loss:
                with self._phase(timer, "ref"):
                    student["ref_log_prob"] = self.actor.compute_ref_log_prob(student)["log_prob"]
            with self._phase(timer, "adv"):
                est = algos.get_adv_estimator(cfg.algorithm.adv_estimator)
                grpo = cfg.algorithm.adv_estimator == "grpo"
                kw = {"norm_by_std": cfg.algorithm.norm_adv_by_std_in_grpo,
                      "std_floor": cfg.algorithm.grpo_std_floor} if grpo else {}
                student["advantages"], _ = est(rewards, student["response_mask"], n, **kw)
            metrics.update({"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()})

        if self._sample_step():  # the per-sample view, scored by the critic before its update
            self._log_samples(batch, student, d_scores if gad_step else None, scores)
        if not lean.rewards_from_update:
            with self._phase(timer, "update_critic"):  # every step: teacher vs student pairs
                pairs, m = levers.critic_pairs(self, self._pairs(batch, student))  # + critic.replay
                metrics.update(m)
                metrics.update(self._update_critic(pairs, gad_step))

        if gad_step:
            with self._phase(timer, "update_actor"):
                update, prompts, m = levers.actor_batch(self, batch, student, rewards)  # filter_groups, SFT mix
                metrics.update(m)
                if prompts:
                    num_mini = max(1, prompts // cfg.actor_rollout_ref.actor.ppo_mini_batch_size)
                    metrics.update(update_actor(self.actor, cfg, update, num_mini, lean.on_policy))
        elif joint:
            with self._phase(timer, "sft"):
                metrics.update(self.actor.sft_step(batch))
        if self.vllm is not None and (gad_step or joint):
            with self._phase(timer, "weight_sync"):  # the actor changed: the engines follow now
                metrics.update(self.sync_rollout())
        metrics.update({f"rollout/{k}": float(v) for k, v in self.syncs.items()})

        if warm:
            self.warmup.observe(metrics["critic/d_acc"])
            if self.warmup.done:
                metrics["warmup/ended_at_step"] = float(self.warmup.ended_at)
        metrics["actor/optimizer_state_bytes"] = float(sum(self.actor.optimizer_state_bytes()))
        metrics.update(fullest_rank(self.actor.memory_metrics()))  # memory/actor/<phase>_bytes of this step
        return metrics

    def _rollout(self, batch: dict, n: int, seed: int, sync_follows: bool = False, **sampling) -> dict:
        """n samples per prompt from the rollout engine; rows i*n .. i*n+n-1 belong to prompt i.
        Also ``rollout_log_prob``: each sampled token's log-prob as the engine computed it.
        ``sync_follows``: the actor changes this step (vLLM engines may drop their weights at sleep)."""
        gen_in = {"prompt_ids": batch["prompt_ids"].repeat_interleave(n, 0),
                  "prompt_mask": batch["prompt_mask"].repeat_interleave(n, 0)}
        if self.vllm is not None:
            if self.vllm_stale:
                self.sync_rollout(initial=True)
            rows = gen_in["prompt_ids"].shape[0]
            out = self.vllm.generate(dict(gen_in, row_seed=torch.arange(rows) * 1_000_003), seed=seed,
                                     sync_follows=sync_follows, **sampling)
        else:
            out = self.actor.generate(gen_in, seed=seed, **sampling)
        # replicas' responses are merged right-padded with 0; padding carries pad_id everywhere
        responses = out["responses"].masked_fill(out["response_mask"] == 0, self.pad_id)
        return dict(gen_in, responses=responses, response_mask=out["response_mask"],
                    rollout_log_prob=out["rollout_log_prob"])

    def sync_rollout(self, initial: bool = False) -> dict:
        """Send the actor's weights to every vLLM engine (``engine/weight_sync.py``). ``initial``: the
        engines never had the actor's weights (counted apart from syncs after updates)."""
        parts = self.actor.export_weights(self.cfg.actor_rollout_ref.rollout.weight_sync_bucket_mb)
        manifest = [info for rank in parts for info, _ in rank]
        payloads = [p for rank in parts for _, p in rank]
        results = self.vllm.update_weights(manifest, payloads)
        self.vllm_stale = False
        self.syncs["initial_syncs" if initial else "weight_syncs"] += 1
        return {"rollout/weight_sync_bytes": float(results[0]["bytes"]),
                "rollout/weight_sync_load_s": max(r["seconds"] for r in results)}

    def _update_critic(self, pairs: dict, gad_step: bool, scores: bool = False) -> dict:
        """The critic's update, as the saturation guard decides in GAD steps: skipped (the pairs are
        only evaluated, so d_acc keeps being measured), at a scaled lr, or with extra updates.
        ``scores``: the result also holds the critic's scores before this update (``split_scores``)."""
        n = self.n
        if not gad_step:  # warmup: always a plain update; the guard sees GAD steps only
            return self.critic.update_critic(pairs, n, return_scores=scores)
        d = self.guard.decide()
        if d["update"]:
            m = self.critic.update_critic(pairs, n, d["lr_scale"], return_scores=scores)
            for _ in range(d["extra_steps"]):
                extra = self.critic.update_critic(pairs, n)
                m["critic/nonfinite_updates"] += extra["critic/nonfinite_updates"]
        else:
            m = {k.replace("val/", "critic/", 1): v
                 for k, v in self.critic.evaluate_pairs(pairs, n, return_scores=scores).items()}
            m["critic/nonfinite_updates"] = 0.0
        self.guard.observe(m["critic/d_acc"])
        if self.guard.enable:
            rolling = self.guard.rolling()
            m.update({"critic/update_skipped": float(not d["update"]), "critic/lr_scale": d["lr_scale"],
                      "critic/extra_steps": float(d["extra_steps"])})
            if rolling is not None:
                m["critic/d_acc_rolling"] = rolling
        return m

    def _sample_step(self) -> bool:
        f = self.cfg.trainer.sample_log_freq
        return f > 0 and getattr(self, "logger", None) is not None and (self.step + 1) % f == 0

    def _log_samples(self, batch: dict, student: dict, rewards: torch.Tensor | None, scores: dict | None) -> None:
        """``samples.jsonl`` (``controller/samples.py``), scored by the critic in the same state for both
        sides: before this step's update (``scores``: read from its update's forward, when it ran first)."""
        if scores is not None:
            t_scores, s_scores = scores["teacher_scores"], scores["student_scores"].reshape(-1)
            s_scores = rewards if rewards is not None else s_scores
        else:
            t_scores = self.critic.compute_scores(teacher_rows(batch), side="teacher")["scores"]
            s_scores = rewards if rewards is not None else self.critic.compute_scores(student)["scores"]
        decode_prompt = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        self.logger.log_samples(self.step + 1, sample_rows(batch, student, self.n, t_scores, s_scores, self.decode,
                                                           decode_prompt, self.eos_id))

    def _length_metrics(self, student: dict, prefix: str) -> dict:
        lengths = student["response_mask"].sum(-1).float()
        ends_eos = (student["responses"] == self.eos_id).any(-1)
        return {prefix + "mean": lengths.mean().item(), prefix + "max": lengths.max().item(),
                prefix + "clip_ratio": (~ends_eos).float().mean().item()}

    def _pairs(self, batch: dict, student: dict) -> dict:
        """The critic's input: prompts, teacher responses and the students as [B, n, R] so a
        prompt's n samples stay with it through the data-parallel split."""
        B, R = batch["prompt_ids"].shape[0], student["responses"].shape[1]
        return {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
                "teacher_response": batch["teacher_response"], "teacher_response_mask": batch["teacher_response_mask"],
                "responses": student["responses"].view(B, self.n, R),
                "response_mask": student["response_mask"].view(B, self.n, R)}

    def validate(self) -> dict:
        """Held-out metrics on ``data.val_files``: critic accuracy/loss on fresh student samples
        (no update) and response lengths. Deterministic: fixed order and seeds."""
        if self.val_dataset is None or self.critic is None:
            return {}
        bs = self.cfg.data.train_batch_size
        items = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        results = []
        for k in range(0, len(items), bs):
            chunk = items[k:k + bs]
            if len(chunk) % self.critic.dp_size or (len(chunk) * self.n) % self.actor.dp_size:
                break  # a ragged tail that cannot be split over the replicas is left out
            batch = collate_prompts(chunk, self.pad_id)
            student = self._rollout(batch, self.n, seed=self.cfg.trainer.seed * 7_000_003 + k)
            m = self.critic.evaluate_pairs(self._pairs(batch, student), self.n)
            m.update(self._length_metrics(student, "val/response_length/"))
            results.append(m)
        return reduce_metrics(results)

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        t = self.cfg.trainer
        resumed = self._maybe_resume()
        self.logger = MetricsLogger(self.run_dir, loggers=_loggers(t.logger), project=t.project_name,
                                    experiment=t.experiment_name, config_dict=to_dict(self.cfg),
                                    total_steps=self.total_steps, resume_step=self.step if resumed else None)
        if t.val_before_train and t.test_freq > 0 and self.step == 0:  # the starting point, as step 0
            self.logger.log(0, self.validate())
        timer = Timer()
        # SIGUSR1 (sent by the sbatch script before the time limit) only sets a flag: the step in flight
        # finishes, then the loop saves and stops. Signal handlers can only be set in the main thread.
        self.stop_signal = None
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(self, "stop_signal", signum))
        try:
            while self.step < self.total_steps:
                self._call_context(self.step + 1)  # a failed worker call names this step (and its save)
                timer.start_step()
                self.phases = []
                items = next(self.loader)
                batch = collate_prompts(items, self.pad_id)
                metrics = self._step(batch, timer)
                self.step += 1
                metrics["epoch"] = self.loader.epoch
                stop = self._count_nonfinite(metrics)
                if stop:
                    metrics.update(timer.collect())
                    self.logger.log(self.step, metrics)
                    log.error("%s", stop)
                    raise NonFiniteError(stop)
                if t.test_freq > 0 and (self.step % t.test_freq == 0 or self.step == self.total_steps):
                    with self._phase(timer, "validate"):
                        metrics.update(self.validate())
                saved = (t.save_freq > 0 and self.step % t.save_freq == 0) or self.step == self.total_steps
                if saved:
                    with self._phase(timer, "save"):
                        self.save()
                metrics.update(levers.keep_best(self, metrics, saved))  # trainer.best_checkpoint
                if self.stop_signal is not None and not (t.save_freq > 0 and self.step % t.save_freq == 0) \
                        and self.step != self.total_steps:
                    with self._phase(timer, "save"):
                        self.save()  # not already saved at this step above
                metrics.update(timer.collect())
                self.logger.log(self.step, metrics)
                if self.stop_signal is not None:
                    log.warning("signal %d: saved the checkpoint of step %d; stopping (resume with "
                                "trainer.resume_mode=auto)", self.stop_signal, self.step)
                    break
        finally:
            if previous is not None:
                signal.signal(signal.SIGUSR1, previous)
            self.logger.close()

    def _count_nonfinite(self, metrics: dict) -> str | None:
        """Count this step's skipped (non-finite) updates per role into ``<role>/nonfinite_steps``
        (cumulative); return the stop message once a role had trainer.max_nonfinite_steps in a row."""
        limit = self.cfg.trainer.max_nonfinite_steps
        for role in ("actor", "critic"):
            key = f"{role}/nonfinite_updates"
            if key in metrics:  # the role updated this step (a frozen warmup actor does not)
                if metrics[key] > 0:
                    self.nonfinite[role] += 1
                    self.nonfinite_run[role] += 1
                else:
                    self.nonfinite_run[role] = 0
            metrics[f"{role}/nonfinite_steps"] = float(self.nonfinite[role])
        for role, run in self.nonfinite_run.items():
            if run >= limit:
                first = self.step - run + 1
                return (f"stopping at step {self.step}: the {role}'s loss or gradient was non-finite (NaN/Inf) in "
                        f"{run} consecutive steps ({first}..{self.step}; trainer.max_nonfinite_steps={limit}). Those "
                        f"updates were skipped, so its weights are still those before step {first}. Lower the "
                        f"{role}'s learning rate or check the data, then resume from the last checkpoint "
                        f"(trainer.resume_mode=auto).")
        return None

    def _call_context(self, step: int) -> None:
        for group in (self.actor, self.critic):
            if group is not None:
                group.context.update(step=step, run_dir=self.run_dir)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Write ``global_step_<N>`` complete under a temporary name, rename it into place, then move
        ``latest`` to it and prune old checkpoints: ``latest`` never names a partial checkpoint, and a
        failed save (e.g. a full disk) leaves the previous checkpoint and ``latest`` as they were."""
        path = os.path.join(self.run_dir, f"global_step_{self.step}")
        extra = {"step": self.step}
        state = {"step": self.step, "loader": self.loader.state_dict(), "warmup": self.warmup.state_dict(),
                 "saturation_guard": self.guard.state_dict(),
                 "hacking_monitor": self.hybrid.monitor.state_dict() if self.hybrid else None,
                 "nonfinite": dict(self.nonfinite), "nonfinite_run": dict(self.nonfinite_run),
                 "syncs": dict(self.syncs)}

        def write(tmp: str) -> None:
            self.actor.save(os.path.join(tmp, "actor"), extra)
            if self.critic is not None:
                self.critic.save(os.path.join(tmp, "critic"), extra)
            ckpt.write_json_atomic(os.path.join(tmp, ckpt.TRAINER_STATE), state)

        ckpt.save_run_checkpoint(self.run_dir, self.step, write)
        t = self.cfg.trainer
        ckpt.prune_run_checkpoints(self.run_dir, {"actor": t.max_actor_ckpt_to_keep,
                                                  "critic": t.max_critic_ckpt_to_keep})
        return path

    def _maybe_resume(self) -> bool:
        t = self.cfg.trainer
        path = t.resume_from_path
        if path is None and t.resume_mode == "auto":
            latest = ckpt.read_latest(self.run_dir)
            path = os.path.join(self.run_dir, f"global_step_{latest}") if latest is not None else None
        if path is None:
            return False
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise FileNotFoundError(f"{path} is not a megatron-gad training checkpoint (no trainer_state.json)")
        with open(os.path.join(path, "trainer_state.json")) as f:
            st = json.load(f)
        self.actor.load(os.path.join(path, "actor"))
        if self.critic is not None:
            self.critic.load(os.path.join(path, "critic"))
        self.loader.load_state_dict(st["loader"])
        self.warmup.load_state_dict(st["warmup"])
        self.guard.load_state_dict(st.get("saturation_guard", {}))
        if self.hybrid is not None and st.get("hacking_monitor"):
            self.hybrid.monitor.load_state_dict(st["hacking_monitor"])
        self.step = int(st["step"])
        self.nonfinite.update(st.get("nonfinite", {}))
        self.nonfinite_run.update(st.get("nonfinite_run", {}))
        self.syncs.update(st.get("syncs", {}))
        self.vllm_stale = self.vllm is not None  # the engines hold the starting weights, not these
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def shutdown(self) -> None:
        self.actor.shutdown()
        if self.critic is not None:
            self.critic.shutdown()
        if self.vllm is not None:
            self.vllm.shutdown()


def _loggers(names) -> tuple[str, ...]:
    out = list(names)
    if "jsonl" not in out:  # metrics.jsonl is always written: scripts and resume rely on it
        out.append("jsonl")
    return tuple(out)


def main_train(args) -> int:
    from megatron_gad.config import load_config, validate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from megatron_gad.controller.preflight import check_loggers, check_paths
    from megatron_gad.data import DataError
    from megatron_gad.errors import InputError

    cfg = load_config(args.config, list(args.overrides))
    validate(cfg)
    import yaml

    if getattr(args, "dry_run", False):  # validate and report; starts no Ray and builds no model
        from megatron_gad.tools.plan import main_dry_run

        check_paths(cfg)
        return main_dry_run(cfg, getattr(args, "gpu", "h100-80gb"))
    print_only = getattr(args, "print_config", False)
    if not print_only:
        check_paths(cfg)  # every path the driver sees, before any worker starts
        check_loggers(cfg)
    print("# resolved config\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    if print_only:
        return 0
    start = time.time()
    try:
        trainer = GADTrainer(cfg)  # reads and tokenizes the data before it starts the workers
    except DataError as e:
        d = cfg.data
        raise InputError(f"data: {e}; fix or remove the row (columns: data.prompt_key={d.prompt_key!r}, "
                         f"data.teacher_response_key={d.teacher_response_key!r}), or set data.on_bad_row=skip "
                         "to drop bad rows") from e
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    if trainer.stop_signal is not None and trainer.step < trainer.total_steps:
        log.info("stopped on signal at step %d of %d; checkpoint in %s", trainer.step, trainer.total_steps,
                 cfg.trainer.default_local_dir)
        return SAVED_ON_SIGNAL_EXIT
    log.info("done: %d steps in %.1f s; metrics in %s", trainer.step, time.time() - start,
             os.path.join(cfg.trainer.default_local_dir, "metrics.jsonl"))
    return 0
