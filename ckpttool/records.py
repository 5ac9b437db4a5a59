"""The records every reader produces and every command returns.

A reader turns a path into a :class:`Checkpoint`: the tree of entries the file
holds, with each tensor as a :class:`TensorRef` (metadata, plus a way to read
its bytes later from the file itself). Commands return frozen result records
with ``to_dict()``; the CLI renders them. Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

from .dtypes import itemsize
from .errors import FormatError


class FileSpan:
    """Bytes ``[offset, offset + size)`` of a file, read with positioned reads.

    The offset may be resolved lazily (``resolve``), so that opening a
    checkpoint never touches tensor data.
    """

    __slots__ = ("path", "_offset", "size", "_resolve")  # a 20,000-tensor archive makes 20,000 of them

    def __init__(self, path: str, offset: Optional[int] = None, size: int = 0, resolve=None):
        self.path = path
        self._offset = offset
        self.size = size
        self._resolve = resolve

    @property
    def offset(self) -> int:
        if self._offset is None:
            self._offset = self._locate()
        return self._offset

    def _locate(self) -> int:
        """The offset, found on first use (subclasses that know how override this)."""
        resolve, self._resolve = self._resolve, None
        return resolve()

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        """Read ``size`` bytes from ``start`` within the span; a short read is an error."""
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        out = bytearray()
        with open(self.path, "rb") as f:
            fd = f.fileno()
            pos = self.offset + start
            if size <= 1 << 30:  # the usual case: one read, no copies
                first = os.pread(fd, size, pos)
                if len(first) == size:
                    return first
                out += first
            while len(out) < size:
                chunk = os.pread(fd, min(size - len(out), 1 << 26), pos + len(out))
                if not chunk:
                    raise FormatError(
                        f"file is truncated: tensor data ends at byte {self.offset + start + size}, "
                        f"file has {os.fstat(fd).st_size}", self.path)
                out += chunk
        return bytes(out)


def _readinto(self, start: int, buf) -> None:
    """Fill ``buf`` (a bytearray or a writable memoryview) with the span's bytes from ``start``."""
    size = len(buf)
    if start < 0 or start + size > self.size:
        raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
    with open(self.path, "rb") as f:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        done = 0
        while done < size:
            n = os.preadv(f.fileno(), [view[done:]], self.offset + start + done)
            if not n:
                raise FormatError(f"file is truncated: tensor data ends at byte {self.offset + start + size}",
                                  self.path)
            done += n


FileSpan.readinto = _readinto

# Read buffers not in use, reused so reading allocates (and faults in) no new memory: one pool per thread
# (threading.local), so two threads never share a buffer.
_THREAD = threading.local()


def _pool() -> list:
    pool = getattr(_THREAD, "pool", None)
    if pool is None:
        pool = _THREAD.pool = []
    return pool


def read_pieces(source: Any, start: int, size: int, step: int) -> Iterator[bytes]:
    """Bytes ``[start, start + size)`` of ``source`` in pieces of ``step`` bytes.

    Where the source can ``readinto``, each piece is a view of a pooled buffer, valid until the next
    piece is asked for (callers write or compare each piece before the next); generators alive at
    the same time (the two sides of a comparison) each hold their own buffer.
    """
    if not hasattr(source, "readinto") or size <= 0:
        for off in range(0, size, step):
            yield source.read(start + off, min(step, size - off))
        return
    pool = _pool()
    buf = pool.pop() if pool else bytearray(step)
    try:
        if len(buf) < min(step, size):
            buf = bytearray(step)
        view = memoryview(buf)
        for off in range(0, size, step):
            n = min(step, size - off)
            source.readinto(start + off, view[:n])
            yield view[:n]
    finally:
        pool.append(buf)


