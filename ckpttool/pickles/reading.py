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

import _compat_pickle
import codecs
import collections
import contextlib
import copyreg
import dataclasses
import gc
import io
import mmap
import os
import pickle  # noqa: F401 - the doctests
import struct
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from ..dtypes import ITEMSIZE as _ITEMSIZE, STORAGE_CLASS_DTYPE, itemsize
from ..errors import FormatError
from ..checkpoint import GlobalRef, Layout, new_tensor_ref, Rebuild, StorageRef, TensorRef
from ..text import safe_repr
from .machine import Machine, Policy, Source, bounded_keys


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
    if dtype in _PACKED_PER_BYTE and numel:  # quint4x2 / quint2x4: each row's values packed into bytes
        return _packed_tensor(storage, storage_offset, shape, strides, requires_grad, dtype, kind, last)
    size_of = _ITEMSIZE.get(dtype, 0) or 1  # itemsize(dtype)
    if numel:
        if (last + 1) * size_of > storage.nbytes:
            raise FormatError(
                f"tensor of shape {list(shape)} at offset {storage_offset} reaches element {last}, "
                f"past the end of its {storage.nbytes}-byte storage {storage.key!r}")
    return new_tensor_ref(shape, dtype, strides, storage_offset, storage, storage.device, bool(requires_grad), kind)


_PACKED_PER_BYTE = {"quint4x2": 2, "quint2x4": 4}


def _packed_tensor(storage, storage_offset, shape, strides, requires_grad, dtype, kind, last) -> TensorRef:
    """A sub-byte quantized tensor: torch packs the last dim's values ``per`` to a byte, row by row (a 4x6
    quint4x2 tensor is 4 rows of 3 bytes); its bytes are that many, not one per value."""
    per = _PACKED_PER_BYTE[dtype]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    nbytes = rows * -(-shape[-1] // per) if shape else 1
    if storage_offset:
        nbytes = -(-(last + 1) // per)
    if nbytes > storage.nbytes:
        raise FormatError(f"{dtype} tensor of shape {list(shape)} needs {nbytes} bytes, past the end of its "
                          f"{storage.nbytes}-byte storage {storage.key!r}")
    t = new_tensor_ref(shape, dtype, strides, storage_offset, storage, storage.device, bool(requires_grad), kind)
    t.__dict__["explicit_nbytes"] = nbytes
    return t


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return _make_tensor(storage, storage_offset, size, stride)


def _with_metadata(t: TensorRef, metadata) -> TensorRef:
    # torch.save's tensor metadata: {"conj": True} / {"neg": True} for views it did not materialise
    if not metadata:
        return t
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and type(v) is bool for k, v in metadata.items()):
        raise FormatError(f"tensor metadata is not a dict of flags: {safe_repr(metadata, 60)}")
    unknown = sorted(set(metadata) - {"conj", "neg"})
    if unknown:
        raise FormatError(f"tensor metadata {', '.join(unknown)} is not one ckpttool knows (conj, neg)")
    t.__dict__["metadata"] = tuple(sorted(metadata.items()))
    return t


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    t = _make_tensor(storage, storage_offset, size, stride, requires_grad)
    return _with_metadata(t, metadata) if metadata else t


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, TorchDtype):
        raise FormatError(f"tensor dtype is not a torch dtype: {safe_repr(dtype, 40)}")
    t = _make_tensor(storage, storage_offset, size, stride, requires_grad, dtype=str(dtype))
    return _with_metadata(t, metadata) if metadata else t


def tensor_parts(tree, prefix: str = "") -> list:
    """The TensorRefs in a rebuild's arguments (tuples, lists, dicts, stubs' states), with their paths."""
    out, todo, seen = [], [(prefix, tree)], set()
    while todo:
        path, node = todo.pop()
        if isinstance(node, TensorRef):
            out.append((path, node))
            continue
        if id(node) in seen or len(out) > 10_000:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            items = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(node)]
        elif isinstance(node, Stub):
            items = [(f"arg{i}", v) for i, v in enumerate(node.args)] + [("state", node.state)] + \
                [(str(k), v) for k, v in node.items.items()] + [(str(i), v) for i, v in enumerate(node.list_items)]
        else:
            continue
        todo.extend(reversed([((f"{path}/{k}" if path else k), v) for k, v in items]))
    return out


