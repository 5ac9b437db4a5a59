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

import os
import pickletools
import zipfile
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .errors import FileAccessError, FormatError
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
    "sys.exit": "stops the process",
}
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


_OTHER = object()
_MARK = object()


def scan_pickle(data: bytes, where: str, depth: int = 0) -> Tuple[Dict[str, Set[str]], List[Tuple[str, bytes]]]:
    """``({global: {uses}}, [(where, nested pickle bytes)])`` of one pickle, from its opcodes alone."""
    uses: Dict[str, Set[str]] = {}
    nested: List[Tuple[str, bytes]] = []
    stack: list = []
    memo: Dict[int, object] = {}

    def use(item, how: str) -> None:
        if isinstance(item, _G):
            uses.setdefault(item.name, set()).add(how)

    def pop_mark() -> list:
        k = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[k + 1:]
        del stack[k:]
        return items

    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
                g = _G(_py3_name(module, qual))
                uses.setdefault(g.name, set()).add("referenced")
                if name == "GLOBAL":
                    stack.append(g)
                else:  # INST: class, mark-delimited args, instantiated now
                    args = pop_mark()
                    use(g, "called" if args else "instantiated")
                    stack.append(_OTHER)
            elif name == "STACK_GLOBAL":
                qual, module = stack.pop(), stack.pop()
                if isinstance(qual, _S) and isinstance(module, _S):
                    g = _G(f"{module.value}.{qual.value}")
                    uses.setdefault(g.name, set()).add("referenced")
                    stack.append(g)
                else:  # names computed at load time: cannot be known statically
                    uses.setdefault("<computed global>", set()).add("referenced")
                    stack.append(_G("<computed global>"))
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
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "TUPLE":
                stack.append(_T(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
                n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
                items = stack[len(stack) - n:] if n else []
                del stack[len(stack) - n:]
                stack.append(_T(items))
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                if isinstance(fn, _G) and fn.name in ("copyreg._reconstructor", "copyreg.__newobj__") and \
                        isinstance(args, _T) and args.items:
                    use(fn, "called")
                    use(args.items[0], "instantiated")
                else:
                    use(fn, "called")
                    if isinstance(fn, _G) and fn.name == "_codecs.encode" and isinstance(args, _T) and args.items \
                            and isinstance(args.items[0], _S) and isinstance(args.items[0].value, str):
                        raw = args.items[0].value.encode("latin-1", "replace")
                        if _looks_like_pickle(raw) and depth < MAX_NESTING:
                            nested.append((f"{where} > bytes at {pos}", raw))
                stack.append(_OTHER)
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                if name == "NEWOBJ_EX":
                    stack.pop()
                stack.pop()
                use(stack.pop(), "instantiated")
                stack.append(_OTHER)
            elif name == "OBJ":
                items = pop_mark()
                if items:
                    use(items[0], "called" if len(items) > 1 else "instantiated")
                stack.append(_OTHER)
            elif name == "BUILD":
                stack.pop()
                if stack and isinstance(stack[-1], _G):
                    use(stack[-1], "state set on the class itself")
            elif name == "STOP":
                break
            elif name in ("PROTO", "FRAME"):
                continue
            else:
                before, after = op.stack_before, op.stack_after
                marks = [j for j, s in enumerate(before) if s is pickletools.markobject]
                if marks:
                    pop_mark()
                    drop = marks[0]
                else:
                    drop = len(before)
                if drop:
                    if len(stack) < drop:
                        raise ValueError("stack underflow")
                    del stack[len(stack) - drop:]
                stack.extend(_OTHER for _ in after)
    except (ValueError, IndexError, KeyError, EOFError, TypeError, UnicodeDecodeError) as e:
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


def _pickles(path: str) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of every pickle the file (or DCP folder) holds at top level."""
    from .formats import detect
    from .formats.torch_legacy import has_magic
    if os.path.isdir(path):
        meta = os.path.join(path, ".metadata")
        if os.path.isfile(meta):
            yield ".metadata", _read(meta)
            return
        found = False
        for n in sorted(os.listdir(path)):
            p = os.path.join(path, n)
            if os.path.isfile(p) and (n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))):
                found = True
                for where, data in _pickles(p):
                    yield f"{n}: {where}", data
        if not found:
            raise FormatError("folder holds no pickle-bearing file to scan", path)
        return
    head = _read(path, 64)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".pkl"):
                        if info.file_size > MAX_PICKLE:
                            raise FormatError(f"record {info.filename} declares {info.file_size} bytes", path)
                        yield info.filename, zf.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise FormatError(f"unreadable zip archive: {e}", path) from None
        return
    if has_magic(head):
        with open(path, "rb") as f:
            for label in ("magic number", "protocol version", "sys_info", "main pickle", "storage keys"):
                start = f.tell()
                try:
                    for op, _, _ in pickletools.genops(f):
                        if op.name == "STOP":
                            break
                except Exception as e:
                    raise FormatError(f"malformed pickle ({label}): {str(e)[:100]}", path) from None
                end = f.tell()
                f.seek(start)
                yield label, f.read(end - start)
        return
    if _looks_like_pickle(head):
        yield "pickle", _read(path)
        return
    detect(path)  # raises for what ckpttool does not know; safetensors and ONNX carry no pickles


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
                                   note=DENY.get(g, "")))
    from .formats import detect
    try:
        fmt = detect(path)
    except FormatError:
        fmt = "dcp" if os.path.isfile(os.path.join(path, ".metadata")) else "unknown"
    return ScanFile(path=path, pickles=pickles, globals=tuple(globals_), format=fmt)


def classify(name: str, uses: Set[str], allowed: Set[str]) -> str:
    """``safe`` | ``needs code`` | ``dangerous`` for one global and how the pickle uses it."""
    if name in allowed or name in BENIGN or _is_torch_builtin_type(name):
        return "safe"
    if name in DENY or name.startswith("<"):
        return "dangerous"
    if "called" in uses:
        return "dangerous"
    return "needs code"


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
