"""The error contract of the ``megatron-gad`` console script.

Every problem with what a person passed in (a config file, a key, a path, a data row, a tool argument)
is a :class:`UserError`: the console script prints its message as one line on stderr and exits with 2,
without a traceback (``--debug`` or ``MEGATRON_GAD_DEBUG=1`` shows it). Its message names the file or
config key, the offending value, and what to do. A run that stops for a reason outside the inputs
(a worker process died, a role's updates stayed non-finite) is a :class:`RunFailure`: one line on
stderr as well, exit code 3, and the last complete checkpoint is intact, so rerunning the command with
``trainer.resume_mode=auto`` continues from it. Anything else is a bug and keeps its traceback (exit 1).

This module imports nothing heavy: the console script catches these before torch is imported.
"""

from __future__ import annotations


class UserError(Exception):
    """An input problem the person running the command can fix; the message says how."""


class InputError(UserError, ValueError):
    """A path named by a config key or argument that is missing, unreadable, or not what the key needs."""


class RunFailure(Exception):
    """The run stopped for a reason outside the inputs; the message names what stopped (role, rank, step)
    and the checkpoint a rerun with trainer.resume_mode=auto continues from."""


class DistributedRunError(RuntimeError):
    """A rank of a local multi-process run (``parallel.launch``) failed or exited without a result; the
    message holds each failed rank's traceback, so the console script prints it instead of its own stack
    (exit 1: a failure inside a rank is a bug, or an environment problem its traceback names)."""
