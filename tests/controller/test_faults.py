"""Faults survived (issue 15): non-finite steps skipped, counted and stopped on; checkpoints that a
failed or interrupted save never corrupts, and pruning only after a newer checkpoint is complete.

The trainer cases run the in-process (trainer.workers=local) trainer in a spawned process, as
``test_local_trainer.py`` does; NaN comes from the ``MEGATRON_GAD_INJECT_NAN`` debug hook."""

from __future__ import annotations

import errno
import json
import os

import pytest
from local_setup import local_overrides

from megatron_gad import checkpoint as ckpt

pytestmark = pytest.mark.distributed



def _overrides(assets, run_dir):
    return local_overrides(assets, run_dir, kl=False)


# ---------------------------------------------------------------- checkpoint functions (no model)
def _fake_save(run, step, fail=False):
    def write(tmp):
        os.makedirs(os.path.join(tmp, "actor"))
        with open(os.path.join(tmp, "actor", "w.bin"), "w") as f:
            f.write(str(step))
        if fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        ckpt.write_json_atomic(os.path.join(tmp, ckpt.TRAINER_STATE), {"step": step})
    return ckpt.save_run_checkpoint(str(run), step, write)


def test_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = str(tmp_path / "s.json")
    ckpt.write_json_atomic(p, {"a": 1})

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError):
        ckpt.write_json_atomic(p, {"a": 2})
    monkeypatch.undo()
    assert json.load(open(p)) == {"a": 1} and os.listdir(tmp_path) == ["s.json"]


