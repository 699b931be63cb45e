"""TP x PP layouts (2x2, 2x1, 1x2) give the 1x1 results on the same weights and batch.

One spawned run per layout computes everything for both model families (llama: GQA, untied;
qwen2: qkv bias, tied embeddings) and both roles, through the real training path
(``ModelShard.train_step``: DDP ``main_grad`` after ``finalize_model_grads``):
  * actor: token-mean NLL from ``vocab_parallel_logprob`` on the TP shard, per-token log-probs,
    and the full gradient gathered to global names;
  * critic: last-valid-token scores (non-zero head set deterministically), BT loss, gradient.
The batch mixes left-padded prompts and right-padded responses.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gad.tools.tiny_models import make_hf_model

FAMILIES = ("llama", "qwen2")
# fp32: an error of a few ulps of the largest value compared (grads of the critic reach ~10)
RTOL_OF_MAX = 1e-6
ATOL = 2e-6
# (max abs diff, max |reference|) per (layout, family, quantity); printed with pytest -s
DIFFS: dict[str, tuple[float, float]] = {}


def _batches() -> list[dict]:
    """Two micro-batches [4, 9]: rows 0-1 left-padded (prompts), rows 2-3 right-padded too."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(2):
        ids = torch.randint(3, 96, (4, 9), generator=g)
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[0, :3] = 0
        mask[1, :1] = 0
        mask[2, :2] = 0
        mask[2, -2:] = 0
        mask[3, -3:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def _gathered_grads(role) -> dict[str, torch.Tensor] | None:
    """DDP ``main_grad`` of this stage as full tensors with global names (tp_rank 0 only)."""
    import torch.distributed as dist

    from megatron_gad.models import hf as hfmap
    from megatron_gad.parallel import state

    lay, out = role.layout, {}
    for name, p in role.module.named_parameters():
        g = p.main_grad.detach().float()
        if lay.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(lay.tp_size)]
            dist.all_gather(parts, g.contiguous(), group=state.tp_group())
            g = hfmap._tp_unslice(parts, p, name)
        out[hfmap.global_name(role.module, name)] = g.clone()
    return out if lay.tp_rank == 0 else None


def _actor(path, tp, pp, batches):
    from megatron_gad.config import OptimConfig
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.kernels.logprob import vocab_parallel_logprob
    from megatron_gad.parallel import state

    # lr 0 / no clipping: the step leaves weights and main_grad as the backward produced them
    role = ModelShard("actor", path, tp, pp, optim=OptimConfig(lr=0.0, weight_decay=0.0, clip_grad=0.0))
    v_local = role.padded_vocab // tp
    v_start = role.layout.tp_rank * v_local

    def loss_fn(logits, mb):  # logits [B, S, V/tp]
        ids, mask = mb["input_ids"], mb["attention_mask"]
        lp, _ = vocab_parallel_logprob(logits[:, :-1], ids[:, 1:], tp_group=state.tp_group(), vocab_start=v_start,
                                       vocab_size=role.arch.vocab_size, chunk_size=7)
        valid = (mask[:, :-1] * mask[:, 1:]).float()  # both the context and the target token are real
        loss = -(lp * valid).sum() / valid.sum()
        return loss, {"loss": loss.detach(), "logp": (lp * valid).detach()}

    results, info = role.train_step([dict(b) for b in batches], loss_fn)
    return {"results": results, "grads": _gathered_grads(role), "grad_norm": info["grad_norm"]}


