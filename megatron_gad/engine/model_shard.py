"""One model on this rank: its Megatron shard, lazy DDP + optimizer, checkpoints and export.

Plain Python (no Ray): workers hold one or two of these (the actor its policy and reference), the
tools use it to convert and sample, tests drive it from locally spawned ranks. On CPU the caller's
process entry has entered ``parallel.cpu_compat.cpu_device_mode()``.
"""

from __future__ import annotations

import math
import os

import torch

from megatron_gad import checkpoint as ckpt
from megatron_gad.algos.schedule import lr_at
from megatron_gad.config import MegatronConfig, OptimConfig, padded_vocab_size
from megatron_gad.engine.forward_backward import LossFn, forward_backward
from megatron_gad.models import hf as hfmap
from megatron_gad.models.arch import arch_from_hf_config, read_hf_config
from megatron_gad.models.build import build_model
from megatron_gad.parallel import state

NAN_ENV = "MEGATRON_GAD_INJECT_NAN"


def injected_nan_steps(role: str) -> set[int]:
    """Debug hook for fault tests: ``MEGATRON_GAD_INJECT_NAN="critic:0,1;actor:2"`` makes the loss of
    those ``train_step`` calls (0-based, counted per model in this process) NaN, so the update is skipped
    as a real non-finite step would be. Read by the worker process (Ray workers inherit the env)."""
    out: set[int] = set()
    for part in os.environ.get(NAN_ENV, "").split(";"):
        name, _, steps = part.partition(":")
        if name.strip() == role:
            out.update(int(x) for x in steps.split(",") if x.strip())
    return out


def megatron_kwargs(m: MegatronConfig) -> dict:
    """A role's ``...megatron`` section as :class:`ModelShard` arguments (after ``role, path``), so a
    worker passes every setting by construction instead of naming each one."""
    o = m.override_transformer_config
    return dict(tp=m.tensor_model_parallel_size, pp=m.pipeline_model_parallel_size, params_dtype=m.params_dtype,
                seed=m.seed, fp8=m.fp8, fp8_recipe=m.fp8_recipe, use_distributed_optimizer=m.use_distributed_optimizer,
                sequence_parallel=m.sequence_parallel, recompute_granularity=o.recompute_granularity,
                recompute_method=o.recompute_method, recompute_num_layers=o.recompute_num_layers,
                attention_backend=m.attention_backend)


