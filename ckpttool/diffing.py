"""``diff``: compare the state_dicts of two checkpoints, key by key and value by value.

Values are compared tensor by tensor, a chunk at a time, straight from the
files: memory stays bounded by a few chunks whatever the checkpoint's size.
Chunks whose bytes are equal need no arithmetic; only where bytes differ, or
dtypes differ, are values converted and measured, with numpy (``numbers``), never
torch: a diff of values stays a small process.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from . import numbers
from .align import Alignment, align as find_alignment, pair_names
from .errors import CkptError, UsageError
from .records import Checkpoint, DiffResult, Rebuild, TensorDiff, TensorRef, read_pieces
from .tree import open_state_dict

Progress = Optional[Any]

# Default tolerances by dtype, as torch.testing.assert_close uses them (float8: about one ulp at 1).
# Integer, bool and quantized tensors compare exactly.
DEFAULT_TOLERANCES: Dict[str, Tuple[float, float]] = {  # dtype -> (atol, rtol)
    "float64": (1e-7, 1e-7), "complex128": (1e-7, 1e-7),
    "float32": (1e-5, 1.3e-6), "complex64": (1e-5, 1.3e-6),
    "float16": (1e-5, 1e-3), "complex32": (1e-5, 1e-3),
    "bfloat16": (1e-5, 1.6e-2),
    "float8_e4m3fn": (1e-3, 0.125), "float8_e4m3fnuz": (1e-3, 0.125),
    "float8_e5m2": (1e-3, 0.25), "float8_e5m2fnuz": (1e-3, 0.25), "float8_e8m0fnu": (0.0, 1.0),
}
# dtypes ``numbers`` can turn into float64/complex128 for measuring; others are compared as bytes.
_MEASURABLE = set(DEFAULT_TOLERANCES) | {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
                                         "uint8", "bool"}
_INTEGER = {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"}
CHUNK_ELEMENTS = 1 << 20  # 1M elements: 8 MB as float64 per side; the measuring temporaries stay ~50 MB


def is_floating(dtype: str) -> bool:
    return dtype in DEFAULT_TOLERANCES


def tolerance(dtype_a: str, dtype_b: str, atol: Optional[float] = None,
              rtol: Optional[float] = None) -> Tuple[float, float]:
    """(atol, rtol) for comparing a ``dtype_a`` tensor with a ``dtype_b`` one: the looser dtype's
    defaults, or the given values for floating tensors; integers always compare exactly.

    >>> tolerance("float32", "float16")
    (1e-05, 0.001)
    >>> tolerance("int64", "int64", atol=0.1)
    (0.0, 0.0)
    """
    if not (is_floating(dtype_a) or is_floating(dtype_b)):
        return 0.0, 0.0
    da = DEFAULT_TOLERANCES.get(dtype_a, (0.0, 0.0))
    db = DEFAULT_TOLERANCES.get(dtype_b, (0.0, 0.0))
    return (max(da[0], db[0]) if atol is None else atol), (max(da[1], db[1]) if rtol is None else rtol)


def diff(a: Union[str, Checkpoint], b: Union[str, Checkpoint], key_a: Optional[str] = None,
         key_b: Optional[str] = None, values: bool = True, atol: Optional[float] = None,
         rtol: Optional[float] = None, align: bool = True, progress: Progress = None) -> DiffResult:
    """Compare the state_dicts of ``a`` and ``b`` (paths or opened checkpoints, any formats).

    ``values=False`` compares names, shapes and dtypes only and reads no tensor data.
    ``atol``/``rtol`` override the dtype defaults (see ``DEFAULT_TOLERANCES``) for
    floating tensors. ``align`` strips a wrapper prefix (``module.``, ``_orig_mod.``,
    ``model.``...) that every key of one side carries, when that makes more keys meet.

    >>> r = diff("a.pt", "b.safetensors")   # doctest: +SKIP
    >>> r.equal, r.only_in_a, [d.name for d in r.value_mismatch]   # doctest: +SKIP
    (False, (), ['fc.weight'])
    """
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"{name} must be a finite number >= 0, not {v}")
    ca, sa = open_state_dict(a, key_a)
    cb, sb = open_state_dict(b, key_b)
    names_a, names_b = list(sa.tensors), list(sb.tensors)
    alignment = find_alignment(names_a, names_b) if align else Alignment()
    pairs, only_a, only_b = pair_names(names_a, names_b, alignment)

    shape_mm: List[TensorDiff] = []
    dtype_mm: List[TensorDiff] = []
    form_mm: List[TensorDiff] = []
    to_compare: List[Tuple[TensorDiff, TensorRef, TensorRef]] = []
    for na, nb in pairs.items():
        ta, tb = sa.tensors[na], sb.tensors[nb]
        d = TensorDiff(name=na, name_b=nb, shape_a=ta.shape, shape_b=tb.shape, dtype_a=ta.dtype, dtype_b=tb.dtype)
        if ta.shape != tb.shape:
            shape_mm.append(d)
            continue
        if ta.dtype != tb.dtype:
            dtype_mm.append(d)
        if ta.rebuild is not None or tb.rebuild is not None or ta.kind != tb.kind or ta.subclass != tb.subclass:
            forms = form_difference(ta, tb)
            if forms:
                d = dataclasses.replace(d, form_a=forms[0], form_b=forms[1])
                form_mm.append(d)
        to_compare.append((d, ta, tb))

    compared: List[TensorDiff] = []
    if values:
        total = sum(ta.nbytes + tb.nbytes for _, ta, tb in to_compare)
        done = 0
        for d, ta, tb in to_compare:
            try:
                compared.append(compare_tensors(d, ta, tb, atol, rtol))
            except CkptError as e:
                if e.path is None:
                    e.path = f"{ca.path}, {cb.path}"
                raise
            done += ta.nbytes + tb.nbytes
            if progress:
                progress(done, total)
    by_name = {d.name: d for d in compared}
    dtype_mm = [by_name.get(d.name, d) for d in dtype_mm]  # with how their values compare
    form_mm = [by_name.get(d.name, d) for d in form_mm]
    mismatch = tuple(d for d in compared if d.status == "mismatch")
    close = tuple(d for d in compared if d.status == "close")
    undecided = tuple(d for d in compared if d.status == "not_compared")  # values that could not be compared
    equal = not (only_a or only_b or shape_mm or dtype_mm or form_mm or mismatch or undecided)
    return DiffResult(
        path_a=ca.path, path_b=cb.path, format_a=ca.format, format_b=cb.format, entry_a=sa.entry,
        entry_b=sb.entry, count_a=len(names_a), count_b=len(names_b), only_in_a=tuple(only_a),
        only_in_b=tuple(only_b), shape_mismatch=tuple(shape_mm), dtype_mismatch=tuple(dtype_mm),
        value_mismatch=mismatch, value_close=close,
        exact=sum(1 for d in compared if d.status == "exact"),
        not_compared=tuple(d for d in compared if d.status in ("not_compared", "no_data")),
        values_compared=values, atol=atol, rtol=rtol, prefix_alignment=alignment, equal=equal,
        exit_code=0 if equal else 1, form_mismatch=tuple(form_mm))


def _param_state(t: TensorRef) -> Optional[Tuple[TensorRef, Any]]:
    """(the tensor, its attributes) of a Parameter saved with attributes of its own, else None."""
    r = t.rebuild
    if isinstance(r, Rebuild) and r.name == "_rebuild_parameter_with_state" and r.args and \
            isinstance(r.args[0], TensorRef):
        return r.args[0], (r.args[3] if len(r.args) > 3 else None)
    return None


def form_difference(a: TensorRef, b: TensorRef) -> Optional[Tuple[str, str]]:
    """(A's form, B's form) where torch holds the two differently, else None. Two Parameters with the same
    attribute names but other attribute values differ too. A conj / neg view is its values as torch gives
    them (``torch.equal`` of the view and its resolved copy): the bits alone are no difference."""
    fa, fb = (dataclasses.replace(t, metadata=()).form if t.metadata else t.form for t in (a, b))
    if fa != fb:
        return fa, fb
    pa, pb = _param_state(a), _param_state(b)
    if pa and pb and _skeleton(pa[1]) != _skeleton(pb[1]):
        return fa, fb + " (other attribute values)"
    return None


def _pieces(t: TensorRef, n: int, reuse: bool = False) -> Iterator[bytes]:
    """The tensor's C-order bytes, ``n`` elements at a time (a strided view is gathered first).

    With ``reuse``, pieces of a contiguous tensor are views of a reused buffer (``read_pieces``),
    each valid until the next piece is asked for.
    """
    if reuse and t.is_contiguous and t.has_data:
        yield from read_pieces(t.storage.source, t.span()[0], t.nbytes, n * t.itemsize)
        return
    if t.is_contiguous or t.numel <= 1:
        yield from t.iter_chunks(n * t.itemsize)
        return
    data = t.read_bytes()
    step = n * t.itemsize
    for i in range(0, len(data), step):
        yield data[i:i + step]


FAST_CHUNK = 8 << 20
_buffers: List[bytearray] = []  # two reusable buffers whose contents are equal between calls


def _bytes_equal(a: TensorRef, b: TensorRef) -> bool:
    """Are two contiguous tensors' bytes equal? Two reusable buffers, no arithmetic, no torch.

    Each chunk is read into the front of both buffers and the whole buffers compared (a C memcmp):
    the bytes past the chunk are equal too, because any earlier difference ended the comparison,
    after which the buffers are made anew.
    """
    sa, sb = a.storage.source, b.storage.source
    if not (a.is_contiguous and b.is_contiguous and hasattr(sa, "readinto") and hasattr(sb, "readinto")):
        return False
    if not _buffers:
        _buffers.extend((bytearray(FAST_CHUNK), bytearray(FAST_CHUNK)))
    bufa, bufb = _buffers
    (start_a, _), (start_b, _) = a.span(), b.span()
    total = a.nbytes
    step = FAST_CHUNK - FAST_CHUNK % a.itemsize
    va, vb = memoryview(bufa), memoryview(bufb)
    for off in range(0, total, step):
        n = min(step, total - off)
        sa.readinto(start_a + off, va[:n])
        sb.readinto(start_b + off, vb[:n])
        if bufa != bufb:
            _buffers.clear()  # unequal now: the next call starts from fresh, equal buffers
            return False
    return True


def _same_bits(pa: bytes, pb: bytes) -> bool:
    if isinstance(pa, memoryview) or isinstance(pb, memoryview):  # a memoryview's == goes element by element
        import numpy as np
        return bool(np.array_equal(np.frombuffer(pa, dtype=np.uint8), np.frombuffer(pb, dtype=np.uint8)))
    return pa == pb


def _count(piece: bytes, itemsize: int) -> int:
    return len(piece) // max(itemsize, 1)


def compare_tensors(d: TensorDiff, a: TensorRef, b: TensorRef, atol: Optional[float] = None,
                    rtol: Optional[float] = None, chunk_elements: int = CHUNK_ELEMENTS) -> TensorDiff:
    """Fill ``d`` with how the values of ``a`` and ``b`` (same shape) compare.

    ``exact`` when every element is bitwise equal (same dtype) or numerically equal
    (different dtypes); ``close`` when all are within the tolerance; else ``mismatch``
    with the count of elements outside it and the max abs / rel difference.
    """
    import dataclasses
    a, b = (_param_state(t)[0] if _param_state(t) else t for t in (a, b))  # attributes: form_difference's
    if a.is_composite or b.is_composite or (a.rebuild is not None and a.has_data) or \
            (b.rebuild is not None and b.has_data):
        return _compare_rebuilt(d, a, b, atol, rtol, chunk_elements)
    if not (a.has_data or b.has_data):  # meta on both sides: nothing to compare, nothing differs
        return dataclasses.replace(d, status="no_data", note=f"no data on either side ({a.kind} tensors)")
    if not (a.has_data and b.has_data):
        side = "A" if not a.has_data else "B"
        return dataclasses.replace(d, status="mismatch", mismatched=a.numel, numel=a.numel, max_abs=math.nan,
                                   max_rel=math.nan, note=f"{side} has no data (a {(a if side == 'A' else b).kind} "
                                                          f"tensor); the other has values")
    at, rt = tolerance(a.dtype, b.dtype, atol, rtol)
    measurable = a.dtype in _MEASURABLE and b.dtype in _MEASURABLE and a.kind == b.kind == "dense"
    bits_a, bits_b = a.bits, b.bits
    same_bits = bits_a == bits_b  # the same view bits on both sides: the bytes say it all
    if not same_bits and not measurable:
        return dataclasses.replace(d, status="not_compared", note=f"A is a {a.form}, B a {b.form} tensor, of "
                                                                  f"{a.dtype}: values not compared")
    if not measurable and a.dtype != b.dtype:
        return dataclasses.replace(d, status="not_compared",
                                   note=f"values of {a.dtype} and {b.dtype} cannot be compared numerically")
    if not measurable and not (a.is_contiguous and b.is_contiguous):  # same dtype: the gathered bytes say it
        if a.read_bytes() == b.read_bytes():
            return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, atol=at, rtol=rt)
        return dataclasses.replace(d, status="mismatch", mismatched=a.numel, numel=a.numel, max_abs=math.nan,
                                   max_rel=math.nan, note=f"strided {a.dtype} view: bytes differ")
    note = "" if same_bits else f"compared as torch loads them (A: {a.form}, B: {b.form})"
    if same_bits and bits_a:
        note = f"both {a.form}s: their stored values compared"
    if same_bits and a.dtype == b.dtype and _bytes_equal(a, b):  # the common case, at the speed of the disk
        return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, atol=at, rtol=rt, note=note)
    n_bad, max_abs, max_rel, exact = 0, 0.0, 0.0, True
    for pa, pb in zip(_pieces(a, chunk_elements, reuse=True), _pieces(b, chunk_elements, reuse=True)):
        if not same_bits:  # the values torch gives: the stored ones, conjugated / negated by the view bits
            chunk_bad, chunk_abs, chunk_rel, chunk_exact = numbers.measure(
                _as_loaded(numbers.as_numbers(pa, a.dtype), bits_a), _as_loaded(numbers.as_numbers(pb, b.dtype),
                                                                               bits_b), at, rt)
            exact = exact and chunk_exact
            n_bad += chunk_bad
            max_abs, max_rel = max(max_abs, chunk_abs), max(max_rel, chunk_rel)
            continue
        if a.dtype == b.dtype and _same_bits(pa, pb):
            continue
        if not measurable:  # same dtype, bytes differ, no numbers to measure (quantized, packed)
            exact = False
            n_bad += _count(pa, a.itemsize)
            max_abs = max_rel = math.nan
            continue
        if a.dtype == b.dtype and a.dtype in _INTEGER:
            chunk_bad, chunk_abs, chunk_rel, chunk_exact = numbers.measure_ints(numbers.as_native(pa, a.dtype),
                                                                                numbers.as_native(pb, b.dtype))
        else:
            chunk_bad, chunk_abs, chunk_rel, chunk_exact = numbers.measure(numbers.as_numbers(pa, a.dtype, "a"),
                                                                           numbers.as_numbers(pb, b.dtype, "b"),
                                                                           at, rt)
        exact = exact and chunk_exact
        n_bad += chunk_bad
        max_abs = max(max_abs, chunk_abs)
        max_rel = max(max_rel, chunk_rel)
    if exact:
        return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, atol=at, rtol=rt, note=note)
    status = "mismatch" if n_bad else "close"
    return dataclasses.replace(d, status=status, max_abs=max_abs, max_rel=max_rel, mismatched=n_bad,
                               numel=a.numel, atol=at, rtol=rt, note=note)


def _as_loaded(x, bits):
    """Numbers as torch gives them for a view with these bits (conj, neg)."""
    import numpy as np
    if "conj" in bits:
        x = np.conj(x)
    if "neg" in bits:
        x = -x
    return x


_RANK = {"exact": 0, "no_data": 0, "close": 1, "not_compared": 2, "mismatch": 3}


def _skeleton(v: Any, depth: int = 0, memo: Optional[Dict[int, Any]] = None) -> Any:
    """:func:`_skeleton_of`, each object once (a digest per object, so a file's shared tuples cost linear time)."""
    import hashlib
    memo = {} if memo is None else memo
    key = id(v)
    if key in memo:
        return memo[key]
    value = _skeleton_of(v, depth, memo)
    digest = hashlib.sha1(repr(value).encode("utf-8", "replace")).hexdigest()
    if isinstance(v, (dict, list, tuple, set, frozenset)) or hasattr(v, "__dict__"):
        memo[key] = digest
        memo.setdefault("_keep", []).append(v)
    return digest


def _skeleton_of(v: Any, depth: int, memo: Dict[int, Any]) -> Any:
    """A rebuild's arguments with their tensors and storages reduced to (dtype, shape): what must be equal
    besides the tensors' values (a quantizer's scale, a sparse tensor's size, a subclass's attributes)."""
    from .formats.safe_pickle import Stub
    from .records import Rebuild, StorageRef, Value
    if depth > 50:
        return "..."
    if isinstance(v, TensorRef):
        return ("tensor", v.dtype, v.shape)
    if isinstance(v, StorageRef):
        return ("storage", v.dtype)
    if isinstance(v, Rebuild):
        return (v.module, v.name, _skeleton(v.args, depth + 1, memo))
    if isinstance(v, Value):
        return ("value", _skeleton(v.value, depth + 1, memo))
    if isinstance(v, type) and issubclass(v, Stub):
        return ("global", v.stub_module, v.stub_name)
    if isinstance(v, Stub):
        return (v.qualname, _skeleton(v.args, depth + 1, memo), _skeleton(v.state, depth + 1, memo),
                _skeleton(sorted(v.items.items(), key=repr), depth + 1, memo), _skeleton(v.list_items, depth + 1, memo))
    if isinstance(v, dict):
        return ("dict",) + tuple((repr(k), _skeleton(x, depth + 1, memo)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__,) + tuple(_skeleton(x, depth + 1, memo) for x in v)
    if isinstance(v, (set, frozenset)):
        return (type(v).__name__,) + tuple(sorted(repr(x) for x in v))
    if callable(v):
        return ("function", getattr(v, "__name__", "?"))
    return repr(v)


def _compare_rebuilt(d: TensorDiff, a: TensorRef, b: TensorRef, atol: Optional[float], rtol: Optional[float],
                     chunk_elements: int) -> TensorDiff:
    """Tensors torch rebuilds by a call of their own (sparse, nested, quantized, subclasses): the same form,
    the same call's other arguments, and each component tensor compared by value."""
    import dataclasses
    if (a.kind, a.subclass) != (b.kind, b.subclass):
        return dataclasses.replace(d, status="not_compared",
                                   note=f"A is a {a.form} tensor, B a {b.form} one: values not compared")
    if _skeleton(a.rebuild) != _skeleton(b.rebuild):
        return dataclasses.replace(d, status="mismatch", numel=a.numel, mismatched=a.numel, max_abs=math.nan,
                                   max_rel=math.nan, note=f"{a.form} tensors rebuilt with different arguments "
                                                          "(sizes, quantizer parameters or attributes)")
    parts_a = list(a.parts) or ([("data", a)] if a.has_data else [])
    parts_b = list(b.parts) or ([("data", b)] if b.has_data else [])
    if [n for n, _ in parts_a] != [n for n, _ in parts_b]:
        return dataclasses.replace(d, status="not_compared", note=f"{a.form} tensors of different parts")
    if not parts_a:
        if a.kind == "value":  # a state_dict entry that is no tensor: its value (the skeleton) is all there is
            return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, note=f"{a.form}: equal")
        return dataclasses.replace(d, status="no_data", note=f"no data on either side ({a.form} tensors)")
    worst, bad, max_abs, max_rel, said = "exact", 0, 0.0, 0.0, []
    for (name, pa), (_, pb) in zip(parts_a, parts_b):
        sub = TensorDiff(name=name, name_b=name, shape_a=pa.shape, shape_b=pb.shape, dtype_a=pa.dtype,
                         dtype_b=pb.dtype)
        if pa.shape != pb.shape or pa.dtype != pb.dtype:
            sub = dataclasses.replace(sub, status="mismatch", mismatched=pa.numel, max_abs=math.nan,
                                      max_rel=math.nan)
        else:
            pa_dense = dataclasses.replace(pa, kind="dense", rebuild=None, parts=())
            pb_dense = dataclasses.replace(pb, kind="dense", rebuild=None, parts=())
            sub = compare_tensors(sub, pa_dense, pb_dense, atol, rtol, chunk_elements)
        if _RANK[sub.status] > _RANK[worst]:
            worst = sub.status
        bad += sub.mismatched
        for m, v in (("abs", sub.max_abs), ("rel", sub.max_rel)):
            if v is not None:
                if m == "abs":
                    max_abs = v if math.isnan(v) else max(max_abs, v)
                else:
                    max_rel = v if math.isnan(v) else max(max_rel, v)
        said.append(f"{name} {sub.status}")
    worst = "exact" if worst == "no_data" else worst
    note = f"{a.form}: compared part by part ({', '.join(said)})"
    if worst == "exact":
        return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, note=note)
    return dataclasses.replace(d, status=worst, mismatched=bad, numel=a.numel, max_abs=max_abs, max_rel=max_rel,
                               note=note)
