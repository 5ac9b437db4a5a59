"""A full disk, simulated for the writers: shared by the convert and remap tests.

``simulate_full_disk(monkeypatch, modules, room)`` makes every file that zipfile opens for writing,
and every file the named modules ``open`` for writing, share ``room`` bytes; past them a write
fails with ENOSPC, as on a full disk. Returns the list of opened files (close them after).
"""
from __future__ import annotations

import builtins
import errno
import importlib
import os
import zipfile
from typing import List, Sequence


class FullDiskFile:
    """A file on a disk with ``room[0]`` bytes left (shared by every file): then writes fail with ENOSPC."""

    def __init__(self, f, room: list):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def simulate_full_disk(monkeypatch, modules: Sequence[str] = ("ckpttool.formats.safetensors_writer",),
                       room: int = 3000) -> List[FullDiskFile]:
    opened: List[FullDiskFile] = []
    left = [room]

    class FullZip(zipfile.ZipFile):
        def __init__(self, file, mode="r", *args, **kwargs):
            if mode == "w" and isinstance(file, (str, os.PathLike)):
                file = FullDiskFile(builtins.open(file, "w+b"), left)
                opened.append(file)
            super().__init__(file, mode, *args, **kwargs)

    def full_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode:
            f = FullDiskFile(f, left)
            opened.append(f)
        return f

    monkeypatch.setattr(zipfile, "ZipFile", FullZip)
    for name in modules:
        monkeypatch.setattr(importlib.import_module(name), "open", full_open, raising=False)
    return opened
