"""The discriminator's saturation guard (pure logic, saved with checkpoints; GAD steps only).

A saturated discriminator (d_acc ~0.96–0.99: it tells every student sample from the teacher) gives
the actor a reward with no signal; a blind one (~0.5) gives noise. The guard keeps D in a band by
acting on its *next* update from the rolling mean of its recent d_acc:

* above ``upper``: ``skip`` the update (D is only evaluated on the step's pairs, so the rolling
  d_acc keeps moving) or ``scale_lr`` (update with the learning rate times ``lr_scale``);
* below ``lower``: ``extra_steps`` more updates on the same pairs;
* otherwise a normal update.

Only GAD steps feed and consult it: the warmup and ``trainer.warmup.until_d_acc`` see the raw d_acc.
"""

from __future__ import annotations

from collections import deque


class SaturationGuard:
    def __init__(self, enable: bool, upper: float, lower: float, window: int, action: str, lr_scale: float,
                 extra_steps: int):
        self.enable = enable
        self.upper, self.lower = upper, lower
        self.action, self.lr_scale, self.extra_steps = action, lr_scale, extra_steps
        self.recent: deque[float] = deque(maxlen=window)

    def rolling(self) -> float | None:
        return sum(self.recent) / len(self.recent) if len(self.recent) == self.recent.maxlen else None

    def decide(self) -> dict:
        """How to update D this step: {"update": bool, "lr_scale": float, "extra_steps": int}."""
        plain = {"update": True, "lr_scale": 1.0, "extra_steps": 0}
        r = self.rolling() if self.enable else None
        if r is None:  # off, or not a full window of GAD steps yet
            return plain
        if r > self.upper:
            return {"update": False, "lr_scale": 1.0, "extra_steps": 0} if self.action == "skip" else \
                {"update": True, "lr_scale": self.lr_scale, "extra_steps": 0}
        if r < self.lower:
            return dict(plain, extra_steps=self.extra_steps)
        return plain

    def observe(self, d_acc: float) -> None:
        if self.enable:
            self.recent.append(float(d_acc))

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, s: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(x) for x in s.get("recent", []))