class BufferSpan:
    """Bytes held in memory (small embedded data, e.g. an ONNX initializer's raw_data)."""

    def __init__(self, data: bytes, path: str = ""):
        self._data = data
        self.size = len(data)
        self.path = path

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        return self._data[start:start + size]


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage of the file: the bytes one or more tensors view.

    ``key`` identifies it within its file; ``device`` is the location tag the
    file carries (``cpu``, ``cuda:1``); ``source`` reads its bytes lazily.
    """

    key: str
    dtype: str
    device: str
    nbytes: int
    source: Any = None
    file: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype, "device": self.device, "nbytes": self.nbytes}


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor's metadata and a lazy handle on its bytes.

    >>> t = TensorRef(shape=(2, 3), dtype="float32", stride=(3, 1))
    >>> t.numel, t.nbytes, t.is_contiguous
    (6, 24, True)
    """

    shape: Tuple[int, ...]
    dtype: str
    stride: Tuple[int, ...] = ()
    storage_offset: int = 0
    storage: Optional[StorageRef] = None
    device: str = "cpu"
    requires_grad: bool = False
    is_parameter: bool = False
    kind: str = "dense"          # dense | quantized | meta | string | packed | sparse_coo... | nested | subclass
    subclass: Optional[str] = None  # e.g. a tensor subclass "mypkg.MyTensor"
    explicit_nbytes: Optional[int] = None
    #: The element count torch gives (``numel()``) where ``shape`` cannot say it: a nested tensor, whose rows
    #: differ in length (``shape`` holds ``"j"`` for a ragged dim, as torch prints ``j1``).
    explicit_numel: Optional[int] = None
    #: torch.save's tensor metadata (``_rebuild_tensor_v2``'s last argument), as (key, value) pairs: the conj
    #: and neg bits of a view torch has not materialised. The bytes are the un-conjugated, un-negated values.
    metadata: Tuple[Tuple[str, Any], ...] = ()
    #: A tensor made of other tensors (sparse, nested, a wrapper subclass): its components by name.
    parts: Tuple[Tuple[str, "TensorRef"], ...] = ()
    #: The call torch.save wrote for this tensor, kept where ckpttool writes it back as it was (``Rebuild``).
    rebuild: Any = None

    @property
    def numel(self) -> int:
        if self.explicit_numel is not None:
            return self.explicit_numel
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype) or 1

    @property
    def nbytes(self) -> int:
        if self.explicit_nbytes is not None:
            return self.explicit_nbytes
        return self.numel * itemsize(self.dtype)

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True

    @property
    def has_data(self) -> bool:
        return self.storage is not None and self.storage.source is not None

    @property
    def bits(self) -> Tuple[str, ...]:
        """The view bits torch applies on load (``conj``, ``neg``): the values are not the bytes."""
        return tuple(k for k, v in self.metadata if v)

    @property
    def is_composite(self) -> bool:
        """Made of other tensors (``parts``), not one storage region."""
        return bool(self.parts)

    @property
    def form(self) -> str:
        """How torch holds it, in words: ``dense``, ``sparse_coo``, ``conj view``, ``subclass mypkg.T``..."""
        out = self.kind
        if self.kind == "value":
            v = getattr(self.rebuild, "value", None)
            return f"value torch.{v}" if type(v).__name__ == "TorchDtype" else f"value {v!r}"
        if self.kind == "jagged":  # torch.nested's own subclass: its long name says nothing more
            out = "jagged nested"
        elif self.kind == "quantized":
            out = _quantizer(self.rebuild)
        elif self.subclass in ("torch.Tensor", "torch.nn.parameter.Parameter") and self.kind == "dense":
            # torch's own class, saved with attributes of its own (_rebuild_from_type_v2's state)
            state = self.rebuild.args[3] if isinstance(self.rebuild, Rebuild) and len(self.rebuild.args) > 3 else None
            names = ", ".join(sorted(map(str, state)))[:80] if isinstance(state, dict) and state else "state"
            what = "tensor" if self.subclass == "torch.Tensor" else "parameter"
            out = f"{what} with attributes ({names})"
        elif self.subclass:
            out = f"subclass {self.subclass}" if self.kind in ("dense", "subclass") else f"{out} {self.subclass}"
        elif isinstance(self.rebuild, Rebuild) and self.rebuild.name == "_rebuild_parameter_with_state":
            state = self.rebuild.args[3] if len(self.rebuild.args) > 3 else None
            names = ", ".join(sorted(map(str, state)))[:80] if isinstance(state, dict) else "state"
            out = f"parameter with attributes ({names})" + ("" if out == "dense" else f" ({out})")
        if self.bits:
            out = " ".join(self.bits) + " view" + ("" if out == "dense" else f" ({out})")
        return out

    def span(self) -> Tuple[int, int]:
        """(first byte, byte length) of the storage region this tensor touches."""
        size = itemsize(self.dtype) or 1
        if self.numel == 0:
            return self.storage_offset * size, 0
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.storage_offset * size, (last - self.storage_offset + 1) * size

    def read_bytes(self) -> bytes:
        """The tensor's bytes in C order (gathered when the tensor is a strided view)."""
        if not self.has_data:
            raise FormatError(f"tensor has no data in the file (a {self.kind} tensor)", self.storage.file if self.storage else None)
        start, length = self.span()
        if self.is_contiguous or self.numel <= 1:
            return self.storage.source.read(start, self.nbytes)
        from .numbers import gather
        return gather(self.storage.source.read(start, length), self.shape, self.stride, itemsize(self.dtype))

    def iter_chunks(self, chunk_bytes: int = 1 << 26) -> Iterator[bytes]:
        """Yield the tensor's C-order bytes in bounded pieces (whole elements each)."""
        if not (self.is_contiguous or self.numel <= 1):
            yield self.read_bytes()
            return
        size = itemsize(self.dtype) or 1
        step = max(size, chunk_bytes - chunk_bytes % size)
        start, _ = self.span()
        total = self.nbytes
        for off in range(0, total, step):
            yield self.storage.source.read(start + off, min(step, total - off))

    def to_torch(self):
        """Materialize as a contiguous CPU torch tensor (imports torch): the values torch loads, a conj or neg
        view's bits applied (and resolved).

        A strided view is read as the storage region it spans and gathered by torch.
        """
        t = self._stored_torch()
        if self.metadata:
            bits = self.bits
            if "conj" in bits:
                t = t.conj().resolve_conj()
            if "neg" in bits:
                t = t.neg()
        return t

    def _stored_torch(self):
        from .torch_bridge import tensor_from_bytes, torch_dtype
        if self.is_contiguous or self.numel <= 1:
            source = self.storage.source if self.has_data else None
            if hasattr(source, "readinto") and self.nbytes:  # read straight into the tensor: one copy in memory
                import torch
                flat = torch.empty(self.nbytes, dtype=torch.uint8)
                source.readinto(self.span()[0], memoryview(flat.numpy()))
                return flat.view(torch_dtype(self.dtype)).reshape(self.shape)
            return tensor_from_bytes(self.read_bytes(), self.dtype, self.shape)
        if not self.has_data:
            return tensor_from_bytes(self.read_bytes(), self.dtype, self.shape)  # raises the no-data error
        start, length = self.span()
        flat = tensor_from_bytes(self.storage.source.read(start, length), self.dtype, (length // itemsize(self.dtype),))
        return flat.as_strided(self.shape, self.stride).contiguous()

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "shape": list(self.shape), "dtype": self.dtype, "device": self.device,
            "nbytes": self.nbytes, "stride": list(self.stride), "storage_offset": self.storage_offset,
            "requires_grad": self.requires_grad, "is_parameter": self.is_parameter,
        }
        if self.kind != "dense":
            d["kind"] = self.kind
        if self.subclass:
            d["subclass"] = self.subclass
        if self.bits:
            d["bits"] = list(self.bits)
        if self.parts:
            d["parts"] = {name: p.to_dict() for name, p in self.parts}
        return d


# Fast makers for the records readers make once per storage or tensor (20,000 of each in some files):
# a frozen dataclass's __init__ sets each field with object.__setattr__ (2 us for a TensorRef); these
# set them in the instance's __dict__, in field order, so that it stays a compact key-sharing dict
# (0.5 us). The instance is the same as the constructor's, every field set (tests/test_records.py holds
# them to that); none of these classes has a __post_init__.
_new = object.__new__


def new_storage_ref(key: str, dtype: str, device: str, nbytes: int, source: Any, file: str) -> StorageRef:
    """``StorageRef(key=key, dtype=dtype, ...)``, made faster."""
    ref = _new(StorageRef)
    d = ref.__dict__
    d["key"] = key
    d["dtype"] = dtype
    d["device"] = device
    d["nbytes"] = nbytes
    d["source"] = source
    d["file"] = file
    return ref


def new_tensor_ref(shape: Tuple[int, ...], dtype: str, stride: Tuple[int, ...], storage_offset: int,
                   storage: Optional[StorageRef], device: str, requires_grad: bool, kind: str) -> TensorRef:
    """``TensorRef(shape=shape, ...)`` with the other fields at their defaults, made faster."""
    t = _new(TensorRef)
    d = t.__dict__
    d["shape"] = shape
    d["dtype"] = dtype
    d["stride"] = stride
    d["storage_offset"] = storage_offset
    d["storage"] = storage
    d["device"] = device
    d["requires_grad"] = requires_grad
    d["is_parameter"] = False
    d["kind"] = kind
    d["subclass"] = None
    d["explicit_nbytes"] = None
    d["explicit_numel"] = None
    d["metadata"] = ()
    d["parts"] = ()
    d["rebuild"] = None
    return t


def _quantizer(rebuild) -> str:
    """``quantized per_tensor_affine scale=0.05 zero_point=3``, ``quantized per_channel_affine axis=0``."""
    params = rebuild.args[4] if isinstance(rebuild, Rebuild) and len(rebuild.args) > 4 else None
    if not isinstance(params, tuple) or not params:
        return "quantized"
    scheme = str(getattr(params[0], "stub_name", params[0]))
    if scheme == "per_tensor_affine" and len(params) == 3:
        return f"quantized {scheme} scale={params[1]:g} zero_point={params[2]}" \
            if isinstance(params[1], float) else f"quantized {scheme}"
    if scheme.startswith("per_channel") and len(params) == 4:
        return f"quantized {scheme} axis={params[3]}"
    return f"quantized {scheme}"


@dataclass(frozen=True, eq=False)
class Rebuild:
    """A call torch.save wrote to rebuild a tensor: ``module.name(*args)``, its arguments as the reader made
    them (TensorRefs, StorageRefs, stubs, plain values). A writer of torch's format writes it back as it was."""

    module: str
    name: str
    args: Tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class Value:
    """A state_dict entry that is not a tensor (a quantized Linear's ``dtype``, a conv's absent ``bias``): what
    torch's own ``state_dict()`` puts there, written back as it is."""

    value: Any


class Layout(str):
    """A torch layout a pickle names (``torch.sparse_coo``), kept as its name; how it was named (``spelling``:
    ``"get_layout"`` for ``torch.serialization._get_layout(name)``, ``"global"`` for a GLOBAL) is kept too."""

    spelling = "get_layout"


@dataclass(frozen=True)
class GlobalRef:
    """A class or function a pickle names, and what the safe reader made of it."""

    module: str
    name: str
    handling: str  # "tensor" (rebuilt as a TensorRef), "builtin" (safe value), "stub" (inert record)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a reader makes of a path: the entry tree and its metadata.

    ``root`` is the tree: dicts, lists, plain values, :class:`TensorRef` leaves
    and inert stubs for pickled objects. Tensor bytes stay in the file.
    """

    path: str
    format: str
    file_size: int
    root: Any
    metadata: Dict[str, Any] = field(default_factory=dict)
    globals: Tuple[GlobalRef, ...] = ()
    files: Tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorInfo:
    """One named tensor of a result: what inspect lists."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    stride: Tuple[int, ...] = ()
    storage_offset: int = 0
    storage: Optional[str] = None
    stats: Optional[Dict[str, Any]] = None
    #: How torch holds it when not a plain dense tensor (``TensorRef.form``), and its components, if any.
    form: str = "dense"
    parts: Tuple[Tuple[str, str, Tuple[int, ...], int], ...] = ()  # (name, dtype, shape, nbytes)
    explicit_numel: Optional[int] = None  # where shape cannot say it (``TensorRef.explicit_numel``)

    @property
    def numel(self) -> int:
        if self.explicit_numel is not None:
            return self.explicit_numel
        return math.prod(self.shape)

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "device": self.device,
             "nbytes": self.nbytes, "numel": self.numel, "stride": list(self.stride),
             "storage_offset": self.storage_offset, "storage": self.storage}
        if self.stats is not None:
            d["stats"] = self.stats
        if self.form != "dense":
            d["form"] = self.form
        if self.parts:
            d["parts"] = [{"name": n, "dtype": dt, "shape": list(sh), "nbytes": nb} for n, dt, sh, nb in self.parts]
        return d


