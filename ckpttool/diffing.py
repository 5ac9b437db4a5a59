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
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import numbers
from .align import Alignment, Rename, align as find_alignment, pair_names
from .errors import CkptError, UsageError
from .comparing import bytes_equal, pieces, same_bits as piece_bits_equal
from .checkpoint import Checkpoint, Rebuild, StorageRef, TensorRef, Value
from .results import DiffResult, TensorDiff
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


SORTS = ("change", "name", "size", "file")


def diff(a: Union[str, Checkpoint], b: Union[str, Checkpoint], key_a: Optional[str] = None,
         key_b: Optional[str] = None, values: bool = True, atol: Optional[float] = None,
         rtol: Optional[float] = None, align: bool = True, progress: Progress = None,
         filter: Optional[str] = None, sort: str = "file", depth: Optional[int] = None,
         renames: Sequence[Union[str, Rename]] = ()) -> DiffResult:
    """Compare the state_dicts of ``a`` and ``b`` (paths or opened checkpoints, any formats).

    ``values=False`` compares names, shapes and dtypes only and reads no tensor data.
    ``atol``/``rtol`` override the dtype defaults (see ``DEFAULT_TOLERANCES``) for
    floating tensors. ``align`` strips a wrapper prefix (``module.``, ``_orig_mod.``,
    ``model.``...) that every key of one side carries, when that makes more keys meet.
    ``filter`` (a regex, ``re.search``) keeps the pairs whose A name matches (a name only in B
    as A would spell it): the lists, the counts and the verdict cover those only, and the
    others' values are not read. ``renames`` (``REGEX=REPL`` rules, in order, as convert's ``--rename``)
    rewrite A's names before they are matched with B's (a GGUF file's ``blk.0.attn_q.weight`` as a
    transformers model's ``model.layers.0.self_attn.q_proj.weight``); the lists keep A's own names. ``sort`` orders every list: ``change`` (largest relative change
    first, integer tensors after floating ones), ``name``, ``size`` (most elements first) or
    ``file`` (A's order). ``depth`` folds names N levels into a per-module summary.

    >>> r = diff("fixtures/seed_checkpoint.tar", "fixtures/seed_checkpoint.tar")
    >>> r.equal, r.exit_code, r.only_in_a, r.exact
    (True, 0, (), 19)
    """
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"{name} must be a finite number >= 0, not {v}")
    if sort not in SORTS:
        raise UsageError(f"unknown sort order {sort!r} ({', '.join(SORTS)})")
    if depth is not None and depth < 1:
        raise UsageError(f"--depth must be at least 1, not {depth}")
    rx = None
    if filter is not None:
        try:
            rx = re.compile(filter)
        except re.error as e:
            raise UsageError(f"--filter is not a valid regular expression: {e}") from None
    rules = [Rename.parse(r) if isinstance(r, str) else r for r in renames]  # bad rules fail before any reading
    ca, sa = open_state_dict(a, key_a)
    cb, sb = open_state_dict(b, key_b)
    names_a, names_b = list(sa.tensors), list(sb.tensors)
    alignment = find_alignment(names_a, names_b, rules) if align else Alignment()
    pairs, only_a, only_b = pair_names(names_a, names_b, alignment, rules)
    totals = None
    if rx is not None:
        totals = (len(pairs), len(only_a), len(only_b))
        pairs = {na: nb for na, nb in pairs.items() if rx.search(na)}
        only_a = [n for n in only_a if rx.search(n)]
        only_b = [n for n in only_b if rx.search(_as_a(n, alignment))]
        if not (pairs or only_a or only_b):
            raise UsageError(f"--filter '{filter}' matches no name of A or B (of {totals[0]} pairs, "
                             f"{totals[1]} only in A, {totals[2]} only in B)", path=f"{ca.path}, {cb.path}",
                             hint="the regex is searched for in A's names (re.search), e.g. --filter '^layer4\\.'")

    shape_mm: List[TensorDiff] = []
    dtype_mm: List[TensorDiff] = []
    form_mm: List[TensorDiff] = []
    to_compare: List[Tuple[TensorDiff, TensorRef, TensorRef]] = []
    for index, (na, nb) in enumerate(pairs.items()):
        ta, tb = sa.tensors[na], sb.tensors[nb]
        d = TensorDiff(name=na, name_b=nb, shape_a=ta.shape, shape_b=tb.shape, dtype_a=ta.dtype, dtype_b=tb.dtype,
                       index=index)
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
    mismatch = [d for d in compared if d.status == "mismatch"]
    close = [d for d in compared if d.status == "close"]
    undecided = [d for d in compared if d.status == "not_compared"]  # values that could not be compared
    equal = not (only_a or only_b or shape_mm or dtype_mm or form_mm or mismatch or undecided)
    modules = None
    if depth is not None:
        modules = _modules(depth, sort, sa, sb, pairs, only_a, only_b, alignment,
                           {d.name for d in shape_mm + dtype_mm + form_mm}, by_name)
    key = TensorDiff.sort_key(sort)
    order = (lambda ds: tuple(sorted(ds, key=key))) if sort != "file" else tuple
    if sort == "name":
        only_a = sorted(only_a)
        only_b = sorted(only_b, key=lambda n: _as_a(n, alignment))
    beside = _beside(ca, sa, cb, sb, values, atol, rtol, align)
    equal = equal and not any(differs for _, differs in beside)
    return DiffResult(
        path_a=ca.path, path_b=cb.path, format_a=ca.format, format_b=cb.format, entry_a=sa.entry,
        entry_b=sb.entry, count_a=len(names_a), count_b=len(names_b), only_in_a=tuple(only_a),
        only_in_b=tuple(only_b), shape_mismatch=order(shape_mm), dtype_mismatch=order(dtype_mm),
        value_mismatch=order(mismatch), value_close=order(close),
        exact=sum(1 for d in compared if d.status == "exact"),
        not_compared=order(d for d in compared if d.status in ("not_compared", "no_data")),
        values_compared=values, atol=atol, rtol=rtol, prefix_alignment=alignment, equal=equal,
        form_mismatch=order(form_mm), common=len(pairs), filter=filter,
        filter_totals=totals, sort=sort, depth=depth, modules=modules,
        renames=tuple(f"{r.pattern.pattern}={r.repl}" for r in rules),
        notes=tuple(f"{side}: took {sd.entry} of {', '.join(k for k, _ in sd.candidates)} ({sd.reason}); "
                    f"--key-{side.lower()} chooses another" for side, sd in (("A", sa), ("B", sb))
                    if len(sd.candidates) > 1) + tuple(note for note, _ in beside))


