"""GGUF files (llama.cpp's format), read from the header alone.

A file is ``b"GGUF"``, a uint32 version (2 or 3), uint64 tensor and key-value counts, the key-values
(a string key, a uint32 value type, the value: a scalar, a string as uint64 length + UTF-8 bytes, or
an array as element type, uint64 length and the elements), the tensor infos (name, uint32 n_dims, the
uint64 dims innermost first, uint32 GGML type, uint64 offset into the data section), then the data
section, at the next multiple of ``general.alignment`` (default 32). Every count, length, dim, type and
offset is checked against the file before it is believed; the header is read forward in 1 MiB windows of
positioned reads (``_Header``: a huge header costs no more memory than a window; no mmap), and no tensor
is decoded on open.

Refused, as llama.cpp refuses them: duplicate keys or tensor names, a ``general.alignment`` that is not a
uint32 power of two, a tensor offset not aligned, tensors that overlap, a quantized row that is not whole
blocks, GGML types unknown or removed. Keys and tensor names must be UTF-8 (a name becomes a state_dict
key); string values that are not are shown with U+FFFD. Gaps between tensors are allowed (gguf's reader
reads them). Nested arrays are read to ``MAX_DEPTH`` (llama.cpp reads none).

Unquantized tensors (F32, F16, BF16, F64, I8..I64) are plain TensorRefs over a FileSpan. A quantized
one (Q4_K, Q8_0, IQ2_XS...) reads as float32 through a :class:`DequantSpan`, which decodes only the
GGML blocks that cover the bytes asked for, with the ``gguf`` package (an optional dependency).

The simple way beside ``_Header`` is ``gguf.GGUFReader`` (which maps the whole file and builds numpy
views of every array element); tests/test_gguf.py holds this reader to it.
"""
from __future__ import annotations

import math
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

from ..checkpoint import Checkpoint, StorageRef, TensorRef, new_storage_ref, new_tensor_ref
from ..errors import FormatError, MissingDependencyError
from ..spans import FileSpan

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8                # ggml has 4; the bound keeps a hostile n_dims from costing anything
MAX_NAME = 1 << 16          # bytes of a key or tensor name (llama.cpp's tensor names are < 64)
MAX_DEPTH = 3               # arrays of arrays of arrays, no deeper (llama.cpp reads no nested array)
SUMMARY_OVER = 16           # an array longer than this is shown as {type, length, head}
HEAD = 8                    # values a summarized array shows
MAX_SHOWN_STRING = 1 << 14  # a longer string value is shown as {type, length, head}
STRING_HEAD = 1024          # bytes of such a string shown
_WINDOW = 1 << 20           # header bytes read at a time
_I64_MAX = (1 << 63) - 1
_MIN_KV = 8 + 4 + 1         # key length, value type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (an empty name, no dims)
_DECODE_BLOCKS = 1 << 16    # blocks dequantized at a time (2M values for a K-quant)

# GGML type id -> (name, values per block, bytes per block, ckpttool dtype for an unquantized type)
GGML_TYPES: Dict[int, Tuple[str, int, int, Optional[str]]] = {
    0: ("F32", 1, 4, "float32"), 1: ("F16", 1, 2, "float16"),
    2: ("Q4_0", 32, 18, None), 3: ("Q4_1", 32, 20, None), 6: ("Q5_0", 32, 22, None), 7: ("Q5_1", 32, 24, None),
    8: ("Q8_0", 32, 34, None), 9: ("Q8_1", 32, 40, None),
    10: ("Q2_K", 256, 84, None), 11: ("Q3_K", 256, 110, None), 12: ("Q4_K", 256, 144, None),
    13: ("Q5_K", 256, 176, None), 14: ("Q6_K", 256, 210, None), 15: ("Q8_K", 256, 292, None),
    16: ("IQ2_XXS", 256, 66, None), 17: ("IQ2_XS", 256, 74, None), 18: ("IQ3_XXS", 256, 98, None),
    19: ("IQ1_S", 256, 50, None), 20: ("IQ4_NL", 32, 18, None), 21: ("IQ3_S", 256, 110, None),
    22: ("IQ2_S", 256, 82, None), 23: ("IQ4_XS", 256, 136, None),
    24: ("I8", 1, 1, "int8"), 25: ("I16", 1, 2, "int16"), 26: ("I32", 1, 4, "int32"), 27: ("I64", 1, 8, "int64"),
    28: ("F64", 1, 8, "float64"), 29: ("IQ1_M", 256, 56, None), 30: ("BF16", 1, 2, "bfloat16"),
    34: ("TQ1_0", 256, 54, None), 35: ("TQ2_0", 256, 66, None), 39: ("MXFP4", 32, 17, None),
    40: ("NVFP4", 64, 36, None), 41: ("Q1_0", 128, 18, None),
}