def new_tensor_info(name: str, shape: Tuple[int, ...], dtype: str, device: str, nbytes: int,
                    stride: Tuple[int, ...], storage_offset: int, storage: Optional[str],
                    stats: Optional[Dict[str, Any]]) -> TensorInfo:
    """``TensorInfo(name=name, ...)``, made faster (see ``new_tensor_ref``)."""
    info = _new(TensorInfo)
    d = info.__dict__
    d["name"] = name
    d["shape"] = shape
    d["dtype"] = dtype
    d["device"] = device
    d["nbytes"] = nbytes
    d["stride"] = stride
    d["storage_offset"] = storage_offset
    d["storage"] = storage
    d["stats"] = stats
    d["form"] = "dense"
    d["parts"] = ()
    d["explicit_numel"] = None
    return info


@dataclass(frozen=True)
class InspectResult:
    """The result of ``inspect``: a checkpoint's summary and its tensors."""

    path: str
    format: str
    file_size: int
    entry: Optional[str]
    entry_source: str
    tensors: Tuple[TensorInfo, ...]
    total_params: int
    total_bytes: int
    bytes_by_dtype: Dict[str, int]
    devices: Dict[str, int]
    shared_storages: Tuple[Tuple[str, ...], ...]
    other_entries: Dict[str, str]
    pickled_classes: Tuple[str, ...]
    notes: Tuple[str, ...]
    metadata: Dict[str, Any]
    #: (module, tensors, values[, parameters, buffers]) with --depth; the last two where the file says which
    tree: Optional[Tuple[Tuple[Any, ...], ...]] = None
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    #: values in parameters and in buffers, where the file says which is which (a pickled module's _parameters
    #: and _buffers); None for a plain state_dict, which does not say
    parameters: Optional[int] = None
    buffers: Optional[int] = None

    def to_dict(self, tensors: bool = True) -> Dict[str, Any]:
        """The JSON object; ``tensors=False`` leaves the ``tensors`` list empty (its writer writes it apart)."""
        d = {
            "path": self.path, "format": self.format, "file_size": self.file_size,
            "entry": self.entry, "entry_source": self.entry_source,
            "tensors": [t.to_dict() for t in self.tensors] if tensors else [],
            "tensor_count": len(self.tensors),
            # total_params: the parameters where the file says which tensors are (a pickled module), else every
            # value (a state_dict does not say); total_values: every value, always
            "total_values": self.total_params,
            "total_params": self.parameters if self.parameters is not None else self.total_params,
            "parameters": self.parameters, "buffers": self.buffers, "total_bytes": self.total_bytes,
            "bytes_by_dtype": dict(self.bytes_by_dtype), "devices": dict(self.devices),
            "shared_storages": [list(g) for g in self.shared_storages],
            "other_entries": dict(self.other_entries),
            "pickled_classes": list(self.pickled_classes),
            "notes": list(self.notes), "metadata": _jsonable(self.metadata),
        }
        if self.tree is not None:
            d["tree"] = [dict(zip(("module", "tensors", "values", "parameters", "buffers"), row)) for row in self.tree]
        return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if dataclasses.is_dataclass(v):
        return _jsonable(dataclasses.asdict(v))
    return repr(v)


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor of A compares with its counterpart in B."""

    name: str                      # the name in A
    name_b: str                    # the name in B (differs under prefix alignment)
    shape_a: Tuple[int, ...]
    shape_b: Tuple[int, ...]
    dtype_a: str
    dtype_b: str
    status: str = ""               # exact | close | mismatch | not_compared ("" when values were not read)
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    mismatched: int = 0            # elements outside the tolerance
    numel: int = 0
    atol: Optional[float] = None
    rtol: Optional[float] = None
    note: str = ""
    form_a: str = ""               # how torch holds each side (``TensorRef.form``), set where they differ
    form_b: str = ""
    #: ||A - B||_2 / ||B||_2 over the values (float64 sums of squares): 0.0 when exact, inf where ||B|| is 0
    #: and A is not, nan where a NaN meets a number; None where values were not compared or not measurable
    rel_change: Optional[float] = None
    index: int = 0                 # the pair's position in A's file order (sorting; not in the JSON)

    _INTEGRAL = frozenset({"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"})

    @staticmethod
    def change_rank(v: Optional[float]) -> Tuple[int, float]:
        """Sort key part for a relative change, largest first: inf, then unknown (None / nan), then finite."""
        if v is None or v != v:
            return 1, 0.0
        if v == math.inf:
            return 0, 0.0
        return 2, -v

    @property
    def integral(self) -> bool:
        """Both sides integers or bools (step counters, indices): their relative change says little of a weight's."""
        return self.dtype_a in TensorDiff._INTEGRAL and self.dtype_b in TensorDiff._INTEGRAL

    @staticmethod
    def sort_key(sort: str):
        """The key that orders TensorDiffs for ``diff --sort``: ``change`` (floating tensors first, each group
        by relative change, largest first: inf, then unmeasured/nan, then finite; integer tensors after),
        ``name`` (A's name), ``size`` (most elements first) or ``file`` (A's order). Ties keep A's order.

        >>> ds = [TensorDiff("a", "a", (4,), (4,), "float32", "float32", rel_change=0.1, index=0),
        ...       TensorDiff("n", "n", (), (), "int64", "int64", rel_change=1.0, index=1),
        ...       TensorDiff("b", "b", (2,), (2,), "float32", "float32", rel_change=0.5, index=2)]
        >>> [d.name for d in sorted(ds, key=TensorDiff.sort_key("change"))]
        ['b', 'a', 'n']
        """
        if sort == "change":
            return lambda d: (d.integral,) + TensorDiff.change_rank(d.rel_change) + (d.index,)
        if sort == "name":
            return lambda d: (d.name, d.index)
        if sort == "size":
            return lambda d: (-math.prod(d.shape_a), d.index)
        if sort == "file":
            return lambda d: d.index
        raise ValueError(f"unknown sort order {sort!r}")

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name}
        if self.form_a or self.form_b:
            d.update(form_a=self.form_a, form_b=self.form_b)
        if self.name_b != self.name:
            d["name_b"] = self.name_b
        if self.shape_a != self.shape_b:
            d.update(shape_a=list(self.shape_a), shape_b=list(self.shape_b))
        else:
            d["shape"] = list(self.shape_a)
        if self.dtype_a != self.dtype_b:
            d.update(dtype_a=self.dtype_a, dtype_b=self.dtype_b)
        else:
            d["dtype"] = self.dtype_a
        if self.status:
            d["status"] = self.status
            d["rel_change"] = _num(self.rel_change)
        if self.status in ("close", "mismatch"):
            d.update(max_abs=_num(self.max_abs), max_rel=_num(self.max_rel), mismatched=self.mismatched,
                     numel=self.numel, atol=self.atol, rtol=self.rtol)
        if self.note:
            d["note"] = self.note
        return d


