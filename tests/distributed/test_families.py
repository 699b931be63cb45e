"""The 2026 student families against ``transformers``: Qwen3 (q/k norms, explicit head_dim; untied and
tied), Llama 3.1 (llama3-scaled RoPE, positions past the original window; tied as 3.2 1B/3B) and Mistral.

Tiny random models built with the real HF config classes (``tools/tiny_models.py``, every special field
set). One 2x2 and one 1x1 launch, each serving every family:
  * the actor's logits on a packed batch (three sequences of 5..100 tokens in one THD row) equal
    ``transformers`` run on each sequence alone, to 1e-5 (fp32), so packed == per-row as well;
  * the discriminator's backbone (critic role: normed hidden states) likewise; at 2x2 also with
    sequence parallelism (q/k norms under SP use the project's own norm);
  * greedy generation (the ``generate`` tool's body) token-equal to ``transformers.generate``;
  * ``hf-to-mcore`` at 2x2 then ``mcore-to-hf`` at 1x1: every tensor bit-exact.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_gad.tools.tiny_models import make_hf_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~6 min on 2 busy cores

# name -> (tiny_models family, overrides)
MODELS = {
    "qwen3": ("qwen3", {}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
    "llama31": ("llama31", {}),
    "mistral": ("mistral", {}),
}
EOS, PAD, NEW = 2, 0, 8
# llama31's original RoPE window is 64 tokens: the long prompt and its continuation run past it
PROMPTS = [[1] + list(range(3, 73)), [1, 40, 41], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
SEQ_LENS = (100, 5, 37)
TOL = 1e-5
RESULTS: dict[str, dict[str, object]] = {}  # the per-family table, printed with pytest -s


def _seqs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 96, (n,), generator=g) for n in SEQ_LENS]


def _gather_tp(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    from megatron_gad.parallel import state

    tp = dist.get_world_size(state.tp_group())
    if tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group())
    return torch.cat(parts, dim=-1)


def _packed_outputs(path: str, role: str, tp: int, pp: int, **kw) -> torch.Tensor | None:
    """[T, V or H] of the packed batch on the last stage's tp_rank 0 (logits gathered over TP)."""
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.engine.packing import pack_sequences

    shard = ModelShard(role, path, tp, pp, vocab_divisible_by=8, trainable=False, **kw)
    packed = pack_sequences(_seqs(), align=tp)
    gather = role == "actor"

    def loss_fn(out, mb):
        out = _gather_tp(out) if gather else out
        return out.sum() * 0, {"out": out.detach().clone()}

    res = shard.forward([{"packed": packed}], loss_fn)
    lay = shard.layout
    if not res or lay.tp_rank != 0:
        return None
    return res[0]["out"][0, : sum(SEQ_LENS)]


def _worker(rank, world, tp, pp, models, ckpts, exports):
    from megatron_gad.tools.convert import HfToMcoreJob, hf_to_mcore_on_rank, mcore_to_hf_on_rank
    from megatron_gad.tools.generate import GenerateSpec, generate_on_rank

    out = {}
    for name, path in models.items():
        r = {"gen": generate_on_rank(GenerateSpec(model=path, prompts=PROMPTS, max_new_tokens=NEW, eos_id=EOS,
                                                  pad_id=PAD, tp=tp, pp=pp, greedy=True)),
             "logits": _packed_outputs(path, "actor", tp, pp),
             "hidden": _packed_outputs(path, "critic", tp, pp)}
        if tp > 1:
            r["hidden_sp"] = _packed_outputs(path, "critic", tp, pp, sequence_parallel=True)
            hf_to_mcore_on_rank(HfToMcoreJob(path, ckpts[name], tp=tp, pp=pp))
        else:
            mcore_to_hf_on_rank(ckpts[name], exports[name])
        out[name] = r
    return out