def _critic(path, tp, pp, batches):
    from megatron_gad.config import OptimConfig
    from megatron_gad.engine.model_shard import ModelShard
    from megatron_gad.kernels.disc_loss import disc_head_bt_loss

    role = ModelShard("critic", path, tp, pp, optim=OptimConfig(lr=0.0, weight_decay=0.0, clip_grad=0.0))
    head = role.module.output_layer if role.layout.is_last_stage else None
    if head is not None:  # zero-init head would score everything 0: set a fixed non-zero one
        with torch.no_grad():
            h = head.weight.shape[1]
            head.weight.copy_(torch.linspace(-0.5, 0.7, h)[None])
            head.bias.fill_(0.1)

    def loss_fn(hidden, mb):  # hidden [B, S, H] after the final norm
        mask = mb["attention_mask"]
        b, s = mask.shape
        last = s - 1 - mask.flip(-1).argmax(-1)  # last valid token of each row (right padding aware)
        rows = hidden[torch.arange(b), last]
        # rows 0..1 play teachers, 2..3 their students (n=1)
        loss, _, t, st = disc_head_bt_loss(rows[: b // 2], rows[b // 2:], head.weight, head.bias, n=1, impl="torch")
        return loss, {"loss": loss.detach(), "scores": torch.cat([t, st])}

    scored = role.forward([dict(b) for b in batches], loss_fn)
    results, info = role.train_step([dict(b) for b in batches], loss_fn)
    return {"scored": scored, "results": results, "grads": _gathered_grads(role), "grad_norm": info["grad_norm"]}


def _worker(rank, world, tp, pp, paths, batches):
    out = {}
    for fam, path in paths.items():
        out[fam] = {"actor": _actor(path, tp, pp, batches), "critic": _critic(path, tp, pp, batches)}
    from megatron_gad.parallel import state

    lay = state.layout()
    out["layout"] = (lay.tp_rank, lay.pp_rank)
    return out


def _run(tp, pp, paths):
    """Merge per-rank results: last-stage outputs, and full grads from every stage's tp_rank 0."""
    from megatron_gad.parallel.launch import run_local

    ranks = run_local(_worker, tp * pp, tp, pp, paths, _batches())
    merged = {}
    for fam in paths:
        merged[fam] = {}
        for role in ("actor", "critic"):
            m = {"grads": {}}
            for r in ranks:
                tp_rank, pp_rank = r["layout"]
                res = r[fam][role]
                if res["grads"] is not None:
                    m["grads"].update(res["grads"])
                if pp_rank == pp - 1 and tp_rank == 0:
                    m["results"] = res["results"]
                    m["scored"] = res.get("scored")
                    m["grad_norm"] = res["grad_norm"]
            merged[fam][role] = m
    return merged


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {fam: make_hf_model(str(base / fam), fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def reference(paths):
    return _run(1, 1, paths)


def _maxdiff(a, b) -> tuple[float, float]:
    """(max |a - b|, max |b|): b is the 1x1 reference."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item(), b.abs().max().item()


def _grad_diff(got: dict, ref: dict) -> tuple[float, float]:
    pairs = [_maxdiff(got[k], ref[k]) for k in ref]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


def _stack(results, key):
    return torch.stack([torch.as_tensor(r[key]) for r in results])


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 2), (2, 1), (1, 2)])
def test_layout_matches_1x1(paths, reference, tp, pp):
    got = _run(tp, pp, paths)
    for fam in FAMILIES:
        tag = f"{tp}x{pp} {fam}"
        a, ra = got[fam]["actor"], reference[fam]["actor"]
        ref_loss = _stack(ra["results"], "loss")
        assert torch.isfinite(ref_loss).all() and ref_loss.min() > 0
        DIFFS[f"{tag} actor loss"] = _maxdiff(_stack(a["results"], "loss"), ref_loss)
        DIFFS[f"{tag} actor logp"] = _maxdiff(_stack(a["results"], "logp"), _stack(ra["results"], "logp"))
        # tied embeddings at PP>1: the last stage holds its own output_layer copy, whose grad
        # finalize_model_grads all-reduced with the embedding's; 1x1 has no such parameter
        extra = set(a["grads"]) - set(ra["grads"])
        assert extra <= {"output_layer.weight"}, extra
        assert set(ra["grads"]) <= set(a["grads"]), set(ra["grads"]) - set(a["grads"])
        if extra:
            torch.testing.assert_close(a["grads"]["output_layer.weight"],
                                       ra["grads"]["embedding.word_embeddings.weight"], atol=ATOL, rtol=0)
        DIFFS[f"{tag} actor grad"] = _grad_diff(a["grads"], ra["grads"])
        assert max(g.abs().max().item() for g in ra["grads"].values()) > 1e-3  # grads are not trivially 0
        DIFFS[f"{tag} actor grad_norm"] = _maxdiff(a["grad_norm"], ra["grad_norm"])

        c, rc = got[fam]["critic"], reference[fam]["critic"]
        ref_scores = _stack(rc["scored"], "scores")
        assert ref_scores.abs().min() > 0 and ref_scores.std() > 1e-3  # a real, discriminating head
        DIFFS[f"{tag} critic scores"] = _maxdiff(_stack(c["scored"], "scores"), ref_scores)
        DIFFS[f"{tag} critic BT loss"] = _maxdiff(_stack(c["scored"], "loss"), _stack(rc["scored"], "loss"))
        # the training pass sees the same weights (lr 0): same loss as the scoring pass
        torch.testing.assert_close(_stack(c["results"], "loss"), _stack(rc["scored"], "loss"), atol=ATOL, rtol=0)
        assert set(c["grads"]) == set(rc["grads"])
        DIFFS[f"{tag} critic grad"] = _grad_diff(c["grads"], rc["grads"])
        DIFFS[f"{tag} critic grad_norm"] = _maxdiff(c["grad_norm"], rc["grad_norm"])
    mine = {k: v for k, v in DIFFS.items() if k.startswith(f"{tp}x{pp} ")}
    print("\n" + "\n".join(f"  {k}: max abs diff {d:.2e} (max |ref| {m:.2e})" for k, (d, m) in mine.items()))
    bad = {k: v for k, v in mine.items() if not v[0] <= max(ATOL, RTOL_OF_MAX * v[1])}
    assert not bad, f"layout {tp}x{pp} differs from 1x1: {bad}"