def _num(v: Optional[float]) -> Any:
    # JSON has no inf/nan: spell them as strings.
    if v is None or math.isfinite(v):
        return v
    return str(v)


@dataclass(frozen=True)
class DiffResult:
    """The result of ``diff``: how two state_dicts differ in keys, shapes, dtypes and values."""

    path_a: str
    path_b: str
    format_a: str
    format_b: str
    entry_a: Optional[str]
    entry_b: Optional[str]
    count_a: int
    count_b: int
    only_in_a: Tuple[str, ...]
    only_in_b: Tuple[str, ...]
    shape_mismatch: Tuple[TensorDiff, ...]
    dtype_mismatch: Tuple[TensorDiff, ...]
    value_mismatch: Tuple[TensorDiff, ...]
    value_close: Tuple[TensorDiff, ...]
    exact: int
    not_compared: Tuple[TensorDiff, ...]
    values_compared: bool
    atol: Optional[float]
    rtol: Optional[float]
    prefix_alignment: Any          # align.Alignment
    equal: bool
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    #: pairs torch holds differently (a Parameter with attributes vs a plain tensor, sparse vs dense, a conj
    #: view vs resolved values): a difference even where the values are equal
    form_mismatch: Tuple[TensorDiff, ...] = ()
    common: int = -1               # pairs compared (after --filter); -1: count_a - len(only_in_a)
    filter: Optional[str] = None   # --filter REGEX: every list, count and the verdict cover the matching names only
    #: with a filter: (pairs, only in A, only in B) before it
    filter_totals: Optional[Tuple[int, int, int]] = None
    sort: str = "file"             # the order of every list: change | name | size | file
    depth: Optional[int] = None    # --depth N: names folded N levels into ``modules``
    #: (module, tensors, changed, max relative change, elements): tensors counts names in A or B (B-only ones
    #: as A would spell them); changed those not exact (values, shape, dtype or form differ, or in one file only);
    #: the change is the floating tensors' largest, the integer ones' (step counters) where no floating one changed
    modules: Optional[Tuple[Tuple[str, int, int, Optional[float], int], ...]] = None
    #: where a side held several state_dicts: which was taken and why (``A: took state_dict_ema of ...``)
    notes: Tuple[str, ...] = ()

    @property
    def pairs(self) -> int:
        return self.common if self.common >= 0 else self.count_a - len(self.only_in_a)

    def to_dict(self) -> Dict[str, Any]:
        d = self._to_dict()
        d["notes"] = list(self.notes)
        d["sort"] = self.sort
        d["filter"] = None if self.filter is None else {
            "regex": self.filter, "pairs": self.pairs, "pairs_total": self.filter_totals[0],
            "only_in_a": len(self.only_in_a), "only_in_a_total": self.filter_totals[1],
            "only_in_b": len(self.only_in_b), "only_in_b_total": self.filter_totals[2]}
        if self.modules is not None:
            d["depth"] = self.depth
            d["modules"] = [{"module": m, "tensors": n, "changed": c, "max_rel_change": _num(v), "numel": e}
                            for m, n, c, v, e in self.modules]
        return d

    def _to_dict(self) -> Dict[str, Any]:
        return {
            "equal": self.equal,
            "a": {"path": self.path_a, "format": self.format_a, "entry": self.entry_a, "tensors": self.count_a},
            "b": {"path": self.path_b, "format": self.format_b, "entry": self.entry_b, "tensors": self.count_b},
            "prefix_alignment": self.prefix_alignment.to_dict(),
            "only_in_a": list(self.only_in_a), "only_in_b": list(self.only_in_b),
            "shape_mismatch": [d.to_dict() for d in self.shape_mismatch],
            "dtype_mismatch": [d.to_dict() for d in self.dtype_mismatch],
            "form_mismatch": [d.to_dict() for d in self.form_mismatch],
            "value_mismatch": [d.to_dict() for d in self.value_mismatch],
            "value_close": [d.to_dict() for d in self.value_close],
            "not_compared": [d.to_dict() for d in self.not_compared],
            "values_compared": self.values_compared, "exact_equal": self.exact,
            "atol": self.atol, "rtol": self.rtol,
        }


