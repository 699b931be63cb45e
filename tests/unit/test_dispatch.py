"""The dispatch contract (workers/dispatch.py): declarations, splitting over data-parallel
replicas, which rank's result counts, and merging — driven by in-process fake ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_gad.parallel.state import Layout
from megatron_gad.workers.dispatch import Dispatch, collect, dispatch_spec, rank_args, register


def _layouts(tp: int, pp: int, dp: int) -> list[Layout]:
    """Megatron's default rank order: TP fastest, then DP, then PP."""
    out = []
    for rank in range(tp * pp * dp):
        out.append(Layout(rank=rank, world_size=tp * pp * dp, tp_rank=rank % tp, tp_size=tp,
                          pp_rank=rank // (tp * dp), pp_size=pp, dp_rank=(rank // tp) % dp, dp_size=dp))
    return out


class FakeWorker:
    def __init__(self, layout: Layout):
        self.layout = layout

    def is_collector(self) -> bool:
        return self.layout.tp_rank == 0 and self.layout.is_last_stage

    @register(Dispatch.DP, collect="concat")
    def double(self, batch: dict, k: int) -> dict:
        # every rank computes; a non-last stage has nothing sensible to return
        return {"y": batch["x"] * k, "rank": torch.full((batch["x"].shape[0],), self.layout.rank)}

    @register(Dispatch.DP, collect="mean")
    def stats(self, batch: dict) -> dict:
        return {"m": float(batch["x"].float().mean())}

    @register(Dispatch.ALL)
    def whoami(self, tag: str) -> str:
        return f"{tag}{self.layout.rank}"

    def private(self):
        return 1


def _run(workers, name, *args):
    spec = dispatch_spec(FakeWorker, name)
    dp_ranks = [w.layout.dp_rank for w in workers]
    results = [getattr(w, name)(*a) for w, a in zip(workers, rank_args(spec, args, dp_ranks))]
    return collect(spec, results, dp_ranks)


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (1, 1, 3)])
def test_dp_split_and_collect(tp, pp, dp):
    workers = [FakeWorker(lay) for lay in _layouts(tp, pp, dp)]
    x = torch.arange(7)  # uneven shares allowed
    out = _run(workers, "double", {"x": x}, 3)
    assert torch.equal(out["y"], x * 3)  # row order is the input's
    # each replica's rows came from its collector rank: TP rank 0 on the last stage
    collectors = {w.layout.dp_rank: w.layout.rank for w in workers if w.is_collector()}
    shares = torch.tensor_split(x, dp)
    expect = torch.cat([torch.full((len(s),), collectors[d]) for d, s in enumerate(shares)])
    assert torch.equal(out["rank"], expect)


def test_non_collector_ranks_return_none():
    workers = [FakeWorker(lay) for lay in _layouts(2, 2, 1)]
    got = [w.double({"x": torch.ones(2)}, 1) for w in workers]
    assert [g is not None for g in got] == [w.is_collector() for w in workers] == [False, False, True, False]


def test_mean_merge_and_all():
    workers = [FakeWorker(lay) for lay in _layouts(1, 1, 2)]
    assert _run(workers, "stats", {"x": torch.tensor([0.0, 2.0, 4.0, 6.0])}) == {"m": 3.0}  # (1 + 5) / 2
    assert _run(workers, "whoami", "r") == ["r0", "r1"]


def test_ragged_concat_pads_to_widest():
    spec = dispatch_spec(FakeWorker, "double")
    out = collect(spec, [{"y": torch.ones(1, 2, dtype=torch.long)}, {"y": torch.ones(2, 4, dtype=torch.long)}], [0, 1])
    assert out["y"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_unregistered_and_bad_declarations():
    with pytest.raises(AttributeError, match=r"FakeWorker\.private is not a registered worker method; "
                                             r"registered: double, stats, whoami"):
        dispatch_spec(FakeWorker, "private")
    with pytest.raises(ValueError, match="merge rule"):
        register(Dispatch.DP)
    with pytest.raises(ValueError, match="collect must be one of"):
        register(Dispatch.DP, collect="sum")
    with pytest.raises(TypeError, match="first argument"):
        rank_args(dispatch_spec(FakeWorker, "double"), (3,), [0])


def test_missing_replica_result_is_an_error():
    spec = dispatch_spec(FakeWorker, "stats")
    with pytest.raises(RuntimeError, match=r"replica\(s\) \[1\]"):
        collect(spec, [{"m": 1.0}, None], [0, 1])


def test_real_workers_declare_their_methods():
    """The controller's calls are all declared (a typo would surface here, not mid-run)."""
    from megatron_gad.workers.actor import ActorWorker
    from megatron_gad.workers.critic import CriticWorker

    for name in ("generate", "compute_log_prob", "compute_ref_log_prob", "update_actor", "sft_step",
                 "save", "load", "optimizer_state_bytes", "weights_fingerprint", "memory_metrics", "export_weights"):
        dispatch_spec(ActorWorker, name)
    for name in ("compute_scores", "update_critic", "evaluate_pairs", "save", "load"):
        dispatch_spec(CriticWorker, name)
    # metrics averaged, the scores before the update (trainer.lean_step's rewards) concatenated
    assert dispatch_spec(CriticWorker, "update_critic").collect == "mean_concat"
    assert dispatch_spec(ActorWorker, "generate").collect == "concat"


def test_mean_concat_averages_metrics_and_concatenates_rows():
    import torch

    from megatron_gad.workers.dispatch import merge

    a = {"loss": 1.0, "acc": torch.tensor(0.5), "scores": torch.tensor([[1.0, 2.0]])}
    b = {"loss": 3.0, "acc": torch.tensor(1.0), "scores": torch.tensor([[3.0, 4.0], [5.0, 6.0]])}
    got = merge("mean_concat", [a, b])
    assert got["loss"] == 2.0 and got["acc"] == 0.75
    assert torch.equal(got["scores"], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
