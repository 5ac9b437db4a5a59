#!/usr/bin/env python
"""Fuzz ckpttool's readers and its scanner: whatever the bytes, a CkptError or a result, nothing runs.

Inputs are real small checkpoints (a torch zip, a legacy file, a safetensors file, a GGUF file) with
their bytes mutated, structure-aware variants of them (data.pkl swapped for another pickle with the
zip's CRCs right, a zip record's flag / method / size fields changed, a safetensors header
rebuilt from generated JSON, a GGUF file built from generated key-values
and tensor infos with counts, string and array lengths, dims, types, offsets and alignment changed), random pickle opcode streams, and well-formed pickles built from
generated values (containers, calls, NEWOBJ/BUILD, memo, persistent storage ids, tensor rebuilds
with odd sizes, strides and offsets), each as a bare pickle, as a zip's data.pkl (over real
storages) and as a legacy file's main pickle. Each input is written to a temporary folder (never
the repository) and given, in this process, to ``ckpttool.open``, ``ckpttool.scan`` and
``ckpttool.inspect`` (plus the table and JSON renderings). The only exception allowed out is a
``CkptError``; anything else is a bug, as is a hang (``--timeout``), a MemoryError under the
address-space cap, a marker file created by a seed payload, or a process spawned while reading.

    python fuzz/fuzz_readers.py --examples 5000 --seed 1                  # every target, 5000 each
    python fuzz/fuzz_readers.py --examples 20000 --target pickle --seed 7
    python fuzz/fuzz_readers.py --replay /tmp/ckpttool_fuzz_x/bug-1.bin   # rerun one reproducer

Distinct bugs (by exception type and the line that raised it) are collected while fuzzing goes
on; at the end each is printed with its smallest input (base64, and a reproducer file in the
temporary folder), and the exit status is 1. Exit 0 when nothing was found.

Uses hypothesis (``@settings(max_examples=N, deadline=None, database=None)``), called directly.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TARGETS = ("zip", "zip-record", "legacy", "safetensors", "pickle", "zip-pickle", "legacy-pickle", "gguf", "pt2")

# =============================================================================================
# Seeds: real checkpoints, made once into the work folder
# =============================================================================================


class Seeds:
    def __init__(self, work: str):
        import torch
        self.work = work
        self.marker = os.path.join(work, "MARKER")
        torch.manual_seed(0)
        sd = {"w": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.int64), "h": torch.ones(2).half()}
        sd["view"] = sd["w"][1:, 2:]
        zpath = os.path.join(work, "seed.pt")
        torch.save({"state_dict": sd, "epoch": 2, "opt": {"lr": 0.1}}, zpath)
        lpath = os.path.join(work, "seed_legacy.pt")
        torch.save({"state_dict": sd, "epoch": 2}, lpath, _use_new_zipfile_serialization=False)
        from safetensors.torch import save_file
        spath = os.path.join(work, "seed.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items() if k != "view"}, spath, metadata={"format": "pt"})
        self.zip = open(zpath, "rb").read()
        self.gguf = _gguf_seed(os.path.join(work, "seed.gguf"))
        self.pt2 = _pt2_seed(os.path.join(work, "seed.pt2"))
        with zipfile.ZipFile(io.BytesIO(self.pt2)) as z:
            self.pt2_records = [(i, z.read(i)) for i in z.infolist()]
        self.legacy = open(lpath, "rb").read()
        self.safetensors = open(spath, "rb").read()
        with zipfile.ZipFile(zpath) as z:
            self.zip_records = [(i, z.read(i)) for i in z.infolist()]
        self.data_pkl_name = next(i.filename for i, _ in self.zip_records if i.filename.endswith("/data.pkl"))
        self.data_pkl = dict((i.filename, d) for i, d in self.zip_records)[self.data_pkl_name]
        # legacy: the five pickles' spans, then the raw storages
        spans, start = [], 0
        for _ in range(5):
            end = start + max(pos for _, _, pos in pickletools.genops(self.legacy[start:])) + 1
            spans.append((start, end))
            start = end
        self.legacy_spans = spans
        # pickles to mutate: torch's own, a plain dict, a pickled full model, and live payloads
        # (each would create self.marker if run)
        cmd = f"touch {self.marker}"
        code = f"open({self.marker!r}, 'w').close()"
        self.pickles = [
            self.data_pkl,
            pickle.dumps({"a": [1, 2.5, (3, b"x")], "b": {"c": None, "d": True}, "s": {1, 2}}, protocol=2),
            pickle.dumps({"a": [1, 2.5, (3, b"x")], "b": {"c": None}}, protocol=4),
            self.legacy[spans[3][0]:spans[3][1]],
            b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd.encode() + b"\x85R.",
            b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93X" + struct.pack("<I", len(code)) + code.encode() + b"\x85R.",
            b"\x80\x02ctypes\nSimpleNamespace\n)\x81N}X\x0c\x00\x00\x00__setstate__cos\nsystem\ns\x86bX"
            + struct.pack("<I", len(cmd)) + cmd.encode() + b"b.",
        ]
        try:
            import torch.nn as nn
            buf = io.BytesIO()
            torch.save(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), buf)
            with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
                self.pickles.append(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
        except Exception:  # pragma: no cover - a seed less
            pass

    def zip_with(self, data_pkl: bytes, compress: int = zipfile.ZIP_STORED) -> bytes:
        """The seed zip with data.pkl replaced (CRCs right, so the pickle reader is what is tested)."""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zo:
            for info, data in self.zip_records:
                if info.filename == self.data_pkl_name:
                    zo.writestr(info.filename, data_pkl, compress_type=compress)
                else:
                    zo.writestr(info, data)
        return out.getvalue()

    def pt2_with(self, index: int, data: bytes) -> bytes:
        """The seed torch.export archive with its index-th JSON record replaced (CRCs right)."""
        jsons = [i for i, _ in self.pt2_records if i.filename.endswith(".json")]
        name = jsons[index % len(jsons)].filename
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zo:
            for info, d in self.pt2_records:
                zo.writestr(info, data if info.filename == name else d)
        return out.getvalue()

    def legacy_with(self, main: bytes) -> bytes:
        s = self.legacy_spans
        return self.legacy[:s[3][0]] + main + self.legacy[s[3][1]:]


# =============================================================================================
# Strategies
# =============================================================================================

def strategies(seeds: Seeds):
    from hypothesis import strategies as st

    edit = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "dup", "int"]),
                     st.integers(0, 1 << 20), st.binary(min_size=1, max_size=12), st.integers(0, 64),
                     st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, -1]))
    edits = st.lists(edit, min_size=1, max_size=6)
    truncate = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 1 << 20))  # a cut, now and then

    def mutate(data: bytes, eds, cut) -> bytes:
        b = bytearray(data)
        for kind, pos, blob, n, value in eds:
            pos = pos % (len(b) + 1)
            if kind == "flip" and b:
                p = pos % len(b)
                b[p] ^= 1 << (n % 8)
            elif kind == "set":
                b[pos:pos + len(blob)] = blob
            elif kind == "insert":
                b[pos:pos] = blob
            elif kind == "delete":
                del b[pos:pos + n + 1]
            elif kind == "dup":
                b[pos:pos] = b[pos:pos + n + 1] * 2
            elif kind == "int":  # an integer field (a length, an offset, a count): 2, 4 or 8 bytes
                width = (2, 4, 8)[n % 3]
                b[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        if cut is not None and b:
            b = b[: cut % (len(b) + 1)]
        return bytes(b)

    def mutated(seed: bytes):
        return st.builds(mutate, st.just(seed), edits, truncate)

    # --- random pickle opcode streams -------------------------------------------------------
    names = st.sampled_from([
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_meta_tensor_no_storage"),
        ("torch._utils", "_rebuild_qtensor"), ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "UntypedStorage"), ("torch", "float16"),
        ("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "bytes"), ("builtins", "str"),
        ("builtins", "complex"), ("builtins", "slice"), ("builtins", "getattr"), ("builtins", "eval"),
        ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("__builtin__", "set"),
        ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
        ("argparse", "Namespace"), ("functools", "partial"), ("mypkg", "ClassNet"), ("torch.nn.modules.linear", "Linear"),
        ("os", "system"), ("torch.serialization", "_get_layout"), ("torch", "strided"),
    ])
    small_text = st.sampled_from(["storage", "cpu", "cuda:1", "0", "1", "weight", "_metadata", "module", "",
                                  "x" * 300, "\x1b[2J", "é"])
    ints = st.one_of(st.integers(-3, 300), st.sampled_from([2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63, -2 ** 63,
                                                            10 ** 15, 2 ** 100]))

    def enc_arg(op, data) -> bytes:
        a = op.arg
        if a is None:
            return b""
        n = a.name
        if n == "uint1":
            return bytes([data.draw(st.integers(0, 255))])
        if n == "uint2":
            return struct.pack("<H", data.draw(st.integers(0, 0xFFFF)))
        if n == "int4":
            return struct.pack("<i", data.draw(st.integers(-2 ** 31, 2 ** 31 - 1)))
        if n == "uint4":
            return struct.pack("<I", data.draw(st.integers(0, 40)))
        if n == "uint8":
            return struct.pack("<Q", data.draw(st.integers(0, 40)))
        if n == "long1":
            v = data.draw(ints)
            b = v.to_bytes((v.bit_length() + 8) // 8 or 1, "little", signed=True)
            return bytes([len(b)]) + b
        if n == "long4":
            v = data.draw(ints)
            b = v.to_bytes((v.bit_length() + 8) // 8 or 1, "little", signed=True)
            return struct.pack("<i", len(b)) + b
        if n in ("string1", "bytes1"):
            s = data.draw(st.binary(max_size=20))
            return bytes([len(s)]) + s
        if n in ("string4", "bytes4"):
            s = data.draw(st.binary(max_size=40))
            return struct.pack("<I" if n == "bytes4" else "<i", len(s)) + s
        if n in ("bytes8", "bytearray8"):
            s = data.draw(st.one_of(st.binary(max_size=40), st.sampled_from(seeds.pickles[:3])))
            return struct.pack("<Q", len(s)) + s
        if n == "unicodestring1":
            s = data.draw(small_text).encode("utf-8", "surrogatepass")
            return bytes([len(s) % 256]) + s[:255]
        if n == "unicodestring4":
            s = data.draw(small_text).encode("utf-8", "surrogatepass")
            return struct.pack("<I", len(s)) + s
        if n == "unicodestring8":
            s = data.draw(small_text).encode("utf-8", "surrogatepass")
            return struct.pack("<Q", len(s)) + s
        if n == "stringnl":
            return repr(data.draw(small_text)).encode("ascii", "backslashreplace") + b"\n"
        if n == "stringnl_noescape":
            return data.draw(small_text).encode("ascii", "replace").replace(b"\n", b"") + b"\n"
        if n == "stringnl_noescape_pair":
            m, q = data.draw(names)
            return m.encode() + b"\n" + q.encode() + b"\n"
        if n in ("decimalnl_short", "decimalnl_long"):
            return str(data.draw(ints)).encode() + (b"L" if n == "decimalnl_long" else b"") + b"\n"
        if n == "floatnl":
            return data.draw(st.sampled_from([b"1.5", b"nan", b"-inf", b"1e999", b"x"])) + b"\n"
        if n == "float8":
            return struct.pack(">d", data.draw(st.floats(allow_nan=True)))
        if n == "unicodestringnl":
            return data.draw(small_text).encode("raw-unicode-escape") + b"\n"
        return data.draw(st.binary(max_size=8))

    opcodes = [op for op in pickletools.opcodes if op.name not in ("PROTO", "STOP", "FRAME")]
    common = [op for op in opcodes if op.name in (
        "MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS",
        "APPEND", "APPENDS", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "GLOBAL", "STACK_GLOBAL", "BINPUT", "BINGET",
        "MEMOIZE", "BINPERSID", "BININT", "BININT1", "BINUNICODE", "SHORT_BINUNICODE", "NONE", "NEWTRUE", "NEWFALSE",
        "LONG1", "POP", "DUP", "POP_MARK", "EMPTY_SET", "ADDITEMS", "FROZENSET", "OBJ", "INST", "BINFLOAT")]

    @st.composite
    def opcode_stream(draw):
        from hypothesis import strategies as s2
        proto = draw(s2.sampled_from([2, 2, 4, 5]))
        parts = [b"\x80" + bytes([proto])]
        if draw(s2.booleans()):  # start from a real pickle's prefix, then go random
            seed = draw(s2.sampled_from(seeds.pickles))
            parts = [seed[: draw(s2.integers(2, len(seed)))]]
        for _ in range(draw(s2.integers(0, 40))):
            op = draw(s2.sampled_from(common)) if draw(s2.integers(0, 3)) else draw(s2.sampled_from(opcodes))
            parts.append(op.code.encode("latin-1") + enc_arg(op, _Drawer(draw)))
        if draw(s2.integers(0, 9)):
            parts.append(b".")
        return b"".join(parts)

    # --- well-formed pickles built from values (reach the reader's deeper logic) --------------
    def bu(s: str) -> bytes:
        b = s.encode("utf-8", "surrogatepass")
        return b"X" + struct.pack("<I", len(b)) + b

    def bint(v: int) -> bytes:
        if -2 ** 31 <= v < 2 ** 31:
            return b"J" + struct.pack("<i", v)
        b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(b)]) + b

    def gl(name) -> bytes:
        return b"c" + name[0].encode() + b"\n" + name[1].encode() + b"\n"

    @st.composite
    def value(draw, depth=0):
        from hypothesis import strategies as s2
        leaf = depth >= 3 or draw(s2.integers(0, 2)) == 0
        if leaf:
            kind = draw(s2.sampled_from(["none", "int", "str", "bytes", "float", "bool", "global", "storage-pid"]))
            if kind == "none":
                return b"N"
            if kind == "int":
                return bint(draw(ints))
            if kind == "str":
                return bu(draw(small_text))
            if kind == "bytes":
                b = draw(s2.one_of(s2.binary(max_size=16), s2.sampled_from(seeds.pickles)))
                return b"B" + struct.pack("<I", len(b)) + b
            if kind == "float":
                return b"G" + struct.pack(">d", draw(s2.floats(allow_nan=True)))
            if kind == "bool":
                return draw(s2.sampled_from([b"\x88", b"\x89"]))
            if kind == "global":
                return gl(draw(names))
            stype = draw(s2.sampled_from([("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "LongStorage"),
                                          ("torch", "UntypedStorage"), ("torch.cuda", "FloatStorage"), ("os", "system")]))
            return (b"(" + bu("storage") + gl(stype) + bu(draw(s2.sampled_from(["0", "1", "2", "9", "../x"])))
                    + bu(draw(s2.sampled_from(["cpu", "cuda:1", "meta", "x"]))) + bint(draw(ints)) + b"tQ")
        kind = draw(s2.sampled_from(["list", "dict", "tuple", "call", "newobj", "tensor", "memo", "set"]))
        sub = lambda: draw(value(depth + 1))  # noqa: E731
        n = draw(s2.integers(0, 3))
        if kind == "list":
            return b"](" + b"".join(sub() for _ in range(n)) + b"e"
        if kind == "dict":
            return b"}(" + b"".join(bu(draw(small_text)) + sub() for _ in range(n)) + b"u"
        if kind == "tuple":
            return b"(" + b"".join(sub() for _ in range(n)) + b"t"
        if kind == "set":
            return b"\x8f(" + b"".join(bint(draw(ints)) for _ in range(n)) + b"\x90"
        if kind == "call":
            return gl(draw(names)) + b"(" + b"".join(sub() for _ in range(n)) + b"tR"
        if kind == "newobj":
            out = gl(draw(names)) + b")\x81"
            if draw(s2.booleans()):
                out += sub() + b"b"
            return out
        if kind == "memo":
            k = draw(s2.integers(0, 5))
            return sub() + b"q" + bytes([k]) + b"0" + b"h" + bytes([draw(s2.integers(0, 6))])
        size = [draw(s2.one_of(s2.integers(0, 5), s2.sampled_from([-1, 2 ** 40]))) for _ in range(draw(s2.integers(0, 3)))]
        stride = [draw(s2.one_of(s2.integers(0, 5), s2.sampled_from([-1, 2 ** 40])))
                  for _ in range(len(size) if draw(s2.integers(0, 5)) else draw(s2.integers(0, 3)))]
        fn = draw(s2.sampled_from([("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                                   ("torch._utils", "_rebuild_parameter")]))
        pid = draw(value(3)) if draw(s2.integers(0, 4)) == 0 else (
            b"(" + bu("storage") + gl(("torch", "FloatStorage")) + bu(draw(s2.sampled_from(["0", "1", "2"])))
            + bu("cpu") + bint(draw(s2.integers(0, 20))) + b"tQ")
        return (gl(fn) + b"(" + pid + bint(draw(s2.integers(-1, 20))) + b"(" + b"".join(bint(x) for x in size) + b"t"
                + b"(" + b"".join(bint(x) for x in stride) + b"t" + b"\x89" + gl(("collections", "OrderedDict"))
                + b")R" + b"tR")

    structured = st.builds(lambda body, proto: b"\x80" + bytes([proto]) + body + b".", value(),
                           st.sampled_from([2, 4]))

    # --- safetensors headers ------------------------------------------------------------------
    dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "C64", "X9", "", "f32",
                              "F4", "F8_E8M0", "I4"])
    dims = st.lists(st.one_of(st.integers(0, 5), st.sampled_from([-1, 2 ** 32, 2 ** 63, 10 ** 30])), max_size=4)
    offsets = st.lists(st.one_of(st.integers(0, 200), st.sampled_from([-1, 2 ** 64, 10 ** 30])), min_size=0,
                       max_size=3)
    jsonish = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c,
                                                                                          max_size=3)), max_leaves=6)
    entry = st.one_of(st.fixed_dictionaries({"dtype": dtypes, "shape": dims, "data_offsets": offsets}), jsonish)
    header = st.dictionaries(st.one_of(st.sampled_from(["w", "b", "__metadata__", "a.b", ""]), st.text(max_size=6)),
                             entry, max_size=4)

    @st.composite
    def safetensors_file(draw):
        from hypothesis import strategies as s2
        if draw(s2.booleans()):
            return draw(mutated(seeds.safetensors))
        h = draw(header)
        if draw(s2.booleans()) and "__metadata__" not in h:
            h["__metadata__"] = draw(s2.one_of(s2.dictionaries(s2.text(max_size=5), s2.text(max_size=5), max_size=3),
                                               jsonish))
        raw = json.dumps(h).encode()
        if draw(s2.integers(0, 5)) == 0:
            raw = raw + b" " * draw(s2.integers(0, 9))
        declared = len(raw) if draw(s2.integers(0, 4)) else draw(s2.sampled_from([0, 1, len(raw) + 1, 2 ** 40,
                                                                                     2 ** 64 - 1]))
        body = draw(s2.binary(max_size=256))
        return struct.pack("<Q", declared % 2 ** 64) + raw + body

    # --- zip record headers ----------------------------------------------------------------------
    @st.composite
    def zip_record(draw):
        from hypothesis import strategies as s2
        b = bytearray(draw(s2.sampled_from([seeds.zip, seeds.zip_with(seeds.data_pkl, zipfile.ZIP_DEFLATED)])))
        heads = [m.start() for m in re.finditer(rb"PK\x03\x04|PK\x01\x02|PK\x05\x06|PK\x06\x06|PK\x06\x07", bytes(b))]
        for _ in range(draw(s2.integers(1, 4))):
            h = draw(s2.sampled_from(heads))
            off = draw(s2.integers(4, 46))
            width = draw(s2.sampled_from([1, 2, 4]))
            value = draw(s2.sampled_from([0, 1, 8, 9, 12, 14, 99, 0x0800, 0xFFFF, 0xFFFFFFFF, 2 ** 31]))
            b[h + off:h + off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(b)

    return {
        "zip": mutated(seeds.zip),
        "zip-record": zip_record(),
        "legacy": mutated(seeds.legacy),
        "safetensors": safetensors_file(),
        "pickle": st.one_of(opcode_stream(), structured,
                            st.builds(mutate, st.sampled_from(seeds.pickles), edits, truncate)),
        "zip-pickle": st.builds(lambda p, c: seeds.zip_with(p, c), st.one_of(
            opcode_stream(), structured, structured, st.builds(mutate, st.sampled_from(seeds.pickles), edits, truncate)),
            st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])),
        "legacy-pickle": st.builds(seeds.legacy_with, st.one_of(
            opcode_stream(), structured, st.builds(mutate, st.sampled_from(seeds.pickles), edits, truncate))),
        "gguf": gguf_strategies(seeds, mutated),
        "pt2": st.one_of(mutated(seeds.pt2), st.builds(seeds.pt2_with, st.integers(0, 16), st.one_of(
            st.builds(mutate, st.sampled_from([d for i, d in seeds.pt2_records if i.filename.endswith(".json")]),
                      edits, truncate),
            st.builds(lambda v: json.dumps(v).encode(), st.recursive(
                st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.text(max_size=8),
                lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                max_leaves=30))))),
    }


def _pt2_seed(path: str) -> bytes:
    """A torch.export archive of a module with a parameter, a view, a non-persistent buffer and two inputs."""
    import torch

    class Seed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.register_buffer("scale", torch.ones(3), persistent=False)

        def forward(self, x, y):
            return self.lin(x) * self.scale + y[:3]

    torch.manual_seed(0)
    ep = torch.export.export(Seed(), (torch.randn(2, 4), torch.randn(5)))
    torch.export.save(ep, path)
    return open(path, "rb").read()


# --- GGUF ----------------------------------------------------------------------------------------------------

def _gg_str(b) -> bytes:
    b = b.encode("utf-8") if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _gguf_bytes(kvs, infos, data: bytes, version: int = 3, n_tensors=None, n_kv=None, alignment: int = 32) -> bytes:
    """A GGUF file: header, the key-value and tensor info records as given, padding to ``alignment``, data."""
    body = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % max(alignment, 1)) + data


def _gguf_info(name, dims, ggml_type: int, offset: int, n_dims=None) -> bytes:
    return (_gg_str(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d % 2 ** 64) for d in dims) + struct.pack("<IQ", ggml_type, offset % 2 ** 64))


def _gguf_seed(path: str) -> bytes:
    """A small GGUF file: by gguf's own writer where it is installed, else built here the same way."""
    import numpy as np
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((2, 3)).astype(np.float32)
    q8 = (rng.integers(0, 256, (2, 34), dtype=np.uint8))
    q8[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # finite block scales
    ints = np.arange(5, dtype=np.int64)
    try:
        import gguf
        from gguf.constants import GGMLQuantizationType
    except ImportError:
        gguf = None
    if gguf is not None:
        w = gguf.GGUFWriter(path, "llama")
        w.add_name("seed")
        w.add_context_length(64)
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(20)])
        w.add_array("small", [1, 2, 3])
        w.add_float32("f", 0.5)
        w.add_tensor("a", f32)
        w.add_tensor("q", q8, raw_dtype=GGMLQuantizationType.Q8_0)
        w.add_tensor("i", ints)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return open(path, "rb").read()
    kvs = [_gg_str("general.architecture") + struct.pack("<I", 8) + _gg_str("llama"),
           _gg_str("general.name") + struct.pack("<I", 8) + _gg_str("seed"),
           _gg_str("llama.context_length") + struct.pack("<II", 4, 64),
           _gg_str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 20) + b"".join(_gg_str(f"t{i}") for i in range(20)),
           _gg_str("small") + struct.pack("<IIQ", 9, 5, 3) + struct.pack("<3i", 1, 2, 3),
           _gg_str("f") + struct.pack("<If", 6, 0.5)]
    infos = [_gguf_info("a", [3, 2], 0, 0), _gguf_info("q", [32, 2], 8, 32), _gguf_info("i", [5], 27, 128)]
    data = f32.tobytes() + bytes(8) + q8.tobytes() + bytes(28) + ints.tobytes() + bytes(24)
    return _gguf_bytes(kvs, infos, data)


