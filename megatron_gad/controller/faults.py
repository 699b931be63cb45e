"""What the controller does when a worker process dies or fails, and the debug hook that kills one.

A role's ranks run one collective program: when one rank dies (SIGKILL, the OOM killer, a crash, a
lost node) its peers block in the next collective, or fail in it a moment later ("connection closed
by peer"). Waiting on every rank in order can wait forever on a blocked peer; ``ray.get`` over the
list (Ray 2.60) does raise at the dead rank's error, but as a many-line ``ActorDiedError`` that names no
role or step, possibly behind a peer's collective error, and leaves the peers blocked.
:func:`gather` instead takes results as they arrive and stops at the first failure: it gives the
other ranks a short grace to tell which rank *died* (so the message names the cause, not a peer's
collective error), kills the role's remaining processes (their process group is broken for good)
and raises

* :class:`WorkerDiedError` (an :class:`~megatron_gad.errors.RunFailure`: one line at the console,
  exit code 3) naming the role, rank, pid, node, method and trainer step, and which checkpoint
  ``trainer.resume_mode=auto`` continues from; or
* a worker's own :class:`~megatron_gad.errors.UserError` (e.g. a path missing on the worker's node)
  unwrapped from Ray's ``RayTaskError``, so the console prints its one line and exits 2; or
* any other worker exception as Ray reports it (a bug: it keeps its remote traceback).

Debug hook (fault tests and ``benchmarks/soak.py`` only): ``MEGATRON_GAD_KILL_WORKER="critic:1:update_critic:2"``
makes rank 1 of the critic SIGKILL itself as its call number 2 (0-based, counted per method in that
worker process) of ``update_critic`` starts, i.e. mid-step with its peers already in the method.
Several points are separated by ``;``. The driver forwards the variable to the worker processes it
starts (``worker_group.worker_env``), so it applies to the trainers created after it is set.
"""

from __future__ import annotations

import os
import signal
import time

from megatron_gad import checkpoint as ckpt
from megatron_gad.errors import RunFailure, UserError

KILL_ENV = "MEGATRON_GAD_KILL_WORKER"
# Debug hooks read by worker processes; the driver forwards them (see worker_group.worker_env).
DEBUG_ENV = (KILL_ENV, "MEGATRON_GAD_INJECT_NAN")
# After a first failure, how long the other ranks get to report whether one of them died (Ray notices
# a dead process within a second or two; a loaded machine may take longer).
DEATH_GRACE_S = 15.0


def kill_points(spec: str | None, role: str, rank: int) -> dict[str, int]:
    """``{method: call index}`` at which ``role``'s ``rank`` kills itself, from the hook's value."""
    out: dict[str, int] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        fields = [f.strip() for f in part.split(":")]
        if len(fields) != 4 or not fields[1].isdigit() or not fields[3].isdigit():
            raise ValueError(f"{KILL_ENV}: {part!r} is not role:rank:method:call, e.g. critic:1:update_critic:2")
        if fields[0] == role and int(fields[1]) == rank:
            out[fields[2]] = int(fields[3])
    return out


def maybe_kill(points: dict[str, int], calls: dict[str, int], method: str) -> None:
    """Count this call of ``method``; SIGKILL this process if it is a kill point (no cleanup runs,
    as with the OOM killer)."""
    n = calls.get(method, 0)
    calls[method] = n + 1
    if points.get(method) == n:
        os.kill(os.getpid(), signal.SIGKILL)


class WorkerDiedError(RunFailure):
    """A worker process died; the role's other processes were shut down."""

    def __init__(self, role: str, rank: int, pid: int | None, node: str | None, method: str,
                 context: dict, world: int = 2):
        self.role, self.rank, self.pid, self.method = role, rank, pid, method
        self.step = context.get("step")
        where = f"pid {pid} on {node}" if pid is not None else "not started"
        when = f"during {method}" + (f" at step {self.step}" if self.step is not None else "")
        msg = (f"the {role} worker process rank {rank} ({where}) died {when} (killed, e.g. by the OOM killer, "
               "crashed, or its node went down)")
        if world > 1:
            msg += f"; the {role}'s other ranks were stopped"
        run_dir = context.get("run_dir")
        if run_dir is not None:
            latest = ckpt.read_latest(run_dir) if os.path.isdir(run_dir) else None
            if latest is None:
                msg += "; no checkpoint was written yet, so a rerun starts from the beginning"
            else:
                path = os.path.join(run_dir, f"{ckpt.STEP_PREFIX}{latest}")
                msg += (f". The last complete checkpoint is {path}: rerun the same command with "
                        "trainer.resume_mode=auto to continue from it")
        super().__init__(msg)


def _is_death(err: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError)


def gather(refs: list, on_failure, grace_s: float = DEATH_GRACE_S) -> list:
    """Every ref's value in order, or — at the first failure — ``on_failure(failures)`` with
    ``{index: exception}`` of the refs that failed within ``grace_s`` after it (it must raise)."""
    import ray

    results: list = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    failures: dict[int, BaseException] = {}
    deadline = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not ready:  # the grace is over; the ranks still pending are blocked (or slow)
            break
        for ref in ready:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as e:  # sorted out by on_failure
                failures[i] = e
                if deadline is None:
                    deadline = time.monotonic() + grace_s
        if failures and any(_is_death(e) for e in failures.values()):
            break  # the cause is known: the peers' errors (or hangs) follow from it
    if failures:
        try:
            on_failure(failures)
        finally:
            _drain(list(pending))
        raise AssertionError("on_failure must raise")  # pragma: no cover
    return results


def _drain(refs: list, timeout_s: float = 10.0) -> None:
    """Fetch (and drop) what the other ranks' calls ended with once their processes were stopped, so
    Ray does not print their errors as unhandled after the one-line message."""
    import ray

    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # the expected ActorDiedError of a stopped peer
            pass


def raise_failure(role: str, method: str, failures: dict[int, BaseException], pids: list, nodes: list,
                  context: dict) -> None:
    """The error for the ranks' ``failures`` (see the module docstring); the caller has already
    stopped the role's processes."""
    from ray.exceptions import RayTaskError

    deaths = sorted(r for r, e in failures.items() if _is_death(e))
    if deaths:
        r = deaths[0]
        raise WorkerDiedError(role, r, pids[r] if pids else None, nodes[r] if nodes else None, method,
                              context, world=len(pids)) from failures[r]
    first = failures[min(failures)]
    cause = getattr(first, "cause", None) if isinstance(first, RayTaskError) else None
    if isinstance(cause, UserError):
        raise cause from None  # its message already says what to fix; Ray's wrapper adds a traceback
    raise first


class RayStartError(RunFailure):
    """Ray did not start (or the cluster at ``ray.address`` could not be joined)."""


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """``ray.init`` for the trainer, its failure as one line: Ray raises a bare ``Exception`` (e.g. "The
    current node timed out during startup" on an overloaded machine) or ``ConnectionError`` with a long
    traceback that names neither the setting nor what to do."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
    except Exception as e:  # any start-up failure of Ray: nothing of the run exists yet
        reason = " ".join(str(e).split()) or type(e).__name__
        where = f"the Ray cluster at ray.address={address}" if address else "a local Ray instance"
        hint = ("check that the cluster is up and reachable from this node (`ray status`) and that RAY_AUTH_* "
                "matches it" if address else "the machine may be overloaded or out of memory: retry, or set "
                "ray.num_cpus lower; trainer.workers=local runs one rank per role without Ray")
        raise RayStartError(f"could not start {where}: {reason}; {hint}") from None
