"""forward_backward(micro_batches, loss_fn) over Megatron-Core pipeline schedules.

The only place that drives ``get_forward_backward_func``. Callers (workers) hand a list of
micro-batches and a loss function that runs on the last pipeline stage; the same call serves
training (backward) and scoring (forward only). A micro-batch is either

* **packed** (every training and scoring pass): ``{"packed": PackedBatch, ...}`` — one row of
  concatenated sequences with ``cu_seqlens`` (``engine/packing.py``); the model gets
  ``PackedSeqParams`` (THD) and no attention mask: attention is causal within each sequence and
  RoPE restarts per sequence. Output is ``[1, T, ...]``.
* **padded** ``{"input_ids", "attention_mask"[, "position_ids"]}`` ``[B, S]`` with a
  ``[B, 1, S, S]`` causal + padding mask — kept only for tools that compare the two layouts; the
  Transformer Engine spec ignores that mask (its causal kernels read none), so production passes
  never use it.
* **KV-cached sampling** (``inference_context``), see ``engine/generate.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

# loss_fn(output, micro_batch) -> (loss: 0-d tensor, results: dict[str, tensor | float])
# ``output`` is [B, S, V/tp] logits for the actor ([B, S, H] final hidden states inside
# ``kernels.lm_head.hidden_head``, as the actor's passes run) and [B, S, H] normed hidden states for the critic.
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] padding mask (1 = token) -> Megatron's [B, 1, S, S] boolean mask (True = masked):
    causal, and padded keys hidden. Fully masked (padding) query rows stay finite in Megatron's
    softmax (it fills with -10000), and their outputs are never read."""
    _B, S = attention_mask.shape
    causal = torch.ones(S, S, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return (~allowed)[:, None]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _detach(results: dict) -> dict:
    """Results are data, not graph (workers move what they return to CPU)."""
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in results.items()}


def _forward_step(loss_fn: LossFn, data_iterator, model):
    from megatron_gad.parallel.state import device

    batch = _to(next(data_iterator), device())
    packed = batch.get("packed")
    ctx = batch.get("inference_context")
    if packed is not None:
        packed = batch["packed"] = packed.to(device())
        output = model(packed.input_ids, packed.position_ids, None, packed_seq_params=packed.packed_seq_params())
        return output, partial(_loss_wrapper, loss_fn, batch)
    # "mask_4d": the caller's own [B, 1, q, k] mask, or None for unpadded rows (the layer's causal
    # attention only, all Transformer Engine applies); else the padding mask from "attention_mask".
    mask = batch["mask_4d"] if "mask_4d" in batch else attention_mask_4d(batch["attention_mask"])
    if ctx is None:
        output = model(batch["input_ids"], batch["position_ids"], mask)
    else:  # KV-cached sampling: logits come gathered over TP; micro-batches of one cache at their row offset
        ctx.batch_size_offset = batch.get("batch_offset", 0)
        output = model(batch["input_ids"], batch["position_ids"], mask, inference_context=ctx,
                       runtime_gather_output=True)
    return output, partial(_loss_wrapper, loss_fn, batch)


def _loss_wrapper(loss_fn: LossFn, batch: dict, output: torch.Tensor):
    loss, results = loss_fn(output, batch)
    return loss, _detach(results)


def forward_backward(model, micro_batches: list[dict], loss_fn: LossFn, forward_only: bool) -> list[dict]:
    """Run the micro-batches through this rank's pipeline stage.

    Every micro-batch is packed (``packed``), unpadded rows (``input_ids``, ``position_ids`` and
    ``mask_4d=None``: plain causal attention, as the sampler feeds them) or padded (``input_ids``,
    ``attention_mask``; ``position_ids`` derived if missing). Returns the loss function's result dicts
    on the last stage, ``[]`` elsewhere. With ``forward_only=False`` gradients accumulate into the
    (DDP) model; Megatron back-propagates each micro-batch's loss divided by the number of
    micro-batches, and DDP averages gradients over data-parallel replicas (callers that want a
    global normalisation scale their loss by ``len(micro_batches) * dp_size``, see the actor's
    ``_train``).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    for mb in micro_batches:
        if "packed" not in mb and "position_ids" not in mb:
            mb["position_ids"] = position_ids_from_mask(mb["attention_mask"])
    ids = [mb["packed"].input_ids if "packed" in mb else mb["input_ids"] for mb in micro_batches]
    seq_length = max(t.shape[1] for t in ids)  # p2p shapes vary per micro-batch (variable_seq_lengths)
    mbs = ids[0].shape[0]
    fb = get_forward_backward_func()
    ctx = torch.no_grad() if forward_only else torch.enable_grad()
    with ctx:
        out = fb(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
    return list(out) if out else []
