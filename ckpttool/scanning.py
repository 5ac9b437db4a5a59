"""``scan``: every global each pickle in a file would import, how it is used, and whether that is safe.

Nothing is unpickled: each pickle is walked opcode by opcode (``pickletools.genops``) with a
symbolic stack, which tells for every global whether the pickle only refers to it, instantiates it
and fills it with state (a class: ``NEWOBJ`` + ``BUILD``), or *calls* it (``REDUCE``, ``INST``,
``OBJ``). Classification:

- **safe**: what ``torch.load(weights_only=True)`` allows, plus a few benign types
  (``argparse.Namespace``, numpy scalars and dtypes...);
- **needs code**: a class that is only instantiated and given state (a pickled ``nn.Module``):
  loading it runs its class's code, but the pickle itself calls nothing;
- **dangerous**: anything *called* that is not on the allow list. A deny list names the worst
  (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) in the message, but an unknown
  callable is never silently safe.

Pickles are found wherever the formats keep them: a zip's ``data.pkl`` and every other ``.pkl``
record (TorchScript's ``constants.pkl``), the five pickles of the legacy format, a DCP folder's
``.metadata``, a bare pickle file, and pickles nested in ``bytes`` inside any of these.
"""
from __future__ import annotations

import io
import os
import pickletools
import re
import zipfile
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .errors import FileAccessError, FormatError
from .opcodes import generic_stack_effect
from .records import ScanFile, ScanGlobal, ScanResult

# Beyond torch's weights_only allow list: types that hold data and run nothing of note when rebuilt.
BENIGN = {
    "argparse.Namespace", "builtins.frozenset", "builtins.slice", "builtins.range", "builtins.bytes",
    "builtins.object", "builtins.tuple", "builtins.list", "builtins.dict", "builtins.int", "builtins.float",
    "builtins.str", "builtins.bool", "collections.defaultdict", "collections.deque", "copyreg._reconstructor",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "pathlib.PosixPath", "pathlib.WindowsPath",
    "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "numpy.dtype", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.ndarray", "functools.partial",
    # torch.distributed.checkpoint's own metadata classes (a DCP folder's .metadata)
    "torch.distributed.checkpoint.metadata.Metadata", "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta", "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    # TorchScript's own pickle helpers (archives' data.pkl / constants.pkl)
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist", "torch.jit._pickle.build_doublelist",
    "torch.jit._pickle.build_boollist", "torch.jit._pickle.build_tensor_from_id", "torch.jit._pickle.restore_type_tag",
}
# torch.load(weights_only=True)'s own list, for when torch is not importable (the names it held in 2.x).
_WEIGHTS_ONLY_FALLBACK = {
    "collections.OrderedDict", "collections.Counter", "builtins.set", "builtins.bytearray", "builtins.complex",
    "_codecs.encode", "torch.Size", "torch.device", "torch.nn.parameter.Parameter",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_nested_tensor", "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout", "torch.storage.UntypedStorage",
}
# The worst, named in messages (anything else called and not allowed is dangerous all the same).
DENY = {
    "os.system": "runs a shell command", "posix.system": "runs a shell command", "nt.system": "runs a shell command",
    "os.popen": "runs a shell command", "os.execv": "replaces the process", "os.execvp": "replaces the process",
    "os.spawnv": "starts a process", "os.remove": "deletes a file", "os.unlink": "deletes a file",
    "os.rmdir": "deletes a folder", "shutil.rmtree": "deletes a folder tree",
    "subprocess.Popen": "starts a process", "subprocess.call": "starts a process",
    "subprocess.check_call": "starts a process", "subprocess.check_output": "starts a process",
    "subprocess.run": "starts a process", "subprocess.getoutput": "runs a shell command",
    "builtins.eval": "evaluates Python code", "builtins.exec": "executes Python code",
    "builtins.compile": "compiles Python code", "builtins.__import__": "imports a module",
    "builtins.getattr": "reaches any attribute (e.g. os.system)", "builtins.setattr": "changes any object",
    "builtins.open": "opens a file", "builtins.input": "reads the terminal", "builtins.breakpoint": "starts a debugger",
    "importlib.import_module": "imports a module", "runpy.run_path": "runs a Python file",
    "runpy.run_module": "runs a module", "runpy._run_code": "executes Python code",
    "timeit.timeit": "executes Python code", "timeit.repeat": "executes Python code",
    "cProfile.run": "executes Python code", "cProfile.runctx": "executes Python code",
    "profile.run": "executes Python code", "pdb.run": "executes Python code",
    "pickle.loads": "unpickles more (unrestricted)", "pickle.load": "unpickles more (unrestricted)",
    "_pickle.loads": "unpickles more (unrestricted)", "dill.loads": "unpickles more (unrestricted)",
    "marshal.loads": "loads code objects", "types.CodeType": "builds code", "types.FunctionType": "builds a function",
    "socket.socket": "opens a network socket", "socket.create_connection": "opens a network connection",
    "urllib.request.urlopen": "fetches a URL", "webbrowser.open": "opens a browser",
    "ctypes.CDLL": "loads a native library", "numpy.testing._private.utils.runstring": "executes Python code",
    "torch.load": "loads another file (unrestricted by default)", "torch.jit.load": "loads TorchScript code",
    "code.InteractiveInterpreter.runcode": "executes Python code", "operator.attrgetter": "reaches any attribute",
    "operator.methodcaller": "calls any method",
    "sys.exit": "stops the process", "os.mkdir": "creates a folder", "os.makedirs": "creates folders",
    "os.rename": "moves a file", "os.replace": "moves a file", "os.chmod": "changes permissions",
    "os.kill": "signals a process", "os.fork": "forks the process", "os.environ": "reads the environment",
    "shutil.copyfile": "copies a file", "shutil.copy": "copies a file", "shutil.copy2": "copies a file",
    "shutil.move": "moves a file", "tempfile.mkdtemp": "creates a folder", "tempfile.mkstemp": "creates a file",
    "logging.FileHandler": "opens a file", "io.open": "opens a file", "_io.open": "opens a file",
    "codecs.open": "opens a file", "pty.spawn": "starts a process", "asyncio.create_subprocess_exec": "starts a process",
}
# BUILD state keys that make the unpickler call what they hold (BUILD -> __setstate__, APPEND -> append...)
_CALLED_ATTRIBUTES = {"__setstate__", "append", "extend", "add", "update", "__setitem__", "__reduce__",
                      "__reduce_ex__", "__getattr__", "__getattribute__", "__setattr__", "__init__", "__new__"}
