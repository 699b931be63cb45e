"""Peak memory of the actor's update and log-prob passes: today's logits path vs the fused LM head.

before: what main did until the fused head: the output layer's [T, V/TP] logits for every packed
        position, the response rows gathered (a copy), divided by the temperature (another copy),
        then ``vocab_parallel_logprob`` (in-place backward). Reproduced here by running the real
        ``ActorWorker`` with its loss functions fed logits by that code.
after:  the shipped ``ActorWorker``: final hidden states (``hidden_head``) -> response rows ->
        ``lm_head_logprob`` (vocabulary x token chunks, temperature folded in).

Each variant runs in a fresh rank process (one ``run_local`` per variant, side by side in one run).
Memory on CPU: the rank's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the
pass) minus its RSS then, i.e. all the pass allocates on top of the built model, weights, gradients
and optimizer state included (the first update creates them: the same for both variants). On a GPU
also ``torch.cuda.max_memory_allocated`` over the pass.

    python benchmarks/bench_lm_head.py [--vocab 151936] [--hidden 256] [--prompt 1024] [--response 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


@contextlib.contextmanager
def _peak():
    """Yields a dict filled with the pass's extra peak memory (MiB) when the block ends."""
    import torch

    out: dict = {}
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    base = _status_mib("VmRSS")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    yield out
    out["time_s"] = time.perf_counter() - t0
    out["peak_extra_rss_mib"] = _status_mib("VmHWM") - base
    if cuda:
        out["peak_extra_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20 - cuda_base


def _old_token_logprob(self, shard, logits, mb, compute_entropy, temperature=1.0):
    """main's ActorWorker._token_logprob before the fused head (logits in, copies as it made them)."""
    import torch

    from megatron_gad.kernels.logprob import vocab_parallel_logprob
    from megatron_gad.parallel import state

    idx = mb["resp_index"]
    valid = idx >= 0
    sel = logits[0].index_select(0, idx[valid])  # [N, V/TP]
    if temperature != 1.0:
        sel = sel / temperature
    v_local = sel.shape[-1]
    lp, ent = vocab_parallel_logprob(
        sel, mb["responses"][valid], state.tp_group() if self.layout.tp_size > 1 else None,
        vocab_start=self.layout.tp_rank * v_local, vocab_size=shard.arch.vocab_size,
        chunk_size=self.config.actor.logprob_chunk_size, compute_entropy=compute_entropy,
        inplace_backward=torch.is_grad_enabled())

    def rows(flat):
        return None if flat is None else flat.new_zeros(idx.shape).masked_scatter(valid, flat)

    return rows(lp), rows(ent)


def _rank(rank, world, variant, path, a):
    import torch

    from megatron_gad.config import load_config
    from megatron_gad.workers import actor as actor_mod

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if variant == "before":  # the output layer gives logits; the loss functions take them the old way
        actor_mod.hidden_head = lambda module: contextlib.nullcontext()
        actor_mod.ActorWorker._token_logprob = _old_token_logprob
    cfg = load_config(None, [f"actor_rollout_ref.model.path={path}",
                             f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={a.rows}",
                             f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={a.rows}",
                             f"actor_rollout_ref.rollout.temperature={a.temperature}",
                             f"actor_rollout_ref.actor.entropy_coeff={a.entropy_coeff}",
                             f"data.max_response_length={a.response}", f"data.max_prompt_length={a.prompt}"])
    worker = actor_mod.ActorWorker(cfg.actor_rollout_ref, max_response_length=a.response, total_steps=10,
                                   eos_id=2, pad_id=0)
    g = torch.Generator().manual_seed(0)
    B = a.rows
    batch = {"prompt_ids": torch.randint(3, a.vocab, (B, a.prompt), generator=g),
             "prompt_mask": torch.ones(B, a.prompt, dtype=torch.long),
             "responses": torch.randint(3, a.vocab, (B, a.response), generator=g),
             "response_mask": torch.ones(B, a.response, dtype=torch.long)}
    out = {"variant": variant, "tokens": B * (a.prompt + a.response), "response_tokens": B * a.response}
    with _peak() as lp_mem:
        lp = worker.compute_log_prob(batch)["log_prob"]
    out["log_prob"] = lp_mem
    batch.update(old_log_prob=lp - 0.01, advantages=torch.randn(B, a.response, generator=g))
    with _peak() as up_mem:  # the first update also creates the gradient buffers and optimizer state
        m = worker.update_actor(batch, num_mini_batches=1)
    out["first_update"] = up_mem
    with _peak() as up_mem:  # steady state: what the head adds on top of a trained model's state
        worker.update_actor(batch, num_mini_batches=1)
    out["update"] = up_mem
    out["grad_norm"] = m["actor/grad_norm"]
    out["lp"] = lp
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--response", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=1, help="rows per micro-batch (one micro-batch)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--entropy-coeff", type=float, default=0.001)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_lm_head"))
    a = ap.parse_args()

    import torch

    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        path = make_hf_model(os.path.join(tmp, "m"), "llama", seed=0, vocab_size=a.vocab, hidden_size=a.hidden,
                             intermediate_size=4 * a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=a.prompt + a.response)
        rows = [run_local(_rank, 1, v, path, a)[0] for v in ("before", "after")]
    before, after = rows
    lp_diff = float((before.pop("lp") - after.pop("lp")).abs().max())
    unit = before["tokens"] * a.vocab * 4 / 2**20  # MiB of one [T, V] fp32 tensor
    meta = {"vocab": a.vocab, "hidden": a.hidden, "layers": a.layers, "prompt": a.prompt, "response": a.response,
            "rows": a.rows, "temperature": a.temperature, "entropy_coeff": a.entropy_coeff, "dtype": "float32",
            "tp": 1, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "tv_fp32_mib": unit,
            "max_abs_log_prob_diff": lp_diff,
            "grad_norm_rel_diff": abs(before["grad_norm"] - after["grad_norm"]) / abs(before["grad_norm"]),
            "memory_metric": "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS at the start of the pass; "
                             "fresh rank process per variant; the update includes creating grads + optimizer state"}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    cuda = "peak_extra_cuda_mib" in after["update"]
    lines = [
        "# bench_lm_head: actor passes, today's logits path vs the fused LM head",
        "",
        f"llama-shaped actor: hidden {a.hidden}, {a.layers} layers, V = {a.vocab}, fp32, TP 1; one packed "
        f"micro-batch of {a.rows} x ({a.prompt} prompt + {a.response} response) = {before['tokens']} tokens, "
        f"temperature {a.temperature}, entropy_coeff {a.entropy_coeff}; torch {torch.__version__}, "
        f"{meta['device']}. One [T, V] fp32 tensor = {unit:.0f} MiB.",
        "",
        "Memory = peak RSS during the pass minus RSS at its start (fresh rank process per variant)"
        + (", and CUDA max_memory_allocated." if cuda else ".") + " first_update also allocates the gradient "
        "buffers and Adam state (the same in both variants); update is the next one, on that state.",
        "",
        "| pass | before (MiB) | after (MiB) | after / before | before time (s) | after time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in ("log_prob", "first_update", "update"):
        b, f = before[p], after[p]
        rb, rf = b["peak_extra_rss_mib"], f["peak_extra_rss_mib"]
        lines.append(f"| {p} (RSS) | {rb:.0f} | {rf:.0f} | {rf / rb:.2f} | {b['time_s']:.1f} | {f['time_s']:.1f} |")
        if cuda:
            lines.append(f"| {p} (CUDA) | {b['peak_extra_cuda_mib']:.0f} | {f['peak_extra_cuda_mib']:.0f} | "
                         f"{f['peak_extra_cuda_mib'] / b['peak_extra_cuda_mib']:.2f} | | |")
    lines += ["", f"Same results: max |log-prob difference| {lp_diff:.2e}, update grad-norm relative difference "
                  f"{meta['grad_norm_rel_diff']:.2e}.",
              "Timings on a shared CPU are noisy (one run each); memory is the stable number."]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
