"""One exception tree for every user-facing error.

A ``CkptError`` is the user's problem (bad usage, a missing or malformed file,
content refused without ``--trust``): the CLI prints it as one line and exits
with its ``exit_code``. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import Optional


class CkptError(Exception):
    """Base of every error ckpttool reports to the user (exit code 2).

    >>> str(CkptError("not a checkpoint", path="x.bin"))
    'not a checkpoint (x.bin)'
    """

    exit_code = 2

    def __init__(self, message: str, path: Optional[str] = None, hint: Optional[str] = None):
        # Messages quote bytes from files: keep them on one line whatever those bytes are.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.path})" if self.path else self.message


class UsageError(CkptError):
    """The options or arguments do not make sense together."""


class FileAccessError(CkptError):
    """The path is missing, unreadable, or a directory where a file is needed."""


class FormatError(CkptError):
    """The file is of no format ckpttool knows, or is malformed or truncated."""


class KeyNotFoundError(CkptError):
    """``--key`` names an entry the checkpoint does not have."""


class TrustRequiredError(CkptError):
    """The work needs the checkpoint's own code, and ``--trust`` was not given."""


class MissingDependencyError(CkptError):
    """An optional library needed for this file or operation is not installed."""


class CheckFailedError(CkptError):
    """A check the command runs on its own output failed (exit 1): nothing was written."""

    exit_code = 1
