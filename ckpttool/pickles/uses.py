"""Scanning: run a pickle on the machine with symbolic objects, and record how it uses each global.

Nothing is imported or called. A global is a :class:`Global` (its name); what a call or an
instantiation makes is a :class:`Made` (which global made it, and the attributes BUILD gave it);
plain data (numbers, text, bytes, tuples, lists, dicts, sets) is real, built by the machine as the
C unpickler builds it. Every operation the C unpickler would turn into a call is recorded as one:

- ``called``: REDUCE, INST/OBJ, BUILD on a class; a callable an admitted function calls with its
  arguments (``_rebuild_from_type_v2``'s ``func``, ``copyreg._reconstructor``'s ``base``); a value an
  instance holds under a name the unpickler looks up on the instance (BUILD's ``__setstate__``,
  APPENDS' ``extend``/``append``, ADDITEMS' ``add``: attributes an earlier BUILD may have set);
- ``instantiated``: NEWOBJ / NEWOBJ_EX, ``copyreg.__newobj__``, ``_reconstructor``'s class;
- ``built``: BUILD on an instance (its class's ``__setstate__``, or its ``__dict__``);
- ``filled``: APPEND(S)/SETITEM(S)/ADDITEMS on an instance that is not a plain list, dict or set
  (its class's methods run).

A call of anything that is not a named global (a call's result, a persistent id's object) is the
global ``<call of a computed object>``; an extension code is ``<extension code N>``. A load that
fails part-way keeps what ran before the failure: that much the real loader runs too.
"""
from __future__ import annotations

import ast
import collections
import os
import pickletools
import sys
from importlib.machinery import PathFinder
from typing import Any, Dict, List, Optional, Set, Tuple

from ..errors import FormatError
from .machine import AmbiguousPickle, Machine, Policy, Source
from .reading import py3_name

COMPUTED_CALL = "<call of a computed object>"
COMPUTED_GLOBAL = "<computed global>"
MAX_NESTED = 4

# admitted functions that call (or instantiate) what they are given: name -> (index called, index instantiated)
_CALLS_ITS_ARGUMENT = {
    "torch._tensor._rebuild_from_type_v2": (0, 1), "torch._tensor._rebuild_from_type": (0, 1),
    "copyreg._reconstructor": (1, 0), "copyreg.__newobj__": (None, 0), "copyreg.__newobj_ex__": (None, 0),
    "torch._utils._rebuild_wrapper_subclass": (None, 0),
}
# names the C unpickler looks up on the instance itself (so an attribute set by BUILD wins over the class)
_INSTANCE_LOOKUPS = ("__setstate__", "extend", "append", "add")
_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}  # only the names: the machine parses


