"""Fake SLURM commands for tests/e2e/test_slurm.py: every "node" is this machine.

``sbatch`` runs the batch script in the foreground with the SLURM environment a real job has
(nodes fake0..fakeN-1), ``srun`` runs its command locally (once per task), ``scontrol`` expands host
lists and records requeues, after which ``sbatch`` runs the script again as the requeued job
(SLURM_RESTART_COUNT + 1). Each call is appended to ``$FAKE_SLURM_DIR/calls.jsonl``; the batch
shell's pid is written to ``$FAKE_SLURM_DIR/batch.pid`` so a test can signal it like SLURM does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

STATE = os.environ["FAKE_SLURM_DIR"]


def record(cmd: str, argv: list[str], **extra) -> None:
    with open(os.path.join(STATE, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"cmd": cmd, "argv": argv, "node": os.environ.get("SLURMD_NODENAME"), **extra}) + "\n")


def parse_opts(argv: list[str], with_value: set[str]) -> tuple[dict, list[str]]:
    """Leading --opt=value / --opt value / -x value options, then the command."""
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        key, sep, value = argv[i].partition("=")
        if not sep and key in with_value:
            i += 1
            value = argv[i]
        opts[key.lstrip("-")] = value if (sep or key in with_value) else True
        i += 1
    return opts, argv[i:]


def sbatch(argv: list[str]) -> int:
    _, rest = parse_opts(argv, set())
    script, args = rest[0], rest[1:]
    text = open(script).read()
    directives = dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    nodes = int(directives["nodes"])
    job_id = os.environ.get("FAKE_SLURM_JOB_ID", "4242")
    record("sbatch", argv, directives=directives)
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NAME=directives.get("job-name", "job"),
               SLURM_JOB_NODELIST=",".join(f"fake{i}" for i in range(nodes)), SLURM_NNODES=str(nodes),
               SLURM_GPUS_PER_NODE=directives["gpus-per-node"], SLURM_CPUS_PER_TASK=directives["cpus-per-task"],
               SLURMD_NODENAME="fake0")
    output = directives["output"].replace("%x", env["SLURM_JOB_NAME"]).replace("%j", job_id)
    restart = 0
    while True:
        env["SLURM_RESTART_COUNT"] = str(restart)
        with open(output, "a") as out:
            proc = subprocess.Popen(["bash", script, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
            with open(os.path.join(STATE, "batch.pid"), "w") as f:
                f.write(f"{proc.pid} {restart}\n")
            rc = proc.wait()
        marker = os.path.join(STATE, f"requeue_{job_id}")
        if not os.path.exists(marker):
            return rc
        os.remove(marker)  # `scontrol requeue` was called: run again as the requeued job
        restart += 1


def srun(argv: list[str]) -> int:
    opts, command = parse_opts(argv, {"-w", "-N", "-n"})
    record("srun", argv)
    ntasks = int(opts.get("ntasks", opts.get("n", 1)))
    if ntasks == 1:
        node = opts.get("w", opts.get("nodelist", "fake0"))
        os.environ["SLURMD_NODENAME"] = node
        os.execvp(command[0], command)  # exec: signals sent to srun reach the command, as srun forwards them
    rc = 0
    for i in range(ntasks):
        env = dict(os.environ, SLURMD_NODENAME=f"fake{i}", SLURM_PROCID=str(i))
        rc = max(rc, subprocess.call(command, env=env))
    return rc


def scontrol(argv: list[str]) -> int:
    record("scontrol", argv)
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(argv[2].split(",")))
        return 0
    if argv[0] == "requeue":
        open(os.path.join(STATE, f"requeue_{argv[1]}"), "w").close()
        return 0
    print(f"fake scontrol: unsupported {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit({"sbatch": sbatch, "srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
