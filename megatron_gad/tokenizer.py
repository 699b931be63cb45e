"""Loading a tokenizer from a model directory the same way whatever the model family and transformers
release.

``AutoTokenizer`` picks the class from the model's ``model_type`` for some families even when the
directory declares another one: transformers 5 loads a ``qwen2`` directory with ``Qwen2Tokenizer``, which
rebuilds a byte-level BPE from the vocabulary and ignores the pre-tokenizer and model that
``tokenizer.json`` describes. For a directory whose ``tokenizer_config.json`` declares the generic
``PreTrainedTokenizerFast`` / ``TokenizersBackend`` class, ``tokenizer.json`` *is* the whole tokenizer
(that is what those classes save), so it is loaded as declared; every other directory goes through
``AutoTokenizer`` unchanged (a Qwen2.5 or Llama checkpoint declares its own class and loads as before).
"""

from __future__ import annotations

import json
import os

# The classes that save the complete `tokenizers` pipeline in tokenizer.json (transformers 4 and 5 names).
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def declared_class(path: str | os.PathLike) -> str | None:
    """``tokenizer_class`` of ``path``'s tokenizer_config.json, or None (no file, unreadable, not set)."""
    cfg = os.path.join(str(path), "tokenizer_config.json")
    try:
        with open(cfg) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in ``path`` (a local directory or a hub name ``AutoTokenizer`` accepts)."""
    path = str(path)
    if declared_class(path) in GENERIC_CLASSES and os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def save_generic(tokenizer, out_dir: str | os.PathLike) -> None:
    """Saves a ``PreTrainedTokenizerFast`` built from a ``tokenizers`` object and declares its class as
    ``PreTrainedTokenizerFast`` (a name transformers 4 and 5 both know), so ``load_tokenizer`` reads the same
    tokenizer back from any model directory it is copied into, whatever the model family."""
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = os.path.join(str(out_dir), "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