def test_enospc_leaves_previous_checkpoint_and_latest(tmp_path):
    _fake_save(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointSaveError) as ei:
        _fake_save(tmp_path, 2, fail=True)
    msg = str(ei.value)
    assert "step-2" in msg and "No space left on device" in msg
    assert f"still points at {ckpt.STEP_PREFIX}1, which is intact" in msg
    assert ei.value.errno == errno.ENOSPC
    assert ckpt.read_latest(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == ["global_step_1", ckpt.LATEST]  # no partial dir left
    assert ckpt.run_checkpoint_steps(str(tmp_path)) == [1]


def test_partial_dir_is_never_a_checkpoint(tmp_path):
    _fake_save(tmp_path, 1)
    os.makedirs(tmp_path / "global_step_2.partial" / "actor")  # a run killed mid-save
    os.makedirs(tmp_path / "global_step_3" / "actor")  # no trainer_state.json: not complete
    assert ckpt.run_checkpoint_steps(str(tmp_path)) == [1] and ckpt.read_latest(str(tmp_path)) == 1
    _fake_save(tmp_path, 2)  # the stale partial is replaced
    assert ckpt.run_checkpoint_steps(str(tmp_path)) == [1, 2]
    assert not os.path.exists(tmp_path / "global_step_2.partial")
    os.makedirs(tmp_path / "global_step_5.partial" / "critic")  # a killed save of a step never saved again
    _fake_save(tmp_path, 4)
    assert not os.path.exists(tmp_path / "global_step_5.partial") and ckpt.read_latest(str(tmp_path)) == 4


def test_prune_per_role_keeps_latest(tmp_path):
    for s in (1, 2, 3):
        def write(tmp, s=s):
            for r in ("actor", "critic"):
                os.makedirs(os.path.join(tmp, r))
            ckpt.write_json_atomic(os.path.join(tmp, ckpt.TRAINER_STATE), {"step": s})
        ckpt.save_run_checkpoint(str(tmp_path), s, write)
    assert ckpt.prune_run_checkpoints(str(tmp_path), {"actor": None, "critic": None}) == []
    ckpt.prune_run_checkpoints(str(tmp_path), {"actor": 1, "critic": 2})
    assert not os.path.exists(tmp_path / "global_step_1")  # neither role left: removed whole
    assert sorted(os.listdir(tmp_path / "global_step_2")) == ["critic", ckpt.TRAINER_STATE]
    assert sorted(os.listdir(tmp_path / "global_step_3")) == ["actor", "critic", ckpt.TRAINER_STATE]


def test_failed_save_prunes_nothing(tmp_path):
    for s in (1, 2):
        _fake_save(tmp_path, s)
    with pytest.raises(ckpt.CheckpointSaveError):
        _fake_save(tmp_path, 3, fail=True)
        ckpt.prune_run_checkpoints(str(tmp_path), {"actor": 1})  # not reached: the trainer prunes after
    assert ckpt.run_checkpoint_steps(str(tmp_path)) == [1, 2] and ckpt.read_latest(str(tmp_path)) == 2


# ---------------------------------------------------------------- trainer (local workers)
def _params(shard):
    return [p.detach().clone() for p in shard.module.parameters()]


def _adam(shard):
    if shard.optimizer is None:
        return []
    out = []
    for opt in getattr(shard.optimizer, "chained_optimizers", [shard.optimizer]):
        for s in opt.optimizer.state.values():
            out += [v.detach().clone() for v in s.values() if hasattr(v, "clone")]
    return out


def _nan_run(rank, world, overrides):
    import torch

    from megatron_gad.config import load_config
    from megatron_gad.controller.trainer import GADTrainer, NonFiniteError

    # critic train_step calls 1, 2, 3 (steps 2..4) and the actor's first update (step 2) are NaN
    os.environ["MEGATRON_GAD_INJECT_NAN"] = "critic:1,2,3;actor:0"
    tr = GADTrainer(load_config(None, overrides))
    actor, critic = tr.actor.worker.shard, tr.critic.worker.shard
    snaps = []
    for role, group in (("actor", tr.actor), ("critic", tr.critic)):
        name = "update_actor" if role == "actor" else "update_critic"
        orig = getattr(group, name)

        def wrapped(*a, _orig=orig, _role=role, **k):
            shard = actor if _role == "actor" else critic
            before = (_params(shard), _adam(shard), shard.opt_step)
            out = _orig(*a, **k)
            after = (_params(shard), _adam(shard), shard.opt_step)
            same = before[2] == after[2] and len(before[1]) == len(after[1]) and all(
                torch.equal(x, y) for x, y in zip(before[0] + before[1], after[0] + after[1], strict=True))
            snaps.append((tr.step + 1, _role, same))
            return out

        setattr(group, name, wrapped)
    err = None
    try:
        tr.fit()
    except NonFiniteError as e:
        err = str(e)
    tr.shutdown()
    return {"snaps": snaps, "err": err}


def test_nonfinite_steps_skipped_counted_and_stopped(assets, tmp_path):
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    ov = [*_overrides(assets, run), "trainer.total_training_steps=6", "trainer.max_nonfinite_steps=3"]
    got = run_local(_nan_run, 1, ov)[0]
    unchanged = {(s, r): same for s, r, same in got["snaps"]}
    assert unchanged[(1, "critic")] is False and unchanged[(2, "critic")] is True  # skipped: bit-identical
    assert unchanged[(3, "critic")] is True and unchanged[(4, "critic")] is True
    assert unchanged[(2, "actor")] is True and unchanged[(3, "actor")] is False  # one skip, then updates
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]  # stopped at step 4
    assert [m["critic/nonfinite_steps"] for m in rows] == [0, 1, 2, 3]
    assert [m["actor/nonfinite_steps"] for m in rows] == [0, 1, 1, 1]
    assert rows[1]["actor/optimizer_state_bytes"] == 0  # the skipped first update allocated no Adam state
    assert got["err"].startswith("stopping at step 4: the critic's loss or gradient was non-finite")
    assert "3 consecutive steps (2..4; trainer.max_nonfinite_steps=3)" in got["err"]
    assert not os.path.exists(os.path.join(run, "global_step_4"))  # no checkpoint of the failed step


def _ckpt_run(rank, world, overrides, fail):
    import megatron_gad.checkpoint as ck
    from megatron_gad.config import load_config
    from megatron_gad.controller.trainer import GADTrainer

    tr = GADTrainer(load_config(None, overrides))
    if fail:
        real = ck.write_json_atomic

        def enospc(path, obj):
            if path.endswith(ck.TRAINER_STATE):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, obj)

        ck.write_json_atomic = enospc
    err = None
    try:
        tr.fit()
    except ck.CheckpointSaveError as e:
        err = str(e)
    step = tr.step
    tr.shutdown()
    return {"err": err, "step": step}


