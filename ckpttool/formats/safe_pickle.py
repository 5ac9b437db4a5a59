"""A restricted unpickler that imports and calls nothing a file names.

``find_class`` never imports: torch's tensor-rebuild functions and storage
classes are replaced by functions that build :class:`TensorRef` records; a
short list of harmless builtins (``collections.OrderedDict``, ``set``...) is
served by our own safe equivalents; every other global becomes an inert
:class:`Stub` class that records its module and name, the arguments it was
called with and the state it was given. So a pickled full model shows its
module tree and state_dict without its code, and a malicious pickle runs
nothing: the only callables it can reach are the ones defined here.
"""
from __future__ import annotations

import codecs
import dataclasses
import collections
import io
import pickle
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..dtypes import STORAGE_CLASS_DTYPE, itemsize
from ..errors import FormatError
from ..records import GlobalRef, StorageRef, TensorRef


class Stub:
    """An inert stand-in for an object of a class the reader will not import.

    Records what the pickle did with it: ``args`` (constructor or call
    arguments), ``state`` (what BUILD/``__setstate__`` gave), ``items`` and
    ``list_items`` (SETITEMS / APPENDS). Its class carries ``stub_module``
    and ``stub_name``.
    """

    stub_module = ""
    stub_name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        d = obj.__dict__
        d["args"] = args
        d["kwargs"] = kwargs
        d["state"] = None
        d["items"] = {}
        d["list_items"] = []
        d["called"] = False
        return obj

    def __init__(self, *args, **kwargs):
        # Only reached through REDUCE (a call), not NEWOBJ (a bare __new__).
        self.__dict__["called"] = True

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.__dict__["items"][key] = value

    def append(self, value):
        self.__dict__["list_items"].append(value)

    def extend(self, values):
        self.__dict__["list_items"].extend(values)

    @property
    def qualname(self) -> str:
        return f"{type(self).stub_module}.{type(self).stub_name}"

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class TorchDtype(str):
    """A torch dtype named by a pickle (``torch.float32``), kept as its name."""


class _StorageType:
    """A storage class named by a pickle (``torch.FloatStorage``)."""

    def __init__(self, name: str, dtype: str, cuda: bool = False):
        self.name, self.dtype, self.cuda = name, dtype, cuda

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}


def _check_dims(values, what: str) -> Tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise FormatError(f"tensor {what} is not a tuple of non-negative ints: {values!r:.80}")
    return tuple(values)


def _make_tensor(storage, storage_offset, size, stride, requires_grad=False, dtype: Optional[str] = None,
                 kind: str = "dense") -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(f"tensor rebuilt from something that is not a storage: {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise FormatError(f"tensor storage offset is not a non-negative int: {storage_offset!r:.40}")
    shape = _check_dims(size, "size")
    strides = _check_dims(stride, "stride")
    if len(shape) != len(strides):
        raise FormatError(f"tensor has {len(shape)} sizes but {len(strides)} strides")
    dtype = dtype or storage.dtype
    size_of = itemsize(dtype) or 1
    numel = 1
    for n in shape:
        numel *= n
    if numel:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if (last + 1) * size_of > storage.nbytes:
            raise FormatError(
                f"tensor of shape {list(shape)} at offset {storage_offset} reaches element {last}, "
                f"past the end of its {storage.nbytes}-byte storage {storage.key!r}")
    return TensorRef(shape=shape, dtype=dtype, stride=strides, storage_offset=storage_offset,
                     storage=storage, device=storage.device, requires_grad=bool(requires_grad), kind=kind)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _make_tensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"tensor dtype is not a torch dtype: {dtype!r:.40}")
    return _make_tensor(storage, storage_offset, size, stride, requires_grad, dtype=str(dtype))


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad=False,
                     backward_hooks=None):
    return _make_tensor(storage, storage_offset, size, stride, requires_grad, kind="quantized")


def _rebuild_meta(dtype, size, stride, requires_grad=False):
    return TensorRef(shape=_check_dims(size, "size"), dtype=str(dtype), stride=_check_dims(stride, "stride"),
                     device="meta", requires_grad=bool(requires_grad), kind="meta")