# allowed functions that call one of their arguments: (name, index called, index instantiated)
_CALLS_ITS_ARGUMENT = {"torch._tensor._rebuild_from_type_v2": (0, 1), "torch._tensor._rebuild_from_type": (0, 1),
                       "copyreg._reconstructor": (1, 0), "copyreg.__newobj__": (None, 0),
                       "torch._utils._rebuild_wrapper_subclass": (None, 0)}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
MAX_NESTING = 4
MAX_PICKLE = 1 << 31


def allowed_globals() -> Set[str]:
    """What torch.load(weights_only=True) allows by default, plus ``BENIGN``."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        names = set(_get_allowed_globals())
    except Exception:  # torch missing or its private API moved: the recorded list
        names = set(_WEIGHTS_ONLY_FALLBACK)
    return names


class _G:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _S:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _T:
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items


class _D:
    __slots__ = ("items",)

    def __init__(self):
        self.items = []


class _R:
    """The result of a call: calling it again is calling something the pickle computed."""


_OTHER = object()
_MARK = object()


COMPUTED_CALL = "<call of a computed object>"


def scan_pickle(data: bytes, where: str, depth: int = 0) -> Tuple[Dict[str, Set[str]], List[Tuple[str, bytes]]]:
    """``({global: {uses}}, [(where, nested pickle bytes)])`` of one pickle, from its opcodes alone.

    Uses: ``referenced``, ``instantiated`` (NEWOBJ, copyreg), ``called`` (REDUCE, INST/OBJ, an allowed
    function that calls its argument, a BUILD that stores it under a name the unpickler calls).
    A call of something the pickle computed (the result of another call, a persistent id) is
    recorded as the global ``<call of a computed object>``.
    """
    uses: Dict[str, Set[str]] = {}
    nested: List[Tuple[str, bytes]] = []
    stack: list = []
    memo: Dict[int, object] = {}

    def use(item, how: str) -> None:
        if isinstance(item, _G):
            uses.setdefault(item.name, set()).add(how)
        elif isinstance(item, _R) or (how == "called" and not isinstance(item, (_S, _T, _D))):
            # calling (or instantiating) what another call returned, an object, a persistent id...
            uses.setdefault(COMPUTED_CALL, set()).add(how)

    def pop_mark() -> list:
        k = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[k + 1:]
        del stack[k:]
        return items

    def state_calls(state) -> None:
        # BUILD state: {"__setstate__": f} or (dict, {"append": f}) makes the unpickler call f later
        parts = state.items if isinstance(state, _T) and len(state.items) == 2 else [state]
        for part in parts:
            if isinstance(part, _D):
                for k, v in part.items:
                    if isinstance(k, _S) and k.value in _CALLED_ATTRIBUTES and v is not None:
                        use(v, "called")

    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
                g = _G(_py3_name(module, qual))
                uses.setdefault(g.name, set()).add("referenced")
                if name == "GLOBAL":
                    stack.append(g)
                else:  # INST: a call of the class/function with the mark-delimited args
                    pop_mark()
                    use(g, "called")
                    stack.append(_R())
            elif name == "STACK_GLOBAL":
                qual, module = stack.pop(), stack.pop()
                if isinstance(qual, _S) and isinstance(module, _S) and isinstance(qual.value, str) \
                        and isinstance(module.value, str):
                    g = _G(_py3_name(module.value, qual.value))
                else:  # names computed at load time: cannot be known statically
                    g = _G("<computed global>")
                uses.setdefault(g.name, set()).add("referenced")
                stack.append(g)
            elif name in ("EXT1", "EXT2", "EXT4"):
                g = _G(f"<extension code {arg}>")
                uses.setdefault(g.name, set()).add("referenced")
                stack.append(g)
            elif name in _STRING_OPS:
                stack.append(_S(arg))
            elif name in _BYTES_OPS:
                if isinstance(arg, (bytes, bytearray)) and _looks_like_pickle(arg) and depth < MAX_NESTING:
                    nested.append((f"{where} > bytes at {pos}", bytes(arg)))
                stack.append(_S(arg))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _OTHER))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else _OTHER
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else _OTHER
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "TUPLE":
                stack.append(_T(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
                items = stack[len(stack) - n:] if n else []
                del stack[len(stack) - n:]
                stack.append(_T(items))
            elif name == "EMPTY_DICT":
                stack.append(_D())
            elif name == "DICT":
                items = pop_mark()
                d = _D()
                d.items = list(zip(items[0::2], items[1::2]))
                stack.append(d)
            elif name == "SETITEM":
                v, k = stack.pop(), stack.pop()
                if isinstance(stack[-1], _D):
                    stack[-1].items.append((k, v))
            elif name == "SETITEMS":
                items = pop_mark()
                if isinstance(stack[-1], _D):
                    stack[-1].items.extend(zip(items[0::2], items[1::2]))
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                use(fn, "called")
                if isinstance(fn, _G) and fn.name in _CALLS_ITS_ARGUMENT and isinstance(args, _T):
                    called, made = _CALLS_ITS_ARGUMENT[fn.name]
                    if called is not None and len(args.items) > called and not (
                            isinstance(args.items[called], _G) and args.items[called].name == "builtins.object"):
                        use(args.items[called], "called")
                    if made is not None and len(args.items) > made:
                        use(args.items[made], "instantiated")
                if isinstance(fn, _G) and fn.name == "_codecs.encode" and isinstance(args, _T) and args.items \
                        and isinstance(args.items[0], _S) and isinstance(args.items[0].value, str):
                    raw = args.items[0].value.encode("latin-1", "replace")
                    if _looks_like_pickle(raw) and depth < MAX_NESTING:
                        nested.append((f"{where} > bytes at {pos}", raw))
                stack.append(_R())
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    stack.pop()
                stack.pop()
                use(stack.pop(), "instantiated")
                stack.append(_OTHER)
            elif name == "OBJ":
                items = pop_mark()
                if items:
                    use(items[0], "called")
                stack.append(_R())
            elif name == "BUILD":
                state = stack.pop()
                if stack and isinstance(stack[-1], _G):
                    use(stack[-1], "state set on the class itself")
                state_calls(state)
            elif name in ("BINPERSID", "PERSID"):
                pid = stack.pop() if name == "BINPERSID" else _S(arg)
                # the legacy format's ('module', cls, file, source) id loads as cls itself
                if isinstance(pid, _T) and len(pid.items) >= 2 and isinstance(pid.items[0], _S) \
                        and pid.items[0].value == "module":
                    stack.append(pid.items[1])
                else:
                    stack.append(_OTHER)
            elif name == "STOP":
                break
            elif name in ("PROTO", "FRAME"):
                continue
            else:
                generic_stack_effect(op, stack, _MARK, lambda: _OTHER)
    except (ValueError, IndexError, KeyError, EOFError, TypeError, UnicodeDecodeError, AttributeError) as e:
        raise FormatError(f"malformed pickle in {where}: {str(e)[:120]}") from None
    return uses, nested


def _py3_name(module: str, name: str) -> str:
    """``__builtin__.set`` -> ``builtins.set``: the names protocol-2 pickles use, as pickle maps them."""
    import _compat_pickle
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _looks_like_pickle(b: bytes) -> bool:
    return len(b) >= 3 and b[0] == 0x80 and 2 <= b[1] <= 5


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError,
               UnicodeDecodeError, ValueError)


def _pickles(path: str) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of every pickle the file (or folder) holds at top level."""
    from .formats import detect
    if os.path.isdir(path):
        yield from _folder_pickles(path)
        return
    head = _read(path, 64)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        yield from _zip_pickles(path)
        return
    if _looks_like_pickle(head):
        # A bare pickle, or the legacy format: torch.load reads up to five pickles in a row
        # (magic, version, sys_info, the checkpoint, storage keys) whatever their spelling.
        yield from _pickle_sequence(path)
        return
    detect(path)  # raises for what ckpttool does not know; safetensors and ONNX carry no pickles