@dataclass(frozen=True)
class KeptTensor:
    """A source tensor that fits the target: its target name, shape and dtype."""

    name: str
    source_name: str
    shape: Tuple[int, ...]
    dtype: str
    source_dtype: str

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.source_name != self.name:
            d["source_name"] = self.source_name
        if self.source_dtype != self.dtype:
            d["cast_from"] = self.source_dtype
        return d


@dataclass(frozen=True)
class ShapeDrop:
    """A source tensor whose name the target has, with another shape."""

    source_name: str
    name: str
    source_shape: Tuple[int, ...]
    target_shape: Tuple[int, ...]

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "source_shape": list(self.source_shape),
                             "target_shape": list(self.target_shape)}
        if self.source_name != self.name:
            d["source_name"] = self.source_name
        return d


@dataclass(frozen=True)
class FilterResult:
    """The result of ``filter`` / ``load_into``: what of the source fits the target, and why not the rest."""

    source: str
    source_format: str
    source_entry: Optional[str]
    target: str
    kept: Tuple[KeptTensor, ...]
    dropped_unexpected: Tuple[str, ...]            # source names the target has no key for
    dropped_shape_mismatch: Tuple[ShapeDrop, ...]
    missing: Tuple[str, ...]                       # target names the output does not provide
    prefix_alignment: Any                          # align.Alignment
    renames: Tuple[str, ...] = ()
    output: Optional[str] = None
    output_format: Optional[str] = None
    verified: Optional[Dict[str, Any]] = None
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    filled: Tuple[str, ...] = ()    # --complete: missing target keys written from filled_from
    filled_from: str = ""

    @property
    def cast(self) -> Tuple[KeptTensor, ...]:
        return tuple(k for k in self.kept if k.dtype != k.source_dtype)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": {"path": self.source, "format": self.source_format, "entry": self.source_entry},
            "target": self.target,
            "prefix_alignment": self.prefix_alignment.to_dict(), "renames": list(self.renames),
            "kept": [k.to_dict() for k in self.kept],
            "dropped_unexpected": list(self.dropped_unexpected),
            "dropped_shape_mismatch": [d.to_dict() for d in self.dropped_shape_mismatch],
            "missing": list(self.missing),
            "cast": [{"name": k.name, "from": k.source_dtype, "to": k.dtype} for k in self.cast],
            "output": self.output, "output_format": self.output_format, "verified": self.verified,
            "filled": list(self.filled), "filled_from": self.filled_from or None,
        }


