"""The critic's saturation guard: decisions from the rolling d_acc of GAD steps."""

from __future__ import annotations

from megatron_gad.controller.saturation import SaturationGuard

PLAIN = {"update": True, "lr_scale": 1.0, "extra_steps": 0}


def _guard(action="skip", enable=True):
    return SaturationGuard(enable, upper=0.9, lower=0.6, window=2, action=action, lr_scale=0.25, extra_steps=2)


def test_decisions_follow_the_rolling_mean():
    g = _guard()
    assert g.decide() == PLAIN  # no full window yet
    g.observe(1.0)
    assert g.decide() == PLAIN and g.rolling() is None
    g.observe(0.9)
    assert g.rolling() == 0.95 and g.decide() == {"update": False, "lr_scale": 1.0, "extra_steps": 0}
    g.observe(0.7)  # window [0.9, 0.7]: in the band
    assert g.decide() == PLAIN
    g.observe(0.4)  # [0.7, 0.4] -> 0.55 < lower
    assert g.decide() == {"update": True, "lr_scale": 1.0, "extra_steps": 2}


def test_scale_lr_and_off():
    g = _guard("scale_lr")
    g.observe(0.99), g.observe(0.97)
    assert g.decide() == {"update": True, "lr_scale": 0.25, "extra_steps": 0}
    off = _guard(enable=False)
    off.observe(0.99), off.observe(0.99)
    assert off.decide() == PLAIN and off.rolling() is None


def test_state_round_trip():
    g = _guard()
    g.observe(0.99), g.observe(0.97)
    h = _guard()
    h.load_state_dict(g.state_dict())
    assert h.decide() == g.decide() and h.rolling() == g.rolling()