def _pickle_sequence(path: str) -> Iterator[Tuple[str, bytes]]:
    """A bare pickle; or, when its first pickle's value is the legacy magic number (however it is
    spelled: torch.load only compares values), the five pickles torch.load reads in a row."""
    labels = ("magic number", "protocol version", "sys_info", "main pickle", "storage keys")
    with open(path, "rb") as f:
        legacy = False
        for i in range(5):
            start = f.tell()
            if i and not _looks_like_pickle(f.read(3)):
                raise FormatError(f"legacy file ends before its {labels[i]} pickle", path)
            f.seek(start)
            try:
                for op, _, _ in pickletools.genops(f):
                    if op.name == "STOP":
                        break
            except Exception as e:
                raise FormatError(f"malformed pickle{' (' + labels[i] + ')' if legacy else ''}: {str(e)[:100]}",
                                  path) from None
            end = f.tell()
            f.seek(start)
            data = f.read(end - start)
            if i == 0:
                legacy = _is_magic(data)
                if not legacy:
                    yield "pickle", data
                    return
            yield labels[i], data


def _is_magic(data: bytes) -> bool:
    from .formats.safe_pickle import safe_load
    from .formats.torch_legacy import MAGIC_NUMBER
    try:
        value, _ = safe_load(data)
    except FormatError:
        return False
    return type(value) is int and value == MAGIC_NUMBER


