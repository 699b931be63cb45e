"""Moved to :mod:`megatron_gad.tools.tiny_models`; this re-export only serves
``tests/distributed/test_actor_grads.py`` until it imports from there. Delete it then."""

from megatron_gad.tools.tiny_models import CONFIGS, make_hf_model, make_tokenizer

__all__ = ["CONFIGS", "make_hf_model", "make_tokenizer"]
