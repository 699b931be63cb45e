"""CUDA-only attention backends (varlen_attn, flash-attn, compiled flex, sdpa) against eager in bf16.

The model's ``CoreAttention`` on a pack of 8 mixed-length sequences (4,096 tokens, 16 / 2 heads, head
dim 128): output and q/k/v gradients of each fused backend within bf16 tolerance of an fp32 eager
reference computed from the same bf16 inputs (eager in bf16 itself carries bf16 score rounding), and
``auto`` picks a fused backend. Their CPU twins (sdpa, flex forward) run in
``tests/distributed/test_attention_backends.py``.
"""

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "varlen", "flash", "flex"])
def test_fused_backend_matches_eager(backend):
    from gpu_checks_attention import make_attention, max_rel, packed_inputs, run_packed

    from megatron_gad.models.attention import unavailable_reason

    reason = unavailable_reason(backend, "cuda", torch.bfloat16, needs_grad=True)
    if reason:
        pytest.skip(reason)
    qkv, grad, psp, _ = packed_inputs(4096, 8, 16, 2, 128, torch.bfloat16, torch.device("cuda"))
    ref_out, ref_grads = run_packed(make_attention("eager", 16, 2, 128, torch.float32),
                                    [x.float() for x in qkv], grad.float(), psp)
    mod = make_attention(backend, 16, 2, 128, torch.bfloat16)
    assert mod.choose(True, qkv[0]) != "eager"
    out, grads = run_packed(mod, qkv, grad, psp)
    assert max_rel(out, ref_out) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 5e-2