def _as_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise FormatError(f"parameter rebuilt from something that is not a tensor: {type(data).__name__}")
    return dataclasses.replace(data, requires_grad=bool(requires_grad), is_parameter=True)


def _rebuild_from_type(func, new_type, args, state=None):
    # torch._tensor._rebuild_from_type_v2: a tensor subclass (or Parameter) around a rebuilt tensor.
    if not callable(func) or not isinstance(args, tuple):
        raise FormatError("malformed tensor subclass record")
    t = func(*args)
    if not isinstance(t, TensorRef):
        return t
    if isinstance(new_type, type) and issubclass(new_type, Stub):
        name = f"{new_type.stub_module}.{new_type.stub_name}"
        if name == "torch.nn.parameter.Parameter":
            return dataclasses.replace(t, is_parameter=True)
        if name != "torch.Tensor":
            return dataclasses.replace(t, subclass=name)
    return t


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # How protocol-2 pickles spell a bytes object; only latin-1 is legitimate here.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise FormatError("pickle asks _codecs.encode for something other than latin-1 text")
    return codecs.encode(text, "latin1")


def _reconstructor(cls, base, state):
    # copyreg._reconstructor for protocol < 2 objects: only ever builds a stub.
    if isinstance(cls, type) and issubclass(cls, Stub):
        obj = cls.__new__(cls)
        obj.__dict__["args"] = (state,) if state is not None else ()
        return obj
    raise FormatError("pickle reconstructs an object of a class that is not a stub")


def _no_int(ctor):
    # bytes(10**10) would allocate 10 GB: only build from existing data, never from a count.
    def build(source=b"", *args):
        if isinstance(source, int):
            raise FormatError(f"pickle asks {ctor.__name__}() for a size instead of data")
        return ctor(source, *args)
    build.__name__ = ctor.__name__
    return build


class NumpyDtype:
    """``numpy.dtype(code, align, copy)`` as a record; numpy is never imported."""

    def __init__(self, code="", align=False, copy=False):
        if not isinstance(code, str):
            raise FormatError("numpy.dtype with a non-string type code")
        self.code, self.byteorder = code, "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = ">" if state[1] == ">" else "<"

    def __repr__(self) -> str:
        return f"numpy.dtype({self.code!r})"


_NUMPY_STRUCT = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
                 "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?"}


class NumpyScalar:
    """A numpy scalar of a type not decoded here (kept as its dtype code and raw bytes)."""

    def __init__(self, dtype: NumpyDtype, data: bytes):
        self.dtype, self.data = dtype, data

    def __repr__(self) -> str:
        return f"numpy scalar {self.dtype.code} ({len(self.data)} bytes)"


def _numpy_scalar(dtype, data=b""):
    # numpy.core.multiarray.scalar(dtype, raw bytes): decoded with struct to a Python number.
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, (bytes, bytearray, str)):
        raise FormatError("malformed numpy scalar record")
    if isinstance(data, str):
        data = data.encode("latin1")
    fmt = _NUMPY_STRUCT.get(dtype.code)
    if fmt is None or struct.calcsize(fmt) != len(data):
        return NumpyScalar(dtype, bytes(data))
    return struct.unpack(dtype.byteorder + fmt, data)[0]


def _torch_size(dims=()):
    return tuple(_check_dims(list(dims), "size"))


def _torch_device(kind, index=None):
    if not isinstance(kind, str):
        raise FormatError("torch.device with a non-string type")
    return f"{kind}:{index}" if index is not None and ":" not in kind else kind


_SAFE_BUILTINS: Dict[Tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _no_int(bytearray), ("builtins", "complex"): complex,
    ("builtins", "slice"): slice, ("builtins", "bytes"): _no_int(bytes),
    ("builtins", "tuple"): tuple, ("builtins", "list"): list, ("builtins", "dict"): dict,
    ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("torch", "Size"): _torch_size, ("torch", "device"): _torch_device,
    ("numpy", "dtype"): NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar, ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}

_TENSOR_FUNCS: Dict[Tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
    ("torch._utils", "_rebuild_parameter"): _as_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _as_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
}

