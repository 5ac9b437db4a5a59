"""TorchScript archives (``torch.jit.save``), read without torch.

The archive is a torch zip whose ``data.pkl`` pickles the module tree as
``__torch__.*`` objects whose state is a dict of attributes. Which tensor
attributes are parameters and buffers is declared in the archive's generated
code (``__parameters__ = [...]``, ``__buffers__ = [...]`` per class), read here
as text with ``ast.literal_eval``: nothing is executed.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Tuple

from ..records import Checkpoint
from .torch_zip import find_record_folder, open_zip, read_member, read_zip_pickle, zip_metadata

_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t].*\n|\s*\n)*)", re.M)
_MEMBERS = re.compile(r"^\s+__(parameters|buffers)__ = (\[.*?\])\s*$", re.M)


def is_torchscript(names) -> bool:
    """A zip is TorchScript when it carries constants.pkl or generated code."""
    return any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names)


def parse_members(code: str, module: str) -> Dict[str, Tuple[List[str], List[str]]]:
    """Map each ``class X(Module)`` of a code file to its parameter and buffer names.

    >>> parse_members('class L(Module):\\n  __parameters__ = ["weight", ]\\n  __buffers__ = []\\n', "__torch__.m")
    {'__torch__.m.L': (['weight'], [])}
    """
    out = {}
    for m in _CLASS.finditer(code):
        found = {"parameters": [], "buffers": []}
        for kind, lst in _MEMBERS.findall(m.group(2)):
            try:
                value = ast.literal_eval(lst)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, list):
                found[kind] = [v for v in value if isinstance(v, str)]
        out[f"{module}.{m.group(1)}"] = (found["parameters"], found["buffers"])
    return out


def read(path: str) -> Checkpoint:
    """Read a TorchScript archive: its module tree, with parameters and buffers marked."""
    zf = open_zip(path)
    with zf:
        folder = find_record_folder(zf, path)
        root, globs = read_zip_pickle(path, zf, folder)
        members: Dict[str, Tuple[List[str], List[str]]] = {}
        code_dir = folder + "code/"
        for name in zf.namelist():
            if name.startswith(code_dir) and name.endswith(".py"):
                module = name[len(code_dir):-3].replace("/", ".")
                text = read_member(zf, name, path, limit=64 << 20).decode("utf-8", "replace")
                members.update(parse_members(text, module))
        meta = zip_metadata(zf, folder, path)
    return Checkpoint(path=path, format="torchscript", file_size=os.path.getsize(path), root=root,
                      metadata={**meta, "_script_members": members}, globals=globs, files=(path,))
