"""Which Hugging Face architectures are accepted, and the refusals that keep a model from running silently
wrong (a scaled RoPE read as plain RoPE; an unknown family) as one-line input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli

from megatron_gad.models.arch import UnsupportedArch, arch_from_hf_config
from megatron_gad.tools.tiny_models import CONFIGS, make_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
GOOD = json.dumps({"content": "w5 w6", "teacher_response": "w7"})


def _tiny_llama_config(**kw) -> dict:
    """A config.json written by the real transformers config class (so its key layout is today's)."""
    from transformers import LlamaConfig

    base = {k: v for k, v in CONFIGS["llama"].items() if k != "model_type"}
    return LlamaConfig(**{**base, **kw}).to_dict()


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_transformers5_rope_parameters_scaled_is_refused(kind):
    cfg = _tiny_llama_config(rope_parameters={"rope_type": kind, "factor": 8.0, "rope_theta": 10000.0,
                                              "original_max_position_embeddings": 32})
    assert "rope_parameters" in cfg and not cfg.get("rope_scaling")  # the transformers-5 layout
    with pytest.raises(UnsupportedArch, match=f"rope_type '{kind}'"):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_is_read_from_either_key(key):
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.5, "high_freq_factor": 4.5,
            "original_max_position_embeddings": 8192}
    cfg = dict(CONFIGS["llama"], **{key: rope}, rope_theta=500000.0)
    a = arch_from_hf_config(cfg)
    assert (a.rope_type, a.rope_factor, a.rope_low_freq_factor, a.rope_high_freq_factor,
            a.rope_original_max_positions, a.rope_theta) == ("llama3", 32.0, 1.5, 4.5, 8192, 500000.0)
    del rope["low_freq_factor"]
    with pytest.raises(UnsupportedArch, match="needs 'low_freq_factor'"):
        arch_from_hf_config(dict(CONFIGS["llama"], **{key: rope}))


def test_qwen3_and_mistral_fields():
    from transformers import MistralConfig, Qwen3Config

    def cfg(cls, fam, **kw):
        base = {k: v for k, v in CONFIGS[fam].items() if k != "model_type"}
        return cls(**{**base, **kw}).to_dict()

    q = arch_from_hf_config(cfg(Qwen3Config, "qwen3", use_sliding_window=False, sliding_window=4096))
    assert (q.qk_layernorm, q.head_dim, q.qkv_bias, q.sliding_window) == (True, 16, False, None)
    windowed = cfg(Qwen3Config, "qwen3", use_sliding_window=True, sliding_window=64)
    assert arch_from_hf_config(windowed).sliding_window == 64
    m = arch_from_hf_config(cfg(MistralConfig, "mistral", sliding_window=None))
    assert (m.model_type, m.qk_layernorm, m.sliding_window, m.head_dim) == ("mistral", False, None, 8)
    assert arch_from_hf_config(cfg(MistralConfig, "mistral", sliding_window=4096)).sliding_window == 4096
    with pytest.raises(UnsupportedArch, match="attention_bias"):
        arch_from_hf_config(cfg(Qwen3Config, "qwen3", attention_bias=True))


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", ["type", "rope_type"])
def test_scaled_rope_under_either_key_is_refused(key, kind):
    cfg = dict(CONFIGS["llama"], **{key: {kind: "dynamic", "factor": 2.0}})
    with pytest.raises(UnsupportedArch, match=r"rope_type 'dynamic'.*supported: default"):
        arch_from_hf_config(cfg)


def test_plain_rope_under_rope_parameters_is_read():
    cfg = _tiny_llama_config(rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    cfg.pop("rope_theta", None)
    assert arch_from_hf_config(cfg).rope_theta == 123.0


def test_unsupported_model_type_names_the_families():
    with pytest.raises(UnsupportedArch, match=r"'gemma3_text' is not supported.*llama"):
        arch_from_hf_config(dict(CONFIGS["llama"], model_type="gemma3_text"))


@pytest.mark.parametrize("overrides,needles", [
    ({"model_type": "gemma3_text"}, ["'gemma3_text' is not supported", "supported model families: llama"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}}, ["rope_type 'yarn'"]),
    ({"model_type": "mistral", "sliding_window": 16},
     ["longer than the model's sliding_window=16", "data.max_prompt_length+data.max_response_length="]),
])
def test_train_refuses_unsupported_architecture(overrides, needles, tmp_path, capsys):
    """Through the console script: exit 2, one line naming the model path and the supported ones,
    before any worker starts (it failed inside a worker with a traceback and exit 1)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(CONFIGS["llama"], **overrides)))
    make_tokenizer(str(model), CONFIGS["llama"]["vocab_size"])
    data = tmp_path / "train.jsonl"
    data.write_text((GOOD + "\n") * 8)
    code, out, err = run_cli(["train", DEMO, f"actor_rollout_ref.model.path={model}", f"data.train_files=[{data}]",
                              f"trainer.default_local_dir={tmp_path / 'run'}"], capsys)
    assert code == 2, err
    assert err.startswith("megatron-gad train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    assert f"actor_rollout_ref.model.path={model}" in err
    for needle in needles:
        assert needle in err, (needle, err)