@dataclass(frozen=True)
class ConvertResult:
    """The result of ``convert``: what was written where, and how it was checked."""

    source: str
    source_format: str
    entry: Optional[str]
    entry_source: str
    output: str
    format: str                      # torch_zip | safetensors | onnx
    tensors: int                     # tensors written
    files: Tuple[str, ...] = ()
    tied: Tuple[Tuple[str, str], ...] = ()   # (name not stored, the stored twin) for safetensors
    cast_to: Optional[str] = None
    bytes_written: int = 0
    checked: Optional[Dict[str, Any]] = None
    details: Optional[Dict[str, Any]] = None  # e.g. ONNX export: opset, inputs, max difference
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    densified: Tuple[Tuple[str, str], ...] = ()  # --dense: (name, "sparse_coo -> densified float32")
    #: how names were changed: ("prefix", "module."), ("rule", "REGEX=REPL")..., ("renamed", "N of M")
    renamed: Tuple[Tuple[str, str], ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        d = {"output": self.output, "format": self.format, "tensors": self.tensors,
             "source": {"path": self.source, "format": self.source_format, "entry": self.entry,
                        "entry_source": self.entry_source},
             "files": list(self.files), "tied": {a: b for a, b in self.tied}, "cast_to": self.cast_to,
             "bytes_written": self.bytes_written, "checked": self.checked}
        if self.densified:
            d["densified"] = {a: b for a, b in self.densified}
        if self.renamed:
            d["names"] = {"prefix_stripped": dict(self.renamed).get("prefix", ""),
                          "rules": [v for k, v in self.renamed if k == "rule"],
                          "renamed": dict(self.renamed).get("renamed", "")}
        if self.details is not None:
            d["details"] = _jsonable(self.details)
        return d


@dataclass(frozen=True)
class RemapResult:
    """The result of ``remap``: which location tags were rewritten, and the check of the output."""

    source: str
    output: str
    format: str
    storages: int                    # storage records whose tag was looked at
    tensors: int
    mapped: Dict[str, int]           # "cuda:1 -> cuda:0": storages
    unchanged: Dict[str, int]        # tags no rule matched: storages
    checked: Optional[Dict[str, Any]] = None
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    copied: Tuple[str, ...] = ()     # a shard folder's other files (config.json...), copied as they are

    def to_dict(self) -> Dict[str, Any]:
        d = {"output": self.output, "format": self.format, "tensors": self.tensors, "storages": self.storages,
             "source": self.source, "mapped": dict(self.mapped), "unchanged": dict(self.unchanged),
             "checked": self.checked}
        if self.copied:
            d["copied"] = list(self.copied)
        return d


@dataclass(frozen=True)
class CheckResult:
    """One check of ``verify``: pass, fail or skip, with the reason and the first culprit."""

    name: str
    device: Optional[str]
    status: str                     # pass | fail | skip
    detail: str
    culprit: Optional[str] = None   # the first failing tensor or output
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "device": self.device, "status": self.status, "detail": self.detail}
        if self.culprit is not None:
            d["culprit"] = self.culprit
        if self.max_abs is not None:
            d.update(max_abs=_num(self.max_abs), max_rel=_num(self.max_rel))
        return d


