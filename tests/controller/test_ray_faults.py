"""A worker process killed mid-step under Ray (local, CPU; two ranks per role so the dead rank's peer
is blocked in a collective): the run stops within a bounded time with one line naming role, rank
and step (exit code 3 at the console), the role's other processes are stopped, no partial checkpoint
is visible, and ``trainer.resume_mode=auto`` continues from the last complete checkpoint with the
metrics of an uninterrupted run. Kills come from the ``MEGATRON_GAD_KILL_WORKER`` debug hook
(``controller/faults.py``): the worker SIGKILLs itself as the named call starts."""

from __future__ import annotations

import json
import os
import re
import time

import psutil
import pytest
from local_setup import local_overrides

from megatron_gad import checkpoint as ckpt
from megatron_gad.controller import faults
from tests.unit.cli_helpers import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("ray_session")]

ray = pytest.importorskip("ray")

STOP_BOUND_S = 60.0  # from dispatching the fatal call to the error (the grace is 15 s)


def _overrides(assets, run, steps):
    base = [o for o in local_overrides(assets, run, kl=False) if not o.startswith(("trainer.workers=",
                                                                                  "trainer.total_training_steps=",
                                                                                  "trainer.resume_mode="))]
    # 2 ranks per role (DP 2): a killed rank leaves its peer inside a collective
    return [*base, "trainer.workers=ray", "trainer.n_gpus_per_node=2", "trainer.save_freq=2",
            f"trainer.total_training_steps={steps}", "trainer.resume_mode=auto"]


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("timing_s/")} for line in f]


@pytest.fixture
def groups(monkeypatch):
    """Every WorkerGroup created in the test (also one whose start failed), to check its processes end."""
    from megatron_gad.controller.worker_group import WorkerGroup

    made = []
    real = WorkerGroup.__init__

    def init(self, *a, **k):
        made.append(self)
        real(self, *a, **k)

    monkeypatch.setattr(WorkerGroup, "__init__", init)
    return made


def _no_live_workers(groups) -> bool:
    pids = [p for g in groups for p in getattr(g, "pids", []) if p is not None]
    return bool(pids) and _gone(pids)


@pytest.fixture
def dispatch_times(monkeypatch):
    """(role, method) -> when the driver dispatched each call (monotonic), in order."""
    from megatron_gad.controller.worker_group import WorkerGroup

    times: dict = {}
    real = WorkerGroup._execute

    def execute(self, name, per_rank_args, kwargs):
        times.setdefault((self.role, name), []).append(time.monotonic())
        return real(self, name, per_rank_args, kwargs)

    monkeypatch.setattr(WorkerGroup, "_execute", execute)
    return times


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids, timeout=120.0):  # returns as soon as they are gone; the bound is for a loaded 2-core machine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.5)
    return False


def test_kill_parse():
    assert faults.kill_points("critic:1:update_critic:2;actor:0:save:0", "critic", 1) == {"update_critic": 2}
    assert faults.kill_points("critic:1:update_critic:2", "critic", 0) == {}
    assert faults.kill_points(None, "actor", 0) == {}
    with pytest.raises(ValueError, match="is not role:rank:method:call"):
        faults.kill_points("critic:update_critic:2", "critic", 0)