def _beside(ca: Checkpoint, sa, cb: Checkpoint, sb, values: bool, atol, rtol, align: bool
            ) -> List[Tuple[str, bool]]:
    """What the two files hold beside their state_dicts that changes what they compute, as (note, differs):
    a torch.export program's constants (non-persistent buffers, lifted tensors), compared like the state_dict;
    a PEFT adapter's config (r, lora_alpha... scale the update the same tensors make)."""
    out: List[Tuple[str, bool]] = []
    consts = [c.root.get("constants") if c.format == "pt2" and isinstance(c.root, dict) and s.entry != "constants"
              else None for c, s in ((ca, sa), (cb, sb))]
    if consts[0] is not None and consts[1] is not None:
        sub = diff(ca, cb, key_a="constants", key_b="constants", values=values, atol=atol, rtol=rtol, align=align)
        if sub.equal:
            out.append((f"constants: {sub.count_a} compared too, equal", False))
        else:
            what = [f"{len(sub.only_in_a)} only in A"] * bool(sub.only_in_a) + \
                [f"{len(sub.only_in_b)} only in B"] * bool(sub.only_in_b) + \
                [f"{n} different" for n in [len(sub.shape_mismatch) + len(sub.dtype_mismatch) +
                                            len(sub.value_mismatch) + len(sub.form_mismatch)] if n]
            names = [d.name for d in sub.value_mismatch + sub.shape_mismatch + sub.dtype_mismatch][:3]
            out.append((f"constants DIFFER (non-persistent buffers, lifted tensors: what the program computes "
                        f"with): {', '.join(what)}{': ' + ', '.join(names) if names else ''}; "
                        f"--key-a constants --key-b constants shows them", True))
    else:
        for side, c in zip("AB", consts):
            if c is not None:
                out.append((f"{side}'s constants ({len(c)} non-persistent buffers and lifted tensors) are not "
                            f"compared: the other side holds none", False))
    cfgs = [c.metadata.get("adapter_config") for c in (ca, cb)]
    if cfgs[0] is not None and cfgs[1] is not None:
        keys = [k for k in dict.fromkeys(list(cfgs[0]) + list(cfgs[1]))
                if k not in ("base_model_name_or_path", "revision") and cfgs[0].get(k) != cfgs[1].get(k)]
        if keys:
            out.append(("adapter configs DIFFER: " + ", ".join(f"{k} {cfgs[0].get(k)!r} vs {cfgs[1].get(k)!r}"
                                                                for k in keys[:4]), True))
    return out


