"""Writing outputs safely: never over an input, never half a file.

Every command that writes goes through :func:`atomic_output`: the output is
checked against the inputs (through symlinks and other spellings of the path),
an existing file is replaced only with ``force``, and the data goes to a
temporary file beside the target that is fsynced and renamed into place, so a
failure (a full disk, an exception, Ctrl-C) leaves the old file or nothing.
"""
from __future__ import annotations

import contextlib
import os
import threading
import tempfile
from typing import Iterable, Iterator

from .errors import FileAccessError, UsageError


def check_output(out: str, inputs: Iterable[str], force: bool = False, folder: bool = False) -> str:
    """Refuse ``out`` when it is an input or (without ``force``) an existing file; return it absolute.

    ``folder``: the output is a folder (of shards) rather than a file.
    """
    given = os.fspath(out)
    out = os.path.abspath(given)
    if not folder and (given.endswith("/") or given.endswith(os.sep) or os.path.isdir(out)):
        raise UsageError("output is a folder (a trailing '/' or an existing directory): give a file name "
                         "(--max-shard-size SIZE writes a folder of shards)", given)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise FileAccessError("output folder does not exist", out)
    if os.path.lexists(out):
        inputs = list(inputs)
        for inp in inputs:
            if folder and os.path.isdir(out) and os.path.realpath(inp).startswith(os.path.realpath(out) + os.sep):
                raise UsageError("output folder holds one of the inputs; refusing to replace it", out)
            try:
                same = os.path.exists(out) and os.path.samefile(out, inp)
            except OSError:
                same = False
            if same or os.path.realpath(out) == os.path.realpath(inp):
                raise UsageError("output is one of the inputs; refusing to write over it", out)
        if not force:
            raise UsageError("output exists", out, hint="pass --force to replace it")
    return out


@contextlib.contextmanager
def writing(out: str) -> Iterator[None]:
    """Turn an OSError while writing ``out`` (a full disk, a read-only folder) into the one-line error."""
    try:
        yield
    except OSError as e:
        raise FileAccessError(f"cannot write the output: {e.strerror or e}", out) from None


# [depth of uninterrupted() blocks, the signal that arrived inside one]: the main thread's only (Python runs
# signal handlers there); a library call from another thread never touches it
_HOLDING = [0, None]


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that a SIGTERM or Ctrl-C does not cut in two: the signal (caught by ``cli.main``'s
    handler, which asks :func:`hold_signal`) is raised as KeyboardInterrupt when the block is done.

    For the few steps that put an output in place: the rename and the removal of what it replaced,
    and the creation of the temporary name the cleanup must know about.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    _HOLDING[0] += 1
    try:
        yield
    except BaseException:
        _HOLDING[0] -= 1
        if not _HOLDING[0]:
            _HOLDING[1] = None  # the block unwinds anyway: a held signal must not outlive it
        raise
    _HOLDING[0] -= 1
    if not _HOLDING[0] and _HOLDING[1] is not None:
        _HOLDING[1] = None
        raise KeyboardInterrupt()


def hold_signal(signum: int) -> bool:
    """Called by the signal handler: True when an :func:`uninterrupted` block will raise it later."""
    if _HOLDING[0]:
        _HOLDING[1] = signum
        return True
    return False


@contextlib.contextmanager
def atomic_output(out: str) -> Iterator[str]:
    """Yield a temporary path beside ``out``; on success fsync it and rename it to ``out``.

    >>> with atomic_output("/tmp/x.pt") as tmp:   # doctest: +SKIP
    ...     torch.save(sd, tmp)
    """
    folder = os.path.dirname(os.path.abspath(out))
    tmp = None
    try:
        with uninterrupted():  # the name is known to the cleanup below as soon as it exists
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=folder)
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())  # mkstemp makes 0600 files; an output is an ordinary file
        with uninterrupted():
            os.replace(tmp, out)
            tmp = None  # in place: nothing left to remove
            fsync_dir(folder)  # make the rename itself durable
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def fsync_dir(folder: str) -> None:
    """fsync a folder, so that the names created or renamed in it survive a crash (best effort)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def default_mode(folder: bool = False) -> int:
    """The mode a new file (or folder) gets under this process's umask (0644 / 0755 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def folder_into_place(tmpdir: str, out: str) -> None:
    """Rename a finished temporary folder to ``out``, replacing what was there (--force was checked)."""
    import shutil
    os.chmod(tmpdir, default_mode(folder=True))  # mkdtemp makes 0700 folders
    fsync_dir(tmpdir)
    old = None
    with uninterrupted():  # a signal here waits: neither the old output nor its new one is left half-moved
        if os.path.lexists(out):
            old = out + f".old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmpdir, out)
        except BaseException:
            if old:
                os.rename(old, out)  # put the replaced output back
            raise
        fsync_dir(os.path.dirname(os.path.abspath(out)))
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


@contextlib.contextmanager
def scratch_folder(**mkdtemp_args) -> Iterator[str]:
    """A new folder (``tempfile.mkdtemp(**mkdtemp_args)``), removed with what it holds when the block ends,
    however it ends; a signal cannot come between its creation and the cleanup knowing its name."""
    import shutil
    path = None
    try:
        with uninterrupted():
            path = tempfile.mkdtemp(**mkdtemp_args)
        yield path
    finally:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def folder_output(out: str) -> Iterator[str]:
    """A temporary folder beside ``out`` to build a folder output in (shards + index, a DCP folder).

    When the block ends normally every file in it is fsynced and given the default mode, and
    the folder is renamed to ``out``; when it raises (a failed check, a full disk, Ctrl-C) the
    folder is removed and ``out`` is left as it was.
    """
    with scratch_folder(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=os.path.dirname(out)) as tmpdir:
        yield tmpdir
        for base, _, names in os.walk(tmpdir):
            for n in names:
                p = os.path.join(base, n)
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(p, default_mode())
        folder_into_place(tmpdir, out)  # renamed: the scratch folder's removal finds nothing left
