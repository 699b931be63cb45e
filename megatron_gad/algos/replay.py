"""A replay buffer of past student samples for the discriminator (pure torch; ``critic.replay``).

The discriminator sees only the current student's samples, so it can forget what earlier students
did and the actor can cycle back to them (a GAN failure known from images). The buffer keeps the
last ``capacity`` prompt groups (prompt, teacher response and its n student samples, as the critic's
pair batch holds them); each update adds ``groups_per_step`` of them, drawn uniformly, after the
current groups. The actor's batch never holds them: they are off-policy.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

# pair-batch keys and the side their padding is on (prompts are left-padded, responses right-padded)
PAIR_KEYS = {"prompt_ids": "left", "prompt_mask": "left", "teacher_response": "right",
             "teacher_response_mask": "right", "responses": "right", "response_mask": "right"}


def _pad_to(x: Tensor, width: int, side: str, value: int) -> Tensor:
    extra = width - x.shape[-1]
    if extra <= 0:
        return x
    pad = (extra, 0) if side == "left" else (0, extra)
    return torch.nn.functional.pad(x, pad, value=value)


def cat_pair_batches(batches: list[dict], pad_id: int) -> dict:
    """Concatenate critic pair batches along the prompt dim, each tensor padded to the widest on its
    padding side (ids with ``pad_id``, masks with 0)."""
    out = {}
    for key, side in PAIR_KEYS.items():
        parts = [b[key] for b in batches]
        width = max(p.shape[-1] for p in parts)
        value = 0 if key.endswith("mask") else pad_id
        out[key] = torch.cat([_pad_to(p, width, side, value) for p in parts], 0)
    return out


class ReplayBuffer:
    def __init__(self, capacity: int, groups_per_step: int, seed: int = 0):
        self.capacity, self.groups_per_step = capacity, groups_per_step
        self.groups: deque[dict] = deque(maxlen=max(capacity, 1))
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.groups_per_step > 0

    def sample(self) -> list[dict]:
        """Up to ``groups_per_step`` stored groups, drawn uniformly without replacement."""
        k = min(self.groups_per_step, len(self.groups))
        if k == 0:
            return []
        idx = torch.randperm(len(self.groups), generator=self.gen)[:k]
        return [self.groups[int(i)] for i in idx]

    def add(self, pairs: dict) -> None:
        """Store each prompt group of a pair batch (the oldest leave once ``capacity`` is reached)."""
        for i in range(pairs["prompt_ids"].shape[0]):
            self.groups.append({k: pairs[k][i:i + 1].clone() for k in PAIR_KEYS})

    def mix(self, pairs: dict, pad_id: int) -> tuple[dict, int]:
        """The critic's batch: this step's groups, then the replayed ones; and how many were replayed."""
        past = self.sample()
        if not past:
            return pairs, 0
        return cat_pair_batches([pairs, *past], pad_id), len(past)