def _composite(kind: str, shape, dtype: str, parts, rebuild: Rebuild, subclass: Optional[str] = None,
               requires_grad: bool = False, numel: Optional[int] = None) -> TensorRef:
    parts = tuple(parts)
    device = parts[0][1].device if parts else "cpu"
    return TensorRef(shape=tuple(shape), dtype=dtype, device=device, kind=kind, subclass=subclass,
                     requires_grad=bool(requires_grad), explicit_nbytes=sum(p.nbytes for _, p in parts),
                     explicit_numel=numel, parts=parts, rebuild=rebuild)


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad=False,
                     backward_hooks=None):
    t = _make_tensor(storage, storage_offset, size, stride, requires_grad, kind="quantized")
    # per-channel: (qscheme, scales, zero_points, axis): the scales and zero points are tensors of their own
    parts = tensor_parts(quantizer_params) if isinstance(quantizer_params, tuple) else []
    d = t.__dict__
    if parts:
        d["parts"] = (("data", dataclasses.replace(t, kind="dense", dtype=t.dtype)),) + tuple(
            (("scales", "zero_points")[i] if i < 2 else p, ref) for i, (p, ref) in enumerate(parts))
    d["rebuild"] = Rebuild("torch._utils", "_rebuild_qtensor",
                           (storage, storage_offset, size, stride, quantizer_params, requires_grad, backward_hooks))
    return t


def _rebuild_meta(dtype, size, stride, requires_grad=False):
    return TensorRef(shape=_check_dims(size, "size"), dtype=str(dtype), stride=_check_dims(stride, "stride"),
                     device="meta", requires_grad=bool(requires_grad), kind="meta", explicit_nbytes=0,  # no data
                     rebuild=Rebuild("torch._utils", "_rebuild_meta_tensor_no_storage",
                                     (dtype, size, stride, requires_grad)))


def _get_layout(name):
    if not isinstance(name, str) or not name.startswith("torch."):
        raise FormatError(f"unknown tensor layout {safe_repr(name, 40)}")
    return Layout(name[len("torch."):])


# layout -> the names of _rebuild_sparse_tensor's component tensors, in its data tuple's order
_SPARSE_PARTS = {"sparse_coo": ("indices", "values"), "sparse_csr": ("crow_indices", "col_indices", "values"),
                 "sparse_csc": ("ccol_indices", "row_indices", "values"),
                 "sparse_bsr": ("crow_indices", "col_indices", "values"),
                 "sparse_bsc": ("ccol_indices", "row_indices", "values")}


def _rebuild_sparse(layout, data):
    if isinstance(layout, type) and issubclass(layout, Stub) and layout.stub_module == "torch":
        name = layout.stub_name  # torch < 2.1 named the layout as a global
    elif isinstance(layout, Layout):
        name = str(layout)
    else:
        raise FormatError(f"sparse tensor of unknown layout {safe_repr(layout, 40)}")
    names = _SPARSE_PARTS.get(name)
    if names is None or not isinstance(data, tuple) or len(data) < len(names) + 1:
        raise FormatError(f"malformed {name} tensor record")
    tensors = data[:len(names)]
    if not all(isinstance(t, TensorRef) for t in tensors):
        raise FormatError(f"malformed {name} tensor record: its parts are not all tensors")
    shape = _check_dims(data[len(names)], "size")
    values = tensors[-1]
    return _composite(name, shape, values.dtype, zip(names, tensors),
                      Rebuild("torch._utils", "_rebuild_sparse_tensor", (layout, data)))


def _rebuild_nested(buffer, sizes, strides, storage_offsets):
    parts = (("buffer", buffer), ("sizes", sizes), ("strides", strides), ("storage_offsets", storage_offsets))
    if not all(isinstance(t, TensorRef) for _, t in parts):
        raise FormatError("malformed nested tensor record: its parts are not all tensors")
    # the rows' own sizes are in the sizes tensor's data: the shape says how many rows, numel what torch counts
    return _composite("nested", sizes.shape[:1], buffer.dtype, parts,
                      Rebuild("torch._utils", "_rebuild_nested_tensor", (buffer, sizes, strides, storage_offsets)),
                      numel=buffer.numel)


def _as_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise FormatError(f"parameter rebuilt from something that is not a tensor: {type(data).__name__}")
    if state and not data.is_composite:  # a Parameter with attributes of its own: written back as it was
        return dataclasses.replace(data, requires_grad=bool(requires_grad), is_parameter=True,
                                   rebuild=Rebuild("torch._utils", "_rebuild_parameter_with_state",
                                                   (data, requires_grad, backward_hooks, state)))
    return dataclasses.replace(data, requires_grad=bool(requires_grad), is_parameter=True)


def _stub_name(obj) -> Optional[str]:
    if isinstance(obj, type) and issubclass(obj, Stub):
        return f"{obj.stub_module}.{obj.stub_name}"
    return None


