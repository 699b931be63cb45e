"""Running the console script in-process for the CLI tests."""

from __future__ import annotations

from megatron_gad import cli


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``megatron-gad argv``."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
