"""Learning-rate schedule (algos/schedule.py) against hand-computed values."""

import math

import pytest

from megatron_gad.algos.schedule import lr_at


def test_warmup_then_constant():
    assert [lr_at(s, lr=1.0, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_and_cosine_decay():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=12)
    assert lr_at(2, schedule="linear", **kw) == pytest.approx(1.0)
    assert lr_at(7, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(12, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="linear", **kw) == pytest.approx(0.1)  # clamps after the end
    assert lr_at(7, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12, schedule="cosine", **kw) == pytest.approx(0.1)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(0, lr=1.0, schedule="step")
