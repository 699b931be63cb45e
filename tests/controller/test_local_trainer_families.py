"""A short GAD run (1 frozen warmup step, then 2 GAD steps; trainer.workers=local) for each new student family:
Qwen3 (q/k norms, explicit head_dim), Llama 3.1 (llama3-scaled RoPE with an original window shorter than the
run's sequences) and Mistral. Both roles (actor and discriminator) are built from the family's checkpoint,
trained, and saved; the saved actor exports back to a Hugging Face directory of the same family."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from local_setup import local_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# tiny_models family -> overrides for the demo tokenizer's task (sequences up to 16 + 12 = 28 tokens)
FAMILIES = {
    "qwen3": {},
    "llama31": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}},
    "mistral": {"sliding_window": 32},
}


def _family_model(root: str, family: str, tok_dir: str) -> str:
    """A 2-layer random model of ``family`` (the real HF config class) with the demo tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from megatron_gad.tools.tiny_models import CONFIGS

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = {**CONFIGS[family], **FAMILIES[family], "vocab_size": len(tok), "num_hidden_layers": 2}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = os.path.join(root, family)
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(tok_dir):
        if os.path.isfile(os.path.join(tok_dir, name)):
            shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
    return out


def _run(rank, world, overrides, export_dir):
    from megatron_gad.config import load_config, validate
    from megatron_gad.controller.trainer import GADTrainer
    from megatron_gad.tools.convert import mcore_to_hf_on_rank

    cfg = load_config(None, overrides)
    validate(cfg)
    tr = GADTrainer(cfg)
    before = tr.actor.weights_fingerprint()
    tr.fit()
    after = tr.actor.weights_fingerprint()
    tr.shutdown()
    mcore_to_hf_on_rank(os.path.join(cfg.trainer.default_local_dir, "global_step_3", "actor"), export_dir)
    return {"before": before, "after": after}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gad_run_per_family(assets, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from megatron_gad.models.arch import load_arch
    from megatron_gad.parallel.launch import run_local

    model = _family_model(str(tmp_path), family, os.path.join(assets["root"], "tok"))
    arch = load_arch(model)
    assert arch.model_type == CONFIGS_TYPE[family]
    if family == "llama31":  # the run's sequences go past the original RoPE window
        assert arch.rope_type == "llama3" and arch.rope_original_max_positions < 28
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    overrides = [o for o in local_overrides(assets, run, kl=True) if not o.startswith("actor_rollout_ref.model.path")]
    got = run_local(_run, 1, [*overrides, f"actor_rollout_ref.model.path={model}"], export)[0]
    assert got["after"] != got["before"]  # the GAD steps updated the student
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [m["stage"] for m in rows] == ["warmup", "gad", "gad"]
    for m in rows:
        for key in ("critic/d_loss", "critic/d_acc") + (("actor/pg_loss", "actor/kl") if m["stage"] == "gad" else ()):
            assert key in m and m[key] == m[key] and abs(m[key]) < 1e6, (family, key, m.get(key))
    assert os.path.isdir(os.path.join(run, "global_step_3", "critic"))
    # the trained student is a checkpoint of its family that transformers loads as is
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["model_type"] == CONFIGS_TYPE[family]
    AutoModelForCausalLM.from_pretrained(export)


CONFIGS_TYPE = {"qwen3": "qwen3", "llama31": "llama", "mistral": "mistral"}
