"""Helpers the hostile-input tests share: pickles assembled opcode by opcode, live payloads (each creates a
marker file under the stock unpickler, never under ckpttool), the containers they are embedded in (bare, a
torch zip's data.pkl, a legacy file's main pickle), an audit window over what the process does while
ckpttool reads, and the zip record tampering the scan tests use. Imported by test modules; holds no tests.
"""
from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import os
import pickle
import shlex
import struct
import sys
import zipfile
from typing import Callable, Dict, Iterator, List, Tuple

from click.testing import CliRunner

import ckpttool
import ckpttool.formats as formats
import ckpttool.formats.bare_pickle  # noqa: F401  (imported up front so the audit window sees no first-time imports)
import ckpttool.formats.torch_legacy  # noqa: F401
import ckpttool.formats.torch_zip  # noqa: F401
import ckpttool.render  # noqa: F401
import ckpttool.summary  # noqa: F401
from ckpttool.cli import cli
from ckpttool.errors import CkptError
from ckpttool.formats.torch_legacy import MAGIC_PREFIX

try:  # first-time imports of the renderer's helpers happen here, not inside an audited window
    import tabulate  # noqa: F401
except ImportError:  # pragma: no cover
    pass


# =============================================================================================
# Pickle opcodes, by hand
# =============================================================================================

