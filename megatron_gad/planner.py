"""Memory and time formulas for one role's model on one rank: pure arithmetic, no torch.

Weights, gradient buffers and optimizer state are *exact*: they replay how Megatron-Core 0.16 lays a
rank's parameters out (``GPTModel`` with the local layer spec, as ``models/build.py`` builds it), how
``DistributedDataParallel`` packs them into one fp32 gradient buffer (``grad_reduce_in_fp32=True``, one
bucket since ``overlap_grad_reduce=False``; with the distributed optimizer each parameter starts at a
multiple of 64 elements, each bucket is padded to a multiple of lcm(DP, 128) and a shared embedding gets
its own bucket) and which slice of it each data-parallel rank's optimizer owns. The distributed test
``tests/distributed/test_plan_bytes.py`` builds real ``ModelShard``s and compares byte for byte.
Activations, the KV cache and step times are estimates; ``docs/memory-plan.md`` states the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_gad.models.arch import Arch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
ADAM_STEP_BYTES = 4  # torch Adam(W) keeps a float32 scalar `step` tensor per parameter it steps


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False  # tied input/output embedding split over the first and last stage


def stage_params(arch: Arch, role: str, tp: int, pp: int, pp_rank: int, padded_vocab: int) -> list[Param]:
    """This rank's parameters in ``module.named_parameters()`` order (the order fixes the padding of
    the distributed optimizer's buffer). Layers are split evenly over the pipeline stages; every
    TP-split matrix holds 1/TP of its rows or columns; norms and the critic's head are replicated."""
    h, hd, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    # the actor ties its output layer to the embedding when the HF model does; with PP > 1 the last
    # stage keeps its own copy (Megatron's shared_embedding, kept equal by an all-reduce)
    tied = arch.tie_word_embeddings and role == "actor"
    out: list[Param] = []
    if first:
        out.append(Param("embedding.word_embeddings.weight", padded_vocab // tp * h, tied and pp > 1))
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) // tp * hd
    for i in range(arch.num_layers // pp):
        pre = f"decoder.layers.{i}."
        out += [Param(pre + "input_layernorm.weight", h),
                Param(pre + "self_attention.linear_proj.weight", h * (arch.num_heads // tp * hd)),
                Param(pre + "self_attention.linear_qkv.weight", qkv * h)]
        if arch.qkv_bias:
            out.append(Param(pre + "self_attention.linear_qkv.bias", qkv))
        if arch.qk_layernorm:  # Qwen3's per-head q/k RMSNorms, replicated over TP
            out += [Param(pre + "self_attention.q_layernorm.weight", hd),
                    Param(pre + "self_attention.k_layernorm.weight", hd)]
        out += [Param(pre + "pre_mlp_layernorm.weight", h),
                Param(pre + "mlp.linear_fc1.weight", 2 * (ffn // tp) * h),
                Param(pre + "mlp.linear_fc2.weight", h * (ffn // tp))]
    if last:
        out.append(Param("decoder.final_layernorm.weight", h))
        if role == "critic":
            out += [Param("output_layer.weight", h), Param("output_layer.bias", 1)]
        elif not tied or pp > 1:
            out.append(Param("output_layer.weight", padded_vocab // tp * h, tied))
    return out


@dataclass(frozen=True)
class Buffer:
    """DDP's contiguous buffer: total elements (padding included), each parameter's [start, end) and
    the buckets' [start, end)."""
    numel: int
    ranges: tuple[tuple[int, int], ...]  # per parameter, in ``stage_params`` order
    buckets: tuple[tuple[int, int], ...]


def grad_buffer(params: list[Param], dp: int, distributed_optimizer: bool) -> Buffer:
    """Megatron's ``_ParamAndGradBuffer`` index arithmetic with ``bucket_size=None``: parameters are
    placed in reverse order (backward order)."""
    def pad(n: int, d: int) -> int:
        return -(-n // d) * d

    bucket_div = math.lcm(dp, 128)
    ranges: dict[int, tuple[int, int]] = {}
    buckets: list[tuple[int, int]] = []
    start = bucket_start = 0
    in_bucket = 0
    end = 0

    def close(end_index: int) -> int:
        nonlocal bucket_start, in_bucket
        bucket_end = pad(end_index, bucket_div) if distributed_optimizer else end_index
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for i in reversed(range(len(params))):
        p = params[i]
        if distributed_optimizer:
            start = pad(start, 64)
        own_bucket = p.shared_embedding and distributed_optimizer
        if own_bucket and in_bucket:
            start = close(start)
        end = start + p.numel
        ranges[i] = (start, end)
        in_bucket += 1
        start = close(end) if own_bucket else end
    if in_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return Buffer(numel, tuple(ranges[i] for i in range(len(params))), tuple(buckets))


def owned_slices(buf: Buffer, dp: int, dp_rank: int) -> list[int]:
    """Elements of each parameter that ``dp_rank``'s distributed optimizer steps (0: none): each bucket
    is cut into DP equal shards, whatever the parameter boundaries."""
    mine = []
    for b0, b1 in buf.buckets:
        size = (b1 - b0) // dp
        mine.append((b0 + dp_rank * size, b0 + (dp_rank + 1) * size))
    out = []
    for s, e in buf.ranges:
        out.append(sum(max(0, min(e, r1) - max(s, r0)) for r0, r1 in mine))
    return out


@dataclass(frozen=True)
class StateBytes:
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer}


def rank_state_bytes(params: list[Param], params_dtype: str, dp: int, dp_rank: int,
                     distributed_optimizer: bool, trainable: bool = True) -> StateBytes:
    """Bytes one rank holds for one model after its first optimizer step.

    weights: the parameters (with the distributed optimizer they live in DDP's padded parameter buffer);
    grads: DDP's fp32 gradient buffer; optimizer: Adam's two fp32 moments and its step scalar per stepped
    tensor, plus fp32 master copies of half-precision parameters (fp32 parameters are stepped in place).
    A frozen model (``trainable=False``, the reference) holds weights only."""
    b = DTYPE_BYTES[params_dtype]
    unpadded = sum(p.numel for p in params)
    if not trainable:
        return StateBytes(unpadded * b, 0, 0)
    buf = grad_buffer(params, dp, distributed_optimizer)
    master = FP32 if b != FP32 else 0
    if distributed_optimizer:
        owned = [k for k in owned_slices(buf, dp, dp_rank) if k]
        weights = buf.numel * b
    else:
        owned = [p.numel for p in params]
        weights = unpadded * b
    optimizer = sum(k * (2 * FP32 + master) + ADAM_STEP_BYTES for k in owned)
    return StateBytes(weights, buf.numel * FP32, optimizer)


# ------------------------------------------------------------------------------------------ estimates
@dataclass(frozen=True)
class Recompute:
    granularity: str | None = None  # None | "selective" | "full"
    method: str | None = None  # "uniform" | "block"
    num_layers: int | None = None


def layer_activation_elems_per_token(arch: Arch, tp: int, sequence_parallel: bool) -> float:
    """Elements one transformer layer keeps for backward per token (flash attention: no score matrix).

    Replicated over TP (split by TP with sequence parallelism): the inputs of the two RMSNorms and of
    the QKV and FC1 GEMMs (4h). Split by TP: q, k, v after RoPE and the attention output (the input of
    the output projection), the SwiGLU input (2 ffn) and the FC2 input (ffn)."""
    h, hd = arch.hidden_size, arch.head_dim
    replicated = 4 * h / (tp if sequence_parallel else 1)
    split = (2 * arch.num_heads * hd + 2 * arch.num_kv_heads * hd + 3 * arch.ffn_hidden_size) / tp
    return replicated + split


def attention_scores_elems(arch: Arch, tp: int, seq_lens: list[int], copies: int) -> float:
    """Unfused attention (Megatron's local core attention, CPU) keeps ``copies`` [heads/TP, s, s]
    tensors per sequence and layer; flash attention keeps none (``copies=0``)."""
    return copies * (arch.num_heads / tp) * sum(s * s for s in seq_lens)


# Backends whose kernels keep no [heads, s, s] score matrix (flash / memory-efficient / varlen / flex).
FUSED_ATTENTION = ("sdpa", "varlen", "flex", "flash")


def attention_score_copies(backend: str, params_dtype: str) -> int:
    """[heads/TP, s, s] tensors per sequence and layer, in units of ``params_dtype`` elements, that the
    local spec's core attention (``models/attention.py``) keeps for backward with ``backend``
    (``...megatron.attention_backend`` after ``MEGATRON_GAD_ATTENTION_BACKEND``): 0 for the fused kernels
    (``auto`` picks one in bf16/fp16); eager keeps its softmax output, fp32 (1 copy in fp32; in bf16/fp16
    the fp32 probabilities count 2 plus their half-precision cast for the AV GEMM, 3)."""
    half = params_dtype in ("bfloat16", "float16")
    if backend in FUSED_ATTENTION or (backend == "auto" and half):
        return 0
    return 3 if half else 1


def worst_seq_lens(tokens: int, seq: int) -> list[int]:
    """Sequences of a micro-batch of ``tokens`` as long as allowed (``seq``): the largest sum of s^2."""
    full, rest = divmod(tokens, max(1, seq))
    return [seq] * full + ([rest] if rest else [])


def train_activation_bytes(arch: Arch, tp: int, pp: int, tokens: int, params_dtype: str,
                           sequence_parallel: bool = False, recompute: Recompute = Recompute(),
                           in_flight: int = 1, score_copies: int = 0, seq_lens: list[int] | None = None) -> float:
    """Activations kept for backward on the first pipeline stage (the fullest: 1F1B keeps up to
    ``in_flight`` = min(PP, micro-batches) micro-batches of ``tokens`` tokens there)."""
    b = DTYPE_BYTES[params_dtype]
    layers = arch.num_layers // pp
    per_token = layer_activation_elems_per_token(arch, tp, sequence_parallel)
    scores = attention_scores_elems(arch, tp, seq_lens or [tokens], score_copies)
    if recompute.granularity == "selective":
        scores = 0.0  # core attention recomputed: only its inputs are kept
    full = per_token * tokens + scores  # one layer, nothing recomputed
    if recompute.granularity == "full":
        n = min(recompute.num_layers or layers, layers)
        inp = arch.hidden_size * tokens / (tp if sequence_parallel else 1)
        if recompute.method == "block":  # the first n layers keep only their input
            kept = n * inp + (layers - n) * full
        else:  # uniform: groups of n layers keep the group's input
            kept = math.ceil(layers / n) * inp
        stage = kept + full  # plus the layer being recomputed during backward
    else:
        stage = layers * full
    return stage * b * in_flight


def logits_bytes(padded_vocab: int, tp: int, tokens: int, params_dtype: str) -> int:
    """The actor's vocab-parallel logits of a micro-batch [tokens, V/TP] plus an fp32 copy of the rows
    the log-prob kernel reads (an upper bound: it reads response positions only, in chunks)."""
    return tokens * (padded_vocab // tp) * (DTYPE_BYTES[params_dtype] + FP32)


def kv_cache_bytes(arch: Arch, tp: int, pp: int, rows: int, seq_len: int, params_dtype: str) -> int:
    """The native rollout allocates every micro-batch's cache up front: rows x (prompt + response)
    tokens x layers/PP x (K and V) x KV heads/TP x head_dim x dtype bytes."""
    return rows * seq_len * (arch.num_layers // pp) * 2 * (arch.num_kv_heads // tp) * arch.head_dim * \
        DTYPE_BYTES[params_dtype]


def matmul_params(arch: Arch, role: str, padded_vocab: int) -> int:
    """Parameters that take part in a GEMM per token (the input embedding is a lookup): N of 2N / 6N."""
    h, hd = arch.hidden_size, arch.head_dim
    layer = h * (arch.num_heads + 2 * arch.num_kv_heads) * hd + h * arch.num_heads * hd + 3 * h * arch.ffn_hidden_size
    head = padded_vocab * h if role == "actor" else h
    return arch.num_layers * layer + head


def forward_flops(arch: Arch, role: str, padded_vocab: int, seq_lens: list[int]) -> float:
    """2 N per token plus causal attention: QK^T and AV cost 2 x 2 x heads x head_dim per (query, key)
    pair, and a sequence of s tokens has s(s+1)/2 such pairs per layer."""
    n = matmul_params(arch, role, padded_vocab)
    tokens = sum(seq_lens)
    attn = 4 * arch.num_heads * arch.head_dim * arch.num_layers * sum(s * (s + 1) / 2 for s in seq_lens)
    return 2 * n * tokens + attn
