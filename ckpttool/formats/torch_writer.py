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

import collections
import io
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..dtypes import STORAGE_CLASS_DTYPE, itemsize

# dtype -> typed storage class that torch.save uses for it (the rest get UntypedStorage + v3)
_STORAGE_CLASS = {d: c for c, d in STORAGE_CLASS_DTYPE.items() if c != "UntypedStorage" and not d.startswith("q")}
# a quantized tensor's storage is named by its own class (torch.QUInt8Storage...), in _rebuild_qtensor's id
_Q_STORAGE_CLASS = {d: c for c, d in STORAGE_CLASS_DTYPE.items() if d.startswith("q")}
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
    """A tensor to pickle: a view (offset in elements, shape, stride) of a StorageOut; ``metadata``: torch's
    tensor metadata (the conj / neg bits), written as torch.save writes it."""

    storage: StorageOut
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int = 0
    requires_grad: bool = False
    metadata: Tuple[Tuple[str, bool], ...] = ()
    parameter: bool = False  # an nn.Parameter, as torch.save writes one (_rebuild_parameter around the tensor)

    @property
    def dtype(self) -> str:
        return self.storage.dtype


@dataclass(eq=False)
class GlobalOut:
    """A global named as a value (a class, a function, a dtype): ``module.name``."""

    module: str
    name: str


@dataclass(eq=False)
class CallOut:
    """``module.name(*args)``, as a pickle spells a call (GLOBAL, the arguments' tuple, REDUCE)."""

    module: str
    name: str
    args: Tuple[Any, ...]


@dataclass(eq=False)
class ObjectOut:
    """An object of a class ckpttool does not import, written back as the file built it: called with
    ``args`` (REDUCE) or made bare (NEWOBJ), then filled with ``list_items`` / ``items`` and given ``state``."""

    module: str
    name: str
    called: bool
    args: Tuple[Any, ...]
    state: Any = None
    items: Tuple[Tuple[Any, Any], ...] = ()
    list_items: Tuple[Any, ...] = ()


_SCALARS = (int, float, str, bool, type(None), bytes)


