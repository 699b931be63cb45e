"""A role's ``nccl_timeout`` reaches the real process groups its worker joins: the default group and
Megatron's TP / DP groups (gloo, read back from the groups themselves), in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron_gad.config import load_config
from megatron_gad.controller.local_group import LocalWorkerGroup

path = sys.argv[1]
cfg = load_config(None, [f"actor_rollout_ref.model.path={path}", "critic.nccl_timeout=4321",
                         "actor_rollout_ref.model.make_vocab_size_divisible_by=8", "critic.fused_loss=torch"])
LocalWorkerGroup("critic", dict(config=cfg.critic, model_path=path, vocab_divisible_by=8, total_steps=1, eos_id=2))
cpu = torch.device("cpu")
timeout = lambda g: g._get_backend(cpu).options._timeout.total_seconds()
print(json.dumps({"world": timeout(dist.group.WORLD), "tp": timeout(ps.get_tensor_model_parallel_group()),
                  "dp": timeout(ps.get_data_parallel_group())}))
"""


def test_role_timeout_reaches_its_process_groups(tmp_path):
    from megatron_gad.tools.tiny_models import make_hf_model

    path = make_hf_model(str(tmp_path / "m"), "qwen2", seed=1)
    import megatron_gad

    root = os.path.dirname(os.path.dirname(megatron_gad.__file__))  # the package under test, in the child too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, path], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # the default group in seconds; Megatron's groups in whole minutes, rounded up: 73 min
    assert got == {"world": 4321.0, "tp": 4380.0, "dp": 4380.0}
