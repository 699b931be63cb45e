"""``megatron-gad plan``: parameter counts against transformers, the KV-cache formula, the verdict,
suggestions that really fit (and are minimal), and the one-line error contract."""

from __future__ import annotations

import json
import os

import pytest

from tests.unit.cli_helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GAD = os.path.join(ROOT, "configs", "gad.yaml")
ARCHS = os.path.join(ROOT, "configs", "archs")


def _cfg(*overrides, model="qwen2.5-3b"):
    from megatron_gad.config import load_config

    return load_config(GAD, [f"actor_rollout_ref.model.path={os.path.join(ARCHS, model)}", *overrides])


@pytest.mark.parametrize("model", ["qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"])
def test_weights_equal_transformers_parameter_count(model):
    """At TP = PP = DP = 1 and fp32, the planner's weight bytes are 4 x the parameter count of the HF
    model (built on the meta device) plus only the vocabulary padding rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_gad.config import padded_vocab_size
    from megatron_gad.models.arch import load_arch
    from megatron_gad.planner import rank_state_bytes, stage_params

    path = os.path.join(ARCHS, model)
    hf_cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    count = sum(p.numel() for p in hf.parameters())
    arch = load_arch(path)
    vocab = padded_vocab_size(arch.vocab_size, 128)
    pad_rows = (vocab - arch.vocab_size) * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    st = rank_state_bytes(stage_params(arch, "actor", 1, 1, 0, vocab), "float32", 1, 0, False)
    assert st.weights == 4 * (count + pad_rows)
    # TP splits every matrix: TP 2 ranks together hold the model once plus the replicated norms
    tp2 = rank_state_bytes(stage_params(arch, "actor", 2, 1, 0, vocab), "float32", 1, 0, False)
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    assert 2 * tp2.weights == st.weights + 4 * norms


def test_gad_yaml_on_h100_does_not_fit_and_suggestions_fit(capsys):
    from megatron_gad.config import apply_overrides
    from megatron_gad.tools.plan import GPUS, build_plan, load_archs

    native = "actor_rollout_ref.rollout.name=megatron"  # the native sampler's KV cache is what is planned
    code, out, err = run_cli(["plan", GAD, f"actor_rollout_ref.model.path={ARCHS}/qwen2.5-3b", native, "--gpu",
                              "h100-80gb", "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["fits"] is False and plan["suggestions"]
    rollout = next(p for p in plan["phases"] if p["phase"] == "rollout")
    # KV cache, written out independently: 256 prompts x 8 samples / actor DP 4 rows, 2048 + 1536
    # tokens, 36 layers, K and V, 2 KV heads / TP 2, head_dim 128, bf16
    assert rollout["kv_cache"] == (256 * 8 // 4) * 3584 * 36 * 2 * 1 * 128 * 2
    assert {p["phase"] for p in plan["phases"]} == {"rollout", "reward", "old_log_prob", "ref_log_prob",
                                                    "critic_update", "actor_update"}
    cfg = _cfg(native)
    archs = load_archs(cfg)
    for s in plan["suggestions"]:
        assert build_plan(apply_overrides(cfg, s["overrides"]), archs, GPUS["h100-80gb"])["fits"], s
        for i in range(len(s["overrides"])):  # minimal: dropping any one change no longer fits
            fewer = s["overrides"][:i] + s["overrides"][i + 1:]
            assert not build_plan(apply_overrides(cfg, fewer), archs, GPUS["h100-80gb"])["fits"], (s, fewer)


def test_text_output_names_verdict_and_assumptions(capsys):
    code, out, _ = run_cli(["plan", GAD, f"actor_rollout_ref.model.path={ARCHS}/qwen2.5-3b",
                            "critic.megatron.use_distributed_optimizer=true",
                            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
                            "critic.megatron.override_transformer_config={recompute_granularity: full, "
                            "recompute_method: uniform, recompute_num_layers: 1}"], capsys)
    assert code == 0
    assert "verdict: FITS" in out
    assert "40% of peak" in out and "MFU" in out


def test_distributed_optimizer_and_recompute_shrink_the_right_numbers():
    from megatron_gad.tools.plan import GPUS, build_plan, load_archs

    base_cfg = _cfg()
    archs = load_archs(base_cfg)
    base = build_plan(base_cfg, archs, GPUS["h100-80gb"])
    dist = build_plan(_cfg("critic.megatron.use_distributed_optimizer=true"), archs, GPUS["h100-80gb"])
    # DP 4: Adam moments + master copies of a quarter (plus padding) of the parameters
    assert dist["roles"]["critic"]["optimizer"] == pytest.approx(base["roles"]["critic"]["optimizer"] / 4, rel=1e-3)
    assert dist["roles"]["actor"] == base["roles"]["actor"]
    rec = build_plan(_cfg("critic.megatron.override_transformer_config={recompute_granularity: full, "
                          "recompute_method: uniform, recompute_num_layers: 1}"), archs, GPUS["h100-80gb"])
    ph = {p["phase"]: p for p in base["phases"]}
    ph_rec = {p["phase"]: p for p in rec["phases"]}
    assert ph_rec["critic_update"]["transient"] < ph["critic_update"]["transient"] / 5
    assert ph_rec["actor_update"] == ph["actor_update"]


def test_more_nodes_lower_the_rollout_cache(capsys):
    code, out, _ = run_cli(["plan", GAD, f"actor_rollout_ref.model.path={ARCHS}/qwen2.5-3b",
                            "actor_rollout_ref.rollout.name=megatron", "--nodes", "2", "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["world"] == 16 and plan["roles"]["actor"]["dp"] == 8
    rollout = next(p for p in plan["phases"] if p["phase"] == "rollout")
    assert rollout["kv_rows_per_rank"] == 256 * 8 // 8


def test_missing_model_config_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run_cli(["plan", GAD, f"actor_rollout_ref.model.path={tmp_path}/nope"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "config.json" in err and "Traceback" not in err


def test_invalid_layout_is_reported_as_config_error(capsys):
    code, _, err = run_cli(["plan", GAD, f"actor_rollout_ref.model.path={ARCHS}/qwen2.5-7b"], capsys)
    assert code == 0, err  # TP 2 divides 28 heads and 4 KV heads
    code, _, err = run_cli(["plan", GAD, f"actor_rollout_ref.model.path={ARCHS}/qwen2.5-7b",
                            "critic.megatron.tensor_model_parallel_size=8"], capsys)
    assert code == 2 and "num_attention_heads=28" in err


# ---------------------------------------------------------------- train --dry-run
def _dry_run_inputs(tmp_path) -> list[str]:
    """configs/gad.yaml with the Qwen2.5-3B architecture, a tokenizer and tiny data files: every path
    train checks exists, but there are no weights (a dry run must not need them)."""
    import shutil

    from megatron_gad.tools.tiny_models import make_tokenizer

    model = tmp_path / "qwen3b"
    model.mkdir()
    shutil.copy(os.path.join(ARCHS, "qwen2.5-3b", "config.json"), model / "config.json")
    make_tokenizer(str(model), 16)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "w5", "teacher_response": "w6"}) + "\n")
    return [f"actor_rollout_ref.model.path={model}", f"data.train_files=[{data}]", f"data.val_files=[{data}]"]


@pytest.fixture
def nothing_starts(monkeypatch):
    """Importing Ray or building the trainer fails the test."""
    import sys

    import megatron_gad.controller.trainer as trainer

    monkeypatch.setitem(sys.modules, "ray", None)

    def refuse(*a, **k):
        raise AssertionError("--dry-run started the trainer")

    monkeypatch.setattr(trainer, "GADTrainer", refuse)


def test_train_dry_run_reports_layout_placement_and_verdict(tmp_path, capsys, nothing_starts):
    code, out, err = run_cli(["train", GAD, *_dry_run_inputs(tmp_path), "--dry-run"], capsys)
    assert code == 0, err
    assert "# resolved config" in out and "tensor_model_parallel_size: 2" in out
    assert "actor: TP 2 x PP 1 x DP 4 = 8 ranks (+ its frozen reference on the same ranks)" in out
    assert "critic: TP 2 x PP 1 x DP 4 = 8 ranks" in out
    # configs/gad.yaml samples with vLLM: one engine per actor GPU shares each bundle with actor and critic
    assert "rollout: 8 vLLM engine(s) (TP 1) on the actor's bundles" in out
    assert "8 bundles of {'GPU': 1, 'CPU': 1}" in out and "0.333 GPU per rank" in out
    assert "verdict: DOES NOT FIT" in out and "dry run: nothing started" in out

    split = tmp_path / "split"
    split.mkdir()
    code, out, err = run_cli(["train", GAD, *_dry_run_inputs(split), "trainer.placement=split",
                              "--gpu", "h200-141gb", "--dry-run"], capsys)
    assert code == 0, err
    assert "actor: TP 2 x PP 1 x DP 2 = 4 ranks" in out
    # split: the critic has its own bundles; the actor's are shared with its vLLM engines (half each)
    assert "critic: bundles 4..7 (node by node), 0.5 GPU per rank" in out
    assert "on h200-141gb" in out


def test_train_dry_run_refuses_an_invalid_config(tmp_path, capsys, nothing_starts):
    code, out, err = run_cli(["train", GAD, *_dry_run_inputs(tmp_path),
                              "critic.megatron.context_parallel_size=2", "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert "context_parallel_size=2: context parallelism is not supported yet" in err


def test_offload_frees_a_role_only_outside_its_phases():
    from megatron_gad.tools.plan import GPUS, build_plan, load_archs

    base_cfg = _cfg()
    archs = load_archs(base_cfg)
    base = {p["phase"]: p for p in build_plan(base_cfg, archs, GPUS["h100-80gb"])["phases"]}
    plan = build_plan(_cfg("critic.megatron.param_offload=true", "critic.megatron.grad_offload=true",
                           "critic.megatron.optimizer_offload=true"), archs, GPUS["h100-80gb"])
    critic = plan["roles"]["critic"]
    off = {p["phase"]: p for p in plan["phases"]}
    for phase in ("rollout", "old_log_prob", "ref_log_prob", "actor_update"):  # the critic is all on the host
        assert off[phase]["resident"] == base[phase]["resident"] - critic["total"]
    # scoring needs the critic's weights only; its update needs everything
    assert off["reward"]["resident"] == base["reward"]["resident"] - critic["grads"] - critic["optimizer"]
    assert off["critic_update"]["resident"] == base["critic_update"]["resident"]


def test_actor_offload_and_the_reference_on_the_host():
    """The actor's offloaded state and the reference's weights count only in the phases that use them."""
    from megatron_gad.tools.plan import GPUS, build_plan, load_archs

    ref_on_device = "actor_rollout_ref.ref.megatron.param_offload=false"
    base_cfg = _cfg(ref_on_device)
    archs = load_archs(base_cfg)
    base = {p["phase"]: p for p in build_plan(base_cfg, archs, GPUS["h100-80gb"])["phases"]}
    plan = build_plan(_cfg("actor_rollout_ref.actor.megatron.param_offload=true",
                           "actor_rollout_ref.actor.megatron.grad_offload=true",
                           "actor_rollout_ref.actor.megatron.optimizer_offload=true"), archs, GPUS["h100-80gb"])
    actor, ref = plan["roles"]["actor"], plan["roles"]["reference"]
    assert ref["offload"] == ["param"] and ref["total"] == ref["weights"] > 0
    off = {p["phase"]: p for p in plan["phases"]}
    # vLLM samples (configs/gad.yaml): the actor's weights are not used in the rollout
    for phase in ("rollout", "reward", "critic_update"):
        assert off[phase]["resident"] == base[phase]["resident"] - actor["total"] - ref["weights"], phase
    for phase in ("old_log_prob", "weight_sync"):  # the actor's weights only
        assert off[phase]["resident"] == base[phase]["resident"] - actor["grads"] - actor["optimizer"] - ref["weights"]
    assert off["ref_log_prob"]["resident"] == base["ref_log_prob"]["resident"] - actor["total"]
    assert off["actor_update"]["resident"] == base["actor_update"]["resident"] - ref["weights"]
    # the native sampler needs the actor's weights in the rollout
    native = {p["phase"]: p for p in build_plan(_cfg("actor_rollout_ref.actor.megatron.param_offload=true",
                                                     "actor_rollout_ref.rollout.name=megatron"),
                                                archs, GPUS["h100-80gb"])["phases"]}
    native_base = {p["phase"]: p for p in build_plan(_cfg("actor_rollout_ref.rollout.name=megatron"), archs,
                                                     GPUS["h100-80gb"])["phases"]}
    assert native["rollout"]["resident"] == native_base["rollout"]["resident"]
    assert native["reward"]["resident"] == native_base["reward"]["resident"] - actor["weights"]


@pytest.mark.parametrize("placement", ["colocate", "split"])
def test_vllm_claims_its_share_while_awake(placement):
    from megatron_gad.tools.plan import GPUS, RESERVE_PER_PROCESS, build_plan, load_archs

    gpu = GPUS["h100-80gb"]
    cfg = _cfg(f"trainer.placement={placement}", "actor_rollout_ref.rollout.gpu_memory_utilization=0.4")
    archs = load_archs(cfg)
    phases = {p["phase"]: p for p in build_plan(cfg, archs, gpu)["phases"]}
    budget = int(0.4 * gpu.memory)
    assert phases["rollout"]["engine"] == phases["weight_sync"]["engine"] == budget
    assert phases["rollout"]["transient"] == 0  # the KV cache is inside the engine's share
    # Qwen2.5-3B whole on each engine's GPU (engine TP 1), bf16, written out: the tied embedding, per
    # layer QKV (16 + 2 x 2 heads of 128) with bias, the output projection, SwiGLU FC1 / FC2, two norms
    h, layer = 2048, (20 * 128 * 2048 + 20 * 128) + 2048 * 2048 + 3 * 2048 * 11008 + 2 * 2048
    assert phases["rollout"]["engine_weights"] == 2 * (151936 * h + 36 * layer + h)
    assert phases["rollout"]["engine_kv_cache"] == budget - phases["rollout"]["engine_weights"] > 0
    for name in ("reward", "old_log_prob", "critic_update", "actor_update"):  # asleep: weights on the host
        assert phases[name]["engine"] == 0, name
    own = 1 if placement == "split" else 2
    engine_process = {"reward": 0 if placement == "split" else 1, "actor_update": 1}
    for name, extra in engine_process.items():  # the engine's process keeps its CUDA context on its GPUs
        assert phases[name]["reserve"] == (own + extra) * RESERVE_PER_PROCESS, name
    awake = {p["phase"]: p for p in build_plan(_cfg(f"trainer.placement={placement}",
                                                    "actor_rollout_ref.rollout.gpu_memory_utilization=0.4",
                                                    "actor_rollout_ref.rollout.free_cache_engine=false"),
                                               archs, gpu)["phases"]}
    assert awake["actor_update"]["engine"] == budget
    assert awake["reward"]["engine"] == (budget if placement == "colocate" else 0)  # no engine on critic GPUs