def _as_a(name_b: str, alignment: Alignment) -> str:
    """A name of B as A would spell it (A's wrapper prefix instead of B's)."""
    return alignment.prefix_a + alignment.canon_b(name_b)


def module_of(name: str, depth: int) -> str:
    """The module a name folds into at ``depth`` levels, as ``inspect --depth`` folds it (the last part, the
    tensor's own name, is never a module; a top-level tensor is ``(top)``).

    >>> module_of("layer4.1.conv2.weight", 2), module_of("fc.weight", 2), module_of("scale", 1)
    ('layer4.1', 'fc', '(top)')
    """
    parts = name.split(".")
    return ".".join(parts[:min(depth, len(parts) - 1)]) or "(top)"


def _modules(depth: int, sort: str, sa, sb, pairs: Dict[str, str], only_a: List[str], only_b: List[str],
             alignment: Alignment, meta_changed, by_name: Dict[str, TensorDiff]):
    """The per-module rows: (module, tensors, changed, max relative change, elements), in ``sort`` order.

    A module's relative change is its floating tensors' largest; its integer tensors' (step counters) only where
    no floating one changed, and such a module sorts after the others, as integer tensors do (``sort_key``)."""
    rows: Dict[str, List[Any]] = {}  # module -> [tensors, changed, floating max, elements, first index, integer max]

    def bigger(old: Optional[float], new: Optional[float]) -> Optional[float]:
        if new is None or (old is not None and TensorDiff.change_rank(old) <= TensorDiff.change_rank(new)):
            return old
        return new

    def add(name: str, numel: int, changed: bool, d: Optional[TensorDiff]) -> None:
        module = module_of(name, depth)
        row = rows.get(module)
        if row is None:
            row = rows[module] = [0, 0, None, 0, len(rows), None]
        row[0] += 1
        row[1] += changed
        row[3] += numel
        if d is not None:
            slot = 5 if d.integral else 2
            row[slot] = bigger(row[slot], d.rel_change)

    for na in pairs:
        d = by_name.get(na)
        status = d.status if d is not None else ""
        add(na, sa.tensors[na].numel, na in meta_changed or status not in ("", "exact", "no_data"), d)
    for n in only_a:
        add(n, sa.tensors[n].numel, True, None)
    for n in only_b:
        add(_as_a(n, alignment), sb.tensors[n].numel, True, None)
    out = []
    for module, (n, changed, fmax, numel, first, imax) in rows.items():
        integral = fmax in (None, 0.0) and imax not in (None, 0.0)
        out.append((module, n, changed, imax if integral else (fmax if fmax is not None else imax), numel, first,
                    integral))
    keys = {"change": lambda r: (r[6],) + TensorDiff.change_rank(r[3]) + (r[5],),
            "name": lambda r: r[0], "size": lambda r: (-r[4], r[5]), "file": lambda r: r[5]}
    return tuple(r[:5] for r in sorted(out, key=keys[sort]))


