"""``models.build.layer_spec`` falls back to the local spec when Transformer Engine is unusable.

A TE wheel whose shared library fails to load raises ``OSError`` (or ``RuntimeError``) from
``import transformer_engine``, not ``ImportError``. Emulated on CPU: CUDA reported available and an
import hook that makes ``import transformer_engine`` raise; both undone by ``monkeypatch``.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

import pytest
import torch


class _BrokenTE(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``transformer_engine`` and fails while executing it, like a wheel missing its .so
    (every import attempt fails again, as a failed import leaves nothing in sys.modules)."""

    def __init__(self, exc: Exception):
        self.exc = exc

    def find_spec(self, name, path=None, target=None):
        if name == "transformer_engine" or name.startswith("transformer_engine."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.exc


def _te_modules() -> dict:
    return {m: mod for m, mod in sys.modules.items() if m.split(".")[0] == "transformer_engine"}


@pytest.fixture
def broken_te(monkeypatch):
    before = _te_modules()

    def install(exc: Exception):
        for name in before:
            del sys.modules[name]
        monkeypatch.setattr(sys, "meta_path", [_BrokenTE(exc), *sys.meta_path])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    yield install
    # layer_spec leaves TE blocked (None in sys.modules) for the process: undo it for other tests
    for name in _te_modules():
        del sys.modules[name]
    sys.modules.update(before)


@pytest.mark.parametrize("exc", [
    OSError("libtransformer_engine.so: cannot open shared object file: No such file or directory"),
    RuntimeError("CUDA driver version is insufficient for CUDA runtime version"),
    ImportError("No module named 'transformer_engine_torch'"),
])
def test_unloadable_te_falls_back_to_local_spec(broken_te, caplog, exc):
    from megatron_gad.models.attention import CoreAttention
    from megatron_gad.models.build import layer_spec

    broken_te(exc)
    with caplog.at_level(logging.INFO):
        spec = layer_spec(None)
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.module is CoreAttention and core.params == {"backend": "auto"}
    lines = [r.getMessage() for r in caplog.records if "Transformer Engine" in r.getMessage()]
    assert len(lines) == 1, lines
    assert type(exc).__name__ in lines[0] and str(exc) in lines[0] and "local spec" in lines[0]
    # Megatron's own guarded TE imports (``except ImportError``) now take their fallback too
    with pytest.raises(ImportError):
        import transformer_engine  # noqa: F401


def test_patches_are_undone():
    """Runs after the test above (file order): no fake CUDA, no import hook, no half-imported TE."""
    assert not any(isinstance(f, _BrokenTE) for f in sys.meta_path)
    assert torch.cuda.is_available.__module__.startswith("torch")
    assert all(mod is not None for mod in _te_modules().values())


def test_fp8_reaches_megatron_and_needs_the_te_spec():
    """``...megatron.fp8`` goes into Megatron's TransformerConfig; the local spec (no TE here) refuses
    it instead of silently training in bf16."""
    from megatron_gad.models.arch import Arch
    from megatron_gad.models.build import build_model, is_te_spec, layer_spec, transformer_config

    arch = Arch(model_type="llama", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4,
                tie_word_embeddings=False, qkv_bias=False, head_dim=8)
    cfg = transformer_config(arch, 1, 1, "bfloat16", fp8="hybrid", fp8_recipe="tensorwise")
    assert (cfg.fp8, cfg.fp8_recipe) == ("hybrid", "tensorwise")
    assert not is_te_spec(layer_spec(arch))
    with pytest.raises(RuntimeError, match=r"megatron.fp8='hybrid' needs the Transformer Engine layer spec"):
        build_model(arch, "actor", 1, 1, "bfloat16", fp8="hybrid")