def _rebuild_from_type(func, new_type, args, state=None):
    # torch._tensor._rebuild_from_type_v2: a tensor subclass (or Parameter) around a rebuilt tensor.
    if not callable(func) or not isinstance(args, tuple):
        raise FormatError("malformed tensor subclass record")
    name = _stub_name(new_type)
    t = func(*args)
    rebuild = Rebuild("torch._tensor", "_rebuild_from_type_v2", (func, new_type, args, state))
    if isinstance(t, TensorRef):
        if name == "torch.nn.parameter.Parameter" and not state:
            return dataclasses.replace(t, is_parameter=True)
        if name in ("torch.Tensor", None) and not state:
            return t
        # a subclass (or state on the tensor): the values are the tensor's, the object is the subclass's
        return dataclasses.replace(t, subclass=name or "torch.Tensor", rebuild=rebuild)
    # a wrapper subclass (torchao's quantized weights, DTensor, a jagged NestedTensor): its tensors are inside,
    # named by where they are: the constructor's arguments (one: its own names), then the object's state
    if isinstance(state, tuple) and len(state) == 2 and all(x is None or isinstance(x, dict) for x in state):
        state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, slots), as copyreg writes them
    parts = tensor_parts(args[0] if len(args) == 1 else args) + \
        [(n, p) for n, p in tensor_parts(state) if all(p is not q for _, q in tensor_parts(args))]
    if not parts:
        return t
    shape, dtype = (), parts[0][1].dtype
    if _stub_name(func) == "torch._utils._rebuild_wrapper_subclass" and len(args) >= 3:
        dtype = str(args[1]) if isinstance(args[1], TorchDtype) else dtype
        shape = args[2] if isinstance(args[2], tuple) and _naturals(args[2]) else ()
    if name == "torch.nested._internal.nested_tensor.NestedTensor":
        shape, numel = _jagged_shape(args[0] if len(args) == 1 else None)
        return _composite("jagged", shape, dtype, parts, rebuild, subclass=name, numel=numel)
    return _composite("subclass", shape, dtype, parts, rebuild, subclass=name)


def _jagged_shape(kwargs) -> Tuple[tuple, Optional[int]]:
    """A jagged NestedTensor's shape as torch prints it, ``(batch, "j", ...)``, and its numel: the values' shape
    with the ragged dim (``_ragged_idx``) replaced by ``"j"``, after the batch (the offsets' length - 1)."""
    if not isinstance(kwargs, dict):
        return (), None
    values, offsets, ragged = kwargs.get("values"), kwargs.get("offsets"), kwargs.get("_ragged_idx", 1)
    if not (isinstance(values, TensorRef) and isinstance(offsets, TensorRef) and len(offsets.shape) == 1
            and isinstance(ragged, int) and 1 <= ragged <= len(values.shape)):
        return (), None
    dims = list(values.shape)
    dims[ragged - 1] = "j"
    return (max(offsets.shape[0] - 1, 0), *dims), values.numel


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


class TorchSize(tuple):
    """A ``torch.Size`` a pickle made: a tuple of dims, written back as a torch.Size."""


class TorchDevice(str):
    """A ``torch.device`` a pickle made, as its name; ``args`` are how it was called (to write it back)."""

    args: tuple = ()


def _torch_size(dims=()):
    return TorchSize(_check_dims(list(dims), "size"))


def _torch_device(kind, index=None):
    if not isinstance(kind, str):
        raise FormatError("torch.device with a non-string type")
    d = TorchDevice(f"{kind}:{index}" if index is not None and ":" not in kind else kind)
    d.args = (str(kind),) if index is None else (str(kind), index)
    return d


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

TENSOR_FUNCS: Dict[Tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
    ("torch._utils", "_rebuild_parameter"): _as_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _as_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
    ("torch._utils", "_rebuild_sparse_tensor"): _rebuild_sparse,
    ("torch._utils", "_rebuild_nested_tensor"): _rebuild_nested,
    ("torch.serialization", "_get_layout"): _get_layout,
}

PersistentLoad = Callable[[Any], Any]


