"""``megatron-gad bench``'s arithmetic (FLOPs per phase, tokens, steady state), ``--aggregate``'s scaling
table and plot from synthetic reports, and the one-line error contract. The CPU run itself:
``tests/controller/test_bench_run.py``."""

from __future__ import annotations

import json
import os

import pytest

from tests.unit.cli_helpers import run_cli

# a tiny Llama, written out so the FLOP counts below can be done by hand
H, L, A, G, D, F, V = 8, 2, 2, 1, 4, 16, 32


def _arch():
    from megatron_gad.models.arch import Arch

    return Arch(model_type="llama", hidden_size=H, num_layers=L, num_heads=A, num_kv_heads=G, ffn_hidden_size=F,
                vocab_size=V, max_position_embeddings=64, rope_theta=1e4, rms_norm_eps=1e-6,
                tie_word_embeddings=False, qkv_bias=False, head_dim=D)


# per token: QKV h*(a+2g)*d, output projection h*a*d, FC1 + FC2 3*h*f, per layer; the LM head V*h
N_LAYER = H * (A + 2 * G) * D + H * A * D + 3 * H * F
N_ACTOR = L * N_LAYER + V * H
N_CRITIC = L * N_LAYER + H


def _fwd(n, seqs):
    """2N per token + causal attention 4*a*d*L per (query, key) pair."""
    return sum(2 * n * s + 4 * A * D * L * s * (s + 1) / 2 for s in seqs)


def _attn(seqs):
    return sum(4 * A * D * L * s * (s + 1) / 2 for s in seqs)


LENGTHS = {"prompt": [3, 5], "teacher": [4, 2], "sample_prompt": [3, 3, 5, 5], "sample_response": [6, 1, 2, 7]}
SAMPLES = [9, 4, 7, 12]
TEACHERS = [7, 7]


def _specs(actor_recompute=None, critic_recompute=None, actor_epochs=1, critic_epochs=1):
    from megatron_gad.tools.bench_report import ModelSpec

    return (ModelSpec(_arch(), V, actor_recompute, actor_epochs), ModelSpec(_arch(), V, critic_recompute,
                                                                               critic_epochs))


def test_step_flops_by_hand():
    from megatron_gad.tools.bench_report import step_flops

    actor, critic = _specs()
    phases = ["gen", "reward", "old_log_prob", "ref", "adv", "update_critic", "update_actor"]
    got = step_flops(LENGTHS, {}, actor, critic, phases)
    assert got["gen"]["model"] == pytest.approx(_fwd(N_ACTOR, SAMPLES))
    assert got["old_log_prob"] == got["ref"] == got["gen"]
    assert got["reward"]["model"] == pytest.approx(_fwd(N_CRITIC, SAMPLES))
    # the critic trains on each prompt's teacher sequence and its n student samples: forward + 2x backward
    assert got["update_critic"]["model"] == pytest.approx(3 * _fwd(N_CRITIC, TEACHERS + SAMPLES))
    assert got["update_actor"]["model"] == pytest.approx(3 * _fwd(N_ACTOR, SAMPLES))
    assert got["adv"] == {"model": 0.0, "hardware": 0.0}
    for p in phases:  # no recompute: hardware = model
        assert got[p]["hardware"] == got[p]["model"]


