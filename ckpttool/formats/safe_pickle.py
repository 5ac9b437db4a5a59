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
import collections
import contextlib
import copyreg
import dataclasses
import gc
import io
import os
import pickle
import re
import struct
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from ..dtypes import ITEMSIZE as _ITEMSIZE, STORAGE_CLASS_DTYPE, itemsize
from ..errors import FormatError
from ..records import GlobalRef, StorageRef, TensorRef, new_tensor_ref
from ..text import safe_repr


class Stub:
    """An inert stand-in for an object of a class the reader will not import.

    Records what the pickle did with it: ``args`` (constructor or call
    arguments), ``state`` (what BUILD/``__setstate__`` gave), ``items`` and
    ``list_items`` (SETITEMS / APPENDS). Its class carries ``stub_module``
    and ``stub_name``.
    """

    stub_module = ""
    stub_name = ""
    _bounded_repr = True

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

    _bounded_repr = True

    def __init__(self, name: str, dtype: str, cuda: bool = False):
        self.name, self.dtype, self.cuda = name, dtype, cuda
        # bytes per counted element: UntypedStorage counts bytes, typed ones count elements
        self.unit = 1 if name == "UntypedStorage" else itemsize(dtype)

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


def _naturals(values) -> bool:
    """Every value an int >= 0."""
    for v in values:
        if type(v) is not int or v < 0:
            return False
    return True


def _check_dims(values, what: str) -> Tuple[int, ...]:
    if isinstance(values, (tuple, list)) and _naturals(values):
        return tuple(values)
    raise FormatError(f"tensor {what} is not a tuple of non-negative ints: {safe_repr(values, 80)}")


def _make_tensor(storage, storage_offset, size, stride, requires_grad=False, dtype: Optional[str] = None,
                 kind: str = "dense") -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(f"tensor rebuilt from something that is not a storage: {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise FormatError(f"tensor storage offset is not a non-negative int: {safe_repr(storage_offset, 40)}")
    shape, strides = size, stride
    if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) \
            or not _naturals(size + stride):  # not torch's own tuples: the checks in full, with their errors
        shape = _check_dims(size, "size")
        strides = _check_dims(stride, "stride")
        if len(shape) != len(strides):
            raise FormatError(f"tensor has {len(shape)} sizes but {len(strides)} strides")
    numel = 1
    last = storage_offset
    for n, st in zip(shape, strides):
        numel *= n
        last += (n - 1) * st
    dtype = dtype or storage.dtype
    size_of = _ITEMSIZE.get(dtype, 0) or 1  # itemsize(dtype)
    if numel:
        if (last + 1) * size_of > storage.nbytes:
            raise FormatError(
                f"tensor of shape {list(shape)} at offset {storage_offset} reaches element {last}, "
                f"past the end of its {storage.nbytes}-byte storage {storage.key!r}")
    return new_tensor_ref(shape, dtype, strides, storage_offset, storage, storage.device, bool(requires_grad), kind)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _make_tensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"tensor dtype is not a torch dtype: {safe_repr(dtype, 40)}")
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

    _bounded_repr = True

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

    _bounded_repr = True

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


_P = (1 << 61) - 1  # ints below this hash to themselves: no engineered collisions
_FREE_KEY_TYPES = frozenset({str, bytes, bool, type(None), TorchDtype})
MAX_HARD_KEYS = 4096   # dict keys / set members whose hash a file can aim (floats, big ints, int tuples...)
MAX_KEY_NODES = 16     # elements in one tuple / frozenset key
MAX_KEY_BITS = 256     # an int key hashes in time proportional to its size
_CODECS = {"utf-8": "utf-8", "utf8": "utf-8", "latin-1": "latin-1", "latin1": "latin-1", "iso-8859-1": "latin-1",
           "ascii": "ascii", "us-ascii": "ascii"}
_ERROR_HANDLERS = {"strict", "replace", "ignore", "surrogateescape", "surrogatepass", "backslashreplace"}
_NEWOBJ_TYPES = (set, frozenset, dict, list, tuple, int, float, str, bool, complex, object, collections.OrderedDict)