@dataclass(frozen=True)
class VerifyReport:
    """The result of ``verify``: the environment, and every check that applied."""

    path: str
    format: str
    entry: Optional[str]
    environment: Dict[str, Any]
    devices: Tuple[str, ...]
    checks: Tuple[CheckResult, ...]
    ok: bool
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()

    @property
    def first_failure(self) -> Optional[CheckResult]:
        return next((c for c in self.checks if c.status == "fail"), None)

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "format": self.format, "entry": self.entry,
                "environment": _jsonable(self.environment), "devices": list(self.devices),
                "checks": [c.to_dict() for c in self.checks]}


@dataclass(frozen=True)
class ScanGlobal:
    """A global a pickle names: how the pickle uses it and what that makes it."""

    name: str
    verdict: str                     # safe | needs code | dangerous
    uses: Tuple[str, ...]            # referenced, instantiated, called...
    where: Tuple[str, ...]           # which pickles (data.pkl, main pickle, .metadata > bytes at 120...)
    note: str = ""                   # what a deny-listed global does

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "verdict": self.verdict, "uses": list(self.uses),
                             "where": list(self.where)}
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class ScanFile:
    """What ``scan`` found in one path (a file, or a DCP folder); ``error``: why it could not be read."""

    path: str
    pickles: int
    globals: Tuple[ScanGlobal, ...]
    format: str = ""
    advice: Optional[str] = None     # the add_safe_globals line torch.load(weights_only=True) needs
    problems: Tuple[str, ...] = ()   # where a pickle stopped, what was ambiguous
    weights_only: Optional[bool] = None  # torch.load(weights_only=True) reads it as it is (None: not torch.load's)
    error: Optional[str] = None      # one line: why it is unreadable (then nothing else was found)

    @property
    def dangerous_names(self) -> Tuple[str, ...]:
        return tuple(g.name for g in self.globals if g.verdict == "dangerous")

    @property
    def needs_code(self) -> Tuple[str, ...]:
        return tuple(g.name for g in self.globals if g.verdict == "needs code")

    @property
    def verdict(self) -> str:
        """``dangerous`` | ``unreadable`` | ``needs code`` | ``safe`` (what ran before a read failed counts)."""
        if self.dangerous_names:
            return "dangerous"
        if self.error is not None:
            return "unreadable"
        return "needs code" if self.needs_code else "safe"

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "format": self.format, "verdict": self.verdict, "error": self.error,
                "pickles": self.pickles, "dangerous": list(self.dangerous_names),
                "needs_code": list(self.needs_code), "globals": [g.name for g in self.globals],
                "details": [g.to_dict() for g in self.globals], "add_safe_globals": self.advice,
                "weights_only_loads": self.weights_only, "problems": list(self.problems)}


