"""torch's ``weights_only`` allow list as ckpttool's own table, and ``add_safe_globals`` advice.

``scan`` must not import torch, so this module holds a copy of what
``torch.load(path, weights_only=True)`` admits (torch 2.14, ``torch/_weights_only_unpickler.py``),
checked against the installed torch in ``tests/test_allowlist.py``. It imports neither torch nor
numpy.

What torch's weights_only unpickler checks, opcode by opcode (it is a pure-Python loop, not the C
unpickler, and it never calls ``find_class`` or imports anything):

- Only 34 opcodes run (``SUPPORTED_OPCODES``): protocol 2's binary set. Anything else, e.g.
  STACK_GLOBAL, FRAME, MEMOIZE, SHORT_BINUNICODE, BINBYTES, NEWOBJ_EX, INST, OBJ, ADDITEMS,
  FROZENSET, text opcodes (INT, STRING, GET, PUT, PERSID...), is "Unsupported operand": a
  protocol 3+ pickle that uses them never loads, whatever ``add_safe_globals`` says.
- GLOBAL: the two lines are mapped through torch's copy of ``_compat_pickle`` (``__builtin__.long``
  -> ``builtins.int``, ``copy_reg`` -> ``copyreg``...; ``global_name``), then ``module.name`` is
  refused if the module is ``sys``, ``os``, ``posix`` or ``nt`` (``BLOCKED_MODULES``, even when
  user-allowed), and otherwise looked up by exact string in the default table (``WEIGHTS_ONLY``)
  or in the ``add_safe_globals`` table (keyed ``obj.__module__ + "." + obj.__qualname__``, or
  the string of a ``(obj, "name")`` tuple). No other rule admits a name; what looks like one
  (dtypes, storage classes, tensor types) is spelled out in the table. ``import torch`` itself
  calls ``add_safe_globals`` (``WEIGHTS_ONLY_AT_IMPORT``: every builtin exception class,
  ``traceback.StackSummary``/``FrameSummary``, nested-jagged tensors, mesh layouts), and some torch
  modules do so when imported (``WEIGHTS_ONLY_ONCE_IMPORTED``: DTensor, ``_DimRange``...).
- REDUCE: ``func(*args)`` if ``func`` is one of the admitted objects (default or user table,
  compared by ``in ... .values()``); NEWOBJ: ``cls.__new__(cls, *args)`` under the same check
  (``Parameter(*args)`` for ``torch.nn.Parameter``). There is no per-name distinction: every
  admitted global may be called by REDUCE and instantiated by NEWOBJ.
- BUILD: the *type of the instance* (not a global) decides: ``torch.Tensor`` -> ``set_(*state)``,
  ``Parameter`` -> ``__setstate__``, ``OrderedDict`` -> ``__dict__.update``; any other type must be
  an admitted object (so ``numpy.dtype(...)`` needs its concrete class, ``numpy.dtypes.UInt32DType``:
  ``numpy_dtype_class``), then ``__setstate__(state)`` or a ``__dict__``/slots update.
- APPEND/APPENDS: the target must be exactly a ``list``, or a list subclass in the user table
  (``APPEND_TYPES``). SETITEM/SETITEMS: exactly ``dict``, ``OrderedDict`` or ``Counter``
  (``SETITEM_TYPES``; no allow list extends it, so a non-empty ``defaultdict`` never loads).
- BINPERSID: the id must be an int or a tuple whose first item is ``"storage"``; torch.load's
  ``persistent_load`` then wants ``("storage", storage_type, key, location, numel)``.
- PROTO: any value (a warning when not 2). Data opcodes (BININT*, BINFLOAT, LONG1, BINUNICODE,
  SHORT_BINSTRING, EMPTY_*, TUPLE*, MARK, BINGET/BINPUT and LONG_ forms, NONE, NEWTRUE/NEWFALSE,
  STOP) are unchecked.

Example:
    >>> weights_only_admits("torch._utils._rebuild_tensor_v2"), weights_only_admits("__builtin__.set")
    (True, True)
    >>> weights_only_admits("builtins.dict"), weights_only_admits("os.system")
    (False, False)
    >>> numpy_dtype_class("u4")
    'numpy.dtypes.UInt32DType'
"""
from __future__ import annotations

