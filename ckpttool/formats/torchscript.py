"""TorchScript archives (``torch.jit.save``), read without torch.

The archive is a torch zip whose ``data.pkl`` pickles the module tree as
``__torch__.*`` objects whose state is a dict of attributes. Which tensor
attributes are parameters and buffers is declared in the archive's generated
code (``__parameters__ = [...]``, ``__buffers__ = [...]`` per class), read here
as text, line by line: nothing is executed.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from ..checkpoint import Checkpoint
from .archive import Archive
from .torch_zip import read_pickle, zip_metadata

_CLASS = re.compile(r"class (\w+)\(Module\):\s*")
_MEMBERS = re.compile(r"\s+__(parameters|buffers)__ = (\[.*\])\s*")
# A list of plain string literals, as TorchScript writes it: ["weight", "bias", ]
_NAME_LIST = re.compile(r'\[\s*(?:"[^"\\\n]*"\s*,\s*)*(?:"[^"\\\n]*"\s*)?\]')
_NAME = re.compile(r'"([^"\\\n]*)"')


def is_torchscript(names) -> bool:
    """A zip is TorchScript when it carries constants.pkl or generated code."""
    return any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names)


def parse_members(code: str, module: str) -> Dict[str, Tuple[List[str], List[str]]]:
    """Map each ``class X(Module)`` of a code file to its parameter and buffer names.

    >>> parse_members('class L(Module):\\n  __parameters__ = ["weight", ]\\n  __buffers__ = []\\n', "__torch__.m")
    {'__torch__.m.L': (['weight'], [])}
    """
    out: Dict[str, Tuple[List[str], List[str]]] = {}
    current = None
    for line in code.split("\n"):
        m = _CLASS.fullmatch(line)
        if m:
            current = out[f"{module}.{m.group(1)}"] = ([], [])
            continue
        if line[:1] not in (" ", "\t", ""):
            current = None  # a line at the left margin ends the class body
        elif current is not None:
            m = _MEMBERS.fullmatch(line)
            if m and _NAME_LIST.fullmatch(m.group(2)):
                current[0 if m.group(1) == "parameters" else 1][:] = _NAME.findall(m.group(2))
    return out


def read(path: str, archive: Optional[Archive] = None) -> Checkpoint:
    """Read a TorchScript archive: its module tree, with parameters and buffers marked.

    ``archive``: the archive already open on ``path`` (as format detection leaves it); it is closed here.
    """
    if archive is None:
        archive = Archive.open(path)
    with archive:
        root, globs = read_pickle(archive)
        members: Dict[str, Tuple[List[str], List[str]]] = {}
        code_dir = archive.folder + "code/"
        for record in archive.records:
            name = record.name
            if name.startswith(code_dir) and name.endswith(".py"):
                module = name[len(code_dir):-3].replace("/", ".")
                text = archive.read(record, limit=64 << 20).decode("utf-8", "replace")
                members.update(parse_members(text, module))
        meta = zip_metadata(archive)
    return Checkpoint(path=path, format="torchscript", file_size=os.path.getsize(path), root=root,
                      metadata={**meta, "_script_members": members}, globals=globs, files=(path,))
