"""``remap``: rewrite the device tags a checkpoint's storages carry, from the bytes.

A torch.save file records, for each storage, the device it lived on
(``'cuda:1'``), and a plain ``torch.load`` puts it back there, which fails on a
machine without that device. ``remap`` rewrites those tags once, in the file,
so every later ``torch.load`` works without ``map_location``.

Nothing is unpickled to do it: the pickle is walked opcode by opcode with a
symbolic stack, which finds the strings that end up as the location field of a
storage's persistent id. Only those are rewritten; the same string used
elsewhere (a config's ``"device": "cuda:0"``), even through the pickle memo,
keeps its value. Tensor bytes are copied as they are.
"""
from __future__ import annotations

import os
import pickletools
import re
import struct
import zipfile
import zlib
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import CkptError, FormatError, UsageError
from .formats import detect, open as open_checkpoint
from .formats.torch_zip import find_record_folder, open_zip
from .records import Checkpoint, RemapResult
from .tree import all_tensors
from .writing import atomic_output, check_output

_DEVICE = re.compile(r"^[a-z_]+(?::\d+)?$")
Mapping_ = List[Tuple[str, str]]


def parse_maps(items: Sequence[str]) -> Mapping_:
    """``["cuda:1=cuda:0", "cuda=cpu"]`` -> [("cuda:1", "cuda:0"), ("cuda", "cpu")].

    >>> parse_maps(["cuda=cpu"])
    [('cuda', 'cpu')]
    """
    out = []
    for item in items:
        src, sep, dst = item.partition("=")
        src, dst = src.strip(), dst.strip()
        if not sep or not _DEVICE.match(src) or not _DEVICE.match(dst):
            raise UsageError(f"--map {item!r} is not SRC=DST with devices like cpu, cuda, cuda:1, mps")
        out.append((src, dst))
    if not out:
        raise UsageError("give at least one --map SRC=DST (e.g. --map cuda=cpu)")
    return out


def map_location(location: str, maps: Mapping_) -> str:
    """The new tag for ``location``: the first rule that matches (``cuda`` matches every ``cuda:N``).

    >>> maps = parse_maps(["cuda:1=cuda:0", "cuda=cpu"])
    >>> map_location("cuda:1", maps), map_location("cuda:0", maps), map_location("cpu", maps)
    ('cuda:0', 'cpu', 'cpu')
    """
    for src, dst in maps:
        if location == src or (":" not in src and location.startswith(src + ":")):
            return dst
    return location


# ---------------------------------------------------------------------------------------------
# The pickle rewrite


class _Str:
    __slots__ = ("value", "via", "after")

    def __init__(self, value: str, via: int):
        self.value, self.via, self.after = value, via, value


class _Tup:
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items


