"""The error contract of the ``megatron-gad`` console script.

Every problem with what a person passed in (a config file, a key, a path, a data row, a tool argument)
is a :class:`UserError`: the console script prints its message as one line on stderr and exits with 2,
without a traceback (``--debug`` or ``MEGATRON_GAD_DEBUG=1`` shows it). Its message names the file or
config key, the offending value, and what to do. Anything else is a bug and keeps its traceback.

This module imports nothing heavy: the console script catches these before torch is imported.
"""

from __future__ import annotations


class UserError(Exception):
    """An input problem the person running the command can fix; the message says how."""


class InputError(UserError, ValueError):
    """A path named by a config key or argument that is missing, unreadable, or not what the key needs."""