import json
import keyword
import re
import sys
from typing import Iterable, Mapping, Optional, Tuple, Union

__all__ = [
    "APPEND_TYPES", "BENIGN", "BLOCKED_MODULES", "BUILD_SPECIAL", "IMPORT_MAPPING", "NAME_MAPPING",
    "NUMPY_DTYPE_CLASSES", "SETITEM_TYPES", "SUPPORTED_OPCODES", "TORCH_FORMAT_INTERNALS",
    "WEIGHTS_ONLY", "WEIGHTS_ONLY_AT_IMPORT", "WEIGHTS_ONLY_ONCE_IMPORTED", "advice", "global_name",
    "numpy_dtype_class", "weights_only_admits",
]

#: A global as a pickle names it: ``"module.name"``, or the GLOBAL's two lines ``(module, name)``.
GlobalName = Union[str, Tuple[str, str]]

# ---------------------------------------------------------------------------------------------
# The opcode rules (torch/_weights_only_unpickler.py, Unpickler.load)

#: pickletools names of the opcodes the weights_only unpickler runs; any other is refused.
SUPPORTED_OPCODES: frozenset[str] = frozenset({
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE",
    "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT",
    "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT",
    "LONG_BINPUT", "LONG1", "PROTO", "STOP",
})

#: Exact types SETITEM/SETITEMS may write into (``_check_set_item_target``); not extensible.
SETITEM_TYPES: frozenset[str] = frozenset({
    "builtins.dict", "collections.OrderedDict", "collections.Counter",
})

#: Exact type APPEND/APPENDS may extend; list subclasses only when ``add_safe_globals`` admits them.
APPEND_TYPES: frozenset[str] = frozenset({"builtins.list"})

#: Types BUILD handles specially (any other built type must be admitted): what it does with them.
BUILD_SPECIAL: Mapping[str, str] = {
    "torch.Tensor": "inst.set_(*state)",
    "torch.nn.parameter.Parameter": "inst.__setstate__(state)",
    "collections.OrderedDict": "inst.__dict__.update(state)",
}

#: Modules whose globals are refused even when ``add_safe_globals`` names them.
BLOCKED_MODULES: frozenset[str] = frozenset({"sys", "os", "posix", "nt"})

# torch._utils.IMPORT_MAPPING / NAME_MAPPING (a subset of _compat_pickle), applied to every GLOBAL
# before the lookup: protocol 2 pickles written by Python 3 spell builtins as __builtin__.
IMPORT_MAPPING: Mapping[str, str] = {
    "__builtin__": "builtins", "copy_reg": "copyreg", "Queue": "queue", "repr": "reprlib",
    "_abcoll": "collections.abc", "UserDict": "collections", "UserList": "collections",
    "UserString": "collections", "whichdb": "dbm", "StringIO": "io", "cStringIO": "io",
}
_PY2_EXCEPTIONS = (
    "ArithmeticError", "AssertionError", "AttributeError", "BaseException", "BufferError",
    "BytesWarning", "DeprecationWarning", "EOFError", "EnvironmentError", "Exception",
    "FloatingPointError", "FutureWarning", "GeneratorExit", "IOError", "ImportError",
    "ImportWarning", "IndentationError", "IndexError", "KeyError", "KeyboardInterrupt",
    "LookupError", "MemoryError", "NameError", "NotImplementedError", "OSError", "OverflowError",
    "PendingDeprecationWarning", "ReferenceError", "RuntimeError", "RuntimeWarning",
    "StopIteration", "SyntaxError", "SyntaxWarning", "SystemError", "SystemExit", "TabError",
    "TypeError", "UnboundLocalError", "UnicodeDecodeError", "UnicodeEncodeError", "UnicodeError",
    "UnicodeTranslateError", "UnicodeWarning", "UserWarning", "ValueError", "Warning",
    "ZeroDivisionError",
)
NAME_MAPPING: Mapping[Tuple[str, str], Tuple[str, str]] = {
    ("__builtin__", "xrange"): ("builtins", "range"),
    ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"),
    ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"),
    ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"),
    ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"),
    ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"),
    ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
    **{("exceptions", e): ("builtins", e) for e in _PY2_EXCEPTIONS},
}