class ReadPolicy(Policy):
    """Reading: tensor records become TensorRefs, a few builtins are served by safe equivalents, every
    other global is an inert :class:`Stub` class, and nothing a file names is imported or called.

    ``persistent_load`` is the format's function from a persistent id (a ``('storage', type, key,
    location, numel)`` tuple, its storage type already resolved) to a :class:`StorageRef`.
    """

    def __init__(self, persistent_load: Optional[PersistentLoad] = None):
        self.machine: Optional[Machine] = None
        self._persistent = persistent_load
        self.globals: Dict[Tuple[str, str], GlobalRef] = {}
        self._stub_classes: Dict[Tuple[str, str], type] = {}
        charged = self._charged
        self._served = {
            ("builtins", "set"): charged(self._set), ("builtins", "frozenset"): charged(self._frozenset),
            ("builtins", "dict"): charged(self._dict), ("collections", "OrderedDict"): self._ordered_dict,
            ("builtins", "list"): charged(list), ("builtins", "tuple"): charged(tuple),
            ("builtins", "bytes"): charged(_SAFE_BUILTINS[("builtins", "bytes")]),
            ("builtins", "bytearray"): charged(_SAFE_BUILTINS[("builtins", "bytearray")]),
            ("builtins", "str"): charged(_str),
        }

    def _charged(self, ctor: Callable) -> Callable:
        # what a served constructor copies counts against the machine's work cap (memo amplification)
        def call(source=(), *args, **kwargs):
            self.machine.charge(1 + (len(source) if hasattr(source, "__len__") else 0))
            return ctor(source, *args, **kwargs)
        call.__name__ = getattr(ctor, "__name__", "call")
        return call

    # -- globals and persistent ids --------------------------------------------------------
    def _note(self, module: str, name: str, handling: str) -> None:
        self.globals.setdefault((module, name), GlobalRef(module, name, handling))

    def find_class(self, module: str, name: str):  # noqa: D102 - the machine's hook
        module, name = py3_name(module, name, self.machine.proto)
        key = (module, name)
        if key in TENSOR_FUNCS:
            self._note(module, name, "tensor")
            return TENSOR_FUNCS[key]
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

    def extension(self, code: int):  # noqa: D102
        # copyreg's registry of codes -> names (never its cache of imported objects)
        key = copyreg._inverted_registry.get(code)
        if key is None:
            raise FormatError(f"pickle uses unregistered extension code {code}")
        return self.find_class(*key)

    def persistent_load(self, pid):  # noqa: D102 - the machine's hook
        if self._persistent is None:
            raise FormatError("pickle refers to external data (a persistent id) where none is allowed")
        return self._persistent(pid)

    # -- served builtins -------------------------------------------------------------------
    def _set(self, items=()):
        items = list(items)
        bounded_keys(items, self.machine.keys)
        return set(items)

    def _frozenset(self, items=()):
        items = list(items)
        bounded_keys(items, self.machine.keys)
        return frozenset(items)

    def _pairs(self, source) -> list:
        if isinstance(source, dict):
            source = list(source.items())
        pairs = [tuple(p) for p in source]
        if any(len(p) != 2 for p in pairs):
            raise FormatError("pickle builds a dict from items that are not pairs")
        bounded_keys([p[0] for p in pairs], self.machine.keys)
        return pairs

    def _dict(self, source=(), **kwargs):
        return dict(self._pairs(source), **kwargs)

    def _ordered_dict(self, source=(), **kwargs):
        if not source and not kwargs:  # what every torch tensor record calls: OrderedDict()
            return collections.OrderedDict()
        self.machine.charge(1 + (len(source) if hasattr(source, "__len__") else 0))
        return collections.OrderedDict(self._pairs(source), **kwargs)

    # -- calls and objects -----------------------------------------------------------------
    def reduce(self, func, args):  # noqa: D102
        if type(args) is not tuple:
            raise FormatError(f"pickle calls something with arguments that are a {type(args).__name__}")
        if not callable(func):
            raise FormatError(f"pickle calls {_short_type(func)}, which is not callable")
        return func(*args)

    def inst(self, cls, args):  # noqa: D102 - INST/OBJ: cls.__new__(cls) for a class and no args, else a call
        if not args and isinstance(cls, type) and issubclass(cls, Stub):
            return cls.__new__(cls)
        return self.reduce(cls, args)

    def newobj(self, cls, args, kwargs):  # noqa: D102
        if not isinstance(cls, type) or not (issubclass(cls, Stub) or cls in _NEWOBJ_TYPES):
            raise FormatError(f"pickle creates an object of {_short_type(cls)} without calling it")
        if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
            raise FormatError("pickle creates an object with malformed arguments")
        if cls in (set, frozenset):
            bounded_keys(list(args[0]) if args else [], self.machine.keys)
        elif cls in (dict, collections.OrderedDict) and args:
            args = (self._pairs(args[0]),) + args[1:]
        return cls.__new__(cls, *args, **(kwargs or {}))

    def build(self, inst, state):  # noqa: D102
        if isinstance(inst, (Stub, NumpyDtype)):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and \
                all(type(k) is str for k in state):
            inst.__dict__.update(state)  # a state_dict's ``_metadata``
        else:
            raise FormatError(f"pickle sets the state of {_short_type(inst)}")

    def appends(self, obj, items):  # noqa: D102 - C calls obj.extend(items) (or append each)
        if not isinstance(obj, Stub):
            raise FormatError(f"pickle appends to {_short_type(obj)}")
        obj.extend(items)

    def setitems(self, obj, pairs):  # noqa: D102 - C calls obj[key] = value
        if not isinstance(obj, Stub):
            raise FormatError(f"pickle sets items of {_short_type(obj)}")
        for k, v in pairs:
            obj[k] = v

    def additems(self, obj, items):  # noqa: D102 - C calls obj.add(item): no stub has one
        raise FormatError(f"pickle adds set items to {_short_type(obj)}")


