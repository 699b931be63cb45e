"""A checkpoint written under the local spec (CPU) loads under the Transformer Engine spec and back.

TE cannot be imported on CPU, so the TE side is a real ``GPTModel`` built from a spec shaped like
Megatron-Core 0.16.1's ``get_gpt_layer_with_transformer_engine_spec`` (dense, no qk-norm) with
stand-ins for the TE wrappers of ``megatron/core/extensions/transformer_engine.py``; each keeps
exactly what checkpoints see of the class it replaces:
* ``TELayerNormColumnParallelLinear`` (``linear_qkv``, ``mlp.linear_fc1``): owns the pre-norm as
  ``layer_norm_weight`` (no ``input_layernorm`` / ``pre_mlp_layernorm`` module, no
  ``sharded_state_dict_keys_map``), shards ``{"weight": 0, "bias": 0}``, so the norm is replicated;
* ``TERowParallelLinear`` (``linear_proj``, ``mlp.linear_fc2``): shards ``{"weight": 1}``;
* both carry TE's ``_extra_state`` (a uint8 tensor of pickled FP8 metadata, empty without FP8;
  ``set_extra_state`` ignores ``None`` and empty tensors, as TE 2.x does);
* ``TEDotProductAttention``: a TE module, so ``_extra_state`` is in its ``state_dict`` while its
  ``sharded_state_dict`` is empty (vanilla softmax), as in Megatron 0.16.1.
The spec replaces ``models.build.layer_spec`` inside the spawned rank, so building, saving and
loading run through ``ModelShard`` and ``checkpoint.py`` and Megatron's ``dist_checkpointing``.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

pytestmark = pytest.mark.distributed


def _te_extra_state_mixin(base):
    class TEExtraState(base):
        """TE 2.x ``TransformerEngineBaseModule`` extra-state format."""

        fp8_meta = None  # a dict once "FP8 trained"

        def get_extra_state(self):
            if self.fp8_meta is None:
                return torch.empty(0, dtype=torch.uint8)
            return torch.frombuffer(bytearray(pickle.dumps(self.fp8_meta)), dtype=torch.uint8)

        def set_extra_state(self, state):
            if state is None or (torch.is_tensor(state) and state.numel() == 0):
                return
            self.fp8_meta = pickle.loads(state.detach().cpu().numpy().tobytes())

    return TEExtraState


def _te_like_spec(attn_extra_state: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from megatron_gad.models.packed_attention import PackedDotProductAttention

    class TELayerNormColumnParallelLinear(_te_extra_state_mixin(ColumnParallelLinear)):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            self.eps = config.layernorm_epsilon

        def forward(self, x, *args, **kwargs):  # the fused RMSNorm, so the model also runs
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            state_dict = self.state_dict(prefix="", keep_vars=True)
            return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0, "bias": 0},
                                                       sharded_offsets)

    class TERowParallelLinear(_te_extra_state_mixin(RowParallelLinear)):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            state_dict = self.state_dict(prefix="", keep_vars=True)
            return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 1}, sharded_offsets)

    class TEDotProductAttention(_te_extra_state_mixin(PackedDotProductAttention)):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            if not attn_extra_state:
                return {}
            # what Megatron's generic sharded_state_dict_default stores for a TE module without
            # its own override: its state_dict, so an ``_extra_state`` no local checkpoint holds
            return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                       {}, sharded_offsets)

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(
        attn.submodules, linear_qkv=TELayerNormColumnParallelLinear, core_attention=TEDotProductAttention,
        linear_proj=TERowParallelLinear))
    mlp = spec.submodules.mlp
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
        mlp.submodules, linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=IdentityOp, self_attention=attn, pre_mlp_layernorm=IdentityOp,
        mlp=mlp, sharded_state_dict_keys_map={}))


# local module name -> TE module name (the norms move into the following linear)
_LOCAL_TO_TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _te_name(local: str) -> str:
    for a, b in _LOCAL_TO_TE.items():
        if local.endswith("." + a):
            return local[: -len(a)] + b
    return local


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def _adam_state(shard) -> dict[str, torch.Tensor]:
    """Adam moments by parameter name (fp32 params: the optimizer holds the model's own tensors)."""
    inner = [o.optimizer for o in getattr(shard.optimizer, "chained_optimizers", [shard.optimizer])]
    out = {}
    for name, p in shard.module.named_parameters():
        for opt in inner:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0:
                    out[f"{name}/{k}"] = v.detach().clone()
    return out


def _shard(role, path, spec: str, seed: int, with_optimizer: bool):
    """A ``ModelShard`` built under ``spec`` ("local" or "te"); it loads ``path`` while building."""
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.models import build

    original = build.layer_spec
    if spec != "local":  # layer_spec is read only while building the model
        extra = spec == "te_attn_extra"
        build.layer_spec = lambda arch, attention_backend="auto": _te_like_spec(attn_extra_state=extra)
    try:
        shard = ModelShard(role, path, 1, 1, seed=seed)
    finally:
        build.layer_spec = original
    if with_optimizer:
        shard.ensure_optimizer()
    return shard


def _round_trip(rank, world, hf, tmp, role, te_spec):
    """local -> TE -> local, then TE -> local; returns the failures (empty = pass)."""
    errors: list[str] = []

    def check(where, got: dict, want: dict, rename=lambda k: k):
        if {rename(k) for k in want} != set(got):
            errors.append(f"{where}: names differ: {sorted(set(got) ^ {rename(k) for k in want})[:6]}")
            return
        for k, v in want.items():
            if not torch.equal(got[rename(k)], v):
                errors.append(f"{where}: {rename(k)} differs")

    # 1. local spec (HF weights perturbed, one Adam step), saved with its optimizer state
    local = _shard(role, hf, "local", 42, True)
    with torch.no_grad():
        for p in local.module.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # norms != 1, head != 0: a lost weight shows
            p.main_grad.copy_(torch.randn_like(p))
    local.optimizer.step()  # Adam moments exist only after a step
    want = _params(local.module)
    local.save(f"{tmp}/local_{role}")

    # 2. into the TE spec (other seed, so nothing matches by accident), model + optimizer
    te = _shard(role, f"{tmp}/local_{role}", te_spec, 7, True)
    if not any(k.endswith("_extra_state") for k in te.module.state_dict()):
        errors.append("the TE stand-in model has no _extra_state keys")
    te.load(f"{tmp}/local_{role}", with_optimizer=True, load_rng=False)
    check("local->te", _params(te.module), want, _te_name)
    # TE wrote FP8 metadata into its extra state; save under the TE spec
    for m in te.module.modules():
        if hasattr(m, "fp8_meta"):
            m.fp8_meta = {"scale_fwd": torch.tensor([2.0, 4.0]), "recipe": "hybrid"}
    te.save(f"{tmp}/te_{role}")

    # 3. back into the local spec, model + optimizer; Adam moments equal too
    back = _shard(role, f"{tmp}/te_{role}", "local", 11, True)
    back.load(f"{tmp}/te_{role}", with_optimizer=True, load_rng=False)
    check("te->local", _params(back.module), want)
    check("te->local adam", _adam_state(back), _adam_state(local))

    # 4. TE -> TE keeps the FP8 metadata (extra state is really loaded where both sides have it)
    te2 = _shard(role, f"{tmp}/te_{role}", te_spec, 3, False)
    metas = [m.fp8_meta for m in te2.module.modules() if hasattr(m, "fp8_meta")]
    linear_metas = [m for m in metas if m is not None]
    if not linear_metas or any(m["recipe"] != "hybrid" for m in linear_metas):
        errors.append("te->te: FP8 extra state not restored")

    # 5. a requested *tensor* the checkpoint lacks is an error naming it, not a silent skip
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_gad import checkpoint as ckpt

    class WithUnknownTensor:
        def sharded_state_dict(self):
            return dict(back.module.sharded_state_dict(), unknown=ShardedTensor.from_rank_offsets(
                "decoder.unknown.weight", torch.zeros(2), replica_id=0))

        def load_state_dict(self, sd, strict):
            return back.module.load_state_dict(sd, strict=strict)

    try:
        ckpt.load_checkpoint(f"{tmp}/te_{role}", WithUnknownTensor())
        errors.append("a missing tensor loaded silently")
    except KeyError as exc:
        if "decoder.unknown.weight" not in str(exc):
            errors.append(f"missing tensor: unclear error {exc!r}")
    return errors


# "te": Megatron-Core 0.16.1's TE spec; "te_attn_extra": a TE module that also asks for an
# ``_extra_state`` the local checkpoint never wrote (optional: it must load without it)
@pytest.mark.parametrize("role,te_spec", [("actor", "te"), ("critic", "te"), ("actor", "te_attn_extra")])
def test_local_spec_checkpoint_loads_under_te_spec_and_back(tmp_path, role, te_spec):
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    hf = make_hf_model(str(tmp_path / "hf"), "qwen2")  # qkv bias and tied embeddings: more keys
    (errors,) = run_local(_round_trip, 1, hf, str(tmp_path), role, te_spec)
    assert not errors, "\n".join(errors)
