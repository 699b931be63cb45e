"""No device->host sync in a layer on the packed training path, and the sync-free RoPE is bit-identical.

Syncs are counted on CPU where they would block a GPU stream: every ``aten._local_scalar_dense``
(``.item()``, ``bool(tensor)``, ``int(tensor)``) seen by a dispatch mode, plus every ``Tensor.tolist``
call (which reads CPU memory without dispatching). A packed forward+backward of the same model with
2 and with 4 layers must count the same number: 0 per layer (the per-micro-batch work, e.g. the
eager path's host segment bounds, is counted once). The count is shown to work: with Megatron's
unfused THD RoPE (``apply_rope_fusion=False``, today's path before this change) the 4-layer model
counts more than the 2-layer one; and the eager model's logits and gradients are ``torch.equal``
with and without the hook.

RoPE: ``models.rope.apply_rotary_pos_emb_thd`` against Megatron-Core's own unfused
``_apply_rotary_pos_emb_thd`` on mixed-length segments (fp32 and bf16): outputs and input gradients
``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch

LENGTHS = (5, 40, 3, 17, 1)


class _Counter:
    def __init__(self):
        self.n = 0
        self.depth = 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.n += 1
                return func(*args, **(kwargs or {}))

        self._orig = torch.Tensor.tolist

        def tolist(t, *a, **k):
            # a torch-function mode (cpu_compat's) re-enters this wrapper: count the outermost call only
            counter.depth += 1
            try:
                counter.n += counter.depth == 1
                return counter._orig(t, *a, **k)
            finally:
                counter.depth -= 1

        torch.Tensor.tolist = tolist
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        torch.Tensor.tolist = self._orig


def _model(layers: int, backend: str, rope_fusion: bool):
    from megatron.core.models.gpt import GPTModel

    from megatron_gad.models.arch import Arch
    from megatron_gad.models.attention import local_layer_spec
    from megatron_gad.models.build import transformer_config

    arch = Arch(model_type="llama", vocab_size=64, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2,
                head_dim=8,
                ffn_hidden_size=64, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                tie_word_embeddings=False, qkv_bias=False)
    cfg = transformer_config(arch, 1, 1)
    cfg.apply_rope_fusion = rope_fusion
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=local_layer_spec(backend=backend), vocab_size=64,
                    max_sequence_length=128, position_embedding_type="rope")


def _worker(rank, world):
    from megatron_gad.engine.packing import pack_sequences
    from megatron_gad.parallel import state
    from megatron_gad.parallel.cpu_compat import cpu_device_mode

    with cpu_device_mode():
        state.init_model_parallel(1, 1)
        out, logits_of = {}, {}
        for backend in ("auto", "eager", "sdpa"):
            for fusion in (True, False):
                for layers in (2, 4):
                    model = _model(layers, backend, fusion)
                    # a fresh packed batch per count: its per-micro-batch cache starts empty
                    g = torch.Generator().manual_seed(0)
                    p = pack_sequences([torch.randint(1, 64, (n,), generator=g) for n in LENGTHS])
                    with _Counter() as c:
                        logits = model(p.input_ids, p.position_ids, None, packed_seq_params=p.packed_seq_params())
                        logits.float().square().mean().backward()
                    out[(backend, fusion, layers)] = c.n
                    grads = [q.grad.clone() for q in model.parameters()]
                    logits_of[(backend, fusion, layers)] = (logits.detach(), grads)
        # eager with the sync-free RoPE hook == eager with Megatron's unfused RoPE, bit for bit
        for layers in (2, 4):
            (a, ga), (b, gb) = logits_of[("eager", True, layers)], logits_of[("eager", False, layers)]
            out[("bitwise", layers)] = torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
        return out


@pytest.mark.distributed
def test_no_host_sync_per_layer():
    from megatron_gad.parallel.launch import run_local

    got = run_local(_worker, 1)[0]
    print(got)
    for backend in ("auto", "eager", "sdpa"):
        assert got[(backend, True, 4)] == got[(backend, True, 2)], (backend, got)
        # the counter sees syncs: Megatron's unfused THD RoPE has them in every layer
        assert got[(backend, False, 4)] > got[(backend, False, 2)], (backend, got)
    assert got[("bitwise", 2)] and got[("bitwise", 4)]
    # the packed pass itself: at most one host copy of cu_seqlens per micro-batch (eager / sdpa loops)
    assert got[("sdpa", True, 2)] <= 1, got


class _CP:
    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thd_rope_bit_identical_to_megatron(dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    from megatron_gad.models.rope import apply_rotary_pos_emb_thd, thd_positions

    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    T, heads, d = int(cu[-1]), 3, 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(max(LENGTHS), dtype=torch.float32)
    freqs = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)[:, None, None, :]  # [max_s, 1, 1, d]
    x = torch.randn(T, heads, d, generator=g).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = _apply_rotary_pos_emb_thd(a, cu, freqs, cp_group=_CP())
    got = apply_rotary_pos_emb_thd(b, cu, freqs)
    assert torch.equal(ref, got)
    w = torch.randn(T, heads, d, generator=g).to(dtype)
    (ref * w).sum().backward()
    (got * w).sum().backward()
    assert torch.equal(a.grad, b.grad)
    # positions restart at each boundary (independent of the code above)
    assert thd_positions(cu, T).tolist() == [i for n in LENGTHS for i in range(n)]
