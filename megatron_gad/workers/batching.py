"""Micro-batch helpers shared by the workers (pure tensor code)."""

from __future__ import annotations

import torch

from megatron_gad.data import build_sequences


def split_rows(batch: dict, size: int) -> list[dict]:
    """Split every tensor of ``batch`` along dim 0 into chunks of ``size`` rows."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def sequences(prompt_ids, prompt_mask, responses, response_mask) -> dict:
    """The model input for prompts (left-padded) followed by responses (right-padded)."""
    input_ids, attention_mask, position_ids = build_sequences(prompt_ids, prompt_mask, responses, response_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def pad_right(t: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], 1)


def cat_results(results: list[dict], key: str) -> torch.Tensor | None:
    """Concatenate one key of the last stage's per-micro-batch results (on CPU); None on the other
    pipeline stages, which hold no results (their value is never collected)."""
    if not results:
        return None
    return torch.cat([r[key] for r in results], 0).cpu()
