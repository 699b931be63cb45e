"""The trainer's public evaluation calls: sample from the current actor and score with the current
critic, outside the training loop (held-out evaluation, the demo's probes, notebooks). A mixin of
:class:`~megatron_gad.controller.trainer.GADTrainer`: it uses the trainer's worker groups, tokenizer
and rollout engine, and changes no training state."""

from __future__ import annotations

import torch

from megatron_gad import algos
from megatron_gad.controller.samples import teacher_rows
from megatron_gad.data import collate_prompts


class TrainerEvaluation:
    def rollout(self, items: list[dict], n: int, seed: int = 0, temperature: float | None = None,
                greedy: bool = False) -> dict:
        """``n`` samples per prompt of dataset ``items`` from the current actor, with the prompts
        collated: prompt_ids/prompt_mask [B, P], teacher_response(_mask) [B, Rt] and the student
        samples responses/response_mask [B*n, R] (rows i*n .. i*n+n-1 belong to prompt i)."""
        batch = collate_prompts(items, self.pad_id)
        student = self._rollout(batch, n, seed, temperature=temperature, greedy=greedy)
        return dict(batch, responses=student["responses"], response_mask=student["response_mask"])

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        """Text of one response row (valid tokens, EOS and special tokens dropped)."""
        keep = [int(i) for i, m in zip(ids, mask) if m and int(i) != self.eos_id]
        return self.tokenizer.decode(keep, skip_special_tokens=True)

    def sample(self, items: list[dict], n: int, temperature: float | None = None, greedy: bool = False,
               seed: int = 0) -> list[list[str]]:
        """Decoded samples (``n`` per prompt) from the current actor, e.g. for held-out evaluation."""
        out = self.rollout(items, n, seed, temperature=temperature, greedy=greedy)
        texts = [self.decode(ids, m) for ids, m in zip(out["responses"], out["response_mask"])]
        return [texts[i * n:(i + 1) * n] for i in range(len(items))]

    def evaluate_critic(self, items: list[dict], n: int, seed: int = 0, temperature: float | None = None) -> dict:
        """A per-sample view of the critic against fresh actor samples (no update): ``student_texts``
        [B][n], ``student_scores`` [B, n], ``teacher_scores`` [B] and ``d_acc`` (share of teacher-student
        pairs ranked teacher-first, ties half — the training metric's definition)."""
        if self.critic is None:
            raise RuntimeError("trainer.mode=sft has no critic to evaluate")
        batch = collate_prompts(items, self.pad_id)
        student = self._rollout(batch, n, seed, temperature=temperature)  # prompts repeated per sample
        teacher = teacher_rows(batch)
        s_scores = self.critic.compute_scores(student)["scores"]
        t_scores = self.critic.compute_scores(teacher, side="teacher")["scores"]
        _, m = algos.discriminator_loss(s_scores, t_scores, n)
        texts = [self.decode(ids, msk) for ids, msk in zip(student["responses"], student["response_mask"])]
        return {"student_texts": [texts[i * n:(i + 1) * n] for i in range(len(items))],
                "student_scores": s_scores.view(len(items), n), "teacher_scores": t_scores,
                "d_acc": float(m["d_acc"])}
