"""Builds the demo's tokenizer and a random-initialised tiny Llama student, both saved in HF format."""

from __future__ import annotations

import os
import shutil

from megatron_gad.demo.task import SYMBOLS
from megatron_gad.tokenizer import load_tokenizer, save_generic

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
WORDS = ("len",)  # words used by prompts, one token each
VOCAB_MULTIPLE = 8


def _vocab() -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + list(SYMBOLS) + [str(d) for d in range(10)] + [" "] + list(WORDS)
    # Unused filler tokens pad the vocabulary to a multiple of 8 (friendlier for TP splits and kernels).
    n_unused = -len(tokens) % VOCAB_MULTIPLE
    tokens += [f"<unused{i}>" for i in range(n_unused)]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(out_dir: str | os.PathLike) -> str:
    """Saves a character-level tokenizer (plus prompt words) loadable with AutoTokenizer; returns out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Words first, then single characters: "len 12" -> "len", " ", "1", "2".
    alternatives = "|".join(WORDS) + "|."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(alternatives), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without separators
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    save_generic(hf, out_dir)
    return str(out_dir)


def build_tiny_student(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 172,
) -> str:
    """Saves a random-initialised LlamaForCausalLM (safetensors) with the tokenizer files; returns out_dir.

    The weights depend only on ``seed`` (the global torch RNG is left untouched).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        src = os.path.join(str(tokenizer_dir), name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(str(out_dir), name))
    return str(out_dir)