def test_worker_killed_mid_step_then_resume(assets, tmp_path, capsys, monkeypatch, dispatch_times, groups):
    from megatron_gad.config import load_config
    from megatron_gad.controller.trainer import GADTrainer

    # A: the straight run (4 steps: 1 frozen warmup + 3 GAD; checkpoints at 2 and 4)
    straight = str(tmp_path / "straight")
    tr = GADTrainer(load_config(None, _overrides(assets, straight, 4)))
    tr.fit()
    tr.shutdown()
    want = _metrics(straight)
    assert [m["step"] for m in want] == [1, 2, 3, 4]

    # B: through the console script, critic rank 1 dies as step 3's critic update starts; its peer
    # (rank 0) is in the same update's collectives
    run = str(tmp_path / "run")
    monkeypatch.setenv(faults.KILL_ENV, "critic:1:update_critic:2")
    dispatch_times.clear()
    code, _, err = run_cli(["train", _config_file(tmp_path, _overrides(assets, run, 4))], capsys)
    stopped = time.monotonic()
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 3, err
    m = re.fullmatch(r"megatron-gad train: error: the critic worker process rank 1 \(pid (\d+) on ([\d.]+)\) died "
                     r"during update_critic at step 3 \(killed, e\.g\. by the OOM killer, crashed, or its node "
                     r"went down\); the critic's other ranks were stopped\. The last complete checkpoint is "
                     + re.escape(os.path.join(run, "global_step_2")) + r": rerun the same command with "
                     r"trainer\.resume_mode=auto to continue from it", last)
    assert m, last
    assert _gone([int(m.group(1))]) and _no_live_workers(groups)  # the killed rank, and every process of the run
    fatal = dispatch_times[("critic", "update_critic")][2]
    print(f"stopped {stopped - fatal:.1f} s after step 3's critic update was dispatched")
    assert stopped - fatal < STOP_BOUND_S, stopped - fatal
    assert "Traceback" not in last
    assert ckpt.read_latest(run) == 2 and ckpt.run_checkpoint_steps(run) == [2]
    assert not any(n.startswith("global_step_3") for n in os.listdir(run))
    assert [x["step"] for x in _metrics(run)] == [1, 2]

    # C: resume from step 2; actor rank 0 dies as step 4's checkpoint save starts (rank 1 is saving)
    monkeypatch.setenv(faults.KILL_ENV, "actor:0:save:0")
    dispatch_times.clear()
    tr = GADTrainer(load_config(None, _overrides(assets, run, 4)))
    pids = {"actor": list(tr.actor.pids), "critic": list(tr.critic.pids)}
    with pytest.raises(faults.WorkerDiedError) as ei:
        tr.fit()
    stopped = time.monotonic()
    # the group stopped its role's processes itself; the other role is untouched until shutdown
    assert _gone(pids["actor"]) and all(_alive(p) for p in pids["critic"])
    tr.shutdown()
    assert str(ei.value) == (
        f"the actor worker process rank 0 (pid {pids['actor'][0]} on {tr.actor.nodes[0]}) died during save at "
        "step 4 (killed, e.g. by the OOM killer, crashed, or its node went down); the actor's other ranks were "
        f"stopped. The last complete checkpoint is {os.path.join(run, 'global_step_2')}: rerun the same command "
        "with trainer.resume_mode=auto to continue from it")
    assert (ei.value.role, ei.value.rank, ei.value.step, ei.value.method) == ("actor", 0, 4, "save")
    assert stopped - dispatch_times[("actor", "save")][0] < STOP_BOUND_S
    assert _gone(pids["critic"])
    # the step-4 checkpoint never became visible: latest still names step 2, which is complete
    assert ckpt.read_latest(run) == 2 and ckpt.run_checkpoint_steps(run) == [2]
    assert not os.path.exists(os.path.join(run, "global_step_4"))
    state = json.load(open(os.path.join(run, "global_step_2", ckpt.TRAINER_STATE)))
    assert state["step"] == 2

    # D: resume again, no kill: steps 3 and 4 redone; the metrics are the straight run's
    monkeypatch.delenv(faults.KILL_ENV)
    tr = GADTrainer(load_config(None, _overrides(assets, run, 4)))
    tr.fit()
    tr.shutdown()
    assert _metrics(run) == want
    assert _no_live_workers(groups)
    assert ckpt.read_latest(run) == 4 and ckpt.run_checkpoint_steps(run) == [2, 4]
    assert not os.path.exists(os.path.join(run, "global_step_4" + ckpt.PARTIAL))


def _config_file(tmp_path, overrides):
    """A YAML config holding ``overrides`` (the console script takes a file plus overrides)."""
    import yaml

    from megatron_gad.config import load_config, to_dict

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(load_config(None, overrides)), sort_keys=False))
    return str(path)


