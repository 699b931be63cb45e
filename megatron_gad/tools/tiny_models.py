"""Tiny random Hugging Face models (Llama 2 / Llama 3.1 / Mistral / Qwen2 / Qwen3) and a word-level tokenizer,
built locally with ``transformers`` (no downloads): fixtures for the tests and ``benchmarks/gpu_check.py``."""

from __future__ import annotations

import torch

CONFIGS = {
    # GQA (4 heads, 2 kv heads), untied embeddings
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"},
    # Qwen2: qkv bias, tied embeddings
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu"},
    # Qwen3: q/k RMSNorm, head_dim 16 != hidden / heads (8), no qkv bias, untied (as Qwen3-8B and up)
    "qwen3": {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 96,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False},
    # Llama 3.1: llama3-scaled RoPE with an original window of 64 tokens (Llama 3.1: 8192), so that sequences
    # of ~100 tokens run past it; head_dim 8 at theta 1e4 puts one frequency in each of the three regimes
    # (wavelength < 64/4 kept, between 16 and 64 smoothed, > 64 divided by the factor). Tied, as Llama 3.2 1B/3B.
    "llama31": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 256,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}},
    # Mistral (v0.3 layout: Llama's tensors); a sliding window longer than any sequence the tests run
    "mistral": {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 96,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "sliding_window": 200, "tie_word_embeddings": False, "hidden_act": "silu"},
}


def make_tokenizer(out_dir: str, vocab_size: int) -> None:
    """Save a word-level tokenizer: <pad>=0, <s>=1, </s>=2, then w3 .. w{vocab_size-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_gad.tokenizer import save_generic

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    save_generic(fast, out_dir)  # declares its class: every family's directory loads this same tokenizer


def make_hf_model(out_dir: str, family: str = "llama", seed: int = 0, **overrides) -> str:
    """Save a random ``family`` model (CONFIGS, with ``overrides``) and its tokenizer in out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**CONFIGS[family], **overrides}
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # random norms/biases so the mapping of every tensor is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(out_dir, cfg["vocab_size"])
    return out_dir