# ---------------------------------------------------------------------------------------------
# torch 2.14's _get_allowed_globals(), spelled out (its keys: "module.qualname" or str(dtype))

_LEGACY = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
_SPARSE = tuple(t for t in _LEGACY if t != "Bool")
_DTYPES = (
    "bcomplex32", "bfloat16", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool",
    "complex32", "complex64", "complex128", "float16", "float32", "float64", "float4_e2m1fn_x2",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "qint8", "qint32", "quint8", "quint2x4", "quint4x2",
    *(f"int{n}" for n in range(1, 8)), *(f"uint{n}" for n in range(1, 8)),
)
_REBUILD = (
    "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_tensor",
    "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
)

#: Exactly the keys of torch 2.14's ``torch._weights_only_unpickler._get_allowed_globals()``.
WEIGHTS_ONLY: frozenset[str] = frozenset({
    "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
    "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
    "torch._tensor._rebuild_from_type_v2",
    *(f"torch.{d}" for d in _DTYPES),
    # legacy typed tensor classes (torch._tensor_classes), dense CPU/CUDA and sparse
    *(f"torch.{t}Tensor" for t in _LEGACY), *(f"torch.cuda.{t}Tensor" for t in _LEGACY),
    *(f"torch.sparse.{t}Tensor" for t in _SPARSE), *(f"torch.cuda.sparse.{t}Tensor" for t in _SPARSE),
    # storage classes (torch._storage_classes); the legacy ones become StorageType wrappers
    *(f"torch.{t}Storage" for t in _LEGACY + ("ComplexDouble", "ComplexFloat")),
    *(f"torch.cuda.{t}Storage" for t in _LEGACY + ("ComplexDouble", "ComplexFloat")),
    *(f"torch.{t}Storage" for t in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")),
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    # quantization schemes
    "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.per_channel_affine",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
    *(f"torch._utils.{f}" for f in _REBUILD),
})

# Builtin exception classes by Python version, as vars(builtins) holds them (aliases such as
# IOError and EnvironmentError are OSError itself, so they add no key).
_EXCEPTIONS = (
    "ArithmeticError", "AssertionError", "AttributeError", "BaseException", "BlockingIOError",
    "BrokenPipeError", "BufferError", "BytesWarning", "ChildProcessError",
    "ConnectionAbortedError", "ConnectionError", "ConnectionRefusedError", "ConnectionResetError",
    "DeprecationWarning", "EOFError", "Exception", "FileExistsError", "FileNotFoundError",
    "FloatingPointError", "FutureWarning", "GeneratorExit", "ImportError", "ImportWarning",
    "IndentationError", "IndexError", "InterruptedError", "IsADirectoryError", "KeyError",
    "KeyboardInterrupt", "LookupError", "MemoryError", "ModuleNotFoundError", "NameError",
    "NotADirectoryError", "NotImplementedError", "OSError", "OverflowError",
    "PendingDeprecationWarning", "PermissionError", "ProcessLookupError", "RecursionError",
    "ReferenceError", "ResourceWarning", "RuntimeError", "RuntimeWarning", "StopAsyncIteration",
    "StopIteration", "SyntaxError", "SyntaxWarning", "SystemError", "SystemExit", "TabError",
    "TimeoutError", "TypeError", "UnboundLocalError", "UnicodeDecodeError", "UnicodeEncodeError",
    "UnicodeError", "UnicodeTranslateError", "UnicodeWarning", "UserWarning", "ValueError",
    "Warning", "ZeroDivisionError",
    *(("EncodingWarning",) if sys.version_info >= (3, 10) else ()),
    *(("BaseExceptionGroup", "ExceptionGroup") if sys.version_info >= (3, 11) else ()),
    *(("PythonFinalizationError", "_IncompleteInputError") if sys.version_info >= (3, 13) else ()),
)

#: Admitted in every process once ``import torch`` has run: torch's own modules call
#: ``add_safe_globals`` at import (torch.distributed.distributed_c10d: exceptions and tracebacks,
#: for object collectives; torch.nested; torch.distributed.device_mesh). Without torch.distributed
#: (``torch.distributed.is_available()`` false) only the nested-tensor names are added.
WEIGHTS_ONLY_AT_IMPORT: frozenset[str] = frozenset({
    *(f"builtins.{e}" for e in _EXCEPTIONS),
    "traceback.StackSummary", "traceback.FrameSummary",
    "torch.nested._internal.nested_tensor.NestedTensor",
    "torch.nested._internal.nested_tensor._rebuild_njt",
    "torch.distributed._mesh_layout._FlatLayout", "torch.distributed._mesh_layout._MeshLayout",
})

_DTENSOR = frozenset({
    "torch.distributed.device_mesh.DeviceMesh",
    "torch.distributed.tensor._dtensor_spec.DTensorSpec",
    "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "torch.distributed.tensor._dtensor_spec.ShardOrderEntry",
    "torch.distributed.tensor.DTensor",
    "torch.distributed.tensor.placement_types.Partial",
    "torch.distributed.tensor.placement_types.Replicate",
    "torch.distributed.tensor.placement_types.Shard",
    "torch.distributed.tensor.placement_types._StridedShard",
})

#: What importing each module adds (it, or a module it imports, calls ``add_safe_globals``);
#: until then the unpickler refuses these ("must be imported" for DTensor and _DimRange).
#: torch._dynamo (imported by torch.compile) brings DTensor's names along.
WEIGHTS_ONLY_ONCE_IMPORTED: Mapping[str, frozenset[str]] = {
    "torch.distributed.tensor": _DTENSOR,
    "torch._dynamo": _DTENSOR | {"torch._dynamo.decorators._DimRange"},
    "torch.distributed._serialization": frozenset({"torch.distributed._serialization._Entry"}),
}

# ---------------------------------------------------------------------------------------------
# Beyond torch's list

#: numpy's concrete dtype classes (``type(numpy.dtype(...))``, numpy >= 1.25), by qualified name.
NUMPY_DTYPE_CLASSES: frozenset[str] = frozenset(f"numpy.dtypes.{c}" for c in (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "LongLongDType",
    "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "ULongLongDType", "Float16DType",
    "Float32DType", "Float64DType", "LongDoubleDType", "Complex64DType", "Complex128DType",
    "CLongDoubleDType", "ObjectDType", "BytesDType", "StrDType", "VoidDType", "DateTime64DType",
    "TimeDelta64DType", "StringDType",
))

_PATH_CLASSES = ("PurePath", "PurePosixPath", "PureWindowsPath", "PosixPath")

#: Plain data holders safe to construct from data arguments though torch does not admit them:
#: none opens files, imports, evaluates, or calls an argument. Those marked CARE are benign only
#: under the condition said; a scanner checks it.
BENIGN: frozenset[str] = frozenset({
    # Value constructors; what they do to data arguments is parse or copy them.
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.str", "builtins.frozenset", "builtins.slice",
    "typing.Any",  # a marker class omegaconf stores as a node's type; calling it raises
    "argparse.Namespace",  # an attribute bag (NEWOBJ + BUILD of its __dict__)
    "datetime.date", "datetime.time", "datetime.datetime", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal",  # parses a string or a (sign, digits, exponent) tuple, lazily
    # CARE: Fraction("1e999999999") computes 10**exponent (CPU/memory bomb); benign when its
    # argument is "n/d" or ints, which is what Fraction.__reduce__ writes.
    "fractions.Fraction",
    "uuid.UUID", "uuid.SafeUUID",  # an int in __dict__; SafeUUID is the enum its state names
    # Paths: string manipulation only; constructing one touches no file. PosixPath is what
    # torch.distributed.checkpoint writes as StorageMeta.checkpoint_id. Python 3.13 pickles
    # them from pathlib._local.
    *(f"pathlib.{c}" for c in _PATH_CLASSES), *(f"pathlib._local.{c}" for c in _PATH_CLASSES),
    # CARE: loads fill a deque by APPENDS (deque.extend), which torch refuses for non-lists: a
    # non-empty deque never loads with weights_only=True, add_safe_globals or not.
    "collections.deque",
    # CARE: default_factory is a callable the pickle chose, called later on a missing key: benign
    # only if the factory is itself a benign zero-argument constructor (list, dict, int...). Items
    # come by SETITEM(S) on the defaultdict, which torch refuses: only an empty one loads.
    "collections.defaultdict",
    # numpy arrays and scalars. CARE: _reconstruct's first argument must be numpy.ndarray (a
    # subclass's __array_finalize__ is code); scalar(dtype, bytes) copies bytes into a scalar.
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.ndarray",  # BUILD: __setstate__((version, shape, dtype, fortran, raw bytes or list))
    "numpy.dtype",  # numpy.dtype(code, align, copy) parses a type code; BUILD sets byte order etc.
    *NUMPY_DTYPE_CLASSES,  # only ever BUILT (the class of a numpy.dtype(...) result)
})

#: Globals that torch's own format readers load (not torch.load): DCP's ``.metadata`` (read by
#: torch.distributed.checkpoint) and TorchScript's list/tensor helpers (read by torch.jit.load).
TORCH_FORMAT_INTERNALS: frozenset[str] = frozenset({
    *(f"torch.distributed.checkpoint.metadata.{c}" for c in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )),
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    *(f"torch.jit._pickle.{f}" for f in (
        "build_boollist", "build_doublelist", "build_intlist", "build_tensor_from_id",
        "build_tensorlist", "restore_type_tag",
    )),
})

