"""One prepared device check for a session that is lent a GPU (and a smoke run of itself on CPU).

Checks, each recorded independently (a failure is written down, the next check still runs):
  1. disc_loss  fused discriminator head + BT loss: torch vs Triton vs Transformer Engine — loss and
                gradient agreement, time per forward+backward (GPU events), at H=4096, 32 prompts x 8;
  2. logprob    vocab-parallel chunked log-prob vs naive log_softmax at V=151,936, T=4,096: peak memory
                (torch.cuda.max_memory_allocated) and time, side by side;
  3. megatron   a tiny random HF Llama and Qwen2 through Megatron-Core on this device (TE layer spec
                when TE is importable, NCCL process group): logits vs transformers, greedy decoding
                (KV cache) vs transformers;
  4. trainer    three GAD steps (1 warmup + 2 GAD) of the Ray trainer with trainer.device=cuda.

    python benchmarks/gpu_check.py --out benchmarks/results          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --small               # smoke run here

Writes OUT/gpu_check.json; prints it as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _timed(fn, dev: str, reps: int = 10) -> float:
    """Median seconds of fn() (GPU-synchronised)."""
    times = []
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_disc_loss(dev: str, small: bool) -> dict:
    from megatron_gad.kernels.disc_loss import disc_head_bt_loss

    N, n, H = (4, 2, 64) if small else (32, 8, 4096)
    g = torch.Generator(device=dev).manual_seed(0)
    ht = torch.randn(N, H, device=dev, generator=g)
    hs = torch.randn(N * n, H, device=dev, generator=g)
    w = torch.randn(1, H, device=dev, generator=g) * 0.02
    b = torch.zeros(1, device=dev)
    out = {}

    def run(impl, weight):
        a, s, ww = ht.clone().requires_grad_(), hs.clone().requires_grad_(), weight
        loss, _, _, _ = disc_head_bt_loss(a, s, ww, b if impl != "te" else None, n, impl=impl)
        loss.backward()
        return loss.detach(), a.grad, s.grad

    ref = run("torch", w.clone().requires_grad_())
    out["torch_s"] = _timed(lambda: run("torch", w.clone().requires_grad_()), dev)
    impls = ["triton"] if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else []
    try:
        from megatron_gad.kernels.te_disc import TEDiscHead

        if dev == "cuda":
            head = TEDiscHead(H).to(dev)
            with torch.no_grad():
                head.proj.weight[:1].copy_(w)
            impls.append(("te", head))
    except Exception as exc:  # TE missing: say so
        out["te"] = f"unavailable: {exc}"
    for impl in impls:
        name, weight = impl if isinstance(impl, tuple) else (impl, None)
        mk = (lambda weight=weight: weight) if weight is not None else (lambda: w.clone().requires_grad_())
        got = run(name, mk())
        out[f"{name}_loss_abs_err"] = float((got[0] - ref[0]).abs())
        out[f"{name}_grad_teacher_max_err"] = float((got[1] - ref[1]).abs().max())
        out[f"{name}_grad_student_max_err"] = float((got[2] - ref[2]).abs().max())
        out[f"{name}_s"] = _timed(lambda name=name, mk=mk: run(name, mk()), dev)
        out[f"{name}_speedup_vs_torch"] = out["torch_s"] / out[f"{name}_s"]
    return out


def check_logprob(dev: str, small: bool) -> dict:
    from megatron_gad.kernels.logprob import vocab_parallel_logprob

    T, V = (256, 1024) if small else (4096, 151936)
    target = torch.randint(0, V, (T,), device=dev)
    out = {}
    for variant in ("naive", "chunked", "chunked_inplace"):
        torch.manual_seed(0)  # the same logits for every variant: lp_sum must agree
        logits = torch.randn(T, V, device=dev, requires_grad=True)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()

        def step(logits=logits, variant=variant):
            x = logits * 1.0  # non-leaf, like an output layer's logits
            if variant == "naive":
                lp = torch.log_softmax(x, -1).gather(-1, target[:, None])[:, 0]
            else:
                lp, _ = vocab_parallel_logprob(x, target, chunk_size=1024,
                                               inplace_backward=variant == "chunked_inplace")
            lp.sum().backward()
            return lp.detach()

        lp = step()
        if dev == "cuda":
            out[f"{variant}_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[f"{variant}_s"] = _timed(step, dev, reps=5)
        out[f"{variant}_lp_sum"] = float(lp.double().sum())
    if dev == "cuda":
        for v in ("chunked", "chunked_inplace"):
            out[f"{v}_peak_vs_naive"] = out[f"{v}_peak_extra_mib"] / out["naive_peak_extra_mib"]
    for v in ("chunked", "chunked_inplace"):
        out[f"{v}_time_vs_naive"] = out[f"{v}_s"] / out["naive_s"]
    return out


def _megatron_rank(rank, world, path, ids):
    from megatron_gad.engine.generate import generate
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.parallel import state

    role = ModelShard("actor", path, 1, 1, vocab_divisible_by=8)

    def loss_fn(out, batch):
        return out.sum() * 0, {"logits": out}

    logits = role.forward([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], loss_fn)[0]["logits"]
    gen = generate(role, ids, torch.ones_like(ids), max_new_tokens=8, eos_id=2, pad_id=0, greedy=True)
    return {"logits": logits.float().cpu(), "tokens": gen["responses"], "spec": type(
        role.module.decoder.layers[0].self_attention.linear_qkv).__name__, "device": str(state.device())}


def check_megatron(dev: str, small: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.tiny_models import make_hf_model

    out = {}
    root = tempfile.mkdtemp(prefix="gpu_check_")
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for fam in ("llama", "qwen2"):
        path = make_hf_model(os.path.join(root, fam), fam)
        got = run_local(_megatron_rank, 1, path, ids)[0]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
        with torch.no_grad():
            ref = hf(ids.to(dev)).logits.float().cpu()
            greedy = hf.generate(ids.to(dev), max_new_tokens=8, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)[:, 12:].cpu()
        out[fam] = {"logits_max_err": float((got["logits"][..., :96] - ref).abs().max()),
                    "greedy_equal": bool(torch.equal(got["tokens"][:, :greedy.shape[1]], greedy)),
                    "qkv_module": got["spec"], "device": got["device"]}
    return out


def check_trainer(dev: str, small: bool) -> dict:
    import ray

    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    root = tempfile.mkdtemp(prefix="gpu_check_trainer_")
    tok = build_tokenizer(os.path.join(root, "tok"))
    model = build_tiny_student(os.path.join(root, "model"), tok, seed=0)
    data = write_dataset(os.path.join(root, "data"), n_train=64, n_heldout=4, seed=0)
    cfg = load_config(os.path.join(HERE, "..", "configs", "demo.yaml"), [
        f"data.train_files=[{data['train']}]", f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={os.path.join(root, 'run')}", "trainer.total_training_steps=3",
        "trainer.critic_warmup=1", f"trainer.device={dev}", "critic.fused_loss=auto"])
    validate(cfg)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        trainer = GADTrainer(cfg)
        trainer.fit()
        trainer.shutdown()
    finally:
        ray.shutdown()
    with open(os.path.join(root, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"stages": [r["stage"] for r in rows], "step_s": [r["timing_s/step"] for r in rows],
            "d_acc": [r["critic/d_acc"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--only", nargs="*", default=["disc_loss", "logprob", "megatron", "trainer"])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__}
    checks = {"disc_loss": check_disc_loss, "logprob": check_logprob, "megatron": check_megatron,
              "trainer": check_trainer}
    for name in args.only:
        t0 = time.time()
        try:
            report[name] = checks[name](args.device, args.small)
        except Exception:
            report[name] = {"error": traceback.format_exc(limit=8)}
        report[name]["wall_s"] = time.time() - t0
        print(f"[gpu_check] {name}: {json.dumps(report[name])[:400]}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_check_{args.device}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