def _codec(encoding, errors="strict") -> Tuple[str, str]:
    # Looking a codec up by name imports ``encodings.<name>``: only three names are served.
    enc = _CODECS.get(encoding.lower() if isinstance(encoding, str) else None)
    if enc is None or errors not in _ERROR_HANDLERS:
        raise FormatError("pickle asks for a text codec other than utf-8, latin-1 or ascii")
    return enc, errors


def _str(obj="", encoding=None, errors="strict"):
    if encoding is not None:
        if not isinstance(obj, (bytes, bytearray)):
            raise FormatError("pickle decodes something that is not bytes")
        return str(obj, *_codec(encoding, errors))
    if type(obj) not in (str, int, float, bool, type(None)):
        raise FormatError(f"pickle converts a {type(obj).__name__} to text")  # repr() of shared structure explodes
    return str(obj)


def _encoded(ctor):
    plain = _no_int(ctor)

    def build(source=b"", encoding=None, errors="strict"):
        if encoding is not None:
            if not isinstance(source, str):
                raise FormatError(f"pickle encodes something that is not text into {ctor.__name__}")
            return ctor(source, *_codec(encoding, errors))
        return plain(source)
    build.__name__ = ctor.__name__
    return build


_SAFE_BUILTINS: Dict[Tuple[str, str], Callable] = {
    ("builtins", "bytearray"): _encoded(bytearray), ("builtins", "complex"): complex,
    ("builtins", "slice"): slice, ("builtins", "bytes"): _encoded(bytes),
    ("builtins", "tuple"): tuple, ("builtins", "list"): list,
    ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "str"): _str,
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


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with our globals, our persistent ids, and bounded work.

    Built on ``pickle._Unpickler`` rather than the C one because the C one
    cannot be bounded: a 4-byte memo index makes it allocate and zero up to
    32 GB, and it builds dicts and sets (hashing whatever keys a file
    chooses) with no hook. Here the memo is a dict with checked indexes,
    every opcode that reads a declared length checks it against the input's
    size, BUILD only fills objects the reader made for the file, and keys
    whose hash a file can aim (floats, big ints, tuples of ints...) are
    counted and capped so no dict build goes quadratic.

    ``persistent_load`` is the format's function from a persistent id (a
    ``('storage', type, key, location, numel)`` tuple, already with its
    storage type resolved) to a :class:`StorageRef`.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    fast_records = True  # load_in_memory runs torch.save's tensor records whole (tests compare it with False)

    def __init__(self, file, persistent_load: Optional[PersistentLoad] = None, size: Optional[int] = None):
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent_load
        self._size = _input_size(file) if size is None else size
        self._hard_keys = 0
        self.globals: Dict[Tuple[str, str], GlobalRef] = {}
        self._stub_classes: Dict[Tuple[str, str], type] = {}
        self._served = {
            ("builtins", "set"): self._set, ("builtins", "frozenset"): self._frozenset,
            ("builtins", "dict"): self._dict, ("collections", "OrderedDict"): self._ordered_dict,
        }

    # -- globals and persistent ids --------------------------------------------------------
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
        if key in self._served:
            self._note(module, name, "builtin")
            return self._served[key]
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

    # -- keys: bounded hashing -------------------------------------------------------------
    def _key(self, k) -> None:
        """Refuse a dict key / set member whose hashing a file could make slow."""
        t = type(k)
        if t in _FREE_KEY_TYPES or t.__hash__ is object.__hash__ or (t is int and -_P < k < _P):
            return
        if t not in (int, float, tuple, frozenset, complex):
            raise FormatError(f"pickle uses a {t.__name__} as a dict key or set member")
        if t is int and k.bit_length() > MAX_KEY_BITS:  # hashing a big int costs its size, every time
            raise FormatError(f"pickle uses an int of {k.bit_length()} bits as a dict key or set member")
        if t in (tuple, frozenset):
            todo, nodes = [k], 0
            while todo:
                for item in todo.pop():
                    nodes += 1
                    if nodes > MAX_KEY_NODES:
                        raise FormatError(f"pickle uses a {t.__name__} of more than {MAX_KEY_NODES} items as a key")
                    it = type(item)
                    if it is int and item.bit_length() > MAX_KEY_BITS:
                        raise FormatError(f"pickle uses a {t.__name__} holding a {item.bit_length()}-bit int as a key")
                    if it in (tuple, frozenset):
                        todo.append(item)
                    elif not (it in _FREE_KEY_TYPES or it in (int, float, complex) or it.__hash__ is object.__hash__):
                        raise FormatError(f"pickle uses a {t.__name__} holding a {it.__name__} as a key")
        self._hard_keys += 1
        if self._hard_keys > MAX_HARD_KEYS:
            raise FormatError(f"pickle has more than {MAX_HARD_KEYS} dict keys or set members that are not "
                              "strings or small ints")

    def _keys(self, items) -> None:
        if type(items) is list and set(map(type, items)) <= _FREE_KEY_TYPES:  # a state_dict's names: one C pass
            return
        key = self._key
        for k in items:
            key(k)

    def _set(self, items=()):
        items = list(items)
        self._keys(items)
        return set(items)

    def _frozenset(self, items=()):
        items = list(items)
        self._keys(items)
        return frozenset(items)

    def _pairs(self, source) -> list:
        if isinstance(source, dict):
            source = list(source.items())
        pairs = [tuple(p) for p in source]
        if any(len(p) != 2 for p in pairs):
            raise FormatError("pickle builds a dict from items that are not pairs")
        self._keys(p[0] for p in pairs)
        return pairs

    def _dict(self, source=(), **kwargs):
        return dict(self._pairs(source), **kwargs)

    def _ordered_dict(self, source=(), **kwargs):
        if not source and not kwargs:  # what every torch tensor record calls: OrderedDict()
            return collections.OrderedDict()
        return collections.OrderedDict(self._pairs(source), **kwargs)

    # -- opcodes ---------------------------------------------------------------------------
    def _length(self, n: int, what: str) -> int:
        if n < 0 or n > self._size:
            raise FormatError(f"pickle declares a {n}-byte {what} in a {self._size}-byte input")
        return n

    def _memo_index(self, i: int) -> int:
        if i < 0 or i >= 1 << 32:
            raise FormatError(f"pickle memo index {i} out of range")
        return i

    def load_proto(self):
        proto = self.read(1)[0]
        if proto > pickle.HIGHEST_PROTOCOL:
            raise FormatError(f"unsupported pickle protocol {proto}")
        self.proto = proto
    dispatch[pickle.PROTO[0]] = load_proto

    def load_frame(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self._unframer.load_frame(self._length(n, "frame"))
    dispatch[pickle.FRAME[0]] = load_frame

    def _counted(fmt: str, what: str, make):  # noqa: N805 - a factory used in the class body
        size = struct.calcsize(fmt)

        def load(self):
            (n,) = struct.unpack(fmt, self.read(size))
            data = self.read(self._length(n, what))
            if len(data) != n:
                raise FormatError(f"pickle is truncated inside a {n}-byte {what}")
            self.append(make(self, data))
        return load

    dispatch[pickle.BINBYTES[0]] = _counted("<I", "bytes", lambda self, d: d)
    dispatch[pickle.BINBYTES8[0]] = _counted("<Q", "bytes", lambda self, d: d)
    dispatch[pickle.SHORT_BINBYTES[0]] = _counted("<B", "bytes", lambda self, d: d)
    dispatch[pickle.BYTEARRAY8[0]] = _counted("<Q", "bytearray", lambda self, d: bytearray(d))
    dispatch[pickle.BINUNICODE[0]] = _counted("<I", "string", lambda self, d: str(d, "utf-8", "surrogatepass"))
    dispatch[pickle.BINUNICODE8[0]] = _counted("<Q", "string", lambda self, d: str(d, "utf-8", "surrogatepass"))
    dispatch[pickle.SHORT_BINUNICODE[0]] = _counted("<B", "string",
                                                    lambda self, d: str(d, "utf-8", "surrogatepass"))
    dispatch[pickle.BINSTRING[0]] = _counted("<i", "string", lambda self, d: self._decode_string(d))
    dispatch[pickle.SHORT_BINSTRING[0]] = _counted("<B", "string", lambda self, d: self._decode_string(d))
    dispatch[pickle.LONG4[0]] = _counted("<i", "int", lambda self, d: pickle.decode_long(d))
    del _counted

    def load_put(self):
        self.memo[self._memo_index(int(self.readline()[:-1]))] = self.stack[-1]
    dispatch[pickle.PUT[0]] = load_put

    def load_long_binput(self):
        (i,) = struct.unpack("<I", self.read(4))
        self.memo[self._memo_index(i)] = self.stack[-1]
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def _ext(self, code: int):
        # Never copyreg's process-wide cache: it may hold real objects put there by a stock unpickler.
        key = copyreg._extension_registry.get(code)
        if key is None:
            raise FormatError(f"pickle uses unregistered extension code {code}")
        self.append(self.find_class(*key))

    def load_ext1(self):
        self._ext(self.read(1)[0])
    dispatch[pickle.EXT1[0]] = load_ext1

    def load_ext2(self):
        self._ext(struct.unpack("<H", self.read(2))[0])
    dispatch[pickle.EXT2[0]] = load_ext2

    def load_ext4(self):
        self._ext(struct.unpack("<i", self.read(4))[0])
    dispatch[pickle.EXT4[0]] = load_ext4

    def load_setitem(self):
        self._key(self.stack[-2])
        pickle._Unpickler.load_setitem(self)
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        pairs = self.pop_mark()
        self._keys(pairs[0::2])
        target = self.stack[-1]
        if type(target) in (dict, collections.OrderedDict) and not len(pairs) % 2:  # the same sets, in order, in C
            target.update(zip(pairs[0::2], pairs[1::2]))
            return
        for i in range(0, len(pairs), 2):
            target[pairs[i]] = pairs[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        self._keys(items[0::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        self._keys(items)
        target = self.stack[-1]
        if not isinstance(target, set):
            raise FormatError(f"pickle adds set items to a {type(target).__name__}")
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        self._keys(items)
        self.append(frozenset(items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def _new(self, cls, args, kwargs=None):
        if not isinstance(cls, type) or not (issubclass(cls, Stub) or cls in _NEWOBJ_TYPES):
            raise FormatError(f"pickle creates an object of {_short_type(cls)} without calling it")
        if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
            raise FormatError("pickle creates an object with malformed arguments")
        if cls in (set, frozenset):
            self._keys(args[0] if args else ())
        elif cls in (dict, collections.OrderedDict) and args:
            args = (self._pairs(args[0]),) + args[1:]
        self.append(cls.__new__(cls, *args, **(kwargs or {})))

    def load_newobj(self):
        args = self.stack.pop()
        self._new(self.stack.pop(), args)
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self._new(self.stack.pop(), args, kwargs)
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_reduce(self):
        args = self.stack.pop()
        if type(args) is not tuple:
            raise FormatError(f"pickle calls something with arguments that are a {type(args).__name__}")
        func = self.stack[-1]
        if not callable(func):
            raise FormatError(f"pickle calls {_short_type(func)}, which is not callable")
        self.stack[-1] = func(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (Stub, NumpyDtype)):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and \
                all(type(k) is str for k in state):
            inst.__dict__.update(state)  # a state_dict's ``_metadata``
        else:
            raise FormatError(f"pickle sets the state of {_short_type(inst)}")
    dispatch[pickle.BUILD[0]] = load_build


    def _tensor_record(self, m, stack: list, memo: dict) -> int:
        """Run the opcodes of one tensor record that ``_TENSOR_RECORD`` matched; return where it ends.

        The record is the argument tuple of a call already on the stack (the rebuild function):
        ``((`` the persistent id ``(GET GET BINUNICODE PUT GET int TUPLE PUT)``, BINPERSID, the
        storage offset, the size and stride tuples, a bool, ``GET EMPTY_TUPLE REDUCE`` (the
        backward hooks), TUPLE, REDUCE, each object made PUT in the memo. The regex parses those
        opcodes exactly as the loop does (each has a fixed length, bar the string, checked here);
        this does what the loop would do with them, in the same order: the same memo reads and
        puts, the same objects, the same calls with the same checks, so the same errors. Returns 0
        (before doing anything) where the string's declared length is not what the regex read.
        """
        (g_word, g_type, klen, key, p_key, g_loc, numel, p_pid, offset, size, p_size, stride, p_stride, grad,
         g_hooks, p_hooks, p_args, p_out) = m.groups()
        if klen[0] != len(key):
            return 0
        u32 = _U32
        try:
            word = memo[g_word[1] if len(g_word) == 2 else u32(g_word, 1)[0]]
        except KeyError:
            raise _missing(g_word) from None
        try:
            stype = memo[g_type[1] if len(g_type) == 2 else u32(g_type, 1)[0]]
        except KeyError:
            raise _missing(g_type) from None
        key = key.decode("ascii")  # digits: the str that utf-8 / surrogatepass decoding makes
        memo[p_key[1] if len(p_key) == 2 else u32(p_key, 1)[0]] = key
        try:
            location = memo[g_loc[1] if len(g_loc) == 2 else u32(g_loc, 1)[0]]
        except KeyError:
            raise _missing(g_loc) from None
        pid = (word, stype, key, location, _pickled_int(numel))
        memo[p_pid[1] if len(p_pid) == 2 else u32(p_pid, 1)[0]] = pid
        storage = self.persistent_load(pid)
        offset = _pickled_int(offset)
        if p_size is None:
            size = ()
        else:
            size = _pickled_ints(size)
            memo[p_size[1] if len(p_size) == 2 else u32(p_size, 1)[0]] = size
        if p_stride is None:
            stride = ()
        else:
            stride = _pickled_ints(stride)
            memo[p_stride[1] if len(p_stride) == 2 else u32(p_stride, 1)[0]] = stride
        try:
            hooks = memo[g_hooks[1] if len(g_hooks) == 2 else u32(g_hooks, 1)[0]]
        except KeyError:
            raise _missing(g_hooks) from None
        if not callable(hooks):
            raise FormatError(f"pickle calls {_short_type(hooks)}, which is not callable")
        hooks = hooks()
        memo[p_hooks[1] if len(p_hooks) == 2 else u32(p_hooks, 1)[0]] = hooks
        args = (storage, offset, size, stride, grad == b"\x88", hooks)
        memo[p_args[1] if len(p_args) == 2 else u32(p_args, 1)[0]] = args
        func = stack[-1]
        if not callable(func):
            raise FormatError(f"pickle calls {_short_type(func)}, which is not callable")
        out = stack[-1] = func(*args)
        memo[p_out[1] if len(p_out) == 2 else u32(p_out, 1)[0]] = out
        return m.end()

    def load_in_memory(self, data: bytes):
        """``load()`` for a protocol 0-3 pickle held in memory: the hot opcodes run inline.

        The same opcodes, checks and objects as ``load()``; what differs is that the eleven
        opcodes that make up almost all of a torch data.pkl (memo, ints, strings, marks, tuples,
        calls, persistent ids) are decoded from ``data`` directly instead of through
        ``read()`` and a method each, on a local stack (``self.stack`` is brought up to date
        only for the other opcodes). Everything else goes through the dispatch table as
        usual, with the file positioned after its opcode byte. A MARK that opens a tensor
        record as torch.save writes it runs the whole record at once (``_tensor_record``): 20,000
        tensors unpickle in 0.19 s instead of 0.22 s (``fast_records = False``).
        """
        bio = self._file_for_fallback
        self._unframer = pickle._Unframer(bio.read, bio.readline)
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = metastack = []
        self.stack = stack = []
        self.append = stack.append
        self.proto = 0
        memo = self.memo
        dispatch = self.dispatch
        persistent_load = self.persistent_load
        record = _TENSOR_RECORD.match if self.fast_records else None
        n = len(data)
        pos = 0
        u32 = _U32  # unpack_from: the length is checked first, so it never reads short
        while True:
            if pos >= n:
                raise EOFError
            op = data[pos]
            if op == 0x72:  # LONG_BINPUT (an index below 2**32: always in range)
                if pos + 5 > n:
                    raise EOFError
                memo[u32(data, pos + 1)[0]] = stack[-1]
                pos += 5
            elif op == 0x68:  # BINGET
                if pos + 2 > n:
                    raise EOFError
                stack.append(memo[data[pos + 1]])
                pos += 2
            elif op == 0x4B:  # BININT1
                if pos + 2 > n:
                    raise EOFError
                stack.append(data[pos + 1])
                pos += 2
            elif op == 0x28:  # MARK
                if record is not None and stack:
                    m = record(data, pos)
                    if m is not None:
                        end = self._tensor_record(m, stack, memo)
                        if end:
                            pos = end
                            continue
                metastack.append(stack)
                stack = []
                pos += 1
            elif op == 0x58:  # BINUNICODE
                if pos + 5 > n:
                    raise EOFError
                length = u32(data, pos + 1)[0]
                end = pos + 5 + length
                if end > n:
                    raise FormatError(f"pickle declares a {length}-byte string in a {n}-byte input")
                stack.append(str(data[pos + 5:end], "utf-8", "surrogatepass"))
                pos = end
            elif op == 0x74:  # TUPLE
                items = stack
                stack = metastack.pop()
                stack.append(tuple(items))
                pos += 1
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
                pos += 1
            elif op == 0x52:  # REDUCE, as load_reduce
                args = stack.pop()
                if type(args) is not tuple:
                    raise FormatError(f"pickle calls something with arguments that are a {type(args).__name__}")
                func = stack[-1]
                if not callable(func):
                    raise FormatError(f"pickle calls {_short_type(func)}, which is not callable")
                stack[-1] = func(*args)
                pos += 1
            elif op == 0x51:  # BINPERSID
                pid = stack.pop()
                stack.append(persistent_load(pid))
                pos += 1
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
                pos += 1
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
                pos += 1
            elif op == 0x2E:  # STOP
                return stack.pop()
            else:
                if op == 0x95:  # FRAME: protocol 4; its buffering would take reads away from ``pos``
                    raise FormatError("pickle has a FRAME opcode but declares protocol 3 or lower")
                self.stack = stack
                self.append = stack.append
                bio.seek(pos + 1)
                try:
                    dispatch[op](self)
                except KeyError:
                    raise FormatError(f"invalid pickle opcode {op:#04x} at byte {pos}") from None
                except pickle._Stop as stop:
                    return stop.value
                pos = bio.tell()
                stack = self.stack
                metastack = self.metastack


_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from


def _missing(get: bytes) -> Exception:
    """What the loop raises for a GET of an index never PUT: its inline BINGET a KeyError, and LONG_BINGET
    (pickle's ``load_long_binget``) an UnpicklingError."""
    if len(get) == 2:
        return KeyError(get[1])
    i = _U32(get, 1)[0]
    return pickle.UnpicklingError(f"Memo value not found at index {i}")


def _pickled_int(b: bytes) -> int:
    """The value of a BININT1 (``K``), BININT2 (``M``) or BININT (``J``) opcode and its argument."""
    if b[0] == 0x4B:
        return b[1]
    if b[0] == 0x4D:
        return b[1] | b[2] << 8
    return _I32(b, 1)[0]


def _pickled_ints(b: bytes) -> tuple:
    """The tuple a run of BININT* opcodes makes, closed by TUPLE1-3 or opened by MARK and closed by TUPLE."""
    out = []
    i = 1 if b[0] == 0x28 else 0
    end = len(b) - 1
    while i < end:
        op = b[i]
        if op == 0x4B:
            out.append(b[i + 1])
            i += 2
        elif op == 0x4D:
            out.append(b[i + 1] | b[i + 2] << 8)
            i += 3
        else:
            out.append(_I32(b, i + 1)[0])
            i += 5
    return tuple(out)


# One tensor record's argument tuple as torch.save pickles it (protocol 2), after the rebuild function:
# see SafeUnpickler._tensor_record. Every alternative is one opcode with its fixed-length argument, so a
# match parses the bytes as the opcode loop does. GET: BINGET / LONG_BINGET; PUT: BINPUT / LONG_BINPUT.
_GET, _PUT, _INT = rb"(h.|j....)", rb"(q.|r....)", rb"(K.|M..|J....)"
_D = rb"(?:K.|M..|J....)"
_TUPLE = rb"(?:\)|(" + _D + rb"(?:\x85|" + _D + rb"(?:\x86|" + _D + rb"\x87))|\(" + _D + rb"*t)" + _PUT + rb")"
_TENSOR_RECORD = re.compile(
    rb"\(\(" + _GET + _GET + rb"X(.)\x00\x00\x00([0-9]+)" + _PUT + _GET + _INT + rb"t" + _PUT + rb"Q" + _INT
    + _TUPLE + _TUPLE + rb"([\x88\x89])" + _GET + rb"\)R" + _PUT + rb"t" + _PUT + rb"R" + _PUT, re.S)


def _short_type(obj) -> str:
    if isinstance(obj, type) and issubclass(obj, Stub):
        return f"class {obj.stub_module}.{obj.stub_name}"
    if isinstance(obj, Stub):
        return f"an object of {obj.qualname}"
    return f"a {type(obj).__name__}"


def _input_size(f) -> int:
    if isinstance(f, io.BytesIO):
        return len(f.getbuffer())
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return 1 << 62


def parse_storage_pid(pid) -> Tuple[_StorageType, str, str, int, Any]:
    """Check a ``('storage', type, key, location, numel[, view])`` id; return its parts."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
        raise FormatError(f"unknown persistent id {safe_repr(kind, 40)} in pickle")
    _, stype, key, location, numel = pid[:5]
    if not isinstance(stype, _StorageType):
        raise FormatError(f"storage of unknown type {safe_repr(stype, 60)}")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
        raise FormatError(f"malformed storage record {safe_repr(pid, 100)}")
    if stype.cuda and not location.startswith("cuda"):
        location = "cuda"
    return stype, key, location, numel, (pid[5] if len(pid) > 5 else None)


def storage_nbytes(stype: _StorageType, numel: int) -> int:
    """Bytes of a storage: UntypedStorage counts bytes, typed ones count elements."""
    return numel * stype.unit


def safe_load(data: bytes, persistent_load: Optional[PersistentLoad] = None, path: Optional[str] = None):
    """Unpickle ``data`` without importing or running anything it names.

    Returns ``(obj, globals)``. Every failure, whatever the bytes, is a FormatError.

    >>> safe_load(pickle.dumps({"epoch": 3}))[0]
    {'epoch': 3}
    """
    if len(data) > 1 and data[0] == 0x80 and data[1] > 3:  # protocol 4+: framed, read the usual way
        return load_stream(io.BytesIO(data), persistent_load, path)
    bio = io.BytesIO(data)
    up = SafeUnpickler(bio, persistent_load, len(data))
    up._file_for_fallback = bio
    return _finish(up, lambda: up.load_in_memory(data), path)


def load_stream(f, persistent_load: Optional[PersistentLoad] = None, path: Optional[str] = None,
                size: Optional[int] = None):
    """Like :func:`safe_load` on an open binary file positioned at a pickle; leaves it after the pickle.

    ``size`` bounds every length the pickle declares (default: the file's size).
    """
    up = SafeUnpickler(f, persistent_load, size)
    return _finish(up, up.load, path)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC for work whose objects all stay alive until it ends (an unpickled checkpoint,
    the record made of it, its rendering): each collection would only walk them again. Refcounting
    still frees what dies; nested uses leave the GC to the outermost."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _finish(up: SafeUnpickler, load, path: Optional[str]):
    # The cyclic GC is paused while unpickling (a fifth of the load of a 20,000-tensor file).
    # Cyclic garbage a file makes on purpose waits for the next collection, after the load; it is
    # bounded by the input's size as much as the objects the file keeps are.
    try:
        with gc_paused():
            obj = load()
    except FormatError as e:
        raise FormatError(f"malformed pickle: {e.message}", path) from None
    except RecursionError:
        raise FormatError("malformed pickle: nested too deeply", path) from None
    except MemoryError:
        raise FormatError("malformed pickle: asks for more memory than it can hold", path) from None
    except Exception as e:  # pickle raises a zoo of types on bad bytes
        raise FormatError(f"malformed pickle: {type(e).__name__}: {e}"[:200], path) from None
    finally:
        # The unpickler is a cycle (its served builtins are its bound methods): free what it holds
        # (memo, persistent loader and so every StorageRef's cache) now, not at some later collection.
        up.memo.clear()
        up._served = up._persistent = None
    return obj, tuple(up.globals.values())
