"""Every attention backend that runs on CPU (sdpa, flex) equals the eager reference on packed batches.

``GPTModel`` on the local spec with ``core_attention`` = ``models.attention.CoreAttention`` is built
once per backend from the same tiny random HF Llama (GQA, untied) / Qwen2 (qkv bias, tied) models
(hidden 64, head dim 16). One packed row holds sequences whose lengths differ by 30x plus an
alignment pad segment. Checked at TP x PP 1x1 and 2x2 (through Megatron's pipeline schedule), fp32:

* packed logits of sdpa and flex equal eager within 1e-5, with ``MEGATRON_GAD_EMULATE_TE_MASKING``
  unset and set, and each equals ``transformers`` run on every sequence alone (the independent
  reference) within 1e-5;
* unpacked: a right-padded batch with the padding mask (sdpa's additive mask) equals eager; a
  left-padded row differs from HF only under the switch (the mask ignored, as TE does), on sdpa too;
* the sensitivity check: the packed row run as one causal sequence is far from the reference;
* gradients (PP=1, sdpa; flex has no CPU backward): the packed backward equals eager's to 1e-6 of
  the largest gradient.
"""

from __future__ import annotations

import os

import pytest
import torch

# the pipeline-schedule forward of the packed-attention tests (same batches, same logits kept)
from test_packed_attention import _run_batches as _run

FAMILIES = ("llama", "qwen2")
BACKENDS = ("eager", "sdpa", "flex")
ATOL = 1e-5
VOCAB, VOCAB_PAD = 96, 128
LENGTHS = (4, 61, 7, 2, 30, 13)
ALIGN = 4
EMULATE = "MEGATRON_GAD_EMULATE_TE_MASKING"


def _sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in LENGTHS]


def _build(path, tp, pp, backend):
    from megatron.core.models.gpt import GPTModel

    from megatron_gad.models import hf as hfmap
    from megatron_gad.models.arch import load_arch
    from megatron_gad.models.attention import local_layer_spec
    from megatron_gad.models.build import transformer_config
    from megatron_gad.parallel import state

    arch = load_arch(path)
    lay = state.layout()
    torch.manual_seed(0)
    model = GPTModel(config=transformer_config(arch, tp, pp), transformer_layer_spec=local_layer_spec(backend=backend),
                     vocab_size=VOCAB_PAD, max_sequence_length=arch.max_position_embeddings,
                     pre_process=lay.is_first_stage, post_process=lay.is_last_stage, parallel_output=True,
                     share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
                     rotary_base=arch.rope_theta)
    full = hfmap.hf_to_mcore(hfmap.read_hf_state_dict(path), arch, VOCAB_PAD)
    hfmap.load_full_state_dict(model, full, lay.tp_rank, lay.tp_size)
    return model.eval()


