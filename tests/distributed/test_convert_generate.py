"""HF import, greedy generation, export and resharding against ``transformers``.

* ``hf-to-mcore`` at 2x2, then ``mcore-to-hf``: every tensor bit-exact, loadable by
  ``AutoModelForCausalLM`` with identical logits;
* greedy generation (the tools' per-rank body) == ``transformers`` greedy at 1x1, 2x1, 1x2, 2x2 for
  llama and qwen2, left padding included (prompts of different lengths share one batch);
* the 2x2 checkpoint loads at 1x2: same weights, logits equal to transformers, same generation;
* the real console script: ``generate --json`` at 2x2, and ``convert`` both ways at 2x1.
Spawns cost most of the time, so each launch serves every model and several checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_gad.tools.tiny_models import make_hf_model

FAMILIES = ("llama", "qwen2")
EOS, PAD = 2, 0
PROMPTS = [[1, 5, 9, 17, 33], [1, 40, 41], [1, 7, 8, 9, 10, 11, 12], [60]]
NEW = 8


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_greedy(path, prompts, n=NEW) -> list[list[int]]:
    """transformers greedy continuation of each prompt on its own (no padding), up to and with EOS."""
    model, out = _hf_model(path), []
    for p in prompts:
        ids = torch.tensor([p])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
        new = seq[0, len(p):].tolist()
        out.append(new[: new.index(EOS) + 1] if EOS in new else new)
    return out


def _specs(paths: dict, tp: int, pp: int):
    from megatron_gad.tools.generate import GenerateSpec

    return [GenerateSpec(model=p, prompts=PROMPTS, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, tp=tp, pp=pp,
                         greedy=True) for p in paths.values()]


def _convert_worker(rank, world, jobs, specs):
    """2x2: convert every family (the tools' per-rank body), then generate from the HF dirs."""
    from megatron_gad.tools.convert import hf_to_mcore_on_rank
    from megatron_gad.tools.generate import generate_on_rank

    for job in jobs:
        hf_to_mcore_on_rank(job)
    return [generate_on_rank(s) for s in specs]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny HF models, HF greedy outputs, their 2x2 actor checkpoints and our 2x2 generations."""
    from megatron_gad.parallel.launch import run_local
    from megatron_gad.tools.convert import HfToMcoreJob

    base = tmp_path_factory.mktemp("convert")
    w = {"base": base, "hf": {}, "ckpt": {}, "greedy": {}}
    for i, fam in enumerate(FAMILIES):
        w["hf"][fam] = make_hf_model(str(base / f"hf_{fam}"), fam, seed=10 + i)
        w["ckpt"][fam] = str(base / f"ckpt_{fam}_2x2")
        w["greedy"][fam] = _hf_greedy(w["hf"][fam], PROMPTS)
    # the references must exercise something: some continuation runs the full length
    assert max(len(g) for fam in FAMILIES for g in w["greedy"][fam]) == NEW
    jobs = [HfToMcoreJob(w["hf"][f], w["ckpt"][f], tp=2, pp=2) for f in FAMILIES]
    w["gen_2x2"] = run_local(_convert_worker, 4, jobs, _specs(w["hf"], 2, 2))[0]
    return w


@pytest.mark.distributed
def test_generate_2x2_matches_transformers(work):
    for fam, tokens in zip(FAMILIES, work["gen_2x2"]):
        assert tokens == work["greedy"][fam], f"{fam} at 2x2"


def _export_worker(rank, world, specs, exports):
    """1x1: generate from the HF dirs, then export each 2x2 checkpoint (the tools' per-rank body)."""
    from megatron_gad.tools.convert import mcore_to_hf_on_rank
    from megatron_gad.tools.generate import generate_on_rank

    gens = [generate_on_rank(s) for s in specs]
    for ckpt_dir, out_dir in exports:
        mcore_to_hf_on_rank(ckpt_dir, out_dir)
    return gens


@pytest.mark.distributed
def test_generate_1x1_and_mcore_to_hf_roundtrip_bit_exact(work):
    from megatron_gad.models.hf import read_hf_state_dict
    from megatron_gad.parallel.launch import run_local

    outs = {fam: str(work["base"] / f"export_{fam}") for fam in FAMILIES}
    (gens,) = run_local(_export_worker, 1, _specs(work["hf"], 1, 1), [(work["ckpt"][f], outs[f]) for f in FAMILIES])
    for fam, tokens in zip(FAMILIES, gens):
        assert tokens == work["greedy"][fam], f"{fam} at 1x1"
    for fam in FAMILIES:
        orig, back = read_hf_state_dict(work["hf"][fam]), read_hf_state_dict(outs[fam])
        assert set(back) == set(orig), set(back) ^ set(orig)
        unequal = [k for k in orig if not (back[k].dtype == orig[k].dtype and torch.equal(back[k], orig[k]))]
        assert not unequal, f"{fam}: tensors changed in the round trip: {unequal}"
        assert os.path.isfile(os.path.join(outs[fam], "tokenizer.json"))
        a, b = _hf_model(work["hf"][fam]), _hf_model(outs[fam])  # transformers loads the export as is
        ids = torch.tensor([PROMPTS[0]])
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.distributed
def test_generate_2x1_matches_transformers(work):
    from megatron_gad.tools.generate import run_specs

    for fam, tokens in zip(FAMILIES, run_specs(_specs(work["hf"], 2, 1))):
        assert tokens == work["greedy"][fam], f"{fam} at 2x1"


def _reshard_worker(rank, world, specs, ckpts, probe):
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.tools.generate import generate_on_rank

    out = {"gens": [generate_on_rank(s) for s in specs], "weights": {}, "logits": {}}
    for fam, path in ckpts.items():
        role = ModelShard("actor", path, 1, world, trainable=False)  # saved at 2x2, loaded at 1xN
        out["weights"][fam] = role.full_state_dict()
        res = role.forward([{"input_ids": probe, "attention_mask": torch.ones_like(probe)}],
                           lambda logits, mb: (logits.sum() * 0, {"logits": logits}))
        out["logits"][fam] = res[0]["logits"] if res else None
    return out


@pytest.mark.distributed
def test_generate_1x2_and_reshard_2x2_checkpoint(work):
    """1x2 generation from the HF dirs and from the 2x2 checkpoints; weights/logits after reshard."""
    from megatron_gad.models.arch import load_arch
    from megatron_gad.models.hf import hf_to_mcore, read_hf_state_dict
    from megatron_gad.parallel.launch import run_local

    probe = torch.tensor([PROMPTS[2], [PROMPTS[2][-1]] + PROMPTS[2][:-1]])
    specs = _specs(work["hf"], 1, 2) + _specs(work["ckpt"], 1, 2)
    ranks = run_local(_reshard_worker, 2, specs, work["ckpt"], probe)
    gens = ranks[0]["gens"]
    assert gens == ranks[1]["gens"]
    for fam, tokens in zip(list(work["hf"]) + list(work["ckpt"]), gens):
        assert tokens == work["greedy"][fam], f"{fam} at 1x2"
    for fam in FAMILIES:
        arch = load_arch(work["hf"][fam])
        expected = hf_to_mcore(read_hf_state_dict(work["hf"][fam]), arch, 128)
        loaded = ranks[0]["weights"][fam]
        assert set(loaded) <= set(expected)
        unequal = [k for k in loaded if not torch.equal(loaded[k], expected[k])]
        assert not unequal, f"{fam}: resharded weights differ: {unequal}"
        with torch.no_grad():
            ref = _hf_model(work["hf"][fam])(probe).logits
        got = ranks[1]["logits"][fam][..., : arch.vocab_size]
        err = (got - ref).abs().max().item()
        print(f"\n  reshard 2x2->1x2 {fam}: logits max abs diff vs transformers {err:.2e}")
        assert err < 1e-5


@pytest.mark.distributed
def test_console_script_json_2x2(work):
    """The installed ``megatron-gad`` script: one JSON line on stdout, logs on stderr."""
    from transformers import AutoTokenizer

    exe = shutil.which("megatron-gad")
    cmd = [exe] if exe else [sys.executable, "-m", "megatron_gad.cli"]
    # llama: transformers 5 maps a qwen2 config to Qwen2Tokenizer, which ignores the tiny
    # word-level tokenizer.json; the llama checkpoint loads it as saved
    model = work["ckpt"]["llama"]
    text = "w5 w9 w17 w33"
    proc = subprocess.run(cmd + ["generate", model, "--prompt", text, "--greedy", "--max-new-tokens", str(NEW),
                                 "--tp", "2", "--pp", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip("\n").split("\n")
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    tok = AutoTokenizer.from_pretrained(work["hf"]["llama"])
    prompt = tok(text)["input_ids"]
    assert out["token_ids"] == _hf_greedy(work["hf"]["llama"], [prompt])[0]
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)
    assert "[megatron-gad] generate:" in proc.stderr


@pytest.mark.distributed
def test_console_script_convert_both_ways(work):
    """``convert hf-to-mcore`` (2x1) then ``convert mcore-to-hf`` through the real script: bit-exact."""
    from megatron_gad.models.hf import read_hf_state_dict

    exe = shutil.which("megatron-gad")
    cmd = [exe] if exe else [sys.executable, "-m", "megatron_gad.cli"]
    hf, ckpt_dir, out = work["hf"]["qwen2"], str(work["base"] / "cli_ckpt"), str(work["base"] / "cli_export")
    for args in (["hf-to-mcore", hf, ckpt_dir, "--tp", "2", "--pp", "1"], ["mcore-to-hf", ckpt_dir, out]):
        proc = subprocess.run(cmd + ["convert"] + args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout == "" and f"[megatron-gad] {args[0]}: wrote" in proc.stderr
    orig, back = read_hf_state_dict(hf), read_hf_state_dict(out)
    assert set(orig) == set(back) and all(torch.equal(orig[k], back[k]) for k in orig)