def u(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def by(b: bytes) -> bytes:
    """BINBYTES."""
    return b"B" + struct.pack("<I", len(b)) + b


def i4(n: int) -> bytes:
    """BININT (signed 32-bit)."""
    return b"J" + struct.pack("<i", n)


def lng(n: int) -> bytes:
    """LONG1 (any int)."""
    b = n.to_bytes((n.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0 text form)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def sglob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4)."""
    return u(module) + u(name) + b"\x93"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def lst(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def dct(**items: bytes) -> bytes:
    return b"}(" + b"".join(u(k) + v for k, v in items.items()) + b"u"


def call(fn: bytes, *args: bytes) -> bytes:
    """``fn(*args)``: the callable's opcodes, an argument tuple, REDUCE."""
    return fn + tup(*args) + b"R"


def pk(body: bytes, proto: int = 2) -> bytes:
    """A complete pickle: PROTO, the body (one value on the stack), STOP."""
    return b"\x80" + bytes([proto]) + body + b"."


# =============================================================================================
# The payloads: each creates ctx.marker when run by a stock unpickler
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class Ctx:
    marker: str
    script: str  # a .py file that creates the marker when run

    @property
    def cmd(self) -> str:
        return f"touch {shlex.quote(self.marker)}"

    @property
    def code(self) -> str:
        return f"open({self.marker!r}, 'w').close()"


# copyreg extension codes the EXT payloads use (registered only around the tests that need them)
EXT_CODES = {("os", "system"): 0xF1, ("builtins", "exec"): 0x04D2, ("builtins", "eval"): 0x0012_3457}


def _nested(c: Ctx) -> bytes:
    return pk(call(glob("os", "system"), u(c.cmd)))


PAYLOADS: Dict[str, Tuple[Callable[[Ctx], bytes], Tuple[str, ...]]] = {
    # --- plain GLOBAL + REDUCE of things that run a shell or Python
    "os.system": (lambda c: pk(call(glob("os", "system"), u(c.cmd))), ("os",)),
    "posix.system/STACK_GLOBAL": (lambda c: pk(call(sglob("posix", "system"), u(c.cmd)), 4), ("posix",)),
    "subprocess.Popen": (lambda c: pk(call(glob("subprocess", "Popen"), lst(u("touch"), u(c.marker)))),
                         ("subprocess",)),
    "subprocess.check_call": (lambda c: pk(call(sglob("subprocess", "check_call"), lst(u("touch"), u(c.marker))), 4),
                              ("subprocess",)),
    "builtins.eval": (lambda c: pk(call(glob("builtins", "eval"), u(c.code))), ()),
    "__builtin__.exec/proto0": (lambda c: b"\x80\x02" + glob("__builtin__", "exec") + b"(S" + repr(c.code).encode()
                                + b"\ntR.", ()),
    "builtins.open": (lambda c: pk(call(glob("builtins", "open"), u(c.marker), u("w"))), ()),
    "io.open": (lambda c: pk(call(glob("io", "open"), u(c.marker), u("w"))), ("io",)),
    "shutil.copyfile": (lambda c: pk(call(glob("shutil", "copyfile"), u(os.devnull), u(c.marker))), ("shutil",)),
    # --- getattr / import chains: getattr(__import__('os'), 'system')(cmd)
    "getattr(__import__('os'),'system')": (
        lambda c: pk(call(call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), u("os")),
                               u("system")), u(c.cmd))), ()),
    "importlib.import_module": (
        lambda c: pk(call(call(glob("builtins", "getattr"), call(glob("importlib", "import_module"), u("os")),
                               u("system")), u(c.cmd))), ("importlib",)),
    "operator.methodcaller on pathlib.Path": (
        lambda c: pk(call(call(glob("operator", "methodcaller"), u("touch")),
                          call(glob("pathlib", "Path"), u(c.marker)))), ("operator", "pathlib")),
    "code.InteractiveInterpreter().runsource": (
        lambda c: pk(call(call(glob("operator", "methodcaller"), u("runsource"), u(c.code)),
                          call(glob("code", "InteractiveInterpreter")))), ("code", "operator", "codeop")),
    "functools.partial then call": (
        lambda c: pk(call(glob("functools", "partial"), glob("os", "system"), u(c.cmd)) + b")R"), ("functools",)),
    # --- "run this file / string" helpers
    "runpy.run_path": (lambda c: pk(call(glob("runpy", "run_path"), u(c.script))), ("runpy",)),
    "timeit.timeit": (lambda c: pk(call(glob("timeit", "timeit"), u("pass"), u(c.code))), ("timeit",)),
    "cProfile.run": (lambda c: pk(call(glob("cProfile", "run"), u(c.code))), ("cProfile", "profile", "pstats")),
    "numpy.testing runstring": (lambda c: pk(call(glob("numpy.testing._private.utils", "runstring"), u(c.code),
                                                  b"}")), ("numpy.testing._private.utils", "numpy.testing")),
    # --- a pickle inside the pickle
    "pickle.loads(nested)": (lambda c: pk(call(glob("pickle", "loads"), by(_nested(c)))), ("pickle",)),
    "_pickle.loads(nested)": (lambda c: pk(call(sglob("_pickle", "loads"), by(_nested(c))), 4), ("_pickle",)),
    "torch.storage._load_from_bytes(nested)": (
        lambda c: pk(call(glob("torch.storage", "_load_from_bytes"), by(_nested(c)))), ("torch.storage",)),
    # --- other ways to reach a callable: INST, OBJ, NEWOBJ(+BUILD __setstate__), NEWOBJ_EX, EXT, memo
    "INST": (lambda c: b"\x80\x02(" + u(c.cmd) + b"ios\nsystem\n.", ("os",)),
    "OBJ": (lambda c: b"\x80\x02(" + glob("os", "system") + u(c.cmd) + b"o.", ("os",)),
    "NEWOBJ + BUILD sets __setstate__": (
        lambda c: pk(glob("types", "SimpleNamespace") + b")\x81"
                     + b"N" + dct(__setstate__=glob("os", "system")) + b"\x86b"
                     + u(c.cmd) + b"b"), ("types",)),
    "NEWOBJ_EX + BUILD sets __setstate__": (
        lambda c: pk(sglob("types", "SimpleNamespace") + b")}\x92"
                     + b"N" + b"}" + u("__setstate__") + sglob("builtins", "exec") + b"s\x86b"
                     + u(c.code) + b"b", 4), ("types",)),
    "EXT1 (copyreg registry)": (lambda c: pk(b"\x82" + bytes([EXT_CODES["os", "system"]]) + tup(u(c.cmd)) + b"R"),
                                ("os",)),
    "EXT2 (copyreg registry)": (lambda c: pk(b"\x83" + struct.pack("<H", EXT_CODES["builtins", "exec"])
                                             + tup(u(c.code)) + b"R"), ()),
    "EXT4 (copyreg registry)": (lambda c: pk(b"\x84" + struct.pack("<I", EXT_CODES["builtins", "eval"])
                                             + tup(u(c.code)) + b"R"), ()),
    "memo BINPUT/BINGET": (lambda c: pk(glob("os", "system") + b"q\x07" + b"0" + b"N0" + b"h\x07"
                                        + tup(u(c.cmd)) + b"R"), ("os",)),
    "memo PUT/GET text": (lambda c: b"\x80\x02" + glob("os", "system") + b"p42\n0" + b"g42\n"
                          + tup(u(c.cmd)) + b"R.", ("os",)),
    "memo MEMOIZE/LONG_BINGET": (lambda c: pk(sglob("posix", "system") + b"\x94" + b"0" + b"j\x00\x00\x00\x00"
                                              + tup(u(c.cmd)) + b"R", 4), ("posix",)),
    "FRAME + STACK_GLOBAL": (lambda c: (lambda body: b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body)(
        sglob("os", "system") + tup(u(c.cmd)) + b"R."), ("os",)),
    "dict of payloads (torch.save-like)": (
        lambda c: pk(dct(state_dict=b"}", epoch=b"K\x03", model=call(glob("os", "system"), u(c.cmd)))), ("os",)),
}

