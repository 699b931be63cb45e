"""The per-sample view of a step (``samples.jsonl``): prompt, a student sample and the teacher
response side by side, with the critic's scores of both. Pure: the trainer scores, this lays out."""

from __future__ import annotations

from collections.abc import Callable

import torch


def teacher_rows(batch: dict) -> dict:
    """A collated batch's teacher responses as rows to score (``responses``/``response_mask``)."""
    return {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
            "responses": batch["teacher_response"], "response_mask": batch["teacher_response_mask"]}


def sample_rows(batch: dict, student: dict, n: int, teacher_scores: torch.Tensor, student_scores: torch.Tensor,
                decode: Callable[[torch.Tensor, torch.Tensor], str], decode_prompt: Callable[[list[int]], str],
                eos_id: int, prompts: int = 4) -> list[dict]:
    """For up to ``prompts`` prompts: its first student sample (row i*n) beside the teacher response."""
    rows = []
    for i in range(min(prompts, batch["prompt_ids"].shape[0])):
        s_ids, s_mask = student["responses"][i * n], student["response_mask"][i * n]
        t_ids, t_mask = batch["teacher_response"][i], batch["teacher_response_mask"][i]
        p = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        rows.append({"prompt": decode_prompt(p), "student": decode(s_ids, s_mask), "teacher": decode(t_ids, t_mask),
                     "student_score": float(student_scores[i * n]), "teacher_score": float(teacher_scores[i]),
                     "student_len": int(s_mask.sum()), "teacher_len": int(t_mask.sum()),
                     "student_eos": bool((s_ids[s_mask.bool()] == eos_id).any()),
                     "teacher_eos": bool((t_ids[t_mask.bool()] == eos_id).any())})
    return rows
