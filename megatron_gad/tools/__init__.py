"""Command bodies of the ``megatron-gad`` console script (``convert``, ``generate``, ``logprobs``, ``score``).

Each tool validates its inputs in the calling process first (cheap, clear errors), then launches
the TP x PP ranks with :func:`megatron_gad.parallel.launch.run_local`.
"""

from __future__ import annotations

import sys

from megatron_gad.errors import UserError


class ToolError(UserError):
    """A user-facing problem with a tool's inputs (bad path, unsupported model, impossible layout)."""


def log(msg: str) -> None:
    """Progress lines go to stderr so stdout stays clean for results (``generate --json``)."""
    print(f"[megatron-gad] {msg}", file=sys.stderr, flush=True)


def stdout_to_stderr() -> None:
    """In a spawned rank: send file descriptor 1 to stderr. Megatron and friends print from C and
    Python alike; redirecting the descriptor (not just ``sys.stdout``) keeps the parent's stdout
    reserved for the tool's result."""
    import os

    sys.stdout.flush()
    os.dup2(2, 1)
