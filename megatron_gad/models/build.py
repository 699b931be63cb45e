"""Build the two model roles on Megatron-Core: actor (LM head) and discriminator (scalar head)."""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from megatron_gad.config import padded_vocab_size
from megatron_gad.models.arch import Arch, torch_dtype

log = logging.getLogger("megatron_gad")


def transformer_config(arch: Arch, tp: int, pp: int, params_dtype: str = "float32", fp8: str | None = None,
                       fp8_recipe: str = "delayed", sequence_parallel: bool = False,
                       recompute_granularity: str | None = None, recompute_method: str | None = None,
                       recompute_num_layers: int | None = None):
    """``fp8`` ("e4m3" | "hybrid") runs the Transformer Engine GEMMs of the layers in FP8 with
    ``fp8_recipe``; Megatron's transformer block enters TE's FP8 autocast itself. ``sequence_parallel``
    and the ``recompute_*`` settings are Megatron's own (``...megatron.override_transformer_config``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch_dtype(params_dtype)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Build full weights on CPU then slice: TP layouts get identical weights from one seed.
        use_cpu_initialization=True,
        # Fusions need CUDA kernels (or apex); they change nothing numerically we rely on.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # Megatron's RoPE hooks: TE's kernels where TE loads, else models/rope.py's (no host sync in THD)
        apply_rope_fusion=_local_rope_fusion(),
        variable_seq_lengths=True,  # micro-batches may differ in length (p2p sends shapes)
        moe_token_dispatcher_type="alltoall",  # (dense model; only to satisfy the check above)
        deallocate_pipeline_outputs=False,
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        sequence_parallel=sequence_parallel,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )


def _local_rope_fusion() -> bool:
    """True when this process runs Megatron's RoPE through models/rope.py's sync-free functions (no
    Transformer Engine); False keeps Megatron's unfused RoPE beside TE's spec, as before."""
    from megatron_gad.models import rope

    return rope.install()


def layer_spec(arch: Arch, attention_backend: str = "auto"):
    """Transformer Engine spec on a GPU with TE installed; Megatron's local spec (core attention
    :class:`~megatron_gad.models.attention.CoreAttention` on ``attention_backend``) otherwise."""
    qk_layernorm = arch is not None and arch.qk_layernorm  # Qwen3's per-head q/k norms
    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        # Not only ImportError: a wheel whose shared library does not load (wrong CUDA, missing
        # .so) raises OSError or RuntimeError from the import. Any of them means "no TE here".
        except Exception as exc:
            log.warning("Transformer Engine unusable (%s: %s); building the local spec instead",
                        type(exc).__name__, exc)
            # Megatron guards its own TE imports (e.g. in the local spec's module tree) with
            # ``except ImportError``; a retried broken import would raise the OSError again there.
            # None in sys.modules makes every later ``import transformer_engine`` an ImportError.
            for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
                del sys.modules[name]
            sys.modules["transformer_engine"] = None
    # Megatron's local spec with a core attention that also takes packed (THD) input, runs the chosen
    # backend (eager: exactly Megatron's math) and, under MEGATRON_GAD_EMULATE_TE_MASKING=1, masks
    # only what TE would.
    from megatron_gad.models.attention import local_layer_spec

    return local_layer_spec(normalization="RMSNorm", backend=attention_backend, qk_layernorm=qk_layernorm)


def is_te_spec(spec) -> bool:
    """Did :func:`layer_spec` give the Transformer Engine spec (its core attention is TE's)?"""
    core = spec.submodules.self_attention.submodules.core_attention
    return getattr(core, "__module__", "").startswith("megatron.core.extensions.transformer_engine")


class SequenceParallelRMSNorm(nn.RMSNorm):
    """torch RMSNorm for the local (CPU) spec that also runs under sequence parallelism, which
    Megatron's ``WrappedTorchNorm`` refuses: each TP rank then normalises only its own tokens, so its
    weight gradient is partial; marking the weight ``sequence_parallel`` makes ``finalize_model_grads``
    all-reduce it over TP, as Transformer Engine's norms are marked."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def sequence_parallel_local_spec(spec, config):
    """The local layer spec with :class:`SequenceParallelRMSNorm` for every norm (the final one too),
    as the block submodules Megatron would derive from the layer spec for this pipeline stage."""
    import dataclasses

    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    sub = dataclasses.replace(spec.submodules, input_layernorm=SequenceParallelRMSNorm,
                              pre_mlp_layernorm=SequenceParallelRMSNorm)
    if config.qk_layernorm:  # per-head q/k norms (Qwen3): Megatron's torch norm refuses sequence parallel too
        attn = sub.self_attention
        sub = dataclasses.replace(sub, self_attention=dataclasses.replace(attn, submodules=dataclasses.replace(
            attn.submodules, q_layernorm=SequenceParallelRMSNorm, k_layernorm=SequenceParallelRMSNorm)))
    layer = dataclasses.replace(spec, submodules=sub)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)


def apply_llama3_rope_scaling(rotary, arch: Arch) -> None:
    """Llama 3.x RoPE: scale the rotary embedding's inverse frequencies with the checkpoint's four settings.

    Megatron-Core's ``GPTModel(rope_scaling=True)`` passes only the factor and keeps low/high frequency
    factors 1 / 4 and an original context of 8192 (Llama 3.1's); its ``_apply_scaling`` takes all four,
    so it is called here on the unscaled frequencies with the values of ``config.json``."""
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=arch.rope_factor, low_freq_factor=arch.rope_low_freq_factor,
        high_freq_factor=arch.rope_high_freq_factor, original_max_position_embeddings=arch.rope_original_max_positions)


class ValueHead(nn.Linear):
    """hidden -> 1 head stored as the GPT ``output_layer`` (so dist-checkpointing sees
    ``output_layer.weight``), but its forward passes the normed hidden states through: the
    discriminator loss gathers each sequence's last valid token first and applies this weight only
    there (``kernels.disc_loss``), never over every token."""

    def __init__(self, hidden: int, init_std: float = 0.0, dtype=torch.float32, sequence_parallel: bool = False):
        super().__init__(hidden, 1, bias=True, dtype=dtype)
        self.sequence_parallel = sequence_parallel
        with torch.no_grad():
            if init_std > 0:
                self.weight.normal_(0.0, init_std)
            else:
                self.weight.zero_()  # zero init: D starts blind (score 0, d_acc ~ 0.5)
            self.bias.zero_()

    def forward(self, x, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            # each TP rank holds a slice of the tokens; the loss reads any token, on every TP rank. The
            # gather's backward keeps this rank's slice of the (replicated) gradient, no reduction.
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        # Replicated across TP: no tensor-parallel axis.
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)


def build_model(arch: Arch, role: str, tp: int, pp: int, params_dtype: str = "float32",
                vocab_divisible_by: int = 128, head_init_std: float = 0.0, fp8: str | None = None,
                fp8_recipe: str = "delayed", attention_backend: str = "auto", **config_kw):
    """This rank's stage of the actor (``role="actor"``) or discriminator (``role="critic"``).
    ``config_kw``: the further :func:`transformer_config` settings (sequence parallel, recompute).
    ``attention_backend``: the local spec's core attention (``MEGATRON_GAD_ATTENTION_BACKEND`` wins).

    Call after ``parallel.state.init_model_parallel``.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_gad.parallel import state

    if role not in ("actor", "critic"):
        raise ValueError(f"role must be 'actor' or 'critic', got {role!r}")
    config = transformer_config(arch, tp, pp, params_dtype, fp8, fp8_recipe, **config_kw)
    from megatron_gad.models import attention

    backend = attention.requested_backend(attention_backend)
    spec = layer_spec(arch, backend)
    if not is_te_spec(spec):
        attention.announce(role, backend, config.params_dtype, arch.head_dim)
    if config.sequence_parallel and not is_te_spec(spec):
        spec = sequence_parallel_local_spec(spec, config)
    elif fp8 and not is_te_spec(spec):
        # the local spec's linear layers have no FP8 path: running it would silently stay bf16
        raise RuntimeError(f"megatron.fp8={fp8!r} needs the Transformer Engine layer spec (a GPU with TE); "
                           "this process built the local spec. Unset ...megatron.fp8 or install TE")
    lay = state.layout()
    pre, post = lay.is_first_stage, lay.is_last_stage
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, vocab_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and role == "actor",
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    if arch.rope_type == "llama3":
        apply_llama3_rope_scaling(model.rotary_pos_emb, arch)
    if role == "critic" and post:
        model.output_layer = ValueHead(arch.hidden_size, head_init_std, dtype=config.params_dtype,
                                       sequence_parallel=config.sequence_parallel)
    # Without Apex, the local spec's norms are torch RMSNorms created in fp32 whatever params_dtype is.
    # Megatron's bf16/fp16 optimizer then holds them as fp32 params beside the fp32 copies of the
    # half-precision ones, which its checkpoint code does not expect (the optimizer state maps onto the
    # wrong parameters on save). Every parameter takes params_dtype, as with TE's norms.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != config.params_dtype:
            p.data = p.data.to(config.params_dtype)
    return model
