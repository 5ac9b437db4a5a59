"""What the CLI test files share: running a command in-process, its JSON, its one-line errors."""
from __future__ import annotations

import json
import os

from click.testing import CliRunner

from ckpttool.cli import cli


def run(*args):
    """``ckpttool ARGS...`` in this process (paths may be Path objects)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def js(*args, code: int = 0) -> dict:
    """``ckpttool ARGS... --json``: it exits ``code`` and prints one JSON object."""
    r = run(*args, "--json")
    assert r.exit_code == code, (r.output, r.exception)
    return json.loads(r.stdout)


def assert_error(r, first_line: str, hint: str = None) -> None:
    """Exit 2, the one ``ckpttool: error:`` line (and its hint), no traceback, nothing on stdout."""
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.splitlines()
    assert lines and lines[0] == first_line, lines
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert lines[1:] == ([f"hint: {hint}"] if hint is not None else []), lines


def files_in(folder) -> set:
    return set(os.listdir(folder))