_OTHER = object()
_MARK = object()
_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _string_op(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def rewrite_locations(data: bytes, new_location: Callable[[str], str]) -> Tuple[bytes, Counter]:
    """``data`` (a pickle) with each storage's location tag replaced by ``new_location(tag)``.

    Returns the new pickle and a Counter of ``(old, new)`` tag pairs, one per storage id.
    """
    try:
        ops = list(pickletools.genops(data))
    except Exception as e:  # pickletools raises ValueError and friends on bad bytes
        raise FormatError(f"malformed pickle: {e}") from None
    stack: list = []
    memo: Dict[int, object] = {}
    events: List[Tuple[str, int, object, object]] = []  # (kind, op index, memo index, item) for pass 2
    uses: Dict[int, _Str] = {}  # op index of the string -> the item used as a location
    counts: Counter = Counter()
    stop = len(ops)
    for i, (op, arg, pos) in enumerate(ops):
        name = op.name
        if name in _STRING_OPS:
            item = _Str(arg if isinstance(arg, str) else str(arg), i)
            stack.append(item)
            events.append(("def", i, None, item))
        elif name in _GET_OPS:
            src = memo.get(arg, _OTHER)
            item = _Str(src.value, i) if isinstance(src, _Str) else src
            stack.append(item)
            if isinstance(item, _Str):
                events.append(("get", i, arg, item))
        elif name in _PUT_OPS or name == "MEMOIZE":
            idx = arg if name != "MEMOIZE" else len(memo)
            memo[idx] = stack[-1] if stack else _OTHER
            events.append(("put", i, idx, memo[idx]))
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            if name == "TUPLE":
                k = len(stack) - 1 - stack[::-1].index(_MARK)
                items = stack[k + 1:]
                del stack[k:]
            else:
                n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
                items = stack[len(stack) - n:] if n else []
                del stack[len(stack) - n:]
            stack.append(_Tup(items))
        elif name == "BINPERSID":
            pid = stack.pop()
            if isinstance(pid, _Tup) and len(pid.items) >= 5 and isinstance(pid.items[3], _Str) and \
                    isinstance(pid.items[0], _Str) and pid.items[0].value == "storage":
                loc = pid.items[3]
                new = new_location(loc.value)
                counts[(loc.value, new)] += 1
                uses[loc.via] = loc
                loc.after = new
            stack.append(_OTHER)
        elif name == "STOP":
            stop = i
            break
        elif name in ("PROTO", "FRAME"):
            pass
        else:
            before, after = op.stack_before, op.stack_after
            marks = [j for j, s in enumerate(before) if s is pickletools.markobject]
            if marks:
                k = len(stack) - 1 - stack[::-1].index(_MARK)
                del stack[k:]
                drop = marks[0]
            else:
                drop = len(before)
            if drop:
                del stack[len(stack) - drop:]
            stack.extend(_OTHER for _ in after)

    # Pass 2: what each memo slot holds after the rewrite, and which GETs must become literals.
    replace: Dict[int, bytes] = {}
    memo_after: Dict[int, str] = {}
    for kind, i, idx, item in events:
        if kind == "def":
            if i in uses and item.after != item.value:
                replace[i] = _string_op(item.after)
        elif kind == "put":
            if isinstance(item, _Str):
                memo_after[idx] = item.after
            else:
                memo_after.pop(idx, None)
        else:  # get
            wanted = item.after if i in uses else item.value
            item.after = wanted
            if memo_after.get(idx, item.value) != wanted:
                replace[i] = _string_op(wanted)
    if not replace and not any(op.name == "FRAME" for op, _, _ in ops[:stop]):
        return data, counts
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops[:stop + 1]):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":  # frames hold byte counts the rewrite changes: drop them (they are optional)
            continue
        out += replace.get(i, data[pos:end])
    if stop + 1 >= len(ops):
        pass
    return bytes(out), counts


# ---------------------------------------------------------------------------------------------
# Files


def _copy_member(zin: zipfile.ZipFile, info: zipfile.ZipInfo, chunk: int = 1 << 24) -> Iterator[bytes]:
    with zin.open(info) as f:
        while True:
            block = f.read(chunk)
            if not block:
                return
            yield block


def _remap_zip(path: str, tmp: str, new_location: Callable[[str], str]) -> Counter:
    from .formats.torch_writer import _AlignedZip
    counts: Counter = Counter()
    zin = open_zip(path)
    with zin:
        folder = find_record_folder(zin, path)
        z = _AlignedZip(tmp, "")
        try:
            for info in zin.infolist():
                name = info.filename
                if name.endswith(".pkl") and name.startswith(folder) and "/" not in name[len(folder):]:
                    data, c = rewrite_locations(zin.read(info), new_location)
                    counts.update(c)
                    z.add(name, [data], len(data))
                else:
                    z.add(name, _copy_member(zin, info), info.file_size)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise FormatError(f"record is corrupt: {e}", path) from None
        finally:
            z.close()
    return counts


def _pickle_end(f, path: str) -> int:
    """Position just past the pickle that starts at ``f``'s position (scanned, not unpickled)."""
    try:
        for op, _, _ in pickletools.genops(f):
            if op.name == "STOP":
                return f.tell()
    except Exception as e:
        raise FormatError(f"malformed pickle: {e}", path) from None
    raise FormatError("pickle has no end", path)