def test_recompute_epochs_guard_and_sft():
    from megatron_gad.tools.bench_report import step_flops, step_tokens

    actor, critic = _specs("full", "selective", actor_epochs=2, critic_epochs=3)
    got = step_flops(LENGTHS, {"critic/extra_steps": 1.0}, actor, critic, ["update_actor", "update_critic", "sft"])
    a = _fwd(N_ACTOR, SAMPLES)
    assert got["update_actor"]["model"] == pytest.approx(2 * 3 * a)
    assert got["update_actor"]["hardware"] == pytest.approx(2 * 4 * a)  # full recompute: one more forward
    c = _fwd(N_CRITIC, TEACHERS + SAMPLES)
    # 3 epochs x (the update + 1 extra update); selective recompute reruns core attention only
    assert got["update_critic"]["model"] == pytest.approx(6 * 3 * c)
    assert got["update_critic"]["hardware"] == pytest.approx(6 * (3 * c + _attn(TEACHERS + SAMPLES)))
    assert got["sft"]["model"] == pytest.approx(3 * _fwd(N_ACTOR, TEACHERS))
    skipped = step_flops(LENGTHS, {"critic/update_skipped": 1.0}, actor, critic, ["update_critic"])
    assert skipped["update_critic"]["model"] == pytest.approx(c)  # the guard only evaluated the pairs
    assert step_tokens(LENGTHS) == {"sample_prompt": 16, "sample_response": 16, "teacher_sequence": 14, "step": 32}
    sft = dict(LENGTHS, sample_prompt=[], sample_response=[])
    assert step_tokens(sft)["step"] == 14  # no rollout: the teacher rows trained on


def test_summary_excludes_first_step_and_reads_memory():
    from megatron_gad.tools.bench_report import memory_key, summarise_stage

    assert memory_key("memory/critic/update_critic_bytes") == ("critic", "update_critic", 1.0)
    assert memory_key("memory/actor/gen_peak_gb") == ("actor", "gen_peak", 2.0**30)
    assert memory_key("critic/d_acc") is None

    def rec(step, s, gen_s, flops, tokens, mem):
        return {"step": step, "step_s": s, "phases_s": {"gen": gen_s, "update_critic": s - gen_s},
                "flops": {"gen": {"model": flops, "hardware": flops}, "update_critic": {"model": flops,
                                                                                          "hardware": 2 * flops}},
                "tokens": {"step": tokens}, "memory": {"critic": {"update_critic": mem}}}

    records = [rec(1, 100.0, 90.0, 1e9, 10, 5.0), rec(2, 2.0, 1.0, 4e12, 100, 7.0), rec(3, 4.0, 3.0, 8e12, 300, 6.0)]
    s = summarise_stage(records, devices=2, role_devices={"actor": 2, "critic": 2}, peak=1e13, exclude_first=True)
    assert s["measured_steps"] == [2, 3] and s["steps"] == [1, 2, 3]
    assert s["step_seconds"] == 3.0
    assert s["tokens_per_s_per_device"] == pytest.approx(200 / 3.0 / 2)
    assert s["model_flops_per_step"] == pytest.approx(2 * 6e12)
    assert s["mfu"] == pytest.approx(12e12 / 3.0 / 2 / 1e13)
    assert s["hfu"] == pytest.approx(18e12 / 3.0 / 2 / 1e13)
    assert s["phases"]["gen"]["mfu"] == pytest.approx(6e12 / 2.0 / 2 / 1e13)
    assert s["memory_bytes"] == {"critic": {"update_critic": 7.0}}  # max over the measured steps only
    one = summarise_stage(records[:1], 1, {}, 1e13, exclude_first=True)
    assert one["measured_steps"] == [1]  # nothing to exclude from a single step


def _report(devices, nodes, tokens_per_s, config="gad_3b"):
    step_s = 10.0
    return {"schema": "megatron-gad-bench/1", "config_name": config, "nodes": nodes, "gpus_per_node": devices // nodes,
            "world_size": devices, "device": {"name": "NVIDIA H100 80GB HBM3"}, "git_commit": "abc",
            "results": {"warmup": {}, "gad": {"step_seconds": step_s, "measured_steps": [2, 3],
                                              "tokens_per_step": {"step": tokens_per_s * step_s},
                                              "tokens_per_s": tokens_per_s,
                                              "tokens_per_s_per_device": tokens_per_s / devices, "mfu": 0.3}}}


def _write(tmp_path, name, report):
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return str(path)