def py3_name(module: str, name: str, proto: int) -> Tuple[str, str]:
    """The names a protocol 0-2 pickle's global resolves to (``__builtin__.set`` -> ``builtins.set``), as
    the C unpickler's ``find_class`` maps them (``fix_imports``, only below protocol 3)."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def _short_type(obj) -> str:
    if isinstance(obj, type) and issubclass(obj, Stub):
        return f"class {obj.stub_module}.{obj.stub_name}"
    if isinstance(obj, Stub):
        return f"an object of {obj.qualname}"
    return f"a {type(obj).__name__}"


def parse_storage_pid(pid, arity: Optional[int] = None) -> Tuple[_StorageType, str, str, int, Any]:
    """Check a ``('storage', type, key, location, numel[, view])`` id; return its parts.

    ``arity``: the number of fields torch's loader of the format unpacks (5 in a zip archive, 6 in a legacy
    file): an id of another length is one it fails on."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
        raise FormatError(f"unknown persistent id {safe_repr(kind, 40)} in pickle")
    if arity is not None and len(pid) != arity:
        raise FormatError(f"a storage id of {len(pid)} fields where torch.load unpacks {arity}")
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


def safe_load(data, persistent_load: Optional[PersistentLoad] = None, path: Optional[str] = None, pos: int = 0):
    """Unpickle ``data`` (bytes, mmap) at ``pos`` without importing or running anything it names.

    Returns ``(obj, globals)``. Every failure, whatever the bytes, is a FormatError.

    >>> safe_load(pickle.dumps({"epoch": 3}))[0]
    {'epoch': 3}
    """
    obj, globs, _ = _finish(persistent_load, path, lambda m: m.load(data, pos), len(data))
    return obj, globs


def load_stream(f, persistent_load: Optional[PersistentLoad] = None, path: Optional[str] = None,
                size: Optional[int] = None):
    """Like :func:`safe_load` on an open binary file positioned at a pickle; leaves it after the pickle.

    A file on disk is mapped (its pages read as the machine reaches them); any other stream (a zip
    record being inflated) is read in windows. ``size`` bounds every length the pickle declares
    (default: the file's size).
    """
    start = f.tell() if f.seekable() else 0
    try:
        fd = f.fileno()
        length = os.fstat(fd).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd is not None and length > start:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            obj, globs, end = _finish(persistent_load, path, lambda m: m.load(mm, start),
                                      length if size is None else size)
        f.seek(end)
        return obj, globs
    src = Source.of_stream(f, limit=size)
    obj, globs, _ = _finish(persistent_load, path, lambda m: m.load_source(src), size if size is not None
                            else 1 << 62)
    return obj, globs


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


def _finish(persistent_load: Optional[PersistentLoad], path: Optional[str], load, size: int):
    # The cyclic GC is paused while unpickling (a fifth of the load of a 20,000-tensor file).
    # Cyclic garbage a file makes on purpose waits for the next collection, after the load; it is
    # bounded by the input's size as much as the objects the file keeps are.
    policy = ReadPolicy(persistent_load)
    machine = policy.machine = Machine(policy, size)
    try:
        with gc_paused():
            obj = load(machine)
    except FormatError as e:
        raise FormatError(f"malformed pickle: {e.message}", path) from None
    except RecursionError:
        raise FormatError("malformed pickle: nested too deeply", path) from None
    except MemoryError:
        raise FormatError("malformed pickle: asks for more memory than it can hold", path) from None
    except Exception as e:  # a served builtin's own errors on bad arguments (TypeError, ValueError...)
        raise FormatError(f"malformed pickle: {type(e).__name__}: {e}"[:200], path) from None
    finally:
        # The policy is a cycle (its served builtins are its bound methods): free what it holds
        # (memo, persistent loader and so every StorageRef's cache) now, not at some later collection.
        machine.memo.clear()
        policy._served = policy._persistent = policy.machine = None
    return obj, tuple(policy.globals.values()), machine.end