class ModelShard:
    """This rank's shard of one model serving ``role`` "actor" (LM head) or "critic" (scalar head).
    Weights come from an HF directory or a megatron-gad checkpoint (a critic may start from an
    actor/HF checkpoint: its head is new). ``optim`` and ``total_steps`` drive its optimizer and
    learning-rate schedule; a shard built with ``trainable=False`` never gets an optimizer."""

    def __init__(self, role: str, model_path: str, tp: int, pp: int, *, params_dtype: str = "float32",
                 vocab_divisible_by: int = 128, seed: int = 42, optim: OptimConfig | None = None,
                 total_steps: int = 0, head_init_std: float = 0.0, trainable: bool = True, fp8: str | None = None,
                 fp8_recipe: str = "delayed", use_distributed_optimizer: bool = False, sequence_parallel: bool = False,
                 recompute_granularity: str | None = None, recompute_method: str | None = None,
                 recompute_num_layers: int | None = None, attention_backend: str = "auto"):
        self.role = role
        self.model_path = model_path
        self.hf_config = read_hf_config(model_path)
        self.arch = arch_from_hf_config(self.hf_config)
        self.vocab_divisible_by = vocab_divisible_by
        self.padded_vocab = padded_vocab_size(self.arch.vocab_size, vocab_divisible_by)
        self.layout = state.init_model_parallel(tp, pp, seed)
        torch.manual_seed(seed)
        self.module = build_model(self.arch, role, tp, pp, params_dtype, vocab_divisible_by, head_init_std,
                                  fp8, fp8_recipe, sequence_parallel=sequence_parallel,
                                  recompute_granularity=recompute_granularity, recompute_method=recompute_method,
                                  recompute_num_layers=recompute_num_layers, attention_backend=attention_backend)
        self.use_distributed_optimizer = use_distributed_optimizer
        self._offloaded: dict[str, list] = {}  # kind -> [(storage, host copy or None)], see offload()
        self._frozen_host: list | None = None  # a frozen shard's parameter host copies, kept (offload())
        if torch.cuda.is_available():  # built on CPU (identical weights for every layout), then moved
            self.module.cuda(torch.cuda.current_device())
        self.optim = optim or OptimConfig()
        self.total_steps = total_steps
        self.trainable = trainable
        self.ddp = None
        self.optimizer = None
        self.opt_step = 0  # optimizer updates applied (skipped non-finite ones excluded)
        self.train_calls = 0  # train_step calls of this process (what NaN injection counts)
        self.load_weights(model_path)

    # ---------------------------------------------------------------- weights
    def load_weights(self, path: str) -> None:
        self.reload("params")  # no-op unless offloaded
        self._frozen_host = None  # the weights change: a kept host copy would be stale
        if ckpt.is_megatron_checkpoint(path):
            src_role = ckpt.read_meta(path)["role"]
            ckpt.load_checkpoint(path, self.module, skip_output_layer=src_role != self.role)
        else:
            full = hfmap.hf_to_mcore(hfmap.read_hf_state_dict(path), self.arch, self.vocab_divisible_by)
            skip = ("output_layer.",) if self.role == "critic" else ()
            hfmap.load_full_state_dict(self.module, full, self.layout.tp_rank, self.layout.tp_size, skip)

    @property
    def model(self):
        """What forward passes call: the DDP wrapper once training started, else the bare module."""
        return self.ddp if self.ddp is not None else self.module

    # ---------------------------------------------------------------- optimizer (lazy)
    def ensure_optimizer(self) -> None:
        """Allocate DDP grad buffers and Adam state on first use — a frozen actor never pays."""
        if self.optimizer is not None:
            return
        if not self.trainable:
            raise RuntimeError(f"this {self.role} model was built frozen (trainable=False); it has no optimizer")
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = self.module.config
        self.ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.use_distributed_optimizer), self.module)
        cfg.finalize_model_grads_func = finalize_model_grads
        o = self.optim
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad,
            bf16=cfg.bf16, fp16=cfg.fp16, params_dtype=cfg.params_dtype,
            use_distributed_optimizer=self.use_distributed_optimizer,
        ), [self.ddp], use_gloo_process_groups=state.uses_gloo_groups())

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (Adam moments, fp32 master copies) held on this rank."""
        if self.optimizer is None:
            return 0
        total = 0
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", opt)
            for s in inner.state.values():
                total += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t))
            # half-precision params: the optimizer steps fp32 master copies (the whole tensor, or with
            # the distributed optimizer this rank's shard); fp32 params are stepped in place (views)
            for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
                for group in getattr(opt, name, None) or []:
                    total += sum(p.numel() * p.element_size() for p in group)
        return total

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds on its device for the model: ``weights`` (parameter storage; with the
        distributed optimizer the padded contiguous parameter buffer), ``grads`` (DDP's fp32 gradient
        buffers, 0 before the first update) and ``optimizer`` (Adam state and fp32 master copies);
        offloaded state counts 0 (see :meth:`offload`)."""
        names = {"params": "weights", "grads": "grads", "optimizer": "optimizer"}
        return {names[k]: sum(st.nbytes() for st in sts) for k, sts in self._storages().items()}

    # ---------------------------------------------------------------- offload
    def _storages(self) -> dict[str, list]:
        """The storages behind each kind of state, each storage once: ``params`` (the parameters, or
        with the distributed optimizer DDP's parameter buffers, whose views they are), ``grads`` (DDP's
        gradient buffers) and ``optimizer`` (Adam state and fp32 master copies, minus storages that
        are parameters: the distributed optimizer's fp32 shards are views of them)."""
        tensors = {"params": list(self.module.parameters()), "grads": [], "optimizer": []}
        if self.ddp is not None:
            for buf in list(self.ddp.buffers) + list(self.ddp.expert_parallel_buffers):
                tensors["grads"].append(buf.grad_data)
                if buf.param_data is not None:
                    tensors["params"].append(buf.param_data)
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]) if self.optimizer else []:
            inner = opt.optimizer
            tensors["optimizer"] += [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
            tensors["optimizer"] += [p for g in inner.param_groups for p in g["params"]]
        out, seen = {}, set()
        for kind in ("params", "grads", "optimizer"):
            out[kind] = []
            for t in tensors[kind]:
                st = t.untyped_storage()
                if st.data_ptr() not in seen and st.nbytes() > 0:
                    seen.add(st.data_ptr())
                    out[kind].append(st)
        return out

    def offload(self, params: bool = False, grads: bool = False, optimizer: bool = False) -> None:
        """Free the chosen state's device memory, keeping a host copy (pinned on GPU); the storages
        themselves stay, so every view (parameters in DDP's buffer, optimizer shards) is valid again
        after :meth:`reload`. Gradients are dropped, not copied: every update zeroes them first.
        Passes call :meth:`reload` themselves, so an offloaded shard is always safe to use."""
        chosen = [k for k, on in (("params", params), ("grads", grads), ("optimizer", optimizer)) if on]
        storages = self._storages()
        pin = torch.cuda.is_available()
        for kind in chosen:
            if kind in self._offloaded:
                continue
            # a frozen shard's weights never change: the host copy made at its first offload stays valid,
            # so later offloads only free the device memory (no device->host copy every step)
            keep = kind == "params" and not self.trainable
            kept = self._frozen_host if keep and self._frozen_host is not None \
                and [h.nbytes() for h in self._frozen_host] == [st.nbytes() for st in storages[kind]] else None
            saved = []
            for i, st in enumerate(storages[kind]):
                host = None
                if kept is not None:
                    host = kept[i]
                elif kind != "grads":
                    host = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
                    host.copy_(st)
                saved.append((st, host, st.nbytes()))
                st.resize_(0)
            self._offloaded[kind] = saved
            if keep:
                self._frozen_host = [host for _, host, _ in saved]

    def reload(self, *kinds: str) -> None:
        """Bring offloaded state back to the device (all kinds when none is named)."""
        for kind in kinds or tuple(self._offloaded):
            for st, host, nbytes in self._offloaded.pop(kind, []):
                st.resize_(nbytes)
                if host is None:  # a dropped gradient buffer comes back zeroed
                    torch.empty(0, dtype=torch.uint8, device=st.device).set_(st).zero_()
                else:
                    st.copy_(host)

    # ---------------------------------------------------------------- steps
    def forward(self, micro_batches: list[dict], loss_fn: LossFn) -> list[dict]:
        self.reload("params")
        self.module.eval()
        return forward_backward(self.model, micro_batches, loss_fn, forward_only=True)

    def train_step(self, micro_batches: list[dict], loss_fn: LossFn, lr_scale: float = 1.0) -> tuple[list[dict], dict]:
        """One optimizer step over the micro-batches (gradient accumulation); ``lr_scale`` multiplies
        the scheduled learning rate for this step (the critic's saturation guard)."""
        self.reload()
        self.ensure_optimizer()
        self.module.train()
        o = self.optim
        lr = lr_at(self.opt_step, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.lr_warmup_steps,
                   schedule=o.lr_scheduler, total_steps=self.total_steps) * lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        inject = self.train_calls in injected_nan_steps(self.role)
        self.train_calls += 1
        bad_loss = []

        def guarded(output, mb):
            loss, out = loss_fn(output, mb)
            if inject:
                loss = loss * float("nan")
            if not bool(torch.isfinite(loss.detach()).all()):
                bad_loss.append(True)
            return loss, out

        results = forward_backward(self.ddp, micro_batches, guarded, forward_only=False)
        ok, grad_norm = self._guarded_step(bool(bad_loss))
        if ok:
            self.opt_step += 1
        return results, {"lr": lr, "grad_norm": grad_norm, "update_ok": float(ok), "nonfinite": float(not ok)}

    @torch.no_grad()
    def _guarded_step(self, bad_loss: bool) -> tuple[bool, float]:
        """Megatron's ``optimizer.step()`` split at the point where a non-finite loss (on any rank)
        or gradient norm can still skip the update: weights and Adam state stay untouched then.
        Every rank of the role reaches the same decision (the norm and the loss flag are all-reduced)."""
        import torch.distributed as dist
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        found_inf = self.optimizer.prepare_grads()  # main grads in place (fp16: unscaled, inf check)
        grad_norm = float(self.optimizer.get_grad_norm())
        flag = torch.tensor([float(bad_loss or found_inf or not math.isfinite(grad_norm))], device=state.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            return False, grad_norm
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm)
        return bool(self.optimizer.step_with_ready_grads()), grad_norm

    # ---------------------------------------------------------------- checkpoints / export
    def save(self, path: str, extra: dict | None = None, with_optimizer: bool = True) -> None:
        self.reload()
        extra = dict(extra or {}, opt_step=self.opt_step)
        ckpt.save_checkpoint(path, self.module, self.optimizer if with_optimizer else None,
                             hf_config=self.hf_config, role=self.role,
                             vocab_divisible_by=self.vocab_divisible_by, tokenizer_src=self.model_path,
                             extra=extra)

    def load(self, path: str, with_optimizer: bool, load_rng: bool = True) -> dict:
        self.reload()
        self._frozen_host = None
        if with_optimizer and ckpt.read_meta(path).get("has_optimizer"):
            self.ensure_optimizer()
            extra = ckpt.load_checkpoint(path, self.module, self.optimizer, load_rng=load_rng)
        else:
            extra = ckpt.load_checkpoint(path, self.module, load_rng=load_rng)
        self.opt_step = int(extra.get("opt_step", 0))
        return extra

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full Megatron state dict (global names) on global rank 0, None elsewhere (collective)."""
        import torch.distributed as dist

        self.reload("params")
        stage = hfmap.gather_full_state_dict(self.module, state.tp_group(), self.layout.tp_size)
        if self.layout.tp_rank != 0 or self.layout.dp_rank != 0:
            stage = None
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, stage)
        if dist.get_rank() != 0:
            return None
        full = {}
        for part in gathered:
            if part:
                full.update(part)
        return full

    def weights_sum(self) -> float:
        """A cheap fingerprint of this rank's shard (tests and frozen-weight checks use exact equality)."""
        self.reload("params")
        return float(sum(p.detach().double().sum() for p in self.module.parameters()))