def _zip_pickles(path: str, data: Optional[bytes] = None, label: str = "") -> Iterator[Tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pkl"):
                    if info.file_size > MAX_PICKLE:
                        raise FormatError(f"record {info.filename} declares {info.file_size} bytes", path)
                    yield label + info.filename, zf.read(info)
    except _ZIP_ERRORS as e:
        raise FormatError(f"unreadable zip archive{' ' + label if label else ''}: {str(e)[:120]}", path) from None


def _folder_pickles(path: str) -> Iterator[Tuple[str, bytes]]:
    from .formats import detect
    meta = os.path.join(path, ".metadata")
    if os.path.isfile(meta):  # torch.distributed.checkpoint: .metadata, and torch.save blobs inside .distcp files
        yield ".metadata", _read(meta)
        for n in sorted(os.listdir(path)):
            if n.endswith(".distcp"):
                yield from _distcp_pickles(os.path.join(path, n), n)
        return
    found = False
    for n in sorted(os.listdir(path)):
        p = os.path.join(path, n)
        if os.path.isfile(p) and n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt")):
            found = True
            for where, data in _pickles(p):
                yield f"{n}: {where}", data
    if not found:
        detect(path)  # a safetensors / ONNX folder has no pickles; anything else is an error


def _distcp_pickles(path: str, label: str) -> Iterator[Tuple[str, bytes]]:
    """Non-tensor items DCP writes into a .distcp file with torch.save: zip archives, found by their headers."""
    data = _read(path)
    pos = data.find(b"PK\x03\x04")
    while pos >= 0:
        end = data.find(b"PK\x05\x06", pos)
        if end < 0:
            break
        blob = data[pos:end + 22 + int.from_bytes(data[end + 20:end + 22], "little")]
        yield from _zip_pickles(path, blob, f"{label} @ {pos}: ")
        pos = data.find(b"PK\x03\x04", end)


def _read(path: str, n: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise FileAccessError(f"cannot read: {e.strerror or e}", path) from None


def scan_file(path: str, allowed: Optional[Set[str]] = None) -> ScanFile:
    """Scan one path; see the module doc."""
    if not os.path.exists(path):
        raise FileAccessError("no such file or directory", path)
    allowed = allowed_globals() if allowed is None else allowed
    merged: Dict[str, Dict[str, Set[str]]] = {}  # global -> where -> uses
    todo = list(_pickles(path))
    pickles = 0
    while todo:
        where, data = todo.pop(0)
        pickles += 1
        try:
            uses, nested = scan_pickle(data, where, depth=where.count(" > "))
        except FormatError as e:
            e.path = e.path or path
            raise
        for g, how in uses.items():
            merged.setdefault(g, {}).setdefault(where, set()).update(how)
        todo.extend(nested)
    globals_: List[ScanGlobal] = []
    for g in sorted(merged):
        how = set().union(*merged[g].values())
        verdict = classify(g, how, allowed)
        if len(how) > 1:
            how.discard("referenced")  # every global is referenced; say the stronger use
        globals_.append(ScanGlobal(name=g, verdict=verdict, uses=tuple(sorted(how)), where=tuple(sorted(merged[g])),
                                   note=_denied(g)))
    from .formats import detect
    try:
        fmt = detect(path)
    except FormatError:
        fmt = "dcp" if os.path.isfile(os.path.join(path, ".metadata")) else "unknown"
    return ScanFile(path=path, pickles=pickles, globals=tuple(globals_), format=fmt)


def classify(name: str, uses: Set[str], allowed: Set[str]) -> str:
    """``safe`` | ``needs code`` | ``dangerous`` for one global and how the pickle uses it."""
    if not _NAME.fullmatch(name) or _denied(name):  # incl. <computed ...> and names that are no Python path
        return "dangerous"
    if name in allowed or name in BENIGN or _is_torch_builtin_type(name):
        return "safe"
    if "called" in uses:
        return "dangerous"
    return "needs code"


def _denied(name: str) -> str:
    """The deny-list note for ``name`` (``posix.system`` and ``nt.system`` are ``os.system``), or ""."""
    for alias in ("posix.", "nt."):
        if name.startswith(alias):
            return DENY.get("os." + name[len(alias):], DENY.get(name, ""))
    return DENY.get(name, "")


def _is_torch_builtin_type(name: str) -> bool:
    # storage classes and dtypes torch names by module: torch.FloatStorage, torch.cuda.HalfStorage, torch.float16
    mod, _, leaf = name.rpartition(".")
    return mod in ("torch", "torch.cuda") and leaf.endswith("Storage")


def scan(paths: Sequence[str]) -> ScanResult:
    """Scan each path; the result is dangerous when any file is.

    >>> r = scan(["model.pt"])       # doctest: +SKIP
    >>> r.dangerous, r.files[0].dangerous_names   # doctest: +SKIP
    (False, ())
    """
    allowed = allowed_globals()
    files = tuple(scan_file(os.fspath(p), allowed) for p in paths)
    dangerous = any(f.dangerous_names for f in files)
    return ScanResult(files=files, dangerous=dangerous, exit_code=1 if dangerous else 0)


def safe_globals_line(f: ScanFile) -> Optional[str]:
    """The ``add_safe_globals`` line that lets torch.load(weights_only=True) read a file with no dangerous globals."""
    if f.dangerous_names or f.format == "torchscript":  # TorchScript loads with torch.jit.load, not torch.load
        return None
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        default = set(_get_allowed_globals())
    except Exception:
        default = set(_WEIGHTS_ONLY_FALLBACK)
    missing = [g.name for g in f.globals if g.name not in default and not _is_torch_builtin_type(g.name)
               and not g.name.startswith("<") and g.name not in _HANDLED_BY_OPCODES]
    if not missing:
        return None
    return "torch.serialization.add_safe_globals([" + ", ".join(missing) + "])"


# builtins the weights_only unpickler rebuilds without an allow-list entry
_HANDLED_BY_OPCODES = {"builtins.tuple", "builtins.list", "builtins.dict", "builtins.int", "builtins.float",
                       "builtins.str", "builtins.bool", "builtins.bytes"}
