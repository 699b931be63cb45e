"""Shared set-up of the in-process (trainer.workers=local) trainer tests: tiny demo assets and a
3-step config (1 frozen warmup step + 2 GAD steps) that runs in seconds."""

from __future__ import annotations


def build_assets(root: str, hidden: int = 32, heads: int = 4, kv_heads: int = 2, ffn: int = 64) -> dict:
    """Tokenizer, a random 2-layer student (vLLM tests need head_dim = hidden / heads >= 32) and data."""
    from megatron_gad.demo.assets import build_tiny_student, build_tokenizer
    from megatron_gad.demo.task import write_dataset

    tok = build_tokenizer(f"{root}/tok")
    model = build_tiny_student(f"{root}/model", tok, seed=0, hidden=hidden, layers=2, heads=heads, kv_heads=kv_heads,
                               ffn=ffn)
    data = write_dataset(f"{root}/data", n_train=32, n_heldout=8, seed=0)
    return {"model": model, "train": data["train"], "root": root}


def local_overrides(assets: dict, run_dir: str, kl: bool) -> list[str]:
    return [f"data.train_files=[{assets['train']}]", f"actor_rollout_ref.model.path={assets['model']}",
            "actor_rollout_ref.model.make_vocab_size_divisible_by=8",
            "data.max_prompt_length=16", "data.max_response_length=12", "data.train_batch_size=2",
            "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.temperature=1.0",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.optim.lr=1e-3", "critic.optim.lr=1e-3", "critic.ppo_micro_batch_size_per_gpu=1",
            f"actor_rollout_ref.actor.use_kl_loss={str(kl).lower()}", "critic.fused_loss=torch", "trainer.device=cpu",
            "trainer.workers=local", f"trainer.default_local_dir={run_dir}", "trainer.logger=[jsonl]",
            "data.on_bad_row=skip", "trainer.total_training_steps=3", "trainer.critic_warmup=1",
            "trainer.resume_mode=disable"]
