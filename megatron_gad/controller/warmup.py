"""When the critic-only warmup ends (pure logic, saved with checkpoints).

* Fixed: the first ``critic_warmup`` steps are warmup. (verl starts counting steps at 1 and updates
  the actor when ``global_steps >= critic_warmup``, which gives N-1 critic-only steps; here
  ``critic_warmup=N`` means exactly N.)
* Adaptive (``until_d_acc=[low, high]``): warmup ends once d_acc has stayed inside the band for
  ``patience`` consecutive warmup steps — the critic is neither blind (0.5) nor saturated
  (~1.0) — possibly before or after ``critic_warmup``; ``max_steps`` caps it.

In a joint (``trainer.warmup.mode: sft``) warmup the actor trains on the teacher responses beside
the critic, except in the first ``critic_only_steps`` warmup steps (the paper's warmup: LMOps runs
it with ``critic_warmup=10``, so its first steps update the discriminator only).
"""

from __future__ import annotations


class WarmupSchedule:
    def __init__(self, critic_warmup: int, until_d_acc: list[float] | None = None, patience: int = 3,
                 max_steps: int | None = None, critic_only_steps: int = 0):
        self.critic_warmup = critic_warmup
        self.critic_only_steps = critic_only_steps
        self.band = tuple(until_d_acc) if until_d_acc else None
        self.patience = patience
        self.max_steps = max_steps
        self.steps_done = 0
        self.in_band = 0
        self.done = False
        self.ended_at: int | None = None

    def active(self) -> bool:
        """Is the next step a warmup step?"""
        if self.done:
            return False
        limit = self.max_steps if self.band is not None else self.critic_warmup
        if limit is not None and self.steps_done >= limit:
            self._finish()
            return False
        return True

    def sft_due(self) -> bool:
        """In a joint warmup: does the next warmup step train the actor (SFT) as well as the critic?"""
        return self.steps_done >= self.critic_only_steps

    def observe(self, d_acc: float) -> None:
        """Record one finished warmup step and its critic accuracy (d_acc)."""
        self.steps_done += 1
        if self.band is not None:
            low, high = self.band
            self.in_band = self.in_band + 1 if low <= d_acc <= high else 0
            if self.in_band >= self.patience:
                self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.ended_at = self.steps_done

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "in_band": self.in_band, "done": self.done,
                "ended_at": self.ended_at}

    def load_state_dict(self, s: dict) -> None:
        self.steps_done, self.in_band = int(s["steps_done"]), int(s["in_band"])
        self.done, self.ended_at = bool(s["done"]), s["ended_at"]