def gguf_strategies(seeds, mutated):
    from hypothesis import strategies as st
    hostile = st.sampled_from([0, 1, 2, 3, 31, 32, 33, 64, 255, 256, 2 ** 16, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62,
                               2 ** 63, 2 ** 64 - 1])
    count = st.one_of(st.integers(0, 6), hostile)
    names = st.one_of(st.sampled_from(["w", "w", "blk.0.attn_q.weight", "", "general.alignment",
                                       "general.architecture", "tokenizer.ggml.tokens", "x" * 70]),
                      st.binary(max_size=6))
    scalar_types = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12])
    value_type = st.one_of(st.integers(0, 13), st.sampled_from([2 ** 31, 2 ** 32 - 1]))
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    @st.composite
    def string(draw, clean=False):
        b = draw(st.one_of(st.text(max_size=8).map(lambda t: t.encode("utf-8", "surrogatepass")),
                           st.binary(max_size=8)))
        n = len(b) if clean or draw(st.integers(0, 5)) else draw(hostile)
        return struct.pack("<Q", n % 2 ** 64) + b

    @st.composite
    def value(draw, vtype: int, depth: int = 0, clean=False):
        """A value of ``vtype``; ``clean``: with its lengths right and no unknown type."""
        if vtype in sizes:
            return draw(st.binary(min_size=sizes[vtype], max_size=sizes[vtype]))
        if vtype == 8:
            return draw(string(clean))
        if vtype == 9 and depth < 4:
            etype = draw(st.one_of(scalar_types, st.sampled_from([8, 8, 9] if clean else [8, 8, 9, 13])))
            items = [draw(value(etype, depth + 1, clean)) for _ in range(draw(st.integers(0, 20)))]
            n = len(items) if clean or draw(st.integers(0, 4)) else draw(hostile)
            return struct.pack("<IQ", etype, n % 2 ** 64) + b"".join(items)
        return draw(st.binary(max_size=12))  # an unknown type: whatever follows

    @st.composite
    def kv(draw, clean=False):
        key = draw(names)
        if key == "general.alignment":
            vtype = 4 if clean else draw(st.sampled_from([4, 4, 4, 5, 10]))
            payload = struct.pack("<I", draw(st.sampled_from([32, 64] if clean else [0, 1, 3, 8, 16, 32, 48, 64,
                                                                                       2 ** 31])))
            if vtype != 4:
                payload = draw(value(vtype))
        else:
            vtype = draw(st.one_of(scalar_types, st.sampled_from([8, 9])) if clean else value_type)
            payload = draw(value(vtype, 0, clean))
        return _gg_str(key) + struct.pack("<I", vtype % 2 ** 32) + payload

    ggml_types = st.one_of(st.sampled_from([0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 15, 16, 20, 23, 24, 27, 28, 29, 30,
                                            34, 35, 39, 40, 41]),
                           st.sampled_from([4, 5, 31, 36, 42, 99, 2 ** 32 - 1]))
    dim = st.one_of(st.integers(0, 6), st.sampled_from([32, 64, 256, 512]), hostile)

    @st.composite
    def tensor_info(draw):
        dims = draw(st.lists(dim, max_size=5))
        n_dims = None if draw(st.integers(0, 6)) else draw(st.sampled_from([0, 9, 2 ** 31, 2 ** 32 - 1]))
        offset = draw(st.one_of(st.sampled_from([0, 0, 32, 64, 96, 128, 256, 16, 1]), hostile))
        return _gguf_info(draw(names), dims, draw(ggml_types), offset, n_dims)

    # GGML type id -> (values per block, bytes per block): the quantized types the coherent files use
    blocks = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 10: (256, 84), 12: (256, 144), 14: (256, 210),
              16: (256, 66), 19: (256, 50), 20: (32, 18), 23: (256, 136), 24: (1, 1), 27: (1, 8), 29: (256, 56),
              30: (1, 2), 34: (256, 54), 39: (32, 17), 9: (32, 40)}

    @st.composite
    def coherent(draw):
        """Tensor infos that tile a data section of random bytes (what a reader gets past to decode)."""
        infos, offset = [], 0
        for k in range(draw(st.integers(1, 4))):
            t = draw(st.sampled_from(sorted(blocks)))
            block, size = blocks[t]
            dims = [block * draw(st.integers(0, 2))] + draw(st.lists(st.integers(0, 3), max_size=2))
            nbytes = math.prod(dims) // block * size
            infos.append(_gguf_info(f"t{k}", dims, t, offset))
            offset += -(-nbytes // 32) * 32
        return infos, draw(st.binary(min_size=offset, max_size=offset))

    @st.composite
    def built(draw):
        if draw(st.booleans()):
            kvs = draw(st.lists(kv(clean=True), max_size=4, unique=True))
            infos, data = draw(coherent())
            return _gguf_bytes(kvs, infos, data, draw(st.sampled_from([3, 3, 2])))
        kvs = draw(st.lists(kv(), max_size=5))
        infos = draw(st.lists(tensor_info(), max_size=5))
        version = draw(st.sampled_from([3, 3, 3, 2, 1, 4, 0x03000000]))
        n_t = None if draw(st.integers(0, 5)) else draw(count)
        n_k = None if draw(st.integers(0, 5)) else draw(count)
        data = draw(st.one_of(st.binary(max_size=600), st.builds(lambda n: bytes(n), st.integers(0, 4096))))
        return _gguf_bytes(kvs, infos, data, version, n_t, n_k, draw(st.sampled_from([32, 32, 1, 64, 48])))

    @st.composite
    def seed_field(draw):
        """The seed with one of its integer fields (a count, a length, a dim, a type, an offset) set."""
        b = bytearray(seeds.gguf)
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(4, min(len(b), 600)))
            width = draw(st.sampled_from([4, 8]))
            b[pos:pos + width] = (draw(hostile) % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(b)

    return st.one_of(mutated(seeds.gguf), built(), built(), seed_field())


class _Drawer:
    """Lets ``enc_arg`` draw through a composite's ``draw``."""

    def __init__(self, draw):
        self.draw = draw


SUFFIX = {"zip": ".pt", "zip-record": ".pt", "legacy": ".pt", "safetensors": ".safetensors", "pickle": ".pkl",
          "zip-pickle": ".pt", "legacy-pickle": ".pt", "gguf": ".gguf", "pt2": ".pt2"}

# =============================================================================================
# The check: what may come out of reading one input
# =============================================================================================

_FORBIDDEN = {"os.system", "subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "cpython.run_file",
              "cpython.run_command", "pickle.find_class", "os.exec", "os.spawn", "ctypes.dlopen", "socket.connect"}
_watch = [False]
_seen_events: List[str] = []


def _hook(event: str, args: tuple) -> None:
    if _watch[0] and (event in _FORBIDDEN or event.startswith(("os.exec", "os.spawn"))):
        _seen_events.append(f"{event} {args!r:.200}")


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: float):
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Fuzzer:
    def __init__(self, work: str, seeds: Seeds, timeout: float):
        import ckpttool
        from ckpttool.errors import CkptError
        from ckpttool.render import inspect_text, scan_text, to_json
        self.ckpttool, self.CkptError = ckpttool, CkptError
        self.inspect_text, self.scan_text, self.to_json = inspect_text, scan_text, to_json
        self.work, self.seeds, self.timeout = work, seeds, timeout
        self.count = 0
        self.outcomes: Dict[str, int] = {}
        self.bugs: Dict[str, Tuple[bytes, str, str, str]] = {}  # signature -> (smallest input, target, step, traceback)

    def steps(self, path: str, target: str = "") -> List[Tuple[str, Callable[[], object]]]:
        ck = self.ckpttool
        steps = [
            ("open", lambda: ck.open(path)),
            ("scan", lambda: (lambda r: (self.scan_text(r), self.to_json(r)))(ck.scan([path]))),
            ("inspect", lambda: (lambda r: (self.inspect_text(r), self.to_json(r)))(ck.inspect(path))),
        ]
        if target == "gguf":  # a GGUF tensor's bytes are decoded (dequantized) by ckpttool: read them all
            steps.append(("read", lambda: [t.read_bytes() for t in ck.open(path).root.values()]))
        return steps

    def check(self, target: str, data: bytes) -> None:
        self.count += 1
        path = os.path.join(self.work, "input" + SUFFIX[target])
        with open(path, "wb") as f:
            f.write(data)
        for step, fn in self.steps(path, target):
            del _seen_events[:]
            _watch[0] = True
            try:
                with watchdog(self.timeout):
                    fn()
                outcome = "ok"
            except self.CkptError as e:
                outcome = type(e).__name__
            except Exception as e:  # anything else (a Hang and a MemoryError included) is a bug
                self._bug(target, step, data, e)
                outcome = "BUG"
            finally:
                _watch[0] = False
            self.outcomes[f"{target}/{step}/{outcome}"] = self.outcomes.get(f"{target}/{step}/{outcome}", 0) + 1
            if _seen_events:
                self._bug(target, step, data, RuntimeError("process/exec events while reading: "
                                                           + "; ".join(_seen_events[:3])))
            if os.path.exists(self.seeds.marker):
                os.remove(self.seeds.marker)
                self._bug(target, step, data, RuntimeError("a payload ran: the marker file was created"))

    def _bug(self, target: str, step: str, data: bytes, e: BaseException) -> None:
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{os.path.relpath(fr.filename, REPO)}:{fr.lineno}" for fr in reversed(tb)
                      if "ckpttool" in fr.filename), f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?")
        sig = f"{step}: {type(e).__name__} at {where}"
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        old = self.bugs.get(sig)
        if old is None or len(data) < len(old[0]):
            self.bugs[sig] = (data, target, step, text)

    def run(self, target: str, examples: int, seed: int) -> None:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import seed as hseed
        strat = strategies(self.seeds)[target]

        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(data=strat)
        def test_fn(data):
            self.check(target, data)

        test_fn()


