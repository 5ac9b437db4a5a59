"""torch.save's legacy format (``_use_new_zipfile_serialization=False``; torch 0.4-1.5).

A sequence of pickles in one file: the magic number, the protocol version,
a sys_info dict, the object (storages as persistent ids), the sorted list of
storage keys; then each storage in that order as an 8-byte little-endian
element count followed by its raw bytes. The location tags (``cuda:0``) are
read as text, so GPU-saved files read on any machine.
"""
from __future__ import annotations

import os
import struct
from typing import Dict, Tuple

from ..dtypes import itemsize
from ..errors import FormatError
from ..checkpoint import Checkpoint, StorageRef
from ..spans import FileSpan
from ..text import safe_repr
from ..pickles.machine import Machine, Policy
from .safe_pickle import load_stream, parse_storage_pid, storage_nbytes

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# protocol-2 pickle of the magic number: PROTO 2, LONG1 10 bytes
MAGIC_PREFIX = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")
_MAGIC_LONG = b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")


def has_magic(head: bytes) -> bool:
    """Is the first pickle in ``head`` (a file's first bytes) the legacy magic number, as torch.load reads it?

    torch.load compares the *value* of the file's first pickle with the magic number, so any spelling
    counts: protocol 0 (``L...L``), 1, 2, framed protocol 4, opcodes before it that leave it on top.
    The pickle is run on the pickle machine with a policy that refuses every global.
    """
    if not head:
        return False
    body = head[2:]
    if head[:1] == b"\x80" and body[:1] == b"\x95":
        body = body[9:]
    if head[:1] == b"\x80" and body.startswith(_MAGIC_LONG):  # how torch.save writes it: no need to run it
        return True
    try:
        value = Machine(Policy()).load(head)
    except FormatError:
        return False
    return type(value) is int and value == MAGIC_NUMBER


class _OffsetSpan:
    """A view storage of the legacy format: bytes of its root storage from an offset."""

    def __init__(self, base, offset: int, size: int):
        self.base, self.offset_in_base, self.size = base, offset, size
        self.path = base.path

    def read(self, start: int = 0, size=None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError("read outside a view storage", self.path)
        return self.base.read(self.offset_in_base + start, size)


def read(path: str) -> Checkpoint:
    """Read a legacy-format checkpoint's structure (storage headers only, no tensor bytes)."""
    file_size = os.path.getsize(path)
    offsets: Dict[str, int] = {}
    roots: Dict[str, Tuple[StorageRef, int]] = {}  # key -> (ref, element size)
    views: Dict[str, StorageRef] = {}
    modules = []

    def persistent_load(pid):
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            if len(pid) < 2:
                raise FormatError("malformed module record")
            modules.append(pid[1])
            return pid[1]
        stype, key, location, numel, view = parse_storage_pid(pid, 6)
        elem = 1 if stype.name == "UntypedStorage" else itemsize(stype.dtype)
        if key not in roots:
            span = FileSpan(path, size=storage_nbytes(stype, numel), resolve=lambda k=key: _offset_of(k))
            roots[key] = (StorageRef(key=key, dtype=stype.dtype, device=location,
                                     nbytes=storage_nbytes(stype, numel), source=span, file=path), elem)
        root = roots[key][0]
        if root.dtype != stype.dtype or root.nbytes != storage_nbytes(stype, numel):
            # torch.load takes the first storage of a key for all the ids that name it
            raise FormatError(f"storage key {key!r} names two storages ({root.dtype}, {root.nbytes} bytes and "
                              f"{stype.dtype}, {storage_nbytes(stype, numel)} bytes): torch.load reads them as one")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise FormatError(f"malformed storage view record {safe_repr(view, 60)}")
        view_key, offset, view_size = view
        if view_key not in views:
            if type(offset) is not int or type(view_size) is not int or offset < 0 or view_size < 0 \
                    or (offset + view_size) * elem > root.nbytes:
                raise FormatError(f"storage view {view_key!r} lies outside its storage {key!r}")
            views[view_key] = StorageRef(key=str(view_key), dtype=stype.dtype, device=location,
                                         nbytes=view_size * elem,
                                         source=_OffsetSpan(root.source, offset * elem, view_size * elem), file=path)
        return views[view_key]

    def _offset_of(key: str) -> int:
        if key not in offsets:
            raise FormatError(f"storage {key!r} is not in the file's storage list", path)
        return offsets[key]

    with open(path, "rb") as f:
        magic, _ = load_stream(f, None, path)
        if type(magic) is not int or magic != MAGIC_NUMBER:
            raise FormatError("not a legacy PyTorch file (no magic number)", path)
        version, _ = load_stream(f, None, path)
        if version != PROTOCOL_VERSION:
            raise FormatError(f"legacy PyTorch file of unknown protocol version {safe_repr(version, 20)}", path)
        sys_info, _ = load_stream(f, None, path)
        main_start = f.tell()
        root, globs = load_stream(f, persistent_load, path)
        main_end = f.tell()
        if any(g.qualname == "torch._utils._rebuild_nested_tensor" for g in globs):
            # torch's legacy loader fills storages after the pickle ran; a nested tensor's rebuild reads its
            # sizes while they are still unfilled (torch.load fails, or reads garbage)
            raise FormatError("torch.load cannot read a nested tensor from a legacy-format file (it reads the "
                              "tensor's sizes before the file's storages are read)", path)
        keys, _ = load_stream(f, None, path)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise FormatError("legacy PyTorch file has a malformed storage key list", path)
        pos = f.tell()
        fd = f.fileno()
        for key in keys:
            header = os.pread(fd, 8, pos)
            if len(header) != 8:
                raise FormatError(f"file is truncated: storage {key!r} header missing at byte {pos}", path)
            (numel,) = struct.unpack("<q", header)
            if key not in roots:
                raise FormatError(f"storage {key!r} is stored but no tensor uses it", path)
            ref, elem = roots[key]
            nbytes = numel * elem
            if numel < 0 or nbytes != ref.nbytes:
                raise FormatError(f"storage {key!r} header says {numel} elements, its record says otherwise", path)
            offsets[key] = pos + 8
            pos += 8 + nbytes
            if pos > file_size:
                raise FormatError(f"file is truncated: storage {key!r} ends at byte {pos}, file has {file_size}", path)
    missing = [k for k in roots if k not in offsets]
    if missing:
        raise FormatError(f"storage {missing[0]!r} is used but not stored in the file", path)
    # where each storage's bytes are (after its 8-byte element count), in file order: for rewriting tools
    # and where its main pickle is (bytes main_start:main_end)
    meta = {"legacy_protocol": version, "_storages": {k: (offsets[k], roots[k][0].nbytes) for k in keys},
            "_pickle": (main_start, main_end)}
    little = sys_info.get("little_endian") if isinstance(sys_info, dict) else None
    if isinstance(little, bool):  # anything else in sys_info is the file's to choose: not kept
        meta["little_endian"] = little
        if little is False:
            meta["note"] = "big-endian file: tensor bytes are big-endian"
    return Checkpoint(path=path, format="torch_legacy", file_size=file_size, root=root, metadata=meta,
                      globals=globs, files=(path,))
