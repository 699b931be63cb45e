"""Rollout worker: one vLLM engine, fed prompts by the controller and weights by the actor.

Engines are data-parallel and independent: a rollout worker joins no process group (vLLM sets up
its own), and its layout is "replica ``rank`` of ``world``" so the declared dispatch splits a batch
over engines like over the actor's replicas. It reads only ``actor_rollout_ref.rollout`` plus the
shared values passed to it.

A weight update is all or nothing as far as sampling is concerned: a manifest that does not cover
the model is refused before anything loads, and an update that fails while streaming leaves the
engine marked *stale* — it refuses to sample until a complete update arrives, rather than sample
from a half-updated model.
"""

from __future__ import annotations

import time

import torch

from megatron_gad.config import RolloutConfig
from megatron_gad.engine.vllm_engine import VLLMEngine, pad_outputs, unpadded_prompts
from megatron_gad.engine.weight_sync import BucketInfo, WeightSyncError, check_manifest, verified_items
from megatron_gad.engine.weight_transport import ObjectStore
from megatron_gad.models.arch import arch_from_hf_config, read_hf_config
from megatron_gad.models.hf import hf_param_shapes
from megatron_gad.parallel.state import Layout
from megatron_gad.workers.dispatch import Dispatch, register


class RolloutWorker:
    """``model_dir``: an HF directory (config.json; weights too unless ``load_weights`` is False, in
    which case the engine starts with dummy weights and is stale until the first sync)."""

    joins_process_group = False  # vLLM builds its own; see the module docstring

    def __init__(self, config: RolloutConfig, *, rank: int, world: int, model_dir: str, load_weights: bool,
                 max_model_len: int, max_response_length: int, eos_id: int, pad_id: int, dtype: str = "float32",
                 seed: int = 0):
        self.config = config
        self.layout = Layout(rank=rank, world_size=world, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                             dp_rank=rank, dp_size=world)
        self.max_response_length = max_response_length
        self.eos_id, self.pad_id = eos_id, pad_id
        self.expected = hf_param_shapes(arch_from_hf_config(read_hf_config(model_dir)))
        self.engine = VLLMEngine(model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                 load_format="auto" if load_weights else "dummy",
                                 tensor_parallel_size=config.tensor_model_parallel_size,
                                 gpu_memory_utilization=config.gpu_memory_utilization,
                                 enforce_eager=config.enforce_eager, enable_sleep_mode=config.free_cache_engine)
        self.stale = None if load_weights else "it started with placeholder weights and has not been synced yet"
        self.engine.sleep()

    def is_collector(self) -> bool:
        return True

    @register(Dispatch.DP, collect="concat")
    def generate(self, batch: dict, seed: int, temperature: float | None = None, greedy: bool = False,
                 sync_follows: bool = False) -> dict:
        """batch: prompt_ids/prompt_mask [B, P] and ``row_seed`` [B] (each row's sampling seed, set by
        the controller so a sample does not depend on the engine it lands on) -> responses,
        response_mask, rollout_log_prob [B, R]. ``sync_follows``: the actor's weights change before
        the next sample, so the engine drops its weights at sleep instead of backing them up (it is
        stale, refusing to sample, until the sync)."""
        if self.stale:
            raise WeightSyncError(f"rollout engine {self.layout.rank} refuses to sample: {self.stale}")
        r = self.config
        self.engine.wake_up()
        try:
            outs = self.engine.generate(unpadded_prompts(batch["prompt_ids"], batch["prompt_mask"]),
                                        max_new_tokens=self.max_response_length, eos_id=self.eos_id,
                                        seeds=[int(s) + seed for s in batch["row_seed"]],
                                        temperature=temperature or r.temperature, top_k=r.top_k, top_p=r.top_p,
                                        greedy=greedy)
        finally:
            self.engine.sleep(keep_weights=not sync_follows)
            if self.engine.weights_dropped:
                self.stale = "its weights were dropped at sleep for the weight sync that follows"
        return pad_outputs(outs, self.pad_id)

    @register(Dispatch.ALL)
    def update_weights(self, manifest: list[BucketInfo], payloads: list) -> dict:
        """Load the actor's weights in place (``engine.weight_sync``): the manifest is checked against
        this engine's model first; each bucket is fetched and verified as it streams in."""
        if len(payloads) != len(manifest):
            raise WeightSyncError(f"weight sync: {len(manifest)} manifest entries but {len(payloads)} payloads")
        check_manifest(manifest, self.expected)
        start = time.perf_counter()
        self.engine.wake_up(weights_only=True)  # memory for the weights; no KV cache for a load
        try:
            self.stale = "a weight update failed part-way; it needs a complete sync"
            device = "cuda" if torch.cuda.is_available() else None  # verify where the weights go
            self.engine.load_weights(verified_items(manifest, ObjectStore().fetcher(manifest, payloads), device))
            self.stale = None
        finally:
            self.engine.sleep()
        return {"seconds": time.perf_counter() - start, "bytes": sum(i.nbytes for i in manifest)}