class _Emitter:
    """Protocol-2 pickle opcodes for plain containers, scalars and TensorOut leaves."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.w = self.out.write
        self.w(b"\x80\x02")
        # objects written once and met again (a rebuild's shared dict, as the source's pickle shared it) are
        # fetched from the memo, as pickle does: so they load as one object, not two equal ones
        self.memo: Dict[int, int] = {}
        self.keep: List[Any] = []
        self.foreign = False  # wrote something copied from a source file (a rebuild's globals and objects)

    def _memo_get(self, obj: Any) -> bool:
        i = self.memo.get(id(obj))
        if i is None:
            return False
        self.w(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))
        return True

    def _memo_put(self, obj: Any) -> None:
        i = self.memo[id(obj)] = len(self.memo)
        self.keep.append(obj)  # alive while the memo holds its id
        self.w(b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i))

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
            if self._memo_get(obj):
                return
            self._tensor(obj)
            self._memo_put(obj)
        elif isinstance(obj, StorageOut):
            self._storage(obj)
        elif isinstance(obj, GlobalOut):
            self.foreign = True
            self.glob(obj.module, obj.name)
        elif isinstance(obj, CallOut):
            self.foreign = True
            if self._memo_get(obj):
                return
            self.glob(obj.module, obj.name)
            self.emit(tuple(obj.args))
            w(b"R")
            self._memo_put(obj)
        elif isinstance(obj, ObjectOut):
            self._object(obj)
        elif isinstance(obj, (set, frozenset)):  # protocol 2 spells sets as calls of the builtins
            if self._memo_get(obj):
                return
            self.glob("__builtin__", "set" if isinstance(obj, set) else "frozenset")
            self.emit((list(obj),))
            w(b"R")
            self._memo_put(obj)
        elif isinstance(obj, tuple):
            if not obj:
                w(b")")
            else:
                shared = not all(type(x) in _SCALARS for x in obj)  # a tuple of objects may be met again: memo
                if shared and self._memo_get(obj):
                    return
                w(b"(")
                for x in obj:
                    self.emit(x)
                w(b"t")
                if shared:
                    self._memo_put(obj)
        elif isinstance(obj, list):
            if self._memo_get(obj):
                return
            w(b"]")
            self._memo_put(obj)
            for i in range(0, len(obj), 1000):
                w(b"(")
                for x in obj[i:i + 1000]:
                    self.emit(x)
                w(b"e")
        elif isinstance(obj, dict):
            if self._memo_get(obj):
                return
            if type(obj) is dict:
                w(b"}")
            else:  # OrderedDict, as a state_dict is
                self.glob("collections", "OrderedDict")
                w(b")R")
            self._memo_put(obj)
            items = list(obj.items())
            for i in range(0, len(items), 1000):
                w(b"(")
                for k, v in items[i:i + 1000]:
                    self.emit(k)
                    self.emit(v)
                w(b"u")
            meta = getattr(obj, "_metadata", None) if type(obj) is not dict else None
            if meta is not None:  # a state_dict's module versions, as torch.save writes them (BUILD)
                self.emit({"_metadata": meta})
                w(b"b")
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a torch.save file")

    def _storage(self, s: StorageOut) -> None:
        """The persistent id torch.save writes for a storage (its typed class, or UntypedStorage)."""
        cls = _STORAGE_CLASS.get(s.dtype) or _Q_STORAGE_CLASS.get(s.dtype)
        self.w(b"(")
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

    def _tensor(self, t: TensorOut) -> None:
        if t.parameter:
            self.glob("torch._utils", "_rebuild_parameter")
            self.w(b"(")
            self._plain_tensor(t, False)
            self.emit(bool(t.requires_grad))
            self.glob("collections", "OrderedDict")
            self.w(b")RtR")
            return
        self._plain_tensor(t, t.requires_grad)

    def _plain_tensor(self, t: TensorOut, requires_grad: bool) -> None:
        s = t.storage
        cls = _STORAGE_CLASS.get(s.dtype)
        self.glob("torch._utils", "_rebuild_tensor_v2" if cls else "_rebuild_tensor_v3")
        self.w(b"(")  # the call's arguments
        self._storage(s)
        self.emit(t.offset)
        self.emit(tuple(t.shape))
        self.emit(tuple(t.stride))
        self.emit(bool(requires_grad))
        self.glob("collections", "OrderedDict")
        self.w(b")R")
        if not cls:
            self.glob("torch", s.dtype)
        if t.metadata:  # as torch.save: the metadata dict is an argument only when a bit is set
            self.emit(dict(t.metadata))
        self.w(b"tR")

    def _object(self, o: ObjectOut) -> None:
        self.foreign = True
        if self._memo_get(o):
            return
        self.glob(o.module, o.name)
        self.emit(tuple(o.args))
        self.w(b"R" if o.called else b"\x81")
        self._memo_put(o)
        if o.list_items:
            self.w(b"(")
            for x in o.list_items:
                self.emit(x)
            self.w(b"e")
        if o.items:
            self.w(b"(")
            for k, v in o.items:
                self.emit(k)
                self.emit(v)
            self.w(b"u")
        if o.state is not None:
            self.emit(o.state)
            self.w(b"b")

    def finish(self) -> bytes:
        self.w(b".")
        return self.out.getvalue()


def pickle_tree(root: Any) -> bytes:
    """``data.pkl`` for ``root`` (dicts, lists, tuples, scalars, strings, TensorOut leaves, and the calls,
    globals and objects of rebuilds copied from a source).

    Where a source's rebuild was copied, the written pickle is scanned as ``ckpttool scan`` scans a file: one
    that would run anything scan calls dangerous (a global a rebuild calls, an object's method a function
    calls) is a UsageError, and nothing is written.
    """
    e = _Emitter()
    e.emit(root)
    data = e.finish()
    if e.foreign:
        from ..errors import UsageError
        from ..pickles.uses import scan_pickle
        from ..scanning import classify
        r = scan_pickle(data)
        bad = sorted(name for name, how in r.uses.items() if name.startswith("<") or classify(name, set(how)) ==
                     "dangerous")
        if bad or r.error:
            raise UsageError(f"the pickle ckpttool would write holds what scan calls dangerous ({', '.join(bad[:3])}"
                             f"{r.error or ''}), copied from the source's tensor records: not written")
    return data


def storages_of(root: Any) -> List[StorageOut]:
    """The distinct storages the TensorOut leaves of ``root`` use, in first-use order."""
    seen: Dict[int, StorageOut] = {}
    stack = [root]
    order: List[StorageOut] = []
    visited = set()
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list, set, tuple, CallOut, ObjectOut)):
            if id(node) in visited:  # shared (written once, fetched from the memo)
                continue
            visited.add(id(node))
        if isinstance(node, (TensorOut, StorageOut)):
            s = node.storage if isinstance(node, TensorOut) else node
            if id(s) not in seen:
                seen[id(s)] = s
                order.append(s)
        elif isinstance(node, dict):
            stack.extend(reversed([v for kv in node.items() for v in kv]))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(reversed(list(node)))
        elif isinstance(node, CallOut):
            stack.extend(reversed(node.args))
        elif isinstance(node, ObjectOut):
            stack.extend(reversed([*node.args, node.state, *(v for kv in node.items for v in kv), *node.list_items]))
    return order


class AlignedZip:
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
    z = AlignedZip(path, folder)
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


_MAKING = object()
MAX_REBUILD_DEPTH = 200


def rebuild_out(value: Any, tensor_out: Callable[[Any], Any], storage_out: Callable[[Any], StorageOut],
                memo: Optional[Dict[int, Any]] = None) -> Any:
    """What the reader made of a rebuild's arguments, as the writer's objects: the same call written back.

    ``tensor_out(TensorRef)`` and ``storage_out(StorageRef)`` give the written tensor / storage (so a storage
    shared with other tensors stays shared). A value the reader made that has no written form (a numpy
    dtype, an object built with keyword arguments) is a ValueError naming it.
    """
    from ..pickles.reading import TENSOR_FUNCS, Stub, TorchDevice, TorchDtype, TorchSize
    from ..checkpoint import Layout, Rebuild, StorageRef, TensorRef, Value
    from ..pickles.uses import is_enum_class
    from ..scanning import classify
    funcs = {id(f): key for key, f in TENSOR_FUNCS.items()}
    enums: Dict[str, bool] = {}

    def allowed(module: str, name: str, how: str) -> None:
        # a written file never holds a global scan would call dangerous, used as it is used here: convert's
        # output is no more able to run code than torch.load(weights_only=True) of it allows
        if classify(f"{module}.{name}", {how}) == "dangerous":
            raise ValueError(f"a {'call' if how == 'called' else 'use'} of {module}.{name}, which scan calls "
                             "dangerous")
    made: Dict[int, Any] = {} if memo is None else memo  # an object met twice is written once (shared)

    depth = [0]

    def out(v: Any) -> Any:
        depth[0] += 1
        try:
            if depth[0] > MAX_REBUILD_DEPTH:  # the emitter recurses as deep: refused before it would fail
                raise ValueError(f"objects nested more than {MAX_REBUILD_DEPTH} levels deep")
            if isinstance(v, (dict, list, set, tuple, Stub, Rebuild)):
                got = made.get(id(v))
                if got is _MAKING:
                    raise ValueError("an object that contains itself")
                if got is None:
                    made[id(v)] = _MAKING
                    got = made[id(v)] = _out(v)
                return got
            return _out(v)
        finally:
            depth[0] -= 1

    def _out(v: Any) -> Any:
        if isinstance(v, TensorRef):
            return tensor_out(v)
        if isinstance(v, StorageRef):
            return storage_out(v)
        if isinstance(v, Rebuild):
            return CallOut(v.module, v.name, tuple(out(a) for a in v.args))
        if isinstance(v, Value):
            return out(v.value)
        if isinstance(v, TorchDtype):
            return GlobalOut("torch", str(v))
        if isinstance(v, Layout):
            return CallOut("torch.serialization", "_get_layout", ("torch." + str(v),))
        if isinstance(v, TorchSize):
            return CallOut("torch", "Size", (tuple(v),))
        if isinstance(v, TorchDevice):
            return CallOut("torch", "device", tuple(v.args))
        if isinstance(v, type) and issubclass(v, Stub):
            allowed(v.stub_module, v.stub_name, "referenced")
            return GlobalOut(v.stub_module, v.stub_name)
        if isinstance(v, Stub):
            if v.kwargs:
                raise ValueError(f"an object of {v.qualname} made with keyword arguments")
            # an Enum made from its value is an instantiation (proven from the installed source, as scan does)
            how = "called" if v.called and not is_enum_class(v.qualname, enums) else "instantiated"
            allowed(type(v).stub_module, type(v).stub_name, how)
            if v.state is not None:
                allowed(type(v).stub_module, type(v).stub_name, "built")
            return ObjectOut(type(v).stub_module, type(v).stub_name, v.called, tuple(out(a) for a in v.args),
                             out(v.state), tuple((out(k), out(x)) for k, x in v.items.items()),
                             tuple(out(x) for x in v.list_items))
        if id(v) in funcs:
            return GlobalOut(*funcs[id(v)])
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            return v
        if isinstance(v, complex):
            return CallOut("__builtin__", "complex", (v.real, v.imag))
        if isinstance(v, dict):
            return type(v)((out(k), out(x)) for k, x in v.items()) if type(v) in (dict, collections.OrderedDict) \
                else collections.OrderedDict((out(k), out(x)) for k, x in v.items())
        if isinstance(v, (list, tuple, set, frozenset)):
            return type(v)(out(x) for x in v) if type(v) in (list, tuple, set, frozenset) else tuple(out(x) for x in v)
        raise ValueError(f"a {type(v).__name__} the reader made")

    return out(value)
