from megatron_gad.controller.warmup import WarmupSchedule


def run(schedule, accs):
    stages = []
    for acc in accs:
        if not schedule.active():
            stages.append("gad")
            continue
        stages.append("warmup")
        schedule.observe(acc)
    return stages


def test_fixed_warmup_is_exactly_critic_warmup_steps():
    assert run(WarmupSchedule(3), [0.5] * 5) == ["warmup"] * 3 + ["gad"] * 2
    assert run(WarmupSchedule(0), [0.5] * 2) == ["gad"] * 2


def test_band_ends_early_after_patience():
    s = WarmupSchedule(10, [0.6, 0.7], patience=2)
    assert run(s, [0.5, 0.62, 0.8, 0.65, 0.66, 0.5]) == ["warmup"] * 5 + ["gad"]
    assert s.ended_at == 5


def test_band_can_run_past_critic_warmup_and_is_capped():
    s = WarmupSchedule(1, [0.6, 0.7], patience=2, max_steps=4)
    assert run(s, [0.5, 0.5, 0.5, 0.5, 0.65]) == ["warmup"] * 4 + ["gad"]
    assert s.ended_at == 4


def test_state_round_trip():
    s = WarmupSchedule(10, [0.6, 0.7], patience=3)
    run(s, [0.61, 0.62])
    t = WarmupSchedule(10, [0.6, 0.7], patience=3)
    t.load_state_dict(s.state_dict())
    assert run(t, [0.63]) == ["warmup"] and t.done and t.ended_at == 3


def test_joint_warmup_trains_the_actor_after_the_critic_only_steps():
    s = WarmupSchedule(5, critic_only_steps=2)
    due = []
    while s.active():
        due.append(s.sft_due())
        s.observe(0.5)
    assert due == [False, False, True, True, True]