def test_keep_limits_and_enospc_on_trainer(assets, tmp_path):
    from megatron_gad.parallel.launch import run_local

    run = str(tmp_path / "run")
    ov = [*_overrides(assets, run), "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=1",
          "trainer.max_critic_ckpt_to_keep=2"]
    assert run_local(_ckpt_run, 1, ov, False)[0]["err"] is None
    assert ckpt.read_latest(run) == 3 and not os.path.exists(os.path.join(run, "global_step_1"))
    assert sorted(os.listdir(os.path.join(run, "global_step_2"))) == ["critic", ckpt.TRAINER_STATE]
    assert {"actor", "critic", ckpt.TRAINER_STATE} <= set(os.listdir(os.path.join(run, "global_step_3")))
    state3 = json.load(open(os.path.join(run, "global_step_3", ckpt.TRAINER_STATE)))
    assert state3["step"] == 3 and state3["nonfinite"] == {"actor": 0, "critic": 0}

    # resume at 3, step 4's save hits a full disk: step 3 stays the (intact) latest, nothing pruned
    before = sorted(os.listdir(run))
    got = run_local(_ckpt_run, 1, [*ov, "trainer.total_training_steps=4", "trainer.resume_mode=auto"], True)[0]
    assert got["step"] == 4
    assert "saving the step-4 checkpoint" in got["err"] and "No space left on device" in got["err"]
    assert "still points at global_step_3, which is intact" in got["err"]
    assert ckpt.read_latest(run) == 3 and sorted(os.listdir(run)) == before
    assert ckpt.is_megatron_checkpoint(os.path.join(run, "global_step_3", "actor"))


# ---------------------------------------------------------------- the driver SIGKILLed during a save
# The whole run (trainer.workers=local: one process) kills itself with SIGKILL at a point inside the
# step-3 checkpoint save; what is on disk then is what a kill from outside at that instant leaves.
_DRIVER = r"""
import json, os, signal, sys
import torch
from megatron_gad import checkpoint as ck
from megatron_gad.config import load_config
from megatron_gad.controller.trainer import GADTrainer

overrides, point, at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
saving = {"step": None}
real_run_save, real_json, real_latest, real_torch_save = (ck.save_run_checkpoint, ck.write_json_atomic,
                                                          ck.write_latest, torch.save)

def run_save(run_dir, step, write):
    saving["step"] = step
    return real_run_save(run_dir, step, write)

def torch_save(obj, path, *a, **k):  # mid model save: the critic's shards written, its RNG file not
    if point == "mid_critic" and saving["step"] == at and "critic.tmp" in str(path):
        die()
    return real_torch_save(obj, path, *a, **k)

def write_json(path, obj):
    if path.endswith(ck.TRAINER_STATE) and saving["step"] == at:
        if point == "before_state":
            die()
        if point == "mid_state":  # a kill inside json.dump: a prefix of the file under its temporary name
            with open(path + ".tmp", "w") as f:
                f.write(json.dumps(obj)[:20])
            die()
    return real_json(path, obj)

def write_latest(run_dir, step):
    if point == "before_latest" and step == at:  # renamed into place, latest not moved yet
        die()
    return real_latest(run_dir, step)

ck.save_run_checkpoint, ck.write_json_atomic, ck.write_latest = run_save, write_json, write_latest
torch.save = torch_save
if point == "ray_mid_save":  # Ray workers: the driver dies while the critic ranks are writing their shards
    import time
    from megatron_gad.controller.worker_group import WorkerGroup

    real_execute = WorkerGroup._execute

    def execute(self, name, per_rank_args, kwargs):
        if name == "save" and self.role == "critic" and saving["step"] == at:
            # dispatched to the critic's ranks (the actor's shards are already in the partial directory)
            [p.execute.remote(name, *a, **kwargs) for p, a in zip(self.procs, per_rank_args)]
            time.sleep(0.05)
            die()
        return real_execute(self, name, per_rank_args, kwargs)

    WorkerGroup._execute = execute
tr = GADTrainer(load_config(None, overrides))
tr.fit()
tr.shutdown()
"""


