"""The planner's activation estimate (``planner.train_activation_bytes``) against what a real
critic ``ModelShard`` keeps for backward on CPU (gloo ranks, fp32, local layer spec).

Measured: every floating tensor autograd saves during one ``train_step`` (a
``saved_tensors_hooks`` pack hook keeps a weak reference; parameters excluded; views of one storage
counted once); the peak is the largest live total seen at any save, forward or backward (so full
recompute's re-run layer is included). Packed micro-batches, as training runs. The estimate models
fused GPU kernels (TE norm + linear, fused SwiGLU) and the attention backend (eager: score matrices;
sdpa and the other fused kernels: none); the CPU's unfused torch RMSNorm, SwiGLU and RoPE save more,
so the error printed here is the estimate's error *on CPU*; on GPU it is unmeasured.

    PYTHONPATH=. python benchmarks/bench_activation_estimate.py
"""

from __future__ import annotations

import tempfile
import weakref

import torch

CASES = [  # (tp, recompute granularity, sequence parallel, sequences, length, attention backend)
    (1, None, False, 2, 128, "auto"), (1, "selective", False, 2, 128, "auto"), (1, "full", False, 2, 128, "auto"),
    (2, "selective", False, 2, 128, "auto"), (2, "selective", True, 2, 128, "auto"),
    (1, "selective", False, 4, 256, "auto"), (1, None, False, 4, 256, "auto"), (1, None, False, 4, 256, "sdpa"),
]


def _peak(rank, world, path, tp, gran, sp, b, s, backend):
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.engine.packing import pack_sequences

    kw = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
          "selective": dict(recompute_granularity="selective")}.get(gran, {})
    shard = ModelShard("critic", path, tp, 1, vocab_divisible_by=8, sequence_parallel=sp, attention_backend=backend,
                       **kw)
    shard.ensure_optimizer()
    params = {p.untyped_storage().data_ptr() for p in shard.module.parameters()}
    refs: list = []
    peak = [0, None]

    def pack(t):
        if t.is_floating_point():
            refs.append(weakref.ref(t))
            live = {}
            for r in refs:
                x = r()
                if x is not None and x.untyped_storage().data_ptr() not in params:
                    live[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            total = sum(live.values())
            if total > peak[0]:
                peak[0] = total
        return t

    ids = torch.randint(3, 96, (b, s), generator=torch.Generator().manual_seed(0))
    # packed, as every training pass runs (sequence parallelism splits the row evenly over TP)
    mb = [{"packed": pack_sequences(list(ids), align=tp if sp else 1)}]

    def loss_fn(out, _):
        loss = out.float().mean()  # saves nothing: only the model's activations are measured
        return loss, {"loss": loss.detach()}

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shard.train_step(mb, loss_fn)
    return peak[0]


def main() -> None:
    from megatron_gad.models.arch import load_arch
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.planner import Recompute, attention_score_copies, train_activation_bytes
    from megatron_gad.tools.tiny_models import make_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        path = make_hf_model(tmp, "llama", seed=1, hidden_size=64, intermediate_size=176, num_attention_heads=8,
                             num_key_value_heads=2, max_position_embeddings=512)
        arch = load_arch(path)
        print("| TP | recompute | SP | tokens | attention | measured peak (B) | estimate (B) | estimate error |")
        print("|---|---|---|---|---|---|---|---|")
        for tp, gran, sp, b, s, backend in CASES:
            measured = max(run_local(_peak, tp, path, tp, gran, sp, b, s, backend))
            rec = Recompute(gran, "uniform", 1) if gran == "full" else Recompute(gran)
            copies = attention_score_copies(backend, "float32")  # auto on CPU / fp32: eager
            est = train_activation_bytes(arch, tp, 1, b * s, "float32", sp, rec, score_copies=copies,
                                         seq_lens=[s] * b)
            print(f"| {tp} | {gran or '-'} | {'yes' if sp else 'no'} | {b}x{s} | {backend} ({copies} score copies) | "
                  f"{measured} | {int(est)} | {(est - measured) / measured:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
