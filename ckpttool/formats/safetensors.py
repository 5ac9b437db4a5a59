"""safetensors files and sharded folders, read from the header alone.

A file is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``), then the
byte buffer. Every claim of the header is checked against the file before it
is believed: the length, each dtype, each shape against its byte span, and
that the spans tile the buffer without gaps, overlaps or overruns.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Dict, Tuple

from ..dtypes import SAFETENSORS_DTYPE, itemsize
from ..errors import FormatError
from ..checkpoint import Checkpoint, StorageRef, TensorRef
from ..spans import FileSpan
from ..text import safe_repr

MAX_HEADER = 100 << 20  # safetensors' own limit


def looks_like(head: bytes, file_size: int) -> bool:
    """True when the first bytes are a plausible safetensors header start."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    # a header longer than the file still says "safetensors": the reader reports the truncation
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def parse_json(text: bytes, what: str, path: str) -> Any:
    """json.loads whose every failure (bad UTF-8, syntax, huge ints, deep nesting) is a FormatError."""
    try:
        return json.loads(text.decode("utf-8"))
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply", path) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise FormatError(f"{what} is not valid JSON: {str(e)[:120]}", path) from None


def read_header(path: str) -> Tuple[Dict[str, Any], int, int]:
    """Return (header dict, buffer start, file size) after validating the header's framing."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"file too short for a safetensors header ({file_size} bytes)", path)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise FormatError(f"safetensors header claims {n} bytes (limit {MAX_HEADER})", path)
        if 8 + n > file_size:
            raise FormatError(f"safetensors header claims {n} bytes but the file has {file_size} (truncated?)", path)
        text = f.read(n)
    header = parse_json(text, "safetensors header", path)
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object", path)
    return header, 8 + n, file_size


def read(path: str) -> Checkpoint:
    """Read one safetensors file's tensors (metadata only) into a flat state_dict."""
    header, start, file_size = read_header(path)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError("safetensors __metadata__ is not a map of strings", path)
    buffer_size = file_size - start
    spans = []
    tensors: Dict[str, TensorRef] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise FormatError(f"safetensors entry {name!r} is not an object", path)
        dtype_code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_code, str) or dtype_code not in SAFETENSORS_DTYPE:
            raise FormatError(f"tensor {name!r} has unknown dtype {safe_repr(dtype_code, 20)}", path)
        dtype = SAFETENSORS_DTYPE[dtype_code]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"tensor {name!r} has a malformed shape {safe_repr(shape, 60)}", path)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise FormatError(f"tensor {name!r} has malformed data_offsets {safe_repr(offsets, 60)}", path)
        begin, end = offsets
        numel = math.prod(shape)
        nbytes = numel * itemsize(dtype)
        if dtype_code == "F4":  # two fp4 values a byte; the header counts values, torch counts bytes
            if not shape or shape[-1] % 2:
                raise FormatError(f"tensor {name!r}: F4 shape {shape} has no even last dimension (safetensors.torch "
                                  "cannot load it as float4_e2m1fn_x2)", path)
            shape = shape[:-1] + [shape[-1] // 2]
            nbytes = math.prod(shape)
        if not 0 <= begin <= end:
            raise FormatError(f"tensor {name!r} has data_offsets {offsets} that run backwards", path)
        if end - begin != nbytes:
            raise FormatError(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                              f"data_offsets span {end - begin}", path)
        if end > buffer_size:
            raise FormatError(f"tensor {name!r} ends at byte {end} of a {buffer_size}-byte buffer (truncated?)", path)
        spans.append((begin, end, name))
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        storage = StorageRef(key=name, dtype=dtype, device="cpu", nbytes=nbytes,
                             source=FileSpan(path, start + begin, nbytes), file=path)
        tensors[name] = TensorRef(shape=tuple(shape), dtype=dtype, stride=stride, storage=storage, device="cpu")
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise FormatError(f"tensor {name!r} overlaps the tensor before it", path)
        if begin > pos:
            raise FormatError(f"safetensors buffer has a gap before tensor {name!r}", path)
        pos = end
    if pos != buffer_size:
        raise FormatError(f"safetensors buffer has {buffer_size - pos} bytes after its last tensor", path)
    ties = restore_ties(tensors, meta or {})
    extra = {"_ties": ties} if ties else {}
    return Checkpoint(path=path, format="safetensors", file_size=file_size, root=tensors,
                      metadata={"metadata": meta or {}, **extra}, files=(path,))


def restore_ties(tensors: Dict[str, TensorRef], meta: Dict[str, str]) -> Dict[str, str]:
    """Give back the tied names ``safetensors.torch.save_model`` dropped: ``{dropped: kept}`` in the header.

    A dropped name becomes a second tensor over the kept one's storage, as ``load_model``
    restores it, so the state_dict reads as it was saved. Returns the ties applied.
    """
    ties = {}
    for name, kept in meta.items():
        if name not in tensors and isinstance(kept, str) and kept in tensors and name != "format":
            tensors[name] = dataclasses.replace(tensors[kept])
            ties[name] = kept
    return ties