# ---------------------------------------------------------------------------------------------
# Lookups


def global_name(module: str, name: str) -> str:
    """The name torch looks up for a GLOBAL whose two lines are ``module`` and ``name``.

    >>> global_name("__builtin__", "long"), global_name("copy_reg", "_reconstructor")
    ('builtins.int', 'copyreg._reconstructor')
    """
    return _mapped((module, name))[2]


def _mapped(name: GlobalName) -> Tuple[str, str, str]:
    """(module, name, "module.name") after torch's _compat_pickle mapping (as _read_global_instruction).

    A string is split at its last dot: a GLOBAL written by pickle at protocol <= 3 names a
    module's attribute (nested classes are reached by getattr), so that is its module.
    """
    module, attr = name.rpartition(".")[::2] if isinstance(name, str) else name
    if (module, attr) in NAME_MAPPING:
        module, attr = NAME_MAPPING[(module, attr)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return module, attr, f"{module}.{attr}"


def weights_only_admits(name: GlobalName) -> bool:
    """Whether ``torch.load(weights_only=True)`` resolves this GLOBAL in a process that ran
    ``import torch`` and called no ``add_safe_globals`` (the mapping and blocklist included).

    >>> weights_only_admits(("__builtin__", "long")), weights_only_admits("torch.float8_e4m3fn")
    (False, True)
    """
    module, _, full = _mapped(name)
    if module in BLOCKED_MODULES:
        return False
    return full in WEIGHTS_ONLY or full in WEIGHTS_ONLY_AT_IMPORT


_DTYPE_CODE = re.compile(r"([<>|=!]?)([a-zA-Z])(\d*)(\[\w+\])?")
_SIZED = {
    "b": {1: "BoolDType"},
    "i": {1: "Int8DType", 2: "Int16DType", 4: "Int32DType", 8: "Int64DType"},
    "u": {1: "UInt8DType", 2: "UInt16DType", 4: "UInt32DType", 8: "UInt64DType"},
    # long double is 12 bytes on i386, 16 on x86-64 and aarch64 Linux, 8 (float64) elsewhere
    "f": {2: "Float16DType", 4: "Float32DType", 8: "Float64DType",
          12: "LongDoubleDType", 16: "LongDoubleDType"},
    "c": {8: "Complex64DType", 16: "Complex128DType", 24: "CLongDoubleDType", 32: "CLongDoubleDType"},
    "O": {4: "ObjectDType", 8: "ObjectDType"},
    "M": {8: "DateTime64DType"},
    "m": {8: "TimeDelta64DType"},
}
# Kinds a code may give without a size (flexible, or generic datetime/object).
_UNSIZED = {"O": "ObjectDType", "M": "DateTime64DType", "m": "TimeDelta64DType",
            "S": "BytesDType", "U": "StrDType", "V": "VoidDType"}


def numpy_dtype_class(code: str) -> str | None:
    """The class of ``numpy.dtype(code, False, True)`` for a code as numpy pickles it, or None.

    numpy pickles a dtype as ``numpy.dtype(code, align, copy)`` plus BUILD state; torch's BUILD
    wants the type of that result admitted. Codes are kind + item size with an optional byte
    order and datetime unit; numpy's one-letter type characters ('d', 'l'...) are not pickle
    codes and give None. 'i8' is Int64DType (numpy >= 1.25 on LP64 platforms).

    >>> numpy_dtype_class("f8"), numpy_dtype_class("<U5"), numpy_dtype_class("M8[ns]")
    ('numpy.dtypes.Float64DType', 'numpy.dtypes.StrDType', 'numpy.dtypes.DateTime64DType')
    >>> numpy_dtype_class("u3") is None
    True
    """
    m = _DTYPE_CODE.fullmatch(code)
    if m is None:
        return None
    _order, kind, size, unit = m.groups()
    if unit and kind not in "Mm":
        return None
    if kind in "SUV":
        cls = _UNSIZED[kind]
    elif not size:
        cls = _UNSIZED.get(kind) if kind in "OMm" else None
    else:
        cls = _SIZED.get(kind, {}).get(int(size))
    return None if cls is None else f"numpy.dtypes.{cls}"


# ---------------------------------------------------------------------------------------------
# Advice

# Pickled name -> where that object is imported from today (numpy 2 moved numpy.core to
# numpy._core, which numpy 1.26 also provides; Python 3.13 moved pathlib's classes to
# pathlib._local and 3.14 back).
_MOVED: Mapping[str, str] = {
    "numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar": "numpy._core.multiarray.scalar",
    **{f"pathlib._local.{c}": f"pathlib.{c}" for c in _PATH_CLASSES},
}
# Objects whose __module__.__qualname__ is not their pickled name in every supported version
# (numpy 1.26's numpy._core functions say numpy.core; pathlib's classes say pathlib._local on
# 3.13): advised with add_safe_globals' (obj, "pickled.name") form, which matches by name.
_UNSTABLE_HOME = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
    *(f"pathlib.{c}" for c in _PATH_CLASSES),
})


