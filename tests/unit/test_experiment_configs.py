"""configs/experiments: each config (Qwen2.5 3B/7B/14B, Qwen3-8B) passes `train --dry-run` and the planner
says it fits on H100-80GB at its own node count, with a margin (the planner's estimates will change)."""

import glob
import json
import os
import shutil

import pytest
from cli_helpers import run_cli

from megatron_gad.tools.tiny_models import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "experiments", "*.yaml")))


def _arch(path):
    return os.path.join(ROOT, "configs", "archs", os.path.basename(path).rsplit("-", 1)[0])


def test_the_configs():
    """Per Qwen2.5 size: the frozen-actor warmup (the seed recipe), the paper's joint warmup, GAD; and the
    Qwen3-8B student's GAD stage."""
    names = {os.path.basename(p) for p in CONFIGS}
    paper = {f"qwen2.5-{s}-{st}.yaml" for s in ("3b", "7b", "14b") for st in ("warmup", "jointwarmup", "gad")}
    assert names == paper | {"qwen3-8b-gad.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_plan_fits_h100_at_the_configs_node_count(path, capsys):
    code, out, err = run_cli(["plan", path, f"actor_rollout_ref.model.path={_arch(path)}", "--gpu", "h100-80gb",
                              "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["fits"], plan["peak_phase"]
    assert plan["peak_bytes"] <= 0.85 * plan["device_bytes"]  # room for the planner's estimate to grow
    assert plan["nodes"] == {"3b": 1, "7b": 2, "8b": 2, "14b": 4}[os.path.basename(path).split("-")[1]]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_dry_run(path, tmp_path, capsys):
    model = tmp_path / "model"  # the bundled architecture plus a tokenizer: no weights needed
    model.mkdir()
    shutil.copy(os.path.join(_arch(path), "config.json"), model / "config.json")
    make_tokenizer(str(model), 16)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "w3", "teacher_response": "w4"}) + "\n")
    code, out, err = run_cli(["train", path, f"actor_rollout_ref.model.path={model}", f"data.train_files=[{data}]",
                              f"data.val_files=[{data}]", "--dry-run", "--gpu", "h100-80gb"], capsys)
    assert code == 0, err
    assert "dry run: nothing started" in out and "verdict: FITS" in out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_published_settings(path):
    """configs/experiments/README.md's table: one actor update per step (LMOps ppo_mini_batch_size =
    train_batch_size = 256), n=8 at T=0.8, lr 1e-6 both, KL low_var_kl 0.001, grad clip 0.2."""
    from megatron_gad.config import load_config

    cfg = load_config(path)
    a, r = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert a.ppo_mini_batch_size == cfg.data.train_batch_size == 256
    assert (r.n, r.temperature, a.optim.lr, cfg.critic.optim.lr) == (8, 0.8, 1e-6, 1e-6)
    assert (a.use_kl_loss, a.kl_loss_type, a.kl_loss_coef, a.optim.clip_grad) == (True, "low_var_kl", 0.001, 0.2)
    stage = os.path.basename(path).rsplit("-", 1)[1]
    w = cfg.trainer.warmup
    assert {"gad.yaml": (0, "frozen"), "warmup.yaml": (10, "frozen"),
            "jointwarmup.yaml": (1000000, "sft")}[stage] == (cfg.trainer.critic_warmup, w.mode)
    if stage == "jointwarmup.yaml":
        assert w.critic_only_steps == 10 and w.until_d_acc is None and cfg.trainer.total_epochs == 1