PersistentLoad = Callable[[Any], Any]


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are ours and whose persistent ids go to a reader.

    ``persistent_load`` is the format's function from a persistent id (a
    ``('storage', type, key, location, numel)`` tuple, already with its
    storage type resolved) to a :class:`StorageRef`.
    """

    def __init__(self, file, persistent_load: Optional[PersistentLoad] = None):
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent_load
        self.globals: Dict[Tuple[str, str], GlobalRef] = {}
        self._stub_classes: Dict[Tuple[str, str], type] = {}

    def _note(self, module: str, name: str, handling: str) -> None:
        self.globals.setdefault((module, name), GlobalRef(module, name, handling))

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if not isinstance(module, str) or not isinstance(name, str):
            raise FormatError("pickle names a global that is not a string")
        if module == "__builtin__":
            module = "builtins"
        key = (module, name)
        if key in _TENSOR_FUNCS:
            self._note(module, name, "tensor")
            return _TENSOR_FUNCS[key]
        if key in _SAFE_BUILTINS:
            self._note(module, name, "builtin")
            return _SAFE_BUILTINS[key]
        if module in ("torch", "torch.storage", "torch.cuda") and name in STORAGE_CLASS_DTYPE:
            self._note(module, name, "tensor")
            return _StorageType(name, STORAGE_CLASS_DTYPE[name], cuda=module == "torch.cuda")
        if module == "torch" and (name in _DTYPE_NAMES or name in _DTYPE_ALIASES):
            self._note(module, name, "builtin")
            return TorchDtype(_DTYPE_ALIASES.get(name, name))
        self._note(module, name, "stub")
        cls = self._stub_classes.get(key)
        if cls is None:
            cls = type("Stub", (Stub,), {"stub_module": module, "stub_name": name, "__slots__": ()})
            self._stub_classes[key] = cls
        return cls

    def persistent_load(self, pid):  # noqa: D102 - pickle's hook
        if self._persistent is None:
            raise FormatError("pickle refers to external data (a persistent id) where none is allowed")
        return self._persistent(pid)


def parse_storage_pid(pid) -> Tuple[_StorageType, str, str, int, Any]:
    """Check a ``('storage', type, key, location, numel[, view])`` id; return its parts."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
        raise FormatError(f"unknown persistent id {kind!r:.40} in pickle")
    _, stype, key, location, numel = pid[:5]
    if not isinstance(stype, _StorageType):
        raise FormatError(f"storage of unknown type {stype!r:.60}")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
        raise FormatError(f"malformed storage record {pid!r:.100}")
    if stype.cuda and not location.startswith("cuda"):
        location = "cuda"
    return stype, key, location, numel, (pid[5] if len(pid) > 5 else None)


def storage_nbytes(stype: _StorageType, numel: int) -> int:
    """Bytes of a storage: UntypedStorage counts bytes, typed ones count elements."""
    return numel if stype.name == "UntypedStorage" else numel * itemsize(stype.dtype)


def safe_load(data: bytes, persistent_load: Optional[PersistentLoad] = None, path: Optional[str] = None):
    """Unpickle ``data`` without importing or running anything it names.

    Returns ``(obj, globals)``. Every failure, whatever the bytes, is a FormatError.

    >>> safe_load(pickle.dumps({"epoch": 3}))[0]
    {'epoch': 3}
    """
    return load_stream(io.BytesIO(data), persistent_load, path)


def load_stream(f, persistent_load: Optional[PersistentLoad] = None, path: Optional[str] = None):
    """Like :func:`safe_load` on an open binary file positioned at a pickle; leaves it after the pickle."""
    up = SafeUnpickler(f, persistent_load)
    try:
        obj = up.load()
    except FormatError as e:
        raise FormatError(f"malformed pickle: {e.message}", path) from None
    except RecursionError:
        raise FormatError("malformed pickle: nested too deeply", path) from None
    except MemoryError:
        raise FormatError("malformed pickle: asks for more memory than it can hold", path) from None
    except Exception as e:  # pickle raises a zoo of types on bad bytes
        raise FormatError(f"malformed pickle: {type(e).__name__}: {e}"[:200], path) from None
    return obj, tuple(up.globals.values())
