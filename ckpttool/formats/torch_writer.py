"""Writing torch.save's zip format without torch, a storage at a time.

``torch.save`` needs every tensor in memory. Here the pickle (``data.pkl``) is
emitted from metadata alone, opcode by opcode, exactly as torch writes it
(protocol 2, ``_rebuild_tensor_v2`` with a typed storage class, or
``_rebuild_tensor_v3`` with ``UntypedStorage`` and a dtype for the dtypes that
have no storage class), and each storage's bytes are streamed into its
``data/<key>`` record, 64-byte aligned like torch's writer, in bounded chunks.
Views and tied tensors keep sharing their storage, as with torch.save.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..dtypes import STORAGE_CLASS_DTYPE, itemsize

# dtype -> typed storage class that torch.save uses for it (the rest get UntypedStorage + v3)
_STORAGE_CLASS = {d: c for c, d in STORAGE_CLASS_DTYPE.items() if c != "UntypedStorage" and not d.startswith("q")}
ALIGNMENT = 64


@dataclass(eq=False)
class StorageOut:
    """A storage to write: its dtype, byte size and a function yielding its bytes in order."""

    key: str
    dtype: str
    nbytes: int
    chunks: Callable[[], Iterator[bytes]]
    location: str = "cpu"


@dataclass(eq=False)
class TensorOut:
    """A tensor to pickle: a view (offset in elements, shape, stride) of a StorageOut."""

    storage: StorageOut
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int = 0
    requires_grad: bool = False

    @property
    def dtype(self) -> str:
        return self.storage.dtype


class _Emitter:
    """Protocol-2 pickle opcodes for plain containers, scalars and TensorOut leaves."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.w = self.out.write
        self.w(b"\x80\x02")

    def glob(self, module: str, name: str) -> None:
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def emit(self, obj: Any) -> None:
        w = self.w
        if obj is None:
            w(b"N")
        elif obj is True:
            w(b"\x88")
        elif obj is False:
            w(b"\x89")
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                w(b"K" + bytes([obj]))
            elif 0 <= obj < 65536:
                w(b"M" + struct.pack("<H", obj))
            elif -(1 << 31) <= obj < (1 << 31):
                w(b"J" + struct.pack("<i", obj))
            else:
                data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                w(b"\x8a" + bytes([len(data)]) + data if len(data) < 256 else b"\x8b" + struct.pack("<i", len(data)) + data)
        elif isinstance(obj, float):
            w(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, (bytes, bytearray)):  # protocol 2 spells bytes as _codecs.encode(latin-1 text)
            self.glob("_codecs", "encode")
            self.emit((bytes(obj).decode("latin-1"), "latin1"))
            w(b"R")
        elif isinstance(obj, TensorOut):
            self._tensor(obj)
        elif isinstance(obj, tuple):
            if not obj:
                w(b")")
            else:
                w(b"(")
                for x in obj:
                    self.emit(x)
                w(b"t")
        elif isinstance(obj, list):
            w(b"]")
            for i in range(0, len(obj), 1000):
                w(b"(")
                for x in obj[i:i + 1000]:
                    self.emit(x)
                w(b"e")
        elif isinstance(obj, dict):
            if type(obj) is dict:
                w(b"}")
            else:  # OrderedDict, as a state_dict is
                self.glob("collections", "OrderedDict")
                w(b")R")
            items = list(obj.items())
            for i in range(0, len(items), 1000):
                w(b"(")
                for k, v in items[i:i + 1000]:
                    self.emit(k)
                    self.emit(v)
                w(b"u")
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a torch.save file")

    def _tensor(self, t: TensorOut) -> None:
        s = t.storage
        cls = _STORAGE_CLASS.get(s.dtype)
        self.glob("torch._utils", "_rebuild_tensor_v2" if cls else "_rebuild_tensor_v3")
        self.w(b"(")  # the call's arguments
        self.w(b"(")  # the persistent id
        self.emit("storage")
        if cls:
            self.glob("torch", cls)
            numel = s.nbytes // (itemsize(s.dtype) or 1)
        else:
            self.glob("torch.storage", "UntypedStorage")
            numel = s.nbytes
        self.emit(s.key)
        self.emit(s.location)
        self.emit(numel)
        self.w(b"tQ")
        self.emit(t.offset)
        self.emit(tuple(t.shape))
        self.emit(tuple(t.stride))
        self.emit(bool(t.requires_grad))
        self.glob("collections", "OrderedDict")
        self.w(b")R")
        if not cls:
            self.glob("torch", s.dtype)
        self.w(b"tR")

    def finish(self) -> bytes:
        self.w(b".")
        return self.out.getvalue()


def pickle_tree(root: Any) -> bytes:
    """``data.pkl`` for ``root`` (dicts, lists, tuples, scalars, strings, TensorOut leaves)."""
    e = _Emitter()
    e.emit(root)
    return e.finish()


def storages_of(root: Any) -> List[StorageOut]:
    """The distinct storages the TensorOut leaves of ``root`` use, in first-use order."""
    seen: Dict[int, StorageOut] = {}
    stack = [root]
    order: List[StorageOut] = []
    while stack:
        node = stack.pop()
        if isinstance(node, TensorOut):
            if id(node.storage) not in seen:
                seen[id(node.storage)] = node.storage
                order.append(node.storage)
        elif isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed(node))
    return order


class _AlignedZip:
    def __init__(self, path: str, folder: str):
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.folder = folder

    def add(self, name: str, chunks: Iterable[bytes], size: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self.folder}/{name}" if self.folder else name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
        start = self.zf.fp.tell() + 30 + len(info.filename.encode("utf-8")) + (20 if zip64 else 0) + 4
        pad = (-start) % ALIGNMENT
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding field
        written = 0
        with self.zf.open(info, "w", force_zip64=zip64) as f:
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
        if written != size:
            raise ValueError(f"record {name}: wrote {written} bytes, expected {size}")
        return info  # its CRC is the CRC-32 of the bytes written

    def close(self) -> None:
        self.zf.close()


def write_torch_zip(path: str, root: Any, progress: Optional[Callable[[int], None]] = None,
                    folder: str = "archive") -> int:
    """Write ``root`` as a torch.save zip file at ``path``; returns the number of storages written.

    ``progress(nbytes)`` is called after each chunk of storage bytes.
    """
    storages = storages_of(root)
    keys = [s.key for s in storages]
    if len(set(keys)) != len(keys):
        raise ValueError("two storages share a key")
    z = _AlignedZip(path, folder)
    try:
        data = pickle_tree(root)
        z.add("data.pkl", [data], len(data))
        for name, value in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
            z.add(name, [value], len(value))
        for s in storages:
            def counted(s=s):
                for chunk in s.chunks():
                    yield chunk
                    if progress:
                        progress(len(chunk))
            z.add(f"data/{s.key}", counted(), s.nbytes)
        z.add("version", [b"3\n"], 2)
        ident = str(int.from_bytes(os.urandom(16), "little")).encode()
        z.add(".data/serialization_id", [ident], len(ident))
    finally:
        z.close()
    return len(storages)
