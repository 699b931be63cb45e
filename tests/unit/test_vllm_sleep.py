"""The vLLM engine's sleep/wake bookkeeping (GPU-only in vLLM; its CPU twin here): a sync that
follows a rollout drops the weights at sleep (vLLM level 2) and wakes only the weights to load them,
and an engine whose weights were dropped refuses to sample until a complete sync arrived.

vLLM's ``LLM`` is replaced by a model of its documented sleep-mode contract (level 1: weights backed
up to host memory and restored at wake-up; level 2: weights discarded; ``wake_up(tags)`` maps the
tagged memory back), recording the calls."""

from __future__ import annotations

import pytest

from megatron_gad.engine.vllm_engine import VLLMEngine
from megatron_gad.engine.weight_sync import WeightSyncError


class SleepModeLLM:
    def __init__(self):
        self.calls = []
        self.mapped = {"weights", "kv_cache"}
        self.weights = "synced"  # what the weight memory holds

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.backup = self.weights if level == 1 else None
        self.mapped = set()

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache"]
        assert not set(tags) & self.mapped, f"{tags} already mapped"
        self.calls.append(("wake_up", tuple(tags)))
        self.mapped |= set(tags)
        if "weights" in tags:
            self.weights = self.backup if self.backup is not None else "garbage"  # level 2: fresh memory

    def reset_prefix_cache(self):
        pass


def _engine() -> VLLMEngine:
    eng = VLLMEngine.__new__(VLLMEngine)
    eng.llm, eng.sleep_enabled, eng.tied = SleepModeLLM(), True, False
    eng.awake, eng.weights_dropped = {"weights", "kv_cache"}, False

    def load(items):
        assert eng.llm.mapped >= {"weights"}, "loading into unmapped memory"
        eng.llm.weights = "new"
        eng.weights_dropped = False

    eng.load_weights = load
    return eng


def test_sync_after_rollout_wakes_weights_only_and_never_restores_stale_ones():
    eng = _engine()
    eng.sleep(keep_weights=False)  # rollout of a step that updates the actor
    assert eng.weights_dropped and eng.llm.calls == [("sleep", 2)]
    eng.wake_up(weights_only=True)
    assert eng.llm.calls[-1] == ("wake_up", ("weights",)) and "kv_cache" not in eng.llm.mapped
    eng.load_weights([])
    eng.sleep()  # keep the new weights for the next rollout
    assert eng.llm.calls[-1] == ("sleep", 1)
    eng.wake_up()
    assert eng.llm.weights == "new" and eng.llm.mapped == {"weights", "kv_cache"}
    assert eng.llm.calls[-1] == ("wake_up", ("kv_cache", "weights"))


def test_frozen_warmup_keeps_weights_across_sleeps():
    eng = _engine()
    for _ in range(2):
        eng.sleep()
        eng.wake_up()
    assert ("sleep", 2) not in eng.llm.calls and eng.llm.weights == "synced" and not eng.weights_dropped


def test_engine_with_dropped_weights_refuses_to_sample_until_synced():
    import torch

    from megatron_gad.parallel.state import Layout
    from megatron_gad.workers.rollout import RolloutWorker

    w = RolloutWorker.__new__(RolloutWorker)
    w.engine, w.stale, w.eos_id, w.pad_id, w.max_response_length = _engine(), None, 2, 0, 4
    w.layout = Layout(rank=0, world_size=1, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=0, dp_size=1)
    w.config = type("R", (), {"temperature": 1.0, "top_k": -1, "top_p": 1.0})()
    w.expected = {}
    w.engine.generate = lambda prompts, **kw: [([5, 2], [-0.1, -0.2]) for _ in prompts]
    batch = {"prompt_ids": torch.tensor([[3, 4]]), "prompt_mask": torch.ones(1, 2), "row_seed": torch.tensor([0])}
    out = w.generate(batch, seed=0, sync_follows=True)
    assert out["responses"].tolist() == [[5, 2]]
    with pytest.raises(WeightSyncError, match="refuses to sample: its weights were dropped"):
        w.generate(batch, seed=0)
    w.update_weights([], [])
    assert w.stale is None and w.engine.llm.weights == "new"
    w.generate(batch, seed=0)
