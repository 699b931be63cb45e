"""A rendered sbatch script run end to end through fake ``sbatch`` / ``srun`` / ``scontrol``
(tests/e2e/fake_slurm: every "node" is this machine). One node: the script still goes through its
token generation, shared-filesystem check, Ray join wait, USR1 forwarding, requeue and teardown; the
trainer runs a tiny CPU GAD job on Ray workers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parent / "fake_slurm"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:  # the Ray head's GCS port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def job(tmp_path):
    """Tiny assets, a rendered script for 1 node x 1 GPU and the fake-SLURM environment."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
    from local_setup import build_assets, local_overrides

    from megatron_gad.tools.slurm import Request, render_script

    assets = build_assets(str(tmp_path / "assets"))
    run = tmp_path / "run"
    drop = ("trainer.workers=", "trainer.resume_mode=", "trainer.total_training_steps=", "trainer.critic_warmup=")
    overrides = [o for o in local_overrides(assets, str(run), kl=False) if not o.startswith(drop)]
    overrides += ["trainer.workers=ray", "trainer.critic_warmup=1"]
    config = tmp_path / "tiny.yaml"
    config.write_text("trainer:\n  device: cpu\n")
    state = tmp_path / "slurm"
    state.mkdir()
    port = _free_port()
    env = dict(os.environ, PATH=f"{FAKE}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(state), RAY_PORT=str(port),
               JOIN_TIMEOUT="120", RAY_USAGE_STATS_ENABLED="0", FAKE_SLURM_JOB_ID=str(port))

    def render(steps: int) -> Path:
        text = render_script(str(config), overrides + [f"trainer.total_training_steps={steps}"],
                             Request(nodes=1, gpus_per_node=1, cpus_per_task=2, join_timeout_s=120))
        script = tmp_path / "job.sbatch"
        script.write_text(text)
        (run / "logs").mkdir(parents=True, exist_ok=True)  # what `slurm render --out` does
        return script

    return {"render": render, "env": env, "state": state, "run": run, "port": port, "job_id": str(port)}


