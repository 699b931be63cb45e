"""Run Megatron-Core on CPU (gloo) — the whole CUDA adaptation, in one place.

megatron-core 0.16 assumes CUDA in a handful of spots that matter for our use:
  * the RNG tracker reads/writes CUDA generator states (``tensor_parallel.random``);
  * pipeline schedules and p2p communication allocate with ``device="cuda"`` /
    ``torch.cuda.current_device()`` and call ``torch.cuda.synchronize()``;
  * ``.cuda()`` calls on buffers (e.g. causal masks, DDP buckets);
  * the distributed optimizer and grad clipping assert ``param.type() == 'torch.cuda.FloatTensor'``.

On a machine without a GPU, :func:`enable_cpu_mode` patches those entry points process-wide and
:func:`cpu_device_mode` (a ``TorchFunctionMode``; these are per thread, so enter it in the thread
that runs the model) maps ``device="cuda"`` to CPU and makes ``.cuda()`` a no-op. Nothing here is
applied when CUDA is available. The model-parallel RNG forks become no-ops on CPU: weights are
initialised on CPU by Megatron (``use_cpu_initialization``) and our models run without dropout, so
no TP-region randomness exists to track.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuDeviceMode(TorchFunctionMode):
    """Redirect CUDA allocations / moves to CPU for every torch call in this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda() -> stays where it is
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if name == "to" and len(args) > 1 and not isinstance(args[1], torch.dtype):
            if isinstance(args[1], (str, torch.device, int)):
                args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def enable_cpu_mode() -> None:
    """Patch the CUDA-only entry points megatron-core uses (idempotent; no-op with a GPU)."""
    global _ENABLED
    if _ENABLED or cuda_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    dummy_state = torch.zeros(1, dtype=torch.uint8)
    mrandom._get_cuda_rng_state = lambda *a, **k: dummy_state.clone()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: dummy_state.clone()
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0
    torch.cuda.empty_cache = lambda: None

    # Optimizer / grad-clip type checks compare against the CUDA type string.
    orig_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not self.is_cuda and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return orig_type(self, dtype, non_blocking, **kw) if dtype is not None else orig_type(self)

    torch.Tensor.type = _type
    _ENABLED = True


@contextlib.contextmanager
def cpu_device_mode():
    """Context in which Megatron code runs on CPU; a plain ``nullcontext`` when CUDA exists."""
    if cuda_available():
        yield
        return
    enable_cpu_mode()
    with _CpuDeviceMode():
        yield