def test_path_missing_where_the_workers_read_it(assets, tmp_path, capsys, caplog, groups):
    """On a cluster (ray.address set) the driver leaves trainer.init_critic_from, which it cannot see,
    to the critic workers; they check it where they read it: one line, exit 2, nothing left running."""
    run = str(tmp_path / "run")
    missing = str(tmp_path / "only_on_workers" / "critic")
    overrides = [*_overrides(assets, run, 2), "ray.address=auto", f"trainer.init_critic_from={missing}"]
    code, out, err = run_cli(["train", _config_file(tmp_path, overrides)], capsys)
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")
    assert "Traceback" not in err + out
    assert (f"trainer.init_critic_from={missing} does not exist on the driver's node; the workers check it on "
            "theirs (ray.address=auto)") in caplog.text
    node = ray.util.get_node_ip_address()
    assert re.fullmatch(re.escape(
        f"megatron-gad train: error: trainer.init_critic_from={missing} does not exist; set it to a megatron-gad "
        "critic checkpoint directory, e.g. <trainer.default_local_dir>/global_step_<N>/critic (checked on the "
        f"critic worker's node {node} (rank ") + r"[01]\)\)", lines[-1]), lines[-1]
    # the actor had started: its processes were stopped with the critic's
    assert _no_live_workers(groups)


def test_died_message_without_checkpoint_or_peers(tmp_path):
    ctx = {"step": 1, "run_dir": str(tmp_path)}
    e = faults.WorkerDiedError("actor", 0, 4242, "10.0.0.1", "generate", ctx, world=1)
    assert str(e) == ("the actor worker process rank 0 (pid 4242 on 10.0.0.1) died during generate at step 1 (killed, "
                      "e.g. by the OOM killer, crashed, or its node went down); no checkpoint was written yet, so a "
                      "rerun starts from the beginning")
    e = faults.WorkerDiedError("critic", 1, None, None, "setup", {}, world=2)
    assert str(e) == ("the critic worker process rank 1 (not started) died during setup (killed, e.g. by the OOM "
                      "killer, crashed, or its node went down); the critic's other ranks were stopped")
    assert isinstance(e, faults.RunFailure)


@ray.remote(num_cpus=0.01)
class _Rank:
    """A stand-in rank: its call fails like a peer in a broken collective, dies, hangs, or fails on an input."""

    def run(self, mode: str):
        import signal

        from megatron_gad.errors import InputError

        if mode == "peer_error":  # fails first, as gloo does when a peer's socket closes
            raise RuntimeError("[gloo] Connection closed by peer")
        if mode == "die":
            time.sleep(2.0)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "input":
            raise InputError("critic.model.path=/x: no such file or directory; set critic.model.path to a model")
        time.sleep(600)  # "hang": blocked in a collective whose peer never comes


def _failures(modes, grace_s):
    ranks = [_Rank.remote() for _ in modes]
    seen = {}

    def on_failure(failures):
        seen.update(failures)
        raise RuntimeError("stop")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="stop"):
        faults.gather([r.run.remote(m) for r, m in zip(ranks, modes)], on_failure, grace_s=grace_s)
    for r in ranks:
        ray.kill(r)
    return seen, time.monotonic() - start


def test_gather_blames_the_dead_rank_not_the_peer_that_failed_first():
    from ray.exceptions import RayActorError

    seen, took = _failures(["peer_error", "die", "hang"], grace_s=30.0)
    assert isinstance(seen[1], RayActorError) and 0 in seen and 2 not in seen  # the hung rank is not waited for
    assert took < 30.0  # the death ended the grace
    with pytest.raises(faults.WorkerDiedError) as ei:
        faults.raise_failure("critic", "update_critic", seen, [10, 11, 12], ["n0", "n1", "n2"], {"step": 7})
    assert (ei.value.rank, ei.value.pid, ei.value.step) == (1, 11, 7)


def test_gather_grace_then_the_workers_input_error_unwrapped():
    from megatron_gad.errors import InputError

    seen, took = _failures(["input", "hang"], grace_s=3.0)
    assert list(seen) == [0] and 3.0 <= took < 30.0  # no death: the grace runs out, the hung rank is left
    with pytest.raises(InputError) as ei:
        faults.raise_failure("critic", "setup", seen, [10, 11], ["n0", "n1"], {})
    assert type(ei.value) is InputError  # not Ray's wrapper: the console prints its one line
    assert str(ei.value) == "critic.model.path=/x: no such file or directory; set critic.model.path to a model"
