"""Tensor bytes as numbers, with numpy rather than torch (a diff of values then costs ~30 MB, not ~630).

numpy has float16/32/64, complex64/128 and every integer width; the dtypes it lacks are decoded
exactly: bfloat16 is the top half of a float32, complex32 is two float16s, and each float8
format is a 256-entry table built from its definition (tests hold them to torch's own values).
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Dict, List, Tuple

_NATIVE = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "complex128": "<c16", "complex64": "<c8",
           "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint64": "<u8", "uint32": "<u4",
           "uint16": "<u2", "uint8": "u1", "bool": "u1"}
_TABLES: Dict[str, Any] = {}


def _float8_value(byte: int, fmt: str) -> float:
    """The value of one float8 byte in ``fmt`` (OCP FP8 and the AMD "fnuz" variants, and E8M0)."""
    if fmt == "float8_e8m0fnu":  # an exponent alone: 2 ** (e - 127), 0xFF is NaN
        return math.nan if byte == 0xFF else math.ldexp(1.0, byte - 127)
    ebits, mbits, bias = {"float8_e4m3fn": (4, 3, 7), "float8_e4m3fnuz": (4, 3, 8),
                          "float8_e5m2": (5, 2, 15), "float8_e5m2fnuz": (5, 2, 16)}[fmt]
    sign = -1.0 if byte & 0x80 else 1.0
    e = (byte >> mbits) & ((1 << ebits) - 1)
    m = byte & ((1 << mbits) - 1)
    if fmt.endswith("fnuz") and byte == 0x80:
        return math.nan  # the one NaN; there is no -0 and no infinity
    if fmt == "float8_e4m3fn" and e == 15 and m == 7:
        return math.nan  # no infinity; S.1111.111 is NaN
    if fmt == "float8_e5m2" and e == 31:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * math.ldexp(m, 1 - bias - mbits)
    return sign * math.ldexp((1 << mbits) + m, e - bias - mbits)


def _table(fmt: str):
    import numpy as np
    if fmt not in _TABLES:
        _TABLES[fmt] = np.array([_float8_value(b, fmt) for b in range(256)], dtype=np.float64)
    return _TABLES[fmt]


_THREAD = threading.local()  # scratch arrays, one set per thread: two threads never share one


def _work(name: str, n: int, dtype: str):
    """A reused scratch array of ``n`` elements (chunks come one after another: no fresh memory for each)."""
    import numpy as np
    work = getattr(_THREAD, "work", None)
    if work is None:
        work = _THREAD.work = {}
    arr = work.get(name)
    if arr is None or arr.size < n or arr.dtype != np.dtype(dtype):
        arr = work[name] = np.empty(n, dtype=dtype)
    return arr[:n]


def as_numbers(data: bytes, dtype: str, slot: str = ""):
    """Little-endian C-order elements of ``dtype`` -> a float64 (complex128 for complex) numpy array.

    With ``slot`` the array is a reused scratch array, valid until that slot is used again.
    """
    import numpy as np
    if slot and dtype in _NATIVE:
        x = np.frombuffer(data, dtype=_NATIVE[dtype])
        out = _work(slot, len(x), "complex128" if dtype.startswith("complex") else "float64")
        out[...] = x
        return out
    if dtype.startswith("float8_"):
        return _table(dtype)[np.frombuffer(data, dtype=np.uint8)]
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "complex32":
        halves = np.frombuffer(data, dtype="<f2").astype(np.float64)
        out = np.empty(len(halves) // 2, dtype=np.complex128)  # not re + 1j * im: 1j * inf has a NaN real part
        out.real, out.imag = halves[0::2], halves[1::2]
        return out
    x = np.frombuffer(data, dtype=_NATIVE[dtype])
    return x.astype(np.complex128 if dtype.startswith("complex") else np.float64)


def as_native(data: bytes, dtype: str):
    """Integer or bool elements in their own width (float64 would round integers past 2**53)."""
    import numpy as np
    return np.frombuffer(data, dtype=_NATIVE[dtype])


def measure_ints(xa, xb) -> Tuple[int, float, float, bool]:
    """(elements that differ, max abs diff, max rel diff, all equal) of two integer arrays."""
    ne = xa != xb
    bad = int(ne.sum())
    if not bad:
        return 0, 0.0, 0.0, True
    va = xa[ne][:100_000].tolist()  # exact differences from Python ints, over at most 100k of them
    vb = xb[ne][:100_000].tolist()
    diffs = [abs(int(x) - int(y)) for x, y in zip(va, vb)]
    rels = [abs(int(x) - int(y)) / abs(int(y)) if y else math.inf for x, y in zip(va, vb)]
    return bad, float(max(diffs)), float(max(rels)), False


_POOL: List[Any] = []
PARALLEL_MIN = 1 << 18  # elements: below this, one thread


def measure(xa, xb, atol: float, rtol: float) -> Tuple[int, float, float, bool]:
    """(elements not close, max abs diff, max rel diff, all equal) of two float64/complex128 arrays.

    Close is ``|a - b| <= atol + rtol * |b|``, NaN equal to NaN (torch.isclose's rule). Where every
    difference is finite (the usual case) it is measured in a few in-place passes; NaN and Inf
    take the general path. Large arrays are measured in halves on two threads (numpy lets go of
    the GIL in its loops).
    """
    n = len(xa)
    workers = min(2, os.cpu_count() or 1)
    if n < PARALLEL_MIN or workers < 2:
        return _measure_part(xa, xb, atol, rtol, "")
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.append(ThreadPoolExecutor(2, thread_name_prefix="ckpttool-measure"))
    h = n // 2
    parts = [_POOL[0].submit(_measure_part, xa[:h], xb[:h], atol, rtol, "0"),
             _POOL[0].submit(_measure_part, xa[h:], xb[h:], atol, rtol, "1")]
    (b0, a0, r0, e0), (b1, a1, r1, e1) = (p.result() for p in parts)
    if e0 and e1:
        return 0, 0.0, 0.0, True
    return b0 + b1, max(a0, a1), max(r0, r1), False


def _measure_part(xa, xb, atol: float, rtol: float, tag: str) -> Tuple[int, float, float, bool]:
    import numpy as np
    n = len(xa)
    with np.errstate(all="ignore"):
        if xa.dtype.kind == "c" or xb.dtype.kind == "c":
            d = np.abs(np.subtract(xa, xb), out=_work("d" + tag, n, "float64"))
        else:
            d = _work("d" + tag, n, "float64")
            d = np.abs(np.subtract(xa, xb, out=d), out=d)
        if bool(np.isfinite(d.sum())):  # no NaN, no Inf anywhere (a sum is one cheap pass)
            max_abs = float(d.max()) if d.size else 0.0
            if max_abs == 0.0:
                return 0, 0.0, 0.0, True
            ref = np.abs(xb, out=_work("ref" + tag, n, "float64"))
            rel = np.divide(d, ref, out=_work("rel" + tag, n, "float64"))  # 0/0 (equal zeros) is NaN; x/0 is Inf
            rel_inf = bool(np.isinf(rel).any())
            max_rel = math.inf if rel_inf else float(np.nanmax(rel)) if d.size else 0.0
            ref *= rtol
            ref += atol
            bad = int(np.count_nonzero(d > ref))
            return bad, max_abs, max_rel, False
        return _measure_general(xa, xb, atol, rtol)


def _measure_general(xa, xb, atol: float, rtol: float) -> Tuple[int, float, float, bool]:
    import numpy as np
    with np.errstate(all="ignore"):
        both_nan = np.isnan(xa) & np.isnan(xb)
        same = (xa == xb) | both_nan
        if bool(same.all()):
            return 0, 0.0, 0.0, True
        bad = int((~np.isclose(xa, xb, rtol=rtol, atol=atol, equal_nan=True)).sum())
        diff = np.abs(xa - xb)
        diff[same] = 0.0
        finite = np.isfinite(diff)
        max_abs = float(diff[finite].max()) if bool(finite.any()) else 0.0
        if not bool(finite.all()):
            max_abs = math.inf  # a NaN or Inf against a number
        rel = np.where(diff == 0, 0.0, diff / np.abs(xb))
        rel_finite = rel[np.isfinite(rel)]
        max_rel = float(rel_finite.max()) if rel_finite.size else 0.0
        if not bool(np.isfinite(rel).all()):
            max_rel = math.inf
    return bad, max_abs, max_rel, False


def gather(span: bytes, shape, stride, itemsize: int) -> bytes:
    """The C-order bytes of a strided view whose first element starts ``span`` (numpy's as_strided)."""
    import numpy as np
    if not math.prod(shape):
        return b""
    raw = np.frombuffer(span, dtype=np.dtype((np.void, itemsize)))
    try:
        view = np.lib.stride_tricks.as_strided(raw, shape=tuple(shape), strides=tuple(s * itemsize for s in stride),
                                               writeable=False)
        return np.ascontiguousarray(view).tobytes()
    except (ValueError, MemoryError, OverflowError) as e:  # an expand()ed view larger than memory, or than numpy
        from .errors import FormatError
        raise FormatError(f"a strided view of shape {tuple(shape)} ({math.prod(shape) * itemsize} bytes) cannot be "
                          f"gathered in memory: {type(e).__name__}") from None