PAYLOAD_IDS = list(PAYLOADS)
CONTAINERS = ("bare", "zip", "legacy")


@contextlib.contextmanager
def ext_registry():
    """Register the EXT codes (as a victim process would have) for the duration of a test."""
    added = []
    for (mod, name), code in EXT_CODES.items():
        if copyreg._extension_registry.get((mod, name)) != code:
            copyreg.add_extension(mod, name, code)
            added.append((mod, name, code))
    try:
        yield
    finally:
        for mod, name, code in added:
            copyreg.remove_extension(mod, name, code)


def make_ctx(folder) -> Ctx:
    marker = os.path.join(str(folder), "MARKER")
    script = os.path.join(str(folder), "payload_script.py")
    with open(script, "w") as f:
        f.write(f"open({marker!r}, 'w').close()\n")
    return Ctx(marker=marker, script=script)


def markers_in(folder) -> List[str]:
    return sorted(n for n in os.listdir(str(folder)) if n.startswith("MARKER"))


# =============================================================================================
# Containers: a bare pickle, a real torch zip, a real legacy file, each carrying the payload
# =============================================================================================

def zip_with_pickle(src: str, dst: str, data_pkl: bytes, compress: int = zipfile.ZIP_STORED) -> str:
    """Copy torch zip ``src`` to ``dst`` with its data.pkl replaced by ``data_pkl``."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            if info.filename.endswith("/data.pkl"):
                zo.writestr(info.filename, data_pkl, compress_type=compress)
            else:
                zo.writestr(info, zi.read(info))
    return dst


def legacy_header(src: str) -> bytes:
    """The magic / protocol / sys_info pickles of a real legacy-format file."""
    with open(src, "rb") as f:
        for _ in range(3):
            pickle.load(f)  # plain ints and a dict of ints, written by torch itself
        end = f.tell()
        f.seek(0)
        head = f.read(end)
    assert head.startswith(MAGIC_PREFIX)
    return head


def legacy_with_pickle(src: str, dst: str, main: bytes, keys: bytes = pickle.dumps([], protocol=2),
                       storages: bytes = b"") -> str:
    with open(dst, "wb") as f:
        f.write(legacy_header(src) + main + keys + storages)
    return dst


def embed(container: str, data: bytes, tmp_path, make) -> str:
    if container == "bare":
        path = os.path.join(str(tmp_path), "payload.pkl")
        with open(path, "wb") as f:
            f.write(data)
        return path
    if container == "zip":
        return zip_with_pickle(make("state_dict.pt"), os.path.join(str(tmp_path), "payload.pt"), data)
    if container == "legacy":
        return legacy_with_pickle(make("legacy.pt"), os.path.join(str(tmp_path), "payload_legacy.pt"), data)
    raise AssertionError(container)


# =============================================================================================
# The audit window: what the process did while ckpttool read a file
# =============================================================================================

_AUDIT: List[Tuple[str, tuple]] = []
_AUDIT_ON = [False]
FORBIDDEN_EVENTS = {
    "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
    "os.truncate", "shutil.copyfile", "shutil.rmtree", "shutil.move", "ctypes.dlopen", "ctypes.dlsym",
    "socket.connect", "socket.bind", "webbrowser.open", "cpython.run_file", "cpython.run_command",
    "pickle.find_class",     # the stock find_class (which imports) was reached
    "object.__setattr__",    # __code__/__defaults__ of a function, or an attribute of a type, was set
    "code.__new__", "function.__new__",
}


def _audit_hook(event: str, args: tuple) -> None:
    if _AUDIT_ON[0]:
        _AUDIT.append((event, args))


sys.addaudithook(_audit_hook)  # inert outside audited(); hooks cannot be removed


def _writes(event: str, args: tuple) -> bool:
    if event != "open" or len(args) < 3:
        return False
    path, mode, flags = args[0], args[1], args[2]
    if isinstance(path, (str, bytes)) and ("__pycache__" in str(path) or str(path).endswith(".pyc")):
        return False
    if isinstance(mode, str) and any(ch in mode for ch in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


@contextlib.contextmanager
def audited():
    """Record audit events in the block; yields the list, checked by ``assert_clean``."""
    start = len(_AUDIT)
    _AUDIT_ON[0] = True
    seen: List[Tuple[str, tuple]] = []
    try:
        yield seen
    finally:
        _AUDIT_ON[0] = False
        seen.extend(_AUDIT[start:])
        del _AUDIT[start:]


def assert_clean(events, modules_before, named_modules=()) -> None:
    bad = [(e, repr(a)[:150]) for e, a in events if e in FORBIDDEN_EVENTS or e.startswith(("os.exec", "os.spawn"))]
    assert not bad, f"forbidden actions while reading: {bad}"
    writes = [repr(a)[:150] for e, a in events if _writes(e, a)]
    assert not writes, f"files opened for writing while reading: {writes}"
    compiled = [repr(a)[:150] for e, a in events
                if e == "compile" and not (len(a) > 1 and str(a[1]).endswith(".py"))]
    assert not compiled, f"source compiled at run time while reading: {compiled}"
    imported = {str(a[0]) for e, a in events if e == "import" and a}
    new = set(sys.modules) - set(modules_before)
    for mod in named_modules:
        parts = mod.split(".")
        family = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        for m in family:
            if m not in modules_before:
                assert m not in new, f"reading the file imported {m!r}, which the payload names"
                assert m not in imported, f"reading the file tried to import {m!r}"


def cli_run(*args):
    return CliRunner().invoke(cli, list(args))


def assert_cli_sane(result, allow=(0, 2)) -> None:
    """Exit 0 or 2, and never a traceback (a non-CkptError is a bug, DESIGN.md)."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), \
        f"crashed with {type(exc).__name__}: {exc!s:.300}"
    assert result.exit_code in allow, (result.exit_code, result.output[-500:])
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("ckpttool: error: "), result.stderr[-300:]