def test_aggregate_table_and_png(tmp_path, capsys):
    # given out of order: 2 nodes x 8 at 1.8x the 1-node throughput, 4 nodes x 8 at 3x
    paths = [_write(tmp_path, "n2.json", _report(16, 2, 1800.0)), _write(tmp_path, "n1.json", _report(8, 1, 1000.0)),
             _write(tmp_path, "n4.json", _report(32, 4, 3000.0))]
    out = tmp_path / "scaling"
    code, stdout, err = run_cli(["bench", "--aggregate", *paths, "--out", str(out)], capsys)
    assert code == 0, err
    assert "efficiency" in stdout
    table = json.loads((out / "scaling.json").read_text())
    assert table["stage"] == "gad" and table["baseline_devices"] == 8
    rows = table["rows"]
    assert [r["devices"] for r in rows] == [8, 16, 32] and [r["nodes"] for r in rows] == [1, 2, 4]
    assert [r["throughput_per_device"] for r in rows] == pytest.approx([125.0, 112.5, 93.75])
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.8, 3.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.75])
    md = (out / "scaling.md").read_text()
    assert "| 2 | 16 |" in md and "90.0%" in md and "75.0%" in md
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(out / "scaling.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_aggregate_errors(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _report(8, 1, 1000.0))
    other = _write(tmp_path, "b.json", _report(16, 2, 1000.0, config="gad_7b"))
    same = _write(tmp_path, "c.json", _report(8, 1, 900.0))
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    cases = [([a, other], "different configs"), ([a, same], "several reports at [8]"),
             ([a, str(junk)], "not JSON"), ([a, str(tmp_path / "none.json")], "cannot read"),
             ([a, _write(tmp_path, "x.json", {"a": 1})], "not a megatron-gad bench report")]
    for paths, msg in cases:
        code, _, err = run_cli(["bench", "--aggregate", *paths, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and msg in err and "Traceback" not in err, (paths, err)
    code, _, err = run_cli(["bench", "--aggregate", a, "--stage", "sft", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--stage sft" in err


@pytest.mark.parametrize("stages,msg", [("warmup,bogus", "expected a comma list"),
                                        ("gad,warmup", "warmup comes before"), ("sft,gad", "cannot be combined"),
                                        ("gad,gad", "named twice")])
def test_bad_stages(stages, msg, capsys):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code, _, err = run_cli(["bench", os.path.join(root, "configs", "demo.yaml"), "--stages", stages], capsys)
    assert code == 2 and msg in err and "Traceback" not in err


def test_bench_needs_config_or_reports(capsys, tmp_path):
    code, _, err = run_cli(["bench"], capsys)
    assert code == 2 and "give a CONFIG" in err
    code, _, err = run_cli(["bench", "configs/demo.yaml", "--aggregate", "r.json"], capsys)
    assert code == 2 and "takes reports only" in err
    code, _, err = run_cli(["bench", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "cannot read config file" in err


def test_stage_overrides_run_exact_steps():
    from megatron_gad.config import load_config
    from megatron_gad.controller.warmup import WarmupSchedule
    from megatron_gad.tools.bench import stage_overrides

    cfg = load_config(None, ["trainer.warmup.until_d_acc=[0.6, 0.8]", "trainer.critic_warmup=50",
                             *stage_overrides(["warmup", "gad"], 3, "/tmp/x")])
    t = cfg.trainer
    assert t.total_training_steps == 6 and t.save_freq == -1 and t.sample_log_freq == 0
    w = WarmupSchedule(t.critic_warmup, t.warmup.until_d_acc, t.warmup.patience, t.warmup.max_steps)
    stages = []
    for _ in range(t.total_training_steps):
        warm = w.active()
        stages.append("warmup" if warm else "gad")
        if warm:
            w.observe(0.7)  # in the user's band: an adaptive warmup would have ended early
    assert stages == ["warmup"] * 3 + ["gad"] * 3
    only_gad = load_config(None, stage_overrides(["gad"], 2, "/tmp/x")).trainer
    assert only_gad.critic_warmup == 0 and only_gad.total_training_steps == 2
    assert load_config(None, stage_overrides(["sft"], 2, "/tmp/x")).trainer.mode == "sft"
