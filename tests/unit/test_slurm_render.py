"""`megatron-gad slurm render`: the script's #SBATCH lines, Ray start-up and train overrides follow the
config's layout; layouts the allocation cannot hold are refused before anything is queued."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cli_helpers import run_cli

from megatron_gad.config import ConfigError
from megatron_gad.tools.slurm import SAVED_ON_SIGNAL_EXIT, Request, render_script

ROOT = Path(__file__).resolve().parents[2]
GAD = str(ROOT / "configs" / "gad.yaml")  # TP=2 for both roles, 8 GPUs per node, colocated
OUT = "trainer.default_local_dir=/shared/runs/gad"


def _sbatch(text: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))


def _train_args(text: str) -> list[str]:
    block = text[text.index("python3 -m megatron_gad.cli train"):].split("> \"$TRAIN_LOG\"")[0]
    return shlex.split(block.replace("\\\n", " "))[5:]


def test_render_matches_layout_and_is_deterministic():
    req = Request(nodes=4, gpus_per_node=8, partition="gpu", account="proj", time="24:00:00", venv="/sw/venv")
    text = render_script(GAD, [OUT, "data.train_batch_size=512"], req)
    assert text == render_script(GAD, [OUT, "data.train_batch_size=512"], req)
    sb = _sbatch(text)
    assert (sb["nodes"], sb["gpus-per-node"], sb["ntasks-per-node"], sb["cpus-per-task"]) == ("4", "8", "1", "64")
    assert (sb["partition"], sb["account"], sb["time"], sb["signal"]) == ("gpu", "proj", "24:00:00", "B:USR1@300")
    assert sb["output"] == "/shared/runs/gad/logs/%x-%j.out" and "#SBATCH --requeue" in text
    args = _train_args(text)
    assert args[:3] == ["data.train_batch_size=512", "trainer.nnodes=4", "trainer.n_gpus_per_node=8"]
    assert "trainer.resume_mode=auto" in args and 'ray.address=$RAY_ADDRESS' in " ".join(args)
    assert "source /sw/venv/bin/activate" in text and "NODES=4" in text and "GPUS_PER_NODE=8" in text
    # security: token auth on, per-job token, owner-only files, no dashboard, the token never echoed
    assert "umask 077" in text and "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in text
    assert "--include-dashboard=false" in text and "cat \"$RUN/ray_token\"" not in text
    assert f"SAVED_ON_SIGNAL={SAVED_ON_SIGNAL_EXIT}" in text
    assert re.search(r"@[A-Z_]+@", text) is None  # every template field was filled


def test_exit_code_agrees_with_trainer():
    pytest.importorskip("torch")
    from megatron_gad.controller import trainer

    assert trainer.SAVED_ON_SIGNAL_EXIT == SAVED_ON_SIGNAL_EXIT


def test_container_mode_runs_steps_in_the_image():
    text = render_script(GAD, [OUT], Request(nodes=2, gpus_per_node=8, container="nvcr.io/x/gad:1"))
    assert "CONTAINER=(--container-image=nvcr.io/x/gad:1" in text
    assert 'ON_HEAD=(srun --overlap --nodes=1 --ntasks=1 -w "$head_node" "${CONTAINER[@]}")' in text


@pytest.mark.parametrize("overrides,nodes,gpus,message", [
    ([], 1, 1, "TP*PP=2*1=2 must divide the world size trainer.nnodes*trainer.n_gpus_per_node=1"),
    (["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=8"], 4, 4,
     "actor: TP=8 needs 8 GPUs on one node, but --gpus-per-node is 4"),
    # split: the actor's 6 GPUs fill node 0 (4) and 2 of node 1; a critic TP=3 group would straddle nodes 1-2
    (["trainer.placement=split", "critic.megatron.tensor_model_parallel_size=3",
      "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2", "data.train_batch_size=48",
      "actor_rollout_ref.actor.ppo_mini_batch_size=48"], 3, 4, "critic: tensor parallel groups of 3 GPUs would span"),
    (["trainer.workers=local"], 1, 8, "trainer.workers"),
])
def test_refuses_layouts_the_allocation_cannot_hold(overrides, nodes, gpus, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_script(GAD, [OUT, *overrides], Request(nodes=nodes, gpus_per_node=gpus))


def test_cli_render_writes_script_and_refuses_in_one_line(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    code, stdout, _ = run_cli(["slurm", "render", GAD, f"trainer.default_local_dir={tmp_path / 'run'}",
                               "--nodes", "2", "--gpus-per-node", "8", "--out", str(out)], capsys)
    assert code == 0 and "submit with: sbatch" in stdout
    assert _sbatch(out.read_text())["nodes"] == "2" and (tmp_path / "run" / "logs").is_dir()
    code, _, err = run_cli(["slurm", "render", GAD, "--nodes", "1", "--gpus-per-node", "8", "--time", "soon"], capsys)
    assert code == 2 and "--time 'soon' is not a SLURM time" in err and "Traceback" not in err
    code, _, err = run_cli(["slurm", "render", GAD, "--nodes", "1", "--gpus-per-node", "8",
                            "--container", "img", "--venv", "v"], capsys)
    assert code == 2 and "not allowed" in err


def test_bench_job_runs_bench_with_a_report_per_node_count():
    text = render_script(GAD, [OUT], Request(nodes=2, gpus_per_node=8, bench="--steps 5 --stages warmup,gad"))
    line = text[text.index("python3 -m megatron_gad.cli bench"):].split("> \"$TRAIN_LOG\"")[0]
    args = shlex.split(line.replace("\\\n", " "))
    assert args[3] == "bench" and "trainer.nnodes=2" in args and "trainer.resume_mode=auto" not in args
    assert args[-8:] == ["--steps", "5", "--stages", "warmup,gad", "--out", "/shared/runs/gad/bench",
                         "--name", "bench_gad_2x8"]
    train = render_script(GAD, [OUT], Request(nodes=2, gpus_per_node=8))
    assert "megatron_gad.cli train" in train and "--steps" not in train
    with pytest.raises(ConfigError, match="--aggregate runs on a login node"):
        render_script(GAD, [OUT], Request(nodes=2, gpus_per_node=8, bench="--aggregate a.json"))
    with pytest.raises(ConfigError, match="--bench and --pipeline are alternatives"):
        render_script(str(ROOT / "configs" / "pipelines" / "qwen2.5-7b.yaml"), [], Request(nodes=4, gpus_per_node=8,
                      bench="--steps 5"), pipeline=True)


def _header(text: str) -> str:
    return text.split("#SBATCH --job-name")[0]


def test_vllm_engines_are_in_the_layout_and_ray_resources_hold_them():
    """With vLLM the engines share the actor's bundles: the header says what the trainer will ask Ray for
    (controller/placement.py), and every node's Ray (GPUS_PER_NODE GPUs, --cpus-per-task CPUs) holds it."""
    from megatron_gad.config import load_config
    from megatron_gad.controller.placement import placement_request

    req = Request(nodes=4, gpus_per_node=8)
    text = render_script(GAD, [OUT], req)  # gad.yaml: rollout.name=vllm, colocated, TP2 both roles
    cfg = load_config(GAD, [OUT, "trainer.nnodes=4", "trainer.n_gpus_per_node=8"])
    pr = placement_request(32, 32, colocate=True, with_critic=True, with_vllm=True)
    head = _header(text)
    assert f"Ray placement group: {pr.bundles} bundles" in head and pr.bundles == 32
    assert "rollout: 32 vLLM engine(s) (TP 1) on the actor's bundles" in head
    assert "0.3333 GPU and 0.3333 CPU" in head  # actor + critic + engine share each GPU
    sb = _sbatch(text)
    per_node = pr.bundles // req.nodes
    assert int(sb["gpus-per-node"]) >= per_node and int(sb["cpus-per-task"]) >= per_node
    assert 'ray start "$@" --block' in text and 'start_ray "$head_node" "$LOGS/ray-head.log" --head' in text
    assert '--num-gpus="$GPUS_PER_NODE" --num-cpus="$SLURM_CPUS_PER_TASK"' in text
    assert "--ray-client-server-port" not in text  # needs ray[client], which the project does not install
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    # the native sampler: no engines, the two roles split each GPU in half
    native = _header(render_script(GAD, [OUT, "actor_rollout_ref.rollout.name=megatron"], req))
    assert "vLLM" not in native and "0.5 GPU and 0.5 CPU" in native


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.rollout.name=megatron"]])
def test_refuses_too_few_ray_cpus_for_the_placement_group(extra):
    with pytest.raises(ConfigError, match=r"Ray gets 4 CPUs per node \(--cpus-per-task\), but the trainer's "
                                          r"placement group asks 1 CPU per GPU bundle, 8 bundles per node"):
        render_script(GAD, [OUT, *extra], Request(nodes=1, gpus_per_node=8, cpus_per_task=4))
    render_script(GAD, [OUT, *extra], Request(nodes=1, gpus_per_node=8, cpus_per_task=8))  # enough


def test_vllm_engine_groups_must_fit_the_nodes(monkeypatch):
    """Engines follow the actor's bundles, so an engine TP group is checked like a Megatron TP group
    (validation allows engine TP 1 only today; the check stands for when that changes)."""
    from megatron_gad.config import load_config
    from megatron_gad.tools.slurm import check_request

    req = Request(nodes=2, gpus_per_node=2)
    cfg = load_config(GAD, [OUT, "trainer.nnodes=2", "trainer.n_gpus_per_node=2", "data.train_batch_size=128",
                            "actor_rollout_ref.rollout.tensor_model_parallel_size=4"])
    monkeypatch.setattr("megatron_gad.tools.slurm.validate", lambda c: None)  # past today's engine-TP refusal
    with pytest.raises(ConfigError, match="a vLLM engine of TP=4 needs 4 GPUs on one node"):
        check_request(cfg, req)