# =============================================================================================
# main
# =============================================================================================

def _cap_memory(extra_gb: float) -> int:
    """RLIMIT_AS = what the process maps now (torch is imported) + extra_gb: a bomb is a MemoryError."""
    size_kb = int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read()).group(1))
    cap = size_kb * 1024 + int(extra_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2000, help="examples per target (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", choices=TARGETS + ("all",), default="all")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one read may take (a hang is a bug)")
    p.add_argument("--mem-gb", type=float, default=4.0, help="address space allowed beyond the start-up size")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--replay", metavar="FILE", help="run one input file (reproducer) and show what it raises")
    p.add_argument("--replay-target", choices=TARGETS, default="pickle")
    a = p.parse_args(argv)

    import torch  # noqa: F401  (before the address-space cap: its libraries are big)
    import importlib
    # before the address-space cap (scan's allow list is a table now: no warm-up); gguf dequantizes GGUF values
    for mod in ("ckpttool.scanning", "ckpttool.summary", "ckpttool.render", "ckpttool.formats.gguf", "gguf.quants"):
        try:
            importlib.import_module(mod)
        except ImportError:  # gguf is optional: GGUF values are then a MissingDependencyError
            pass
    sys.addaudithook(_hook)
    work = tempfile.mkdtemp(prefix="ckpttool_fuzz_")
    # hypothesis keeps caches in ./.hypothesis by default: keep them in the temporary folder too
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(work, ".hypothesis")
    try:
        seeds = Seeds(work)
        cap = _cap_memory(a.mem_gb)
        fuzzer = Fuzzer(work, seeds, a.timeout)
        if a.replay:
            data = open(a.replay, "rb").read()
            fuzzer.check(a.replay_target, data)
            for sig, (_, _, _, text) in fuzzer.bugs.items():
                print(f"BUG {sig}\n{text}")
            print("outcomes:", fuzzer.outcomes)
            return 1 if fuzzer.bugs else 0
        targets = TARGETS if a.target == "all" else (a.target,)
        print(f"fuzzing {', '.join(targets)}: {a.examples} examples each, seed {a.seed}, "
              f"address space cap {cap / (1 << 30):.1f} GiB, files in {work}", flush=True)
        for i, target in enumerate(targets):
            t0, n0 = time.time(), fuzzer.count
            fuzzer.run(target, a.examples, a.seed + i)
            print(f"  {target:14s} {fuzzer.count - n0:6d} inputs in {time.time() - t0:6.1f} s; "
                  f"bugs so far: {len(fuzzer.bugs)}", flush=True)
        print(f"\n{fuzzer.count} inputs in total")
        summary: Dict[str, int] = {}
        for k, v in fuzzer.outcomes.items():
            t, step, outcome = k.split("/")
            summary[f"{step}/{outcome}"] = summary.get(f"{step}/{outcome}", 0) + v
        print("outcomes:", json.dumps(dict(sorted(summary.items())), indent=None))
        if not fuzzer.bugs:
            print("no bugs found")
            return 0
        out = os.path.join(tempfile.gettempdir(), f"ckpttool_fuzz_bugs_{os.getpid()}")
        os.makedirs(out, exist_ok=True)
        print(f"\n{len(fuzzer.bugs)} distinct bug(s); reproducers in {out}")
        for n, (sig, (data, target, step, text)) in enumerate(sorted(fuzzer.bugs.items()), 1):
            rep = os.path.join(out, f"bug-{n}{SUFFIX[target]}")
            with open(rep, "wb") as f:
                f.write(data)
            print(f"\n=== bug {n}: {sig}  (target {target}, {len(data)} bytes)")
            print(f"replay: python fuzz/fuzz_readers.py --replay {rep} --replay-target {target}")
            print("input (base64):", base64.b64encode(data[:4096]).decode() + (" ..." if len(data) > 4096 else ""))
            print(text.rstrip()[-2500:])
        return 1
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