class Global:
    """A global the pickle names (``module.qualname``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<global {self.name}>"


class Made:
    """What a call or an instantiation made: ``origin`` names its maker (None: computed)."""

    __slots__ = ("origin", "args", "attrs")

    def __init__(self, origin: Optional[Global], args: Any = ()):
        self.origin, self.args, self.attrs = origin, args, {}

    def __repr__(self) -> str:
        return f"<made by {self.origin.name if self.origin else 'a computed call'}>"


class Persistent:
    """What a persistent id loads (a storage, for torch)."""

    __slots__ = ("pid",)

    def __init__(self, pid):
        self.pid = pid


_DATA = (str, bytes, bytearray, int, float, complex, bool, type(None), tuple, list, dict, set, frozenset)


def _plain(value) -> bool:
    """Data all the way down (no global, no made object): what a pure builtin can be run on here. Each
    container is visited once, and at most 10,000 of them (shared structure is no cost to a file)."""
    seen: Set[int] = set()
    todo = [value]
    left = 10000
    while todo:
        v = todo.pop()
        t = type(v)
        if t in (str, bytes, bytearray, int, float, complex, bool, type(None)):
            continue
        if t not in (tuple, list, set, frozenset, dict, collections.OrderedDict):
            return False
        if id(v) in seen:
            continue
        seen.add(id(v))
        left -= 1
        if left < 0:
            return False
        if t in (dict, collections.OrderedDict):
            todo.extend(v.keys())
            todo.extend(v.values())
        else:
            todo.extend(v)
    return True


def _safe_str(obj="", encoding=None, errors="strict"):
    if encoding is None and type(obj) not in (str, int, float, bool, type(None), bytes):
        raise TypeError("str() of a container is not computed here")
    return str(obj) if encoding is None else str(obj, encoding, errors)


def _bounded(ctor):
    def build(source=(), *args):
        if isinstance(source, int) and ctor in (bytes, bytearray):
            raise TypeError("a size, not data")
        return ctor(source, *args)
    return build


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8", "ascii", "iso-8859-1"):
        raise ValueError("a codec not computed here")
    return text.encode(encoding, errors)


# builtins that only convert data (their arguments are data): computed, never imported
_PURE = {
    "builtins.str": _safe_str, "builtins.int": int, "builtins.float": float, "builtins.bool": bool,
    "builtins.complex": complex, "builtins.bytes": _bounded(bytes), "builtins.bytearray": _bounded(bytearray),
    "builtins.tuple": tuple, "builtins.list": list, "builtins.set": set, "builtins.frozenset": frozenset,
    "builtins.dict": dict, "collections.OrderedDict": collections.OrderedDict, "_codecs.encode": _codecs_encode,
}


class UsePolicy(Policy):
    """The scanning policy; ``uses``: global name -> set of uses (see the module doc)."""

    def __init__(self):
        self.machine: Optional[Machine] = None
        self.uses: Dict[str, Set[str]] = {}
        self.built_types: Set[str] = set()
        self.nested: List[Tuple[str, bytes]] = []
        self.enums: Dict[str, bool] = {}  # is_enum_class, once per name

    # -- recording -------------------------------------------------------------------------
    def _use(self, name: str, how: str) -> None:
        self.uses.setdefault(name, set()).add(how)

    def _call_value(self, value) -> None:
        """The unpickler (or an admitted function) calls ``value``."""
        if isinstance(value, Global):
            self._use(value.name, "called")
        elif isinstance(value, (Made, Persistent)):
            self._use(COMPUTED_CALL, "called")
        # calling plain data raises TypeError: the load stops, nothing runs

    def _instantiate_value(self, value) -> None:
        if isinstance(value, Global):
            self._use(value.name, "instantiated")
        elif isinstance(value, (Made, Persistent)):
            self._use(COMPUTED_CALL, "called")

    def note_bytes(self, data, at) -> None:  # noqa: D102 - the machine's hook for bytes it decodes
        # any bytes may be a pickle something unpickles (a class's __setstate__ may pickle.loads its state):
        # protocol 0 has no header to know it by, so every blob is tried (a non-pickle stops at once)
        if len(data) >= 3 and len(self.nested) < 64:
            self.nested.append((f"bytes at {at}" if at >= 0 else "bytes from _codecs.encode", bytes(data)))

    # -- the machine's hooks ---------------------------------------------------------------
    def find_class(self, module: str, name: str):  # noqa: D102
        module, name = py3_name(module, name, self.machine.proto)
        g = Global(f"{module}.{name}")
        self._use(g.name, "referenced")
        return g

    def computed_global(self, module, name):  # noqa: D102 - names the load computes: unknowable here
        if isinstance(module, _DATA) and isinstance(name, _DATA):
            raise FormatError("STACK_GLOBAL requires str")
        g = Global(COMPUTED_GLOBAL)
        self._use(g.name, "referenced")
        return g

    def extension(self, code: int):  # noqa: D102
        g = Global(f"<extension code {code}>")
        self._use(g.name, "referenced")
        return g

    def persistent_load(self, pid):  # noqa: D102
        # the legacy format's ('module', class, source file, source) id loads as the class itself
        if type(pid) is tuple and len(pid) >= 2 and pid[0] == "module":
            return pid[1]
        return Persistent(pid)

    def reduce(self, func, args):  # noqa: D102
        if type(args) is not tuple:
            raise FormatError(f"pickle calls something with arguments that are a {type(args).__name__}")
        if isinstance(func, Global) and len(args) == 1 and _plain(args) and func.name not in _PURE \
                and is_enum_class(func.name, self.enums):
            self._use(func.name, "instantiated")  # Color(1): an enum member looked up by its value
            return Made(func, args)
        self._call_value(func)
        for a in args:
            if isinstance(a, Made) and a.attrs:
                # a function given an object may call its methods (dict(x) calls x.keys()): those looked up on the
                # instance are whatever BUILD put there
                for attr, v in a.attrs.items():
                    if not attr.startswith("__") and isinstance(v, (Global, Made, Persistent)):
                        self._call_value(v)  # a made callable too (a partial): calling it runs its target
        if not isinstance(func, Global):
            if isinstance(func, _DATA):
                raise FormatError(f"pickle calls a {type(func).__name__}, which is not callable")
            return Made(None, args)
        name = func.name
        rule = _CALLS_ITS_ARGUMENT.get(name)
        if rule is not None:
            called, made = rule
            if called is not None and len(args) > called and not (
                    isinstance(args[called], Global) and args[called].name == "builtins.object"):
                self._call_value(args[called])
            if made is not None and len(args) > made:
                self._instantiate_value(args[made])
        pure = _PURE.get(name)
        if pure is not None and _plain(args):
            # a builtin that only converts data: its value, as the loader computes it (a module name
            # for STACK_GLOBAL may be one: str("os")), at a cost counted against the input's size
            self.machine.charge(1 + sum(len(a) for a in args if hasattr(a, "__len__")))
            try:
                value = pure(*args)
            except (TypeError, ValueError, OverflowError, FormatError) as e:
                raise FormatError(f"{name} fails on its arguments: {e}") from None
            if isinstance(value, (bytes, bytearray)):
                self.note_bytes(value, -1)
            return value
        return Made(func, args)

    def inst(self, cls, args):  # noqa: D102 - INST/OBJ: a call (or cls.__new__ for a class and no args)
        return self.reduce(cls, args)

    def newobj(self, cls, args, kwargs):  # noqa: D102
        self._instantiate_value(cls)
        if isinstance(cls, _DATA):
            raise FormatError("NEWOBJ class argument isn't a type object")
        if isinstance(cls, Global):
            if cls.name == "collections.OrderedDict":
                return collections.OrderedDict()
            if cls.name in ("builtins.dict", "builtins.list", "builtins.set"):
                return {"builtins.dict": dict, "builtins.list": list, "builtins.set": set}[cls.name]()
        return Made(cls if isinstance(cls, Global) else None, args)

    def build(self, obj, state):  # noqa: D102
        if isinstance(obj, Global):  # BUILD on a class or function: its __setstate__ runs with the state
            self._use(obj.name, "called")
            return
        if isinstance(obj, Persistent):
            self._use(COMPUTED_CALL, "called")
            return
        if type(obj) is collections.OrderedDict:  # __dict__.update (a state_dict's _metadata)
            return
        if not isinstance(obj, Made):
            raise FormatError(f"pickle sets the state of a {type(obj).__name__}")
        if "__setstate__" in obj.attrs:
            self._call_value(obj.attrs["__setstate__"])
        elif obj.origin is not None:
            self._use(obj.origin.name, "built")
            if obj.origin.name == "numpy.dtype" and obj.args and type(obj.args[0]) is str:
                from .allowlist import numpy_dtype_class
                cls = numpy_dtype_class(obj.args[0])
                if cls:
                    self.built_types.add(cls)
        else:
            self._use(COMPUTED_CALL, "called")  # a computed object's own __setstate__
        # the default __setstate__: a dict (and slot state) becomes attributes the unpickler may look up later
        parts = state if type(state) is tuple and len(state) == 2 else (state,)
        for part in parts:
            if isinstance(part, dict):
                for k, v in part.items():
                    if type(k) is str:
                        obj.attrs[k] = v

    def _fill(self, obj, lookups: Tuple[str, ...]) -> None:
        if isinstance(obj, Made):
            for attr in lookups:
                if attr in obj.attrs:
                    self._call_value(obj.attrs[attr])
                    return
            if obj.origin is not None:
                self._use(obj.origin.name, "filled")
            else:
                self._use(COMPUTED_CALL, "called")
        elif isinstance(obj, (Global, Persistent)):  # a method of a class or module object: a call
            self._use(obj.name if isinstance(obj, Global) else COMPUTED_CALL, "called")
        else:
            raise FormatError(f"pickle fills a {type(obj).__name__} it cannot fill")

    def appends(self, obj, items):  # noqa: D102
        self._fill(obj, ("extend", "append"))

    def additems(self, obj, items):  # noqa: D102
        self._fill(obj, ("add",))

    def setitems(self, obj, pairs):  # noqa: D102 - obj[k] = v goes through the type, not the instance
        if isinstance(obj, list):
            return
        self._fill(obj, ())


class PickleUses:
    """What scanning one pickle found."""

    __slots__ = ("uses", "built_types", "nested", "error", "ambiguous", "end", "value", "opcodes")

    def __init__(self, uses, built_types, nested, error, ambiguous, end, value, opcodes=frozenset()):
        self.uses, self.built_types, self.nested = uses, built_types, nested
        self.error, self.ambiguous, self.end, self.value = error, ambiguous, end, value
        self.opcodes = opcodes  # names of the opcodes it ran outside the machine's hot path (``cold_ops``)


def scan_pickle(data, pos: int = 0, source: Optional[Source] = None, size: Optional[int] = None) -> PickleUses:
    """Run the pickle at ``data[pos:]`` (or from ``source``) symbolically: every global and its uses.

    A pickle that fails part-way reports what ran before (``error`` says where it stopped); an
    ambiguous one (frames read two ways) sets ``ambiguous``.
    """
    policy = UsePolicy()
    machine = policy.machine = Machine(policy, size)
    error, ambiguous, value = None, False, None
    try:
        if source is not None:
            value = machine.load_source(source)
        else:
            value = machine.load(data, pos)
    except AmbiguousPickle as e:
        error, ambiguous = e.message, True
    except FormatError as e:
        error = e.message
    return PickleUses(policy.uses, policy.built_types, policy.nested, error, ambiguous, machine.end, value,
                      frozenset(_OPCODE_NAMES.get(op, f"0x{op:02x}") for op in machine.cold_ops))


# ---------------------------------------------------------------------------------------------
# Enums: a class instantiated with its value, proven from the installed source (nothing imported)

_ENUM_BASES = {"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag", "ReprEnum"}


def is_enum_class(qualname: str, cache: Optional[dict] = None) -> bool:
    """Is ``module.Class`` an Enum, by the source of the installed module (read and parsed, never run)?

    >>> is_enum_class("enum.Enum"), is_enum_class("os.system")
    (False, False)
    """
    if cache is not None and qualname in cache:
        return cache[qualname]
    out = False
    module, _, name = qualname.rpartition(".")
    try:
        tree = _module_ast(module)
        if tree is not None:
            out = _enum_in(tree, name, 0)
    except (OSError, SyntaxError, ValueError, ImportError):
        out = False
    if cache is not None:
        cache[qualname] = out
    return out


def _module_ast(module: str) -> Optional[ast.Module]:
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    spec = PathFinder.find_spec(parts[0], sys.path)
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = PathFinder.find_spec(".".join(parts[:i + 1]), list(spec.submodule_search_locations))
    if spec is None or not spec.origin or not spec.origin.endswith(".py") or not os.path.isfile(spec.origin):
        return None
    if os.path.getsize(spec.origin) > 4 << 20:
        return None
    with open(spec.origin, "rb") as f:
        return ast.parse(f.read())


def _enum_in(tree: ast.Module, name: str, depth: int) -> bool:
    if depth > 4:
        return False
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            for base in node.bases:
                bname = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
                if bname in _ENUM_BASES or bname.endswith("Enum"):
                    return True
                if bname and _enum_in(tree, bname, depth + 1):
                    return True
    return False