def _merge(ranks: list[dict]) -> dict:
    merged = {}
    for name in MODELS:
        m = {"gen": ranks[0][name]["gen"]}
        for key in ("logits", "hidden", "hidden_sp"):
            found = [r[name][key] for r in ranks if r[name].get(key) is not None]
            if found:
                m[key] = found[0]
        merged[name] = m
    return merged


@torch.no_grad()
def _hf_reference(path: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits, hidden = [], []
    for s in _seqs():
        o = model(s[None], output_hidden_states=True)
        logits.append(o.logits[0])
        hidden.append(o.hidden_states[-1][0])  # after the final norm: what the critic's head reads
    gens = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
        new = seq[0, len(p):].tolist()
        gens.append(new[: new.index(EOS) + 1] if EOS in new else new)
    return {"logits": torch.cat(logits), "hidden": torch.cat(hidden), "gen": gens}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from megatron_gad.parallel.launch import run_local

    base = tmp_path_factory.mktemp("families")
    models = {n: make_hf_model(str(base / n), fam, seed=20 + i, **kw)
              for i, (n, (fam, kw)) in enumerate(MODELS.items())}
    ckpts = {n: str(base / f"ckpt_{n}") for n in MODELS}
    exports = {n: str(base / f"export_{n}") for n in MODELS}
    got = {"2x2": _merge(run_local(_worker, 4, 2, 2, models, ckpts, exports)),
           "1x1": _merge(run_local(_worker, 1, 1, 1, models, ckpts, exports))}
    return {"models": models, "exports": exports, "got": got, "ref": {n: _hf_reference(p) for n, p in models.items()}}


def _diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_family_matches_transformers(work, name):
    ref = work["ref"][name]
    assert ref["logits"].abs().max() > 0.1 and ref["hidden"].abs().max() > 0.1
    assert max(len(g) for g in ref["gen"]) == NEW  # a full-length continuation: the comparison bites
    row = RESULTS.setdefault(name, {})
    vocab = ref["logits"].shape[-1]
    for layout, by_name in work["got"].items():
        got = by_name[name]
        row[f"logits {layout}"] = _diff(got["logits"][:, :vocab], ref["logits"])
        row[f"hidden {layout}"] = _diff(got["hidden"], ref["hidden"])
        row[f"greedy {layout}"] = got["gen"] == ref["gen"]
        if "hidden_sp" in got:
            row[f"hidden SP {layout}"] = _diff(got["hidden_sp"], ref["hidden"])
    print(f"\n  {name}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    for key, value in row.items():
        assert value is True or (not isinstance(value, bool) and value < TOL), (name, key, value)


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_round_trip_bit_exact(work, name):
    from megatron_gad.models.hf import read_hf_state_dict

    orig, back = read_hf_state_dict(work["models"][name]), read_hf_state_dict(work["exports"][name])
    assert set(back) == set(orig), set(back) ^ set(orig)
    unequal = [k for k in orig if not (back[k].dtype == orig[k].dtype and torch.equal(back[k], orig[k]))]
    assert not unequal, f"{name}: tensors changed in the round trip: {unequal}"
    if name.startswith("qwen3"):
        assert any(k.endswith("self_attn.q_norm.weight") for k in orig)
    assert os.path.isfile(os.path.join(work["exports"][name], "tokenizer.json"))


def test_scaled_rope_matters_past_the_original_window(work):
    """The llama31 reference differs from the same weights under plain RoPE (most past the original window
    of 64 positions): the equality above is evidence that the llama3 scaling is applied."""
    import json

    from transformers import AutoModelForCausalLM

    path = work["models"]["llama31"]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and not cfg.get("rope_scaling")  # transformers-5 layout
    seq = _seqs()[0][None]
    with torch.no_grad():
        scaled = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(seq).logits[0]
        plain = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})(seq).logits[0]
    assert _diff(scaled[:1], plain[:1]) < 1e-6  # position 0: no rotation at all
    assert _diff(scaled[64:], plain[64:]) > 20 * TOL