def form_difference(a: TensorRef, b: TensorRef) -> Optional[Tuple[str, str]]:
    """(A's form, B's form) where torch holds the two differently, else None. Two Parameters with the same
    attribute names but other attribute values differ too. A conj / neg view is its values as torch gives
    them (``torch.equal`` of the view and its resolved copy): the bits alone are no difference."""
    fa, fb = (dataclasses.replace(t, metadata=()).form if t.metadata else t.form for t in (a, b))
    if fa != fb:
        return fa, fb
    pa, pb = a.attributes(), b.attributes()
    if pa and pb and _skeleton(pa[1]) != _skeleton(pb[1]):
        return fa, fb + " (other attribute values)"
    return None


def _count(piece: bytes, itemsize: int) -> int:
    return len(piece) // max(itemsize, 1)


def compare_tensors(d: TensorDiff, a: TensorRef, b: TensorRef, atol: Optional[float] = None,
                    rtol: Optional[float] = None, chunk_elements: int = CHUNK_ELEMENTS) -> TensorDiff:
    """Fill ``d`` with how the values of ``a`` and ``b`` (same shape) compare.

    ``exact`` when every element is bitwise equal (same dtype) or numerically equal
    (different dtypes); ``close`` when all are within the tolerance; else ``mismatch``
    with the count of elements outside it and the max abs / rel difference. ``rel_change``
    is ||A - B|| / ||B|| (2-norms over every element, sums of squares in float64), measured in
    the same pass: 0.0 for an exact tensor, with no arithmetic.
    """
    import dataclasses
    a, b = (t.attributes()[0] if t.attributes() else t for t in (a, b))  # attributes: form_difference's
    if a.is_composite or b.is_composite or (a.rebuild is not None and a.has_data) or "value" in (a.kind, b.kind) or \
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
            return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, atol=at, rtol=rt, rel_change=0.0)
        return dataclasses.replace(d, status="mismatch", mismatched=a.numel, numel=a.numel, max_abs=math.nan,
                                   max_rel=math.nan, note=f"strided {a.dtype} view: bytes differ")
    note = "" if same_bits else f"compared as torch loads them (A: {a.form}, B: {b.form})"
    if same_bits and bits_a:
        note = f"both {a.form}s: their stored values compared"
    if same_bits and a.dtype == b.dtype and bytes_equal(a, b):  # the common case, at the speed of the disk
        return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, atol=at, rtol=rt, note=note,
                                   rel_change=0.0)
    n_bad, max_abs, max_rel, exact = 0, 0.0, 0.0, True
    # ||A-B||^2 and ||B||^2, from the first chunk that is not exact on: the chunks before it (``prefix``)
    # add to ||B||^2 only, read again at the end if the tensor turns out not exact, so an exact one costs nothing
    sums = [0.0, 0.0]
    prefix = 0
    for pa, pb in zip(pieces(a, chunk_elements, reuse=True), pieces(b, chunk_elements, reuse=True)):
        if not same_bits:  # the values torch gives: the stored ones, conjugated / negated by the view bits
            xa = _as_loaded(numbers.as_numbers(pa, a.dtype), bits_a)
            xb = _as_loaded(numbers.as_numbers(pb, b.dtype), bits_b)
            chunk_bad, chunk_abs, chunk_rel, chunk_exact = numbers.measure(xa, xb, at, rt)
            if exact and chunk_exact:
                prefix += 1
            else:
                _add_squares(sums, xa, xb, chunk_exact)
            exact = exact and chunk_exact
            n_bad += chunk_bad
            max_abs, max_rel = max(max_abs, chunk_abs), max(max_rel, chunk_rel)
            continue
        if a.dtype == b.dtype and piece_bits_equal(pa, pb):
            if exact:
                prefix += 1
            elif measurable:
                _add_squares(sums, None, numbers.as_numbers(pb, b.dtype, "b"), True)
            continue
        if not measurable:  # same dtype, bytes differ, no numbers to measure (quantized, packed)
            exact = False
            n_bad += _count(pa, a.itemsize)
            max_abs = max_rel = math.nan
            continue
        if a.dtype == b.dtype and a.dtype in _INTEGER:
            chunk_bad, chunk_abs, chunk_rel, chunk_exact = numbers.measure_ints(numbers.as_native(pa, a.dtype),
                                                                                numbers.as_native(pb, b.dtype))
            xa = xb = None
        else:
            xa, xb = numbers.as_numbers(pa, a.dtype, "a"), numbers.as_numbers(pb, b.dtype, "b")
            chunk_bad, chunk_abs, chunk_rel, chunk_exact = numbers.measure(xa, xb, at, rt)
        if exact and chunk_exact:
            prefix += 1
        else:
            if xb is None:  # integers: as float64 for the sums (exact to 2**53, then rounded)
                xa, xb = numbers.as_numbers(pa, a.dtype, "a"), numbers.as_numbers(pb, b.dtype, "b")
            _add_squares(sums, xa, xb, chunk_exact)
        exact = exact and chunk_exact
        n_bad += chunk_bad
        max_abs = max(max_abs, chunk_abs)
        max_rel = max(max_rel, chunk_rel)
    if exact:
        return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, atol=at, rtol=rt, note=note,
                                   rel_change=0.0)
    rel_change = None
    if measurable:
        for i, pb in enumerate(pieces(b, chunk_elements, reuse=True)):
            if i >= prefix:
                break
            _add_squares(sums, None, numbers.as_numbers(pb, b.dtype, "b"), True)
        rel_change = _rel_change(*sums)
    status = "mismatch" if n_bad else "close"
    return dataclasses.replace(d, status=status, max_abs=max_abs, max_rel=max_rel, mismatched=n_bad,
                               numel=a.numel, atol=at, rtol=rt, note=note, rel_change=rel_change)