def _grads(model, packed):
    w = torch.randn(VOCAB_PAD, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    out = model(packed.input_ids, packed.position_ids, None, packed_seq_params=packed.packed_seq_params(),
                runtime_gather_output=True)
    (out[0, : sum(packed.seq_lens)] * w).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return g


def _worker(rank, world, tp, pp, paths, seqs):
    from megatron_gad.engine.forward_backward import attention_mask_4d, position_ids_from_mask
    from megatron_gad.engine.packing import pack_sequences, unpack_sequences
    from megatron_gad.parallel import state
    from megatron_gad.parallel.cpu_compat import cpu_device_mode

    with cpu_device_mode():
        lay = state.init_model_parallel(tp, pp)
        main = pack_sequences(seqs, align=ALIGN)
        concat = torch.cat(seqs)[None]
        S = 9  # row 0 right-padded (seq 0), row 1 left-padded (seq 2)
        ids, mask = torch.zeros(2, S, dtype=torch.long), torch.zeros(2, S, dtype=torch.long)
        ids[0, :4], mask[0, :4] = seqs[0], 1
        ids[1, S - 7:], mask[1, S - 7:] = seqs[2], 1
        res = {}
        for fam, path in paths.items():
            for backend in BACKENDS:
                model = _build(path, tp, pp, backend)
                for emulate in ("0", "1"):
                    os.environ[EMULATE] = emulate
                    packed = _run(model, [{"packed": main}], main.total_tokens)
                    unpacked = _run(model, [{"input_ids": concat, "position_ids": torch.arange(concat.shape[1])[None],
                                             "mask_4d": None}], concat.shape[1])
                    padded = [_run(model, [{"input_ids": ids[b:b + 1], "mask_4d": attention_mask_4d(mask[b:b + 1]),
                                            "position_ids": position_ids_from_mask(mask[b:b + 1])}], S)
                              for b in range(2)]
                    if packed:
                        res[(fam, backend, emulate)] = {"main": unpack_sequences(packed[0], main),
                                                        "concat": unpacked[0][0],
                                                        "padded": torch.cat([p[0] for p in padded])}
                os.environ.pop(EMULATE, None)
                if pp == 1 and backend != "flex":
                    g = _grads(model, main)
                    if lay.tp_rank == 0:
                        res[(fam, backend, "grad")] = g
        return res if (lay.is_last_stage and lay.tp_rank == 0) else None


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from megatron_gad.tools.tiny_models import make_hf_model

    base = tmp_path_factory.mktemp("attn_backends")
    return {fam: make_hf_model(str(base / fam), fam, seed=21 + i, hidden_size=64, intermediate_size=128,
                               vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1)
            for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def hf_reference(paths):
    from transformers import AutoModelForCausalLM

    out = {}
    for fam, path in paths.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[fam] = [hf(s[None]).logits[0] for s in _sequences()]
    return out


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_backends_match_eager_and_transformers(paths, hf_reference, tp, pp):
    from megatron_gad.parallel.launch import run_local

    seqs = _sequences()
    got = next(r for r in run_local(_worker, tp * pp, tp, pp, paths, seqs) if r is not None)
    lines, bad = [], []

    def record(tag, diff, limit=ATOL, above=False):
        lines.append(f"  {tag}: {diff:.2e}")
        if (diff <= limit) == above:
            bad.append(f"{tag}: {diff:.2e} ({'expected >' if above else 'limit'} {limit:.0e})")

    for fam in FAMILIES:
        ref = hf_reference[fam]
        assert max(r.abs().max().item() for r in ref) > 1.0
        for emulate in ("0", "1"):
            eager = got[(fam, "eager", emulate)]
            for backend in BACKENDS:
                r = got[(fam, backend, emulate)]
                tag = f"{tp}x{pp} {fam} {backend} emulate={emulate}"
                record(f"{tag} packed vs HF per sequence", max(_maxdiff(g, e) for g, e in zip(r["main"], ref)))
                if backend != "eager":
                    record(f"{tag} packed vs eager", max(_maxdiff(g, e) for g, e in zip(r["main"], eager["main"])))
                    record(f"{tag} unpacked row vs eager", _maxdiff(r["concat"], eager["concat"]))
                    record(f"{tag} padded rows vs eager", _maxdiff(r["padded"][0, :4], eager["padded"][0, :4]))
                tail = r["concat"][LENGTHS[0]:LENGTHS[0] + LENGTHS[1]]
                record(f"{tag} unpacked row vs HF seq 1 (must be large)", _maxdiff(tail, ref[1]), limit=1e-2,
                       above=True)
                record(f"{tag} right-padded row vs HF", _maxdiff(r["padded"][0, :4], ref[0]))
                left = _maxdiff(r["padded"][1, 2:], ref[2])
                if emulate == "0":
                    record(f"{tag} left-padded row vs HF (mask honoured)", left)
                else:
                    record(f"{tag} left-padded row vs HF (mask ignored, must be large)", left, limit=1e-2, above=True)
        if pp == 1:
            g_eager, g_sdpa = got[(fam, "eager", "grad")], got[(fam, "sdpa", "grad")]
            gmax = max(g.abs().max().item() for g in g_eager.values())
            assert gmax > 1.0
            record(f"{tp}x{pp} {fam} sdpa packed grads vs eager (max |grad| {gmax:.0f})",
                   max(_maxdiff(g_sdpa[n], g_eager[n]) for n in g_eager), limit=1e-6 * gmax)
    print("\n" + "\n".join(lines))
    assert not bad, "\n".join(bad)