def _remap_legacy(path: str, tmp: str, new_location: Callable[[str], str]) -> Counter:
    with open(path, "rb") as f:
        ends = []
        for _ in range(3):  # magic number, protocol version, sys_info
            ends.append(_pickle_end(f, path))
        start = f.tell()
        end = _pickle_end(f, path)
        f.seek(start)
        main = f.read(end - start)
        new_main, counts = rewrite_locations(main, new_location)
        with open(tmp, "wb") as out:
            f.seek(0)
            out.write(f.read(ends[2]))
            out.write(new_main)
            f.seek(end)
            while True:
                block = f.read(1 << 24)
                if not block:
                    break
                out.write(block)
    return counts


def remap(path: str, out: str, maps: Union[Sequence[str], Mapping_], force: bool = False,
          check: bool = False) -> RemapResult:
    """Write ``path`` to ``out`` with its storage location tags mapped by ``maps``.

    ``maps``: ``["cuda=cpu"]`` or ``[("cuda:1", "cuda:0")]``; the first matching rule
    wins. The output keeps the input's format (zip, legacy, TorchScript); tensor
    bytes are copied as they are. It is read back through the readers: the same
    tensors, each on its mapped device (``check``: and the same bytes).

    >>> r = remap("gpu.pt", "cpu.pt", ["cuda=cpu"])   # doctest: +SKIP
    >>> r.mapped                                        # doctest: +SKIP
    {'cuda:0 -> cpu': 17, 'cuda:1 -> cpu': 2}
    """
    rules = parse_maps(maps) if maps and isinstance(next(iter(maps)), str) else list(maps)
    if not rules:
        raise UsageError("give at least one --map SRC=DST (e.g. --map cuda=cpu)")
    fmt = detect(path)
    if fmt not in ("torch_zip", "torch_legacy", "torchscript"):
        raise UsageError(f"remap rewrites torch.save and TorchScript files; this is {fmt}, which carries no "
                         "device tags", path)
    src = open_checkpoint(path)  # validates the whole file first
    out = check_output(os.fspath(out), [path], force)

    def new_location(loc: str) -> str:
        return map_location(loc, rules)

    with atomic_output(out) as tmp:
        counts = _remap_zip(path, tmp, new_location) if fmt != "torch_legacy" else \
            _remap_legacy(path, tmp, new_location)
        checked = _check(src, tmp, rules, check)
    mapped = {f"{a} -> {b}": n for (a, b), n in sorted(counts.items()) if a != b}
    kept = {a: n for (a, b), n in sorted(counts.items()) if a == b}
    return RemapResult(source=src.path, output=out, format=src.format, storages=sum(counts.values()),
                       tensors=checked["tensors"], mapped=mapped, unchanged=kept, checked=checked)


def _check(src: Checkpoint, tmp: str, rules: Mapping_, every_byte: bool) -> Dict[str, object]:
    from .formats import open as reopen
    back = reopen(tmp)
    a = list(all_tensors(src.root))
    b = list(all_tensors(back.root))
    if [n for n, _ in a] != [n for n, _ in b]:
        raise CkptError("the rewritten file holds other tensors than the source", tmp)
    compared = 0
    for (name, t), (_, u) in zip(a, b):
        want = map_location(t.device, rules)
        if (t.shape, t.dtype, t.stride, t.storage_offset) != (u.shape, u.dtype, u.stride, u.storage_offset) or \
                u.device != want:
            raise CkptError(f"tensor {name} reads back as {u.dtype} {list(u.shape)} on {u.device}, "
                            f"expected {t.dtype} {list(t.shape)} on {want}", tmp)
        if every_byte and t.has_data:
            if t.read_bytes() != u.read_bytes():
                raise CkptError(f"tensor {name}: bytes differ after the rewrite", tmp)
            compared += 1
    result: Dict[str, object] = {"ok": True, "tensors": len(a), "devices": True}
    if every_byte:
        result["bytes_compared"] = compared
    return result