def _squares(x) -> float:
    """The sum of |x|^2 in float64 (complex: of the moduli). einsum, not dot: no BLAS threads to start."""
    import numpy as np
    if x.dtype.kind == "c":
        return _squares(x.real) + _squares(x.imag)
    return float(np.einsum("i,i->", x, x))


_DIFF: List[Any] = []  # a reused scratch array for A - B


def _add_squares(sums: List[float], xa, xb, exact: bool) -> None:
    """Add ||xa - xb||^2 (unless ``exact``: then ``xa`` may be None) and ||xb||^2 to ``sums``. Elements equal as
    ``measure`` counts them equal (NaN and NaN, inf and inf) add nothing to the first, a NaN on both sides nothing
    to the second; a NaN against a number makes the first NaN."""
    import numpy as np
    sb = _squares(xb)
    if math.isnan(sb):  # a NaN of B that A has too is no value of either: left out of ||B|| as of ||A - B||
        with np.errstate(all="ignore"):
            shared = np.isnan(xb) if exact else np.isnan(xb) & np.isnan(xa)
            sb = _squares(np.where(shared, 0, xb))
    sums[1] += sb
    if exact:
        return
    dtype = np.result_type(xa, xb)
    if not _DIFF or _DIFF[0].size < xa.size or _DIFF[0].dtype != dtype:
        _DIFF[:] = [np.empty(max(xa.size, 1), dtype=dtype)]
    with np.errstate(all="ignore"):
        dv = np.subtract(xa, xb, out=_DIFF[0][:xa.size])
        s = _squares(dv)
        if not math.isfinite(s):  # where both are NaN or the same infinity, no difference
            same = (xa == xb) | (np.isnan(xa) & np.isnan(xb))
            dv[same] = 0
            s = _squares(dv)
    sums[0] += s