def _identifiers(dotted: str) -> bool:
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in dotted.split("."))


def _expression(path: str, taken: set) -> Tuple[Optional[Tuple[str, str]], Tuple[str, ...], str]:
    """(a ``from module import name [as alias]`` pair or None, modules to import, the expression naming the
    object at ``path``). ``from`` imports, because an attribute can hide a submodule of the same name
    (``torchao.quantization.quantize_`` is a function and a package): ``import a.b; a.b.C`` would reach the
    function, ``from a.b import C`` reaches the module. ``taken``: names already bound on the line."""
    module, _, attr = path.rpartition(".")
    if module == "builtins" and _identifiers(attr):
        return None, (), attr
    if _identifiers(module) and _identifiers(attr):
        alias, n = attr, 1
        while alias in taken or alias in ("torch", "importlib", "operator"):
            n += 1
            alias = f"{attr}_{n}"
        taken.add(alias)
        return (module, attr if alias == attr else f"{attr} as {alias}"), (), alias
    # Not spellable as an import statement: go through importlib.
    return None, ("importlib", "operator"), f"operator.attrgetter({attr!r})(importlib.import_module({module!r}))"


def advice(referenced: Iterable[GlobalName], built_types: Iterable[str] = ()) -> str | None:
    """The Python line that makes ``torch.load(path, weights_only=True)`` pass the global and
    BUILD checks of a pickle, or None when it needs nothing beyond torch's defaults.

    ``referenced``: the globals the pickle names (GLOBAL's two lines, or ``module.name``);
    ``built_types``: the qualified types of instances it BUILDs that no global names (the
    concrete class of each ``numpy.dtype(...)``: ``numpy_dtype_class``). Every name torch does not
    admit by default is listed, in ``(obj, "pickled.name")`` form where the pickled name is not
    the object's ``__module__.__qualname__``. The line assumes ``torch`` is imported. What the
    opcode rules refuse (APPEND to a non-list, SETITEM on a dict subclass, protocol 3+ opcodes)
    no line can fix; the caller checks those. Raises ValueError for a blocked module's global.
    Which names deserve to be allowed is the scanner's call, not this function's.

    >>> advice(["numpy.ndarray", "numpy.dtype"], ["numpy.dtypes.UInt32DType"])
    'from numpy import dtype, ndarray; from numpy.dtypes import UInt32DType; torch.serialization.add_safe_globals([dtype, UInt32DType, ndarray])'
    >>> print(advice([("numpy.core.multiarray", "scalar")]))  # numpy 1's name, numpy 2's object
    from numpy._core.multiarray import scalar; torch.serialization.add_safe_globals([(scalar, "numpy.core.multiarray.scalar")])
    >>> advice(["collections.OrderedDict", ("torch._utils", "_rebuild_tensor_v2")]) is None
    True
    """
    needed: dict[str, str] = {}  # key torch will look up -> object path
    blocked = []
    for name in referenced:
        module, _, full = _mapped(name)
        if module in BLOCKED_MODULES:
            blocked.append(full)
        elif not weights_only_admits(full):
            needed[full] = _MOVED.get(full, full)
    if blocked:
        raise ValueError(f"torch refuses globals of {', '.join(sorted(BLOCKED_MODULES))} whatever "
                         f"the allow list says: {', '.join(sorted(set(blocked)))}")
    for t in built_types:
        # BUILD compares the instance's type with the admitted objects, so any key will do.
        if not weights_only_admits(t) and _MOVED.get(t, t) not in needed.values():
            needed[t] = _MOVED.get(t, t)
    if not needed:
        return None
    imports: set[str] = set()
    froms: dict[str, list] = {}
    taken: set = set()
    items = []
    for key, path in sorted(needed.items(), key=lambda kv: (kv[1], kv[0])):
        frm, modules, expr = _expression(path, taken)
        if frm is not None:
            froms.setdefault(frm[0], []).append(frm[1])
        imports.update(modules)
        # json.dumps spells a valid Python string literal whatever the pickle's name holds
        items.append(f"({expr}, {json.dumps(key)})" if key != path or path in _UNSTABLE_HOME else expr)
    line = f"torch.serialization.add_safe_globals([{', '.join(items)}])"
    statements = [f"import {', '.join(sorted(imports))}"] if imports else []
    statements += [f"from {m} import {', '.join(names)}" for m, names in sorted(froms.items())]
    return "; ".join(statements + [line])