def _driver(overrides, tmp_path, point="none", at=0):
    """(exit code, output) of the run in its own session. Megatron's checkpoint writer starts a
    multiprocessing Manager process that a SIGKILLed parent cannot stop, and a SIGKILLed driver's Ray
    processes outlive it: every process carrying this run's marker in its environment is killed after
    the run, so nothing is left behind (and no pipe is held open)."""
    import signal
    import subprocess
    import sys
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               MEGATRON_GAD_TEST_RUN=mark)
    log = tmp_path / f"driver_{point}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(overrides), point, str(at)], env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            for p in psutil.process_iter():
                try:
                    if p.pid != os.getpid() and p.environ().get("MEGATRON_GAD_TEST_RUN") == mark:
                        p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
    return code, log.read_text()[-3000:]


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("timing_s/")} for line in f]


def test_driver_sigkill_during_save(assets, tmp_path):
    import signal

    def ov(run):
        return [o if o != "trainer.resume_mode=disable" else "trainer.resume_mode=auto"
                for o in _overrides(assets, run)] + ["trainer.save_freq=2"]  # saves at steps 2 and 3

    straight = str(tmp_path / "straight")
    code, out = _driver(ov(straight), tmp_path)
    assert code == 0, out
    want = _metrics(straight)
    run = str(tmp_path / "run")
    # each kill happens in step 3's save; every rerun resumes (auto) from step 2 and is killed at the next point
    for point in ("mid_critic", "before_state", "mid_state", "before_latest"):
        code, out = _driver(ov(run), tmp_path, point, 3)
        assert code == -signal.SIGKILL, (point, code, out)
        assert ckpt.read_latest(run) == 2, point
        state = json.load(open(os.path.join(run, "global_step_2", ckpt.TRAINER_STATE)))
        assert state["step"] == 2 and state["loader"]["position"] == 4, point
        for role in ("actor", "critic"):
            assert ckpt.is_megatron_checkpoint(os.path.join(run, "global_step_2", role)), (point, role)
        complete = [2, 3] if point == "before_latest" else [2]  # renamed whole, but latest still names 2
        assert ckpt.run_checkpoint_steps(run) == complete, point
        if point != "before_latest":
            assert not os.path.exists(os.path.join(run, "global_step_3")), point
        assert [m["step"] for m in _metrics(run)] == [1, 2], point  # step 3 is logged after its save
    code, out = _driver(ov(run), tmp_path, "resume")
    assert code == 0, out
    assert _metrics(run) == want
    assert ckpt.read_latest(run) == 3 and ckpt.run_checkpoint_steps(run) == [2, 3]
    assert not [n for n in os.listdir(run) if n.endswith((ckpt.PARTIAL, ".old", ".tmp"))]


def test_driver_sigkill_during_save_with_ray_workers(assets, tmp_path):
    """The same with Ray workers (one rank per role): the driver dies while the critic's rank is writing."""
    import signal

    pytest.importorskip("ray")

    def ov(run):
        return [o for o in _overrides(assets, run) if not o.startswith(("trainer.workers=", "trainer.resume_mode="))] \
            + ["trainer.workers=ray", "trainer.resume_mode=auto", "trainer.save_freq=2"]

    straight = str(tmp_path / "straight")
    code, out = _driver(ov(straight), tmp_path)
    assert code == 0, out
    run = str(tmp_path / "run")
    code, out = _driver(ov(run), tmp_path, "ray_mid_save", 3)
    assert code == -signal.SIGKILL, (code, out)
    assert ckpt.read_latest(run) == 2 and ckpt.run_checkpoint_steps(run) == [2]
    assert not os.path.exists(os.path.join(run, "global_step_3"))
    assert [m["step"] for m in _metrics(run)] == [1, 2]
    code, out = _driver(ov(run), tmp_path, "resume")
    assert code == 0, out
    assert _metrics(run) == _metrics(straight)
    assert ckpt.read_latest(run) == 3 and not [n for n in os.listdir(run) if n.endswith(ckpt.PARTIAL)]