# GGML types llama.cpp has removed from GGUF files (repacked layouts): refused, as llama.cpp refuses them
REMOVED_GGML_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4",
                      37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}

# GGUF value type id -> (name, struct format of a scalar, its size); string and array have no format
VALUE_TYPES: Dict[int, Tuple[str, str, int]] = {
    0: ("uint8", "B", 1), 1: ("int8", "b", 1), 2: ("uint16", "H", 2), 3: ("int16", "h", 2),
    4: ("uint32", "I", 4), 5: ("int32", "i", 4), 6: ("float32", "f", 4), 7: ("bool", "B", 1),
    8: ("string", "", 8), 9: ("array", "", 12), 10: ("uint64", "Q", 8), 11: ("int64", "q", 8),
    12: ("float64", "d", 8),
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# llama.cpp's llama_ftype (general.file_type)
FILE_TYPES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
    19: "MOSTLY_IQ2_XXS", 20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M", 28: "MOSTLY_IQ2_S",
    29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M", 32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0",
    37: "MOSTLY_TQ2_0", 38: "MOSTLY_MXFP4_MOE", 39: "MOSTLY_NVFP4", 40: "MOSTLY_Q1_0", 1024: "GUESSED",
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TAIL = struct.Struct("<IQ")  # a tensor info's type and offset
_ARRAY_HEAD = struct.Struct("<IQ")  # an array's element type and length
_FIXED = struct.Struct("<4sIQQ")  # magic, version, tensor count, key-value count
_SCALARS = {t: struct.Struct("<" + fmt) for t, (_, fmt, _) in VALUE_TYPES.items() if fmt}


def looks_like(head: bytes) -> bool:
    """True when the file starts with GGUF's magic.

    >>> looks_like(b"GGUF\\x03\\x00\\x00\\x00")
    True
    """
    return head[:4] == MAGIC


class _Header:
    """The file's header bytes, read forward in windows of positioned reads.

    ``need(pos, n)`` makes sure the window holds ``[pos, pos + n)`` and returns where it starts in
    ``buf``; a range past the end of the file is a FormatError naming ``what`` was being read. The
    window moves on (it does not grow), so a hostile 10 GB array costs no memory to skip.

    ``need`` may replace ``buf``: read ``buf`` only after it (``unpack`` and ``take`` do). The argument
    order ``unpack_from(h.buf, h.need(...))`` reads the old window at a move (a wrong value, silently).
    """

    def __init__(self, fd: int, path: str, size: int):
        self.fd, self.path, self.size = fd, path, size
        self.buf = b""
        self.base = 0

    def need(self, pos: int, n: int, what: str) -> int:
        if pos + n > self.size:
            raise FormatError(f"GGUF file is truncated: {what} at byte {pos} runs past the end of the "
                              f"{self.size}-byte file", self.path)
        i = pos - self.base
        if 0 <= i and i + n <= len(self.buf):
            return i
        want = min(max(n, _WINDOW), self.size - pos)
        parts, got = [], 0
        while got < want:
            chunk = os.pread(self.fd, want - got, pos + got)
            if not chunk:
                if got >= n:
                    break
                raise FormatError(f"GGUF file is truncated: {what} at byte {pos} could not be read", self.path)
            parts.append(chunk)
            got += len(chunk)
        self.buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self.base = pos
        return 0

    def unpack(self, st: struct.Struct, pos: int, what: str) -> tuple:
        """``st`` unpacked at ``pos``: the window moved first, then read."""
        i = self.need(pos, st.size, what)
        return st.unpack_from(self.buf, i)

    def take(self, pos: int, n: int, what: str) -> bytes:
        """The bytes ``[pos, pos + n)``: the window moved first, then read."""
        i = self.need(pos, n, what)
        return self.buf[i:i + n]

    def u32(self, pos: int, what: str) -> int:
        return self.unpack(_U32, pos, what)[0]

    def u64(self, pos: int, what: str) -> int:
        return self.unpack(_U64, pos, what)[0]

    def name(self, pos: int, what: str) -> Tuple[str, int]:
        """A key or tensor name (strict UTF-8, at most MAX_NAME bytes) and the position after it."""
        n = self.u64(pos, f"the length of {what}")
        if n > MAX_NAME:
            raise FormatError(f"{what} at byte {pos} claims {n} bytes (limit {MAX_NAME})", self.path)
        raw = self.take(pos + 8, n, what)
        try:
            return raw.decode("utf-8"), pos + 8 + n
        except UnicodeDecodeError:
            raise FormatError(f"{what} at byte {pos} is not valid UTF-8: {raw[:40]!r}", self.path) from None


def read(path: str) -> Checkpoint:
    """Read a GGUF file's structure: its tensors (no bytes read) and key-values.

    >>> ckpt = read("model-Q4_K_M.gguf")  # doctest: +SKIP
    >>> ckpt.metadata["architecture"], ckpt.metadata["tensor_types"]["blk.0.attn_q.weight"]  # doctest: +SKIP
    ('llama', 'Q4_K')
    """
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        h = _Header(f.fileno(), path, file_size)
        return _read(h, path, file_size)


def _read(h: _Header, path: str, file_size: int) -> Checkpoint:
    if file_size < 24:
        raise FormatError(f"file too short for a GGUF header ({file_size} bytes, the header takes 24)", path)
    magic, version, tensor_count, kv_count = h.unpack(_FIXED, 0, "the header")
    if magic != MAGIC:
        raise FormatError(f"not a GGUF file (starts with {magic!r})", path)
    if version not in VERSIONS:
        if version == 1:
            raise FormatError("GGUF version 1 is not supported (files of llama.cpp before August 2023); "
                              "convert it again with a current llama.cpp", path)
        if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
            raise FormatError("big-endian GGUF files are not supported", path)
        raise FormatError(f"GGUF version {version} is not supported (ckpttool reads versions 2 and 3)", path)
    room = file_size - 24
    if tensor_count > room // _MIN_TENSOR_INFO or kv_count > room // _MIN_KV \
            or tensor_count * _MIN_TENSOR_INFO + kv_count * _MIN_KV > room:
        raise FormatError(f"GGUF header claims {tensor_count} tensors and {kv_count} key-values, more than the "
                          f"{file_size}-byte file can hold", path)
    pos = 24
    kv: Dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for n in range(kv_count):
        key, pos = h.name(pos, f"key {n}")
        if key in kv:
            raise FormatError(f"GGUF key {key!r} appears twice", path)
        vtype = h.u32(pos, f"the value type of key {key!r}")
        if vtype not in VALUE_TYPES:
            raise FormatError(f"GGUF key {key!r} has unknown value type {vtype}", path)
        if vtype != _ARRAY and vtype != _STRING:
            st = _SCALARS[vtype]
            kv[key] = _scalar(vtype, h.unpack(st, pos + 4, f"the value of key {key!r}")[0])
            pos += 4 + st.size
        else:
            kv[key], pos = _value(h, pos + 4, vtype, key, 0, True)
        if key == "general.alignment":  # as gguf's reader and llama.cpp take it: a uint32 power of two
            if vtype != _UINT32:
                raise FormatError(f"GGUF general.alignment has type {VALUE_TYPES[vtype][0]}, not uint32", path)
            alignment = kv[key]
            if alignment == 0 or alignment & (alignment - 1):
                raise FormatError(f"GGUF general.alignment {alignment} is not a power of two", path)

    infos: List[Tuple[str, Tuple[int, ...], int, int]] = []
    seen = set()
    for n in range(tensor_count):
        name, pos = h.name(pos, f"the name of tensor {n}")
        if name in seen:
            raise FormatError(f"GGUF tensor {name!r} appears twice", path)
        seen.add(name)
        n_dims = h.u32(pos, f"the n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise FormatError(f"GGUF tensor {name!r} has {n_dims} dims (at most {MAX_DIMS})", path)
        raw = h.take(pos + 4, 8 * n_dims + 12, f"the dims, type and offset of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", raw)
        ggml_type, offset = _TAIL.unpack_from(raw, 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, ggml_type, offset))

    data_start = -(-pos // alignment) * alignment
    root: Dict[str, TensorRef] = {}
    tensor_types: Dict[str, str] = {}
    spans = []
    for name, dims, ggml_type, offset in infos:
        t = GGML_TYPES.get(ggml_type)
        if t is None:
            if ggml_type in REMOVED_GGML_TYPES:
                raise FormatError(f"GGUF tensor {name!r} has GGML type {ggml_type} ({REMOVED_GGML_TYPES[ggml_type]}), "
                                  "which llama.cpp no longer reads: quantize the model again", path)
            raise FormatError(f"GGUF tensor {name!r} has unknown GGML type {ggml_type}", path)
        type_name, block, type_size, dtype = t
        # torch needs every dim, and the product of the dims with a 0 taken as 1 (its contiguous strides,
        # and its numel checked partial product by partial product), to fit int64: a 0 hides no overflow
        numel = nonzero = 1
        for d in dims:
            numel *= d
            nonzero *= d or 1
            if d > _I64_MAX or nonzero > _I64_MAX:
                raise FormatError(f"GGUF tensor {name!r} dims {list(dims)} overflow int64", path)
        if block > 1 and (dims[0] if dims else 1) % block:
            raise FormatError(f"GGUF tensor {name!r}: its rows of {dims[0] if dims else 1} values are not whole "
                              f"{type_name} blocks of {block}", path)
        nbytes = numel // block * type_size
        if offset % alignment:
            raise FormatError(f"GGUF tensor {name!r} has offset {offset}, not a multiple of the alignment "
                              f"{alignment}", path)
        start = data_start + offset
        if start + nbytes > file_size:
            raise FormatError(f"GGUF tensor {name!r} ends at byte {start + nbytes} of a {file_size}-byte file "
                              "(truncated?)", path)
        if nbytes:
            spans.append((offset, offset + nbytes, name))
        shape = tuple(reversed(dims))
        stride = _contiguous(shape)
        if dtype is not None:
            storage = new_storage_ref(name, dtype, "cpu", nbytes, FileSpan(path, start, nbytes), path)
            root[name] = new_tensor_ref(shape, dtype, stride, 0, storage, "cpu", False, "dense")
        else:
            source = DequantSpan(path, start, nbytes, numel * 4, ggml_type, name)
            storage = StorageRef(key=name, dtype="float32", device="cpu", nbytes=numel * 4, source=source, file=path)
            root[name] = TensorRef(shape=shape, dtype="float32", stride=stride, storage=storage, device="cpu",
                                   kind="dense", encoding=type_name, encoded_nbytes=nbytes)
        tensor_types[name] = type_name
    spans.sort()
    for (_, end, before), (begin, _, name) in zip(spans, spans[1:]):
        if begin < end:
            raise FormatError(f"GGUF tensor {name!r} overlaps tensor {before!r}", path)

    arch = kv.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    metadata = {
        "gguf_version": version, "alignment": alignment, "architecture": arch, "kv": kv,
        "tensor_types": tensor_types,
        "details": _details(version, alignment, arch, kv, tensor_types),
    }
    return Checkpoint(path=path, format="gguf", file_size=file_size, root=root, metadata=metadata, globals=(),
                      files=(path,))


def _contiguous(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def _scalar(vtype: int, value: Any) -> Any:
    """A scalar as JSON holds it: a bool for bool, a string for a float that is not finite."""
    if vtype == 7:
        return bool(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf', '-inf': JSON has no such numbers
    return value


def _value(h: _Header, pos: int, vtype: int, key: str, depth: int, build: bool) -> Tuple[Any, int]:
    """The string or array value at ``pos`` (its value type already read) and the position after it;
    ``build=False`` only walks over it (every length still checked)."""
    path = h.path
    if vtype == _STRING:
        n = h.u64(pos, f"the string length of key {key!r}")
        if n > h.size - pos - 8:
            raise FormatError(f"GGUF key {key!r}: a string of {n} bytes at byte {pos} runs past the end of the "
                              f"{h.size}-byte file", path)
        if not build:
            return None, pos + 8 + n
        if n > MAX_SHOWN_STRING:
            text = h.take(pos + 8, STRING_HEAD, f"the string of key {key!r}").decode("utf-8", "replace")
            return {"type": "string", "length": n, "head": text}, pos + 8 + n
        return h.take(pos + 8, n, f"the string of key {key!r}").decode("utf-8", "replace"), pos + 8 + n
    # an array
    if depth >= MAX_DEPTH:
        raise FormatError(f"GGUF key {key!r}: arrays nested more than {MAX_DEPTH} deep", path)
    etype, n = h.unpack(_ARRAY_HEAD, pos, f"the array type and length of key {key!r}")
    pos += 12
    if etype not in VALUE_TYPES:
        raise FormatError(f"GGUF key {key!r}: array of unknown value type {etype}", path)
    ename, fmt, esize = VALUE_TYPES[etype]
    if n > (h.size - pos) // esize:  # the smallest an element can be: a string's length, an array's header
        raise FormatError(f"GGUF key {key!r}: an array of {n} {ename} values at byte {pos - 12} cannot fit in "
                          f"the {h.size}-byte file", path)
    shown = n if n <= SUMMARY_OVER else HEAD
    if fmt:  # scalars: skipped by arithmetic, the shown ones unpacked
        values = None
        if build:
            raw = h.take(pos, shown * esize, f"the array of key {key!r}")
            values = [_scalar(etype, v) for v in struct.unpack_from(f"<{shown}{fmt}", raw)]
        end = pos + n * esize
    elif etype == _STRING:
        values = []
        if build:
            for _ in range(shown):
                v, pos = _value(h, pos, _STRING, key, depth + 1, True)
                values.append(v)
            n_left = n - shown
        else:
            n_left = n
        end = _skip_strings(h, pos, n_left, key)
    else:  # arrays of arrays
        values = []
        for k in range(n):
            v, pos = _value(h, pos, _ARRAY, key, depth + 1, build and k < shown)
            if build and k < shown:
                values.append(v)
        end = pos
    if not build:
        return None, end
    if n > SUMMARY_OVER:
        return {"type": ename, "length": n, "head": values}, end
    return values, end


def _skip_strings(h: _Header, pos: int, n: int, key: str) -> int:
    """The position after ``n`` strings from ``pos``, each length checked: the tight loop a 150,000-token
    vocabulary goes through (no Python object per string)."""
    unpack = _U64.unpack_from
    size = h.size
    buf, base = h.buf, h.base
    end = base + len(buf)
    for _ in range(n):
        if not base <= pos <= end - 8:
            h.need(pos, 8, f"the string length of key {key!r}")
            buf, base = h.buf, h.base
            end = base + len(buf)
        pos += 8 + unpack(buf, pos - base)[0]
        if pos > size:
            raise FormatError(f"GGUF key {key!r}: a string runs past the end of the {size}-byte file", h.path)
    return pos


def _details(version: int, alignment: int, arch: Optional[str], kv: Dict[str, Any],
             tensor_types: Dict[str, str]) -> List[List[str]]:
    """inspect's summary rows: architecture, name, the GGUF framing, the GGML types, notable keys."""
    rows: List[List[str]] = []
    if arch is not None:
        rows.append(["architecture", arch])
    name = kv.get("general.name")
    if isinstance(name, str):
        rows.append(["name", name])
    rows.append(["gguf", f"version {version}, alignment {alignment}, {len(kv)} key-values"])
    counts: Dict[str, int] = {}
    for t in tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    if counts:
        rows.append(["ggml types", ", ".join(f"{t} {c} tensor{'s' if c != 1 else ''}" for t, c in
                                             sorted(counts.items(), key=lambda tc: (-tc[1], tc[0])))])
    ftype = kv.get("general.file_type")
    if type(ftype) is int:
        rows.append(["file type", f"{FILE_TYPES.get(ftype, 'unknown')} ({ftype})"])
    if arch is not None:
        bits = []
        for suffix, label in (("context_length", "context length"), ("embedding_length", "embedding"),
                              ("block_count", "blocks"), ("attention.head_count", "heads"),
                              ("expert_count", "experts")):
            v = kv.get(f"{arch}.{suffix}")
            if type(v) is int:
                bits.append(f"{label} {v}")
        if bits:
            rows.append(["model", ", ".join(bits)])
    tokens = kv.get("tokenizer.ggml.tokens")
    model = kv.get("tokenizer.ggml.model")
    n_tokens = tokens["length"] if isinstance(tokens, dict) else len(tokens) if isinstance(tokens, list) else None
    if isinstance(model, str) or n_tokens is not None:
        rows.append(["tokenizer", ", ".join(([model] if isinstance(model, str) else []) +
                                            ([f"{n_tokens} tokens"] if n_tokens is not None else []))])
    return rows


class DequantSpan:
    """The float32 values of a quantized GGUF tensor: ``size`` decoded bytes over ``encoded_size`` bytes of
    ``path`` from ``offset``, decoded on read.

    GGML blocks run along the innermost dim and a row is a whole number of them, so the tensor is one run
    of blocks: a read decodes only the blocks that hold the values asked for (``_DECODE_BLOCKS`` at a time),
    never the whole tensor for a chunk of it. The naive way is ``gguf.quants.dequantize`` of every byte.
    """

    __slots__ = ("path", "offset", "encoded_size", "size", "ggml_type", "name")

    def __init__(self, path: str, offset: int, encoded_size: int, size: int, ggml_type: int, name: str):
        self.path, self.offset, self.encoded_size, self.size = path, offset, encoded_size, size
        self.ggml_type, self.name = ggml_type, name

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        """The little-endian float32 bytes ``[start, start + size)`` of the dequantized values."""
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        if size == 0:
            return b""
        dequantize, qtype, np = _dequantizer(self.ggml_type, self.name, self.path)
        _, block, type_size, _ = GGML_TYPES[self.ggml_type]
        first = start // 4 // block          # the block of the first value asked for
        end_value = -(-(start + size) // 4)  # the value after the last one asked for
        last = -(-end_value // block)        # the block after the last one that holds values asked for
        out = np.empty((last - first) * block, dtype="<f4")
        for b in range(first, last, _DECODE_BLOCKS):
            n = min(_DECODE_BLOCKS, last - b)
            raw = FileSpan(self.path, self.offset + b * type_size, n * type_size).read()
            try:
                with np.errstate(all="ignore"):
                    values = dequantize(np.frombuffer(raw, dtype=np.uint8), qtype)
            except NotImplementedError:
                raise FormatError(f"GGUF tensor {self.name!r}: the gguf package cannot dequantize GGML type "
                                  f"{self.type_name}", self.path) from None
            out[(b - first) * block:(b - first + n) * block] = values.reshape(-1)
        lo = start - first * block * 4
        return out.view(np.uint8)[lo:lo + size].tobytes()

    def readinto(self, start: int, buf) -> None:
        """Fill ``buf`` with the decoded bytes from ``start`` (the FileSpan interface read_pieces uses)."""
        view = memoryview(buf).cast("B")
        view[:] = self.read(start, len(view))


def _dequantizer(ggml_type: int, name: str, path: str):
    """(gguf.quants.dequantize, the GGMLQuantizationType, numpy), imported on first use."""
    try:
        import numpy as np
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise MissingDependencyError("reading GGUF quantized tensors needs the gguf package: "
                                     "pip install 'ckpttool[gguf]'", path) from None
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise FormatError(f"GGUF tensor {name!r}: the installed gguf package does not know GGML type "
                          f"{GGML_TYPES[ggml_type][0]}", path) from None
    return dequantize, qtype, np