def read_everything(path: str, fmt=None):
    """ckpttool.open plus every inspect rendering; returns (checkpoint or error, cli results)."""
    try:
        got = formats.open(path, fmt) if fmt else ckpttool.open(path)
    except CkptError as e:
        got = e
    results = [cli_run("inspect", path), cli_run("inspect", path, "--json"), cli_run("inspect", path, "--stats")]
    return got, results


# =============================================================================================
# Payloads that name no dangerous global by its own name (the scanner must follow the value)
# =============================================================================================

def _mkdtemp_noargs(c):  # INST with an empty argument list: tempfile.mkdtemp() (TMPDIR points at the marker)
    return b"\x80\x02(itempfile\nmkdtemp\n."


BYPASSES = {
    # the callable is DUP'd: REDUCE calls a copy the scanner no longer knows by name
    "DUP launders the callable": lambda c: pk(glob("shutil", "copyfile") + b"2" + tup(u(os.devnull), u(c.marker))
                                              + b"R"),
    # functools.partial (benign, as vit_b_16 needs) wraps any function; the partial is then called
    "functools.partial(copyfile, ...)()": lambda c: pk(call(glob("functools", "partial"), glob("shutil", "copyfile"),
                                                            u(os.devnull), u(c.marker)) + b")R"),
    # BUILD with slot state sets an instance's __setstate__; the next BUILD calls it
    "BUILD sets __setstate__ = os.mkdir": lambda c: pk(glob("types", "SimpleNamespace") + b")\x81" + b"N"
                                                       + dct(__setstate__=glob("os", "mkdir")) + b"\x86b"
                                                       + u(c.marker) + b"b"),
    # BUILD sets an instance attribute named append; APPEND calls it
    "BUILD sets append = os.mkdir, APPEND calls it": lambda c: pk(glob("types", "SimpleNamespace") + b")\x81"
                                                                  + dct(append=glob("os", "mkdir")) + b"b"
                                                                  + u(c.marker) + b"a"),
    # copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state) when base is not object
    "copyreg._reconstructor runs base.__init__": lambda c: pk(call(glob("copyreg", "_reconstructor"),
                                                                   glob("logging", "FileHandler"),
                                                                   glob("logging", "FileHandler"), u(c.marker))),
    # an allow-listed torch function that calls its first argument: func(*args)
    "_rebuild_from_type_v2 calls its func": lambda c: pk(call(glob("torch._tensor", "_rebuild_from_type_v2"),
                                                              glob("os", "mkdir"), glob("torch", "Tensor"),
                                                              tup(u(c.marker)), b"}")),
    # INST (and OBJ) with no arguments is cls(): a call of whatever the global is
    "INST with no arguments calls a function": _mkdtemp_noargs,
}