@dataclass(frozen=True)
class ScanResult:
    """The result of ``scan``: one entry per file; exit 1 when any is dangerous, else 2 when any is unreadable."""

    files: Tuple[ScanFile, ...]
    dangerous: bool
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    skipped: Tuple[Tuple[str, str], ...] = ()  # (path, why): files of scanned folders that were not scanned

    @property
    def unreadable(self) -> Tuple[ScanFile, ...]:
        return tuple(f for f in self.files if f.verdict == "unreadable")

    def counts(self) -> Dict[str, int]:
        """How many files of each verdict, and in all."""
        out = {"files": len(self.files), "dangerous": 0, "unreadable": 0, "needs_code": 0, "safe": 0}
        for f in self.files:
            out[f.verdict.replace(" ", "_")] += 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"dangerous": self.dangerous, "counts": self.counts(), "files": [f.to_dict() for f in self.files],
                "skipped": [{"path": p, "reason": why} for p, why in self.skipped]}


def exit_code(result: Any) -> int:
    """The exit code a command's result means, for every command in one place: 1 when a check found
    something (the files differ, verify failed, a file is dangerous), 2 when a file to scan could not be
    read (and none was dangerous), else 0. Errors (a ``CkptError``) carry their own: 2 for bad input, 1 for a
    check that failed while writing (``CheckFailedError``)."""
    if isinstance(result, DiffResult):
        return 0 if result.equal else 1
    if isinstance(result, VerifyReport):
        return 0 if result.ok else 1
    if isinstance(result, ScanResult):
        return 1 if result.dangerous else 2 if result.unreadable else 0
    return 0