def _calls(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def _logs_text(run: Path) -> str:
    logs = run / "logs"
    if not logs.is_dir():
        return ""
    return "".join(f"--- {p.name}\n" + p.read_text(errors="replace") for p in sorted(logs.iterdir()) if p.is_file())


# Bounds for a loaded 2-core machine (Ray's start-up alone has taken over a minute there): the waits end
# as soon as the event happens, so a generous bound costs nothing when the job is healthy.
START_TIMEOUT = 420
JOB_TIMEOUT = 900


def _wait_for(predicate, proc, timeout: float, what: str, run: Path) -> None:
    """Polls ``predicate`` until it holds; fails with the job's log tail if the job ended or time ran out."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}; logs:\n{_logs_text(run)[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; logs:\n{_logs_text(run)[-4000:]}")
        time.sleep(0.5)


def _wait_exit(proc, run: Path) -> int:
    try:
        return proc.wait(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not end within {JOB_TIMEOUT} s; logs:\n{_logs_text(run)[-4000:]}")


def test_rendered_script_runs_tiny_job_and_refuses_tokenless_client(job):
    script = job["render"](steps=2)
    proc = subprocess.Popen(["sbatch", str(script)], env=job["env"])
    token_file = job["run"] / ".slurm" / job["job_id"] / "ray_token"
    batch_out = job["run"] / "logs" / f"megatron-gad-{job['job_id']}.out"
    try:
        _wait_for(lambda: batch_out.exists() and "joined Ray" in batch_out.read_text(), proc, START_TIMEOUT,
                  "Ray to start", job["run"])
        token = token_file.read_text().strip()
        assert len(token) == 64 and (token_file.stat().st_mode & 0o777) == 0o600
        # a client without the token (no env, no default token file under HOME) is refused
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env["HOME"] = str(job["state"])
        code = (f"import ray; ray.init(address='127.0.0.1:{job['port']}', logging_level='ERROR'); "
                "print('CONNECTED')")
        client = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = client.communicate(timeout=12)
        except subprocess.TimeoutExpired:
            client.kill()
            out, _ = client.communicate()
        assert "CONNECTED" not in out
        assert "InvalidAuthToken" in out or "Unauthenticated" in out, out[-2000:]
        assert _wait_exit(proc, job["run"]) == 0, _logs_text(job["run"])[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    run = job["run"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    calls = _calls(job["state"])
    sb = next(c for c in calls if c["cmd"] == "sbatch")["directives"]
    assert (sb["nodes"], sb["gpus-per-node"], sb["signal"]) == ("1", "1", "B:USR1@300")
    ray_start = [c["argv"] for c in calls if c["cmd"] == "srun" and "ray" in c["argv"]]
    assert len(ray_start) == 1 and "--head" in ray_start[0] and "--include-dashboard=false" in ray_start[0]
    assert any(c["cmd"] == "srun" and "--ntasks=1" in c["argv"] and "bash" in c["argv"] for c in calls)  # FS check
    assert not token_file.exists(), "the token file outlives the job"
    assert token not in _logs_text(run)
    assert "Ray stopped; exit 0" in batch_out.read_text()
    assert not any(c["cmd"] == "scontrol" and c["argv"][0] == "requeue" for c in calls)


STEPS = 12  # enough that USR1, sent once step 1 is logged, lands before the last step on a fast machine


def test_usr1_saves_requeues_and_resumes(job):
    script = job["render"](steps=STEPS)
    proc = subprocess.Popen(["sbatch", str(script)], env=job["env"])
    metrics = job["run"] / "metrics.jsonl"
    pid_file = job["state"] / "batch.pid"
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc, START_TIMEOUT + 300,
                  "step 1", job["run"])
        batch_pid, restart = pid_file.read_text().split()
        assert restart == "0"
        os.kill(int(batch_pid), signal.SIGUSR1)  # what `--signal=B:USR1@300` does
        assert _wait_exit(proc, job["run"]) == 0, _logs_text(job["run"])[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    run, jid = job["run"], job["job_id"]
    first = (run / "logs" / f"train-{jid}-0.log").read_text()
    m = re.search(rf"stopped on signal at step (\d+) of {STEPS}", first)
    assert m, first[-3000:]
    saved = int(m.group(1))
    assert 1 <= saved < STEPS and (run / f"global_step_{saved}" / "trainer_state.json").is_file()
    calls = _calls(job["state"])
    assert ["requeue", jid] in [c["argv"] for c in calls if c["cmd"] == "scontrol"]
    second = (run / "logs" / f"train-{jid}-1.log").read_text()
    assert f"resumed from {run}/global_step_{saved} at step {saved}" in second, second[-3000:]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert "trainer.resume_mode=auto" in script.read_text()


def test_a_ray_start_that_exits_stops_the_job_at_once(job, tmp_path):
    """A node whose `ray start` exits (here: a `ray` that prints an error and exits 1, as Ray does when an
    option needs a missing extra) ends the job within seconds with exit 3, naming the node and its log,
    instead of waiting JOIN_TIMEOUT (120 s here) for nodes to join."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ray").write_text("#!/bin/bash\necho 'ValueError: ray start failed on purpose' >&2\nexit 1\n")
    (shim / "ray").chmod(0o755)
    script = job["render"](steps=2)
    env = dict(job["env"], PATH=f"{shim}:{job['env']['PATH']}")
    start = time.monotonic()
    proc = subprocess.Popen(["sbatch", str(script)], env=env)
    rc = _wait_exit(proc, job["run"])
    elapsed = time.monotonic() - start
    out = (job["run"] / "logs" / f"megatron-gad-{job['job_id']}.out").read_text()
    assert rc == 3, out[-3000:]
    assert "Ray on fake0 exited with status 1" in out and "ray start failed on purpose" in out, out[-3000:]
    assert f"Ray did not start on fake0 (log: {job['run']}/logs/ray-head.log)" in out, out[-3000:]
    assert "joined Ray" not in out and not (job["run"] / "metrics.jsonl").exists()
    assert elapsed < 100, f"the job took {elapsed:.0f} s to stop (JOIN_TIMEOUT is 120 s)"
    assert not (job["run"] / ".slurm" / job["job_id"] / "ray_token").exists()