def record_headers(b: bytearray, name: bytes) -> Iterator[Tuple[bytes, int, int, int, int]]:
    """Each zip header in ``b`` that names ``name``, local (PK\\x03\\x04) and central (PK\\x01\\x02): its
    signature, the header's offset, the name's offset, and the offsets of its flag and compression method
    fields. ``b`` may be changed between items (the search goes on after the name)."""
    i = -1
    while True:
        i = b.find(name, i + 1)
        if i < 0:
            return
        for sig, off, flag_at, method_at in ((b"PK\x03\x04", 30, 6, 8), (b"PK\x01\x02", 46, 8, 10)):
            h = i - off
            if h >= 0 and b[h:h + 4] == sig:
                yield sig, h, i, h + flag_at, h + method_at


def flag_record(path: str, record_suffix: str, flag=None, method=None, version=None, bad_utf8_name=False) -> None:
    """Change a record's general-purpose flag, compression method, or (central directory only) the version
    needed to extract, or make its central-directory name invalid UTF-8 under the UTF-8 flag."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(record_suffix)).encode()
    b = bytearray(open(path, "rb").read())
    for sig, h, i, flag_at, method_at in record_headers(b, name):
        if flag is not None:
            b[flag_at:flag_at + 2] = struct.pack("<H", flag)
        if method is not None:
            b[method_at:method_at + 2] = struct.pack("<H", method)
        if sig == b"PK\x01\x02" and version is not None:
            b[h + 6:h + 8] = struct.pack("<H", version)
        if sig == b"PK\x01\x02" and bad_utf8_name:
            b[h + 8:h + 10] = struct.pack("<H", 0x0800)
            b[i] = 0xFF
    with open(path, "wb") as fh:
        fh.write(bytes(b))