def _rel_change(ssd: float, ssb: float) -> float:
    """||A - B|| / ||B|| from the sums of squares: inf where B is all zeros and A is not.

    >>> _rel_change(0.0, 0.0), _rel_change(4.0, 0.0), _rel_change(4.0, 16.0)
    (0.0, inf, 0.5)
    """
    if ssd == 0.0:
        return 0.0
    if ssb == 0.0:
        return math.inf
    return math.sqrt(ssd) / math.sqrt(ssb)


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
    if depth > 50:
        return "..."
    if isinstance(v, TensorRef):  # its values are compared apart; how it is rebuilt (a quantizer) is not a value
        return ("tensor", v.dtype, v.shape, v.metadata,
                _skeleton(v.rebuild, depth + 1, memo) if v.rebuild is not None else None)
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
                     chunk_elements: int, depth: int = 0) -> TensorDiff:
    """Tensors torch rebuilds by a call of their own (sparse, nested, quantized, subclasses): the same form,
    the same call's other arguments, and each component tensor compared by value."""
    import dataclasses
    if (a.kind, a.subclass) != (b.kind, b.subclass):
        return dataclasses.replace(d, status="not_compared",
                                   note=f"A is a {a.form} tensor, B a {b.form} one: values not compared")
    if _skeleton(a.rebuild) != _skeleton(b.rebuild):
        return dataclasses.replace(d, status="mismatch", numel=0, mismatched=0, max_abs=None,
                                   max_rel=None, note=f"{a.form} tensors rebuilt with different arguments "
                                                          "(sizes, quantizer parameters or attributes)")
    parts_a = list(a.parts) or ([("data", a)] if a.has_data else [])
    parts_b = list(b.parts) or ([("data", b)] if b.has_data else [])
    if [n for n, _ in parts_a] != [n for n, _ in parts_b]:
        return dataclasses.replace(d, status="not_compared", note=f"{a.form} tensors of different parts")
    if not parts_a:
        if a.kind == "value":  # a state_dict entry that is no tensor: its value (the skeleton) is all there is
            return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, note=f"{a.form}: equal",
                                       rel_change=0.0)
        return dataclasses.replace(d, status="no_data", note=f"no data on either side ({a.form} tensors)")
    worst, bad, max_abs, max_rel, said, differing = "exact", 0, 0.0, 0.0, [], []
    rels: List[Optional[float]] = []  # the floating parts' relative changes; None once another part differs
    for (name, pa), (_, pb) in zip(parts_a, parts_b):
        sub = TensorDiff(name=name, name_b=name, shape_a=pa.shape, shape_b=pb.shape, dtype_a=pa.dtype,
                         dtype_b=pb.dtype)
        if pa.shape != pb.shape or pa.dtype != pb.dtype:
            sub = dataclasses.replace(sub, status="mismatch", mismatched=pa.numel, max_abs=math.nan,
                                      max_rel=math.nan)
        elif (pa.is_composite or (pa.rebuild is not None and pa.rebuild is not a.rebuild)) and depth < 8:
            # a part that is itself rebuilt (a packed weight: quantized, with its own scales): compared as such
            sub = _compare_rebuilt(sub, pa, pb, atol, rtol, chunk_elements, depth + 1)
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
        if is_floating(pa.dtype) and is_floating(pb.dtype):
            rels.append(sub.rel_change)
        elif sub.status not in ("exact", "no_data"):  # indices, an integer part differ: no one relative change
            rels.append(None)
        if sub.status == "mismatch" and sub.numel:
            said.append(f"{name} {sub.mismatched:,}/{sub.numel:,} differ")
        elif sub.status == "mismatch":  # itself of parts: which of them
            said.append(f"{name} differs" + (f" {sub.note.partition(': compared part by part ')[2]}"
                                             if "compared part by part" in sub.note else ""))
        else:
            said.append(f"{name} {sub.status}")
        if sub.status not in ("exact", "no_data"):
            differing.append(name)
    worst = "exact" if worst == "no_data" else worst
    note = f"{a.form}: compared part by part ({', '.join(said)})"
    if worst == "exact":
        return dataclasses.replace(d, status="exact", max_abs=0.0, max_rel=0.0, note=note, rel_change=0.0)
    # the largest of the floating parts' relative changes, where every other part is exact
    rel = None if not rels or None in rels else min(rels, key=TensorDiff.change_rank)  # rank: largest first
    if a.kind.startswith("sparse") or a.kind in ("nested", "jagged"):
        values_only = all(n.rsplit("/", 1)[-1] in ("values", "buffer") for n in differing)
    else:
        values_only = False
    if not values_only:  # a scale, an index, an integer code differs: its numbers are not the tensor's values
        return dataclasses.replace(d, status=worst, mismatched=0, numel=0, max_abs=None, max_rel=None, note=note,
                                   rel_change=rel)
    return dataclasses.replace(d, status=worst, mismatched=bad, numel=a.numel, max_abs=max_abs, max_rel=max_rel,
                               note=note, rel_change=rel)
