"""The records the commands return: frozen dataclasses with ``to_dict()``, rendered by the CLI, and the exit
code each means (``exit_code``, decided here for every command)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .checkpoint import new_instance


@dataclass(frozen=True)
class TensorInfo:
    """One named tensor of a result: what inspect lists."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    stride: Tuple[int, ...] = ()
    storage_offset: int = 0
    storage: Optional[str] = None
    stats: Optional[Dict[str, Any]] = None
    #: How torch holds it when not a plain dense tensor (``TensorRef.form``), and its components, if any.
    form: str = "dense"
    parts: Tuple[Tuple[str, str, Tuple[int, ...], int], ...] = ()  # (name, dtype, shape, nbytes)
    explicit_numel: Optional[int] = None  # where shape cannot say it (``TensorRef.explicit_numel``)

    @property
    def numel(self) -> int:
        if self.explicit_numel is not None:
            return self.explicit_numel
        return math.prod(self.shape)

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "device": self.device,
             "nbytes": self.nbytes, "numel": self.numel, "stride": list(self.stride),
             "storage_offset": self.storage_offset, "storage": self.storage}
        if self.stats is not None:
            d["stats"] = self.stats
        if self.form != "dense":
            d["form"] = self.form
        if self.parts:
            d["parts"] = [{"name": n, "dtype": dt, "shape": list(sh), "nbytes": nb} for n, dt, sh, nb in self.parts]
        return d


def new_tensor_info(name: str, shape: Tuple[int, ...], dtype: str, device: str, nbytes: int,
                    stride: Tuple[int, ...], storage_offset: int, storage: Optional[str],
                    stats: Optional[Dict[str, Any]]) -> TensorInfo:
    """``TensorInfo(name=name, ...)``, made faster (see ``new_tensor_ref``)."""
    info = new_instance(TensorInfo)
    d = info.__dict__
    d["name"] = name
    d["shape"] = shape
    d["dtype"] = dtype
    d["device"] = device
    d["nbytes"] = nbytes
    d["stride"] = stride
    d["storage_offset"] = storage_offset
    d["storage"] = storage
    d["stats"] = stats
    d["form"] = "dense"
    d["parts"] = ()
    d["explicit_numel"] = None
    return info


@dataclass(frozen=True)
class InspectResult:
    """The result of ``inspect``: a checkpoint's summary and its tensors."""

    path: str
    format: str
    file_size: int
    entry: Optional[str]
    entry_source: str
    tensors: Tuple[TensorInfo, ...]
    total_params: int
    total_bytes: int
    bytes_by_dtype: Dict[str, int]
    devices: Dict[str, int]
    shared_storages: Tuple[Tuple[str, ...], ...]
    other_entries: Dict[str, str]
    pickled_classes: Tuple[str, ...]
    notes: Tuple[str, ...]
    metadata: Dict[str, Any]
    #: (module, tensors, values[, parameters, buffers]) with --depth; the last two where the file says which
    tree: Optional[Tuple[Tuple[Any, ...], ...]] = None
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    #: values in parameters and in buffers, where the file says which is which (a pickled module's _parameters
    #: and _buffers); None for a plain state_dict, which does not say
    parameters: Optional[int] = None
    buffers: Optional[int] = None

    def to_dict(self, tensors: bool = True) -> Dict[str, Any]:
        """The JSON object; ``tensors=False`` leaves the ``tensors`` list empty (its writer writes it apart)."""
        d = {
            "path": self.path, "format": self.format, "file_size": self.file_size,
            "entry": self.entry, "entry_source": self.entry_source,
            "tensors": [t.to_dict() for t in self.tensors] if tensors else [],
            "tensor_count": len(self.tensors),
            # total_params: the parameters where the file says which tensors are (a pickled module), else every
            # value (a state_dict does not say); total_values: every value, always
            "total_values": self.total_params,
            "total_params": self.parameters if self.parameters is not None else self.total_params,
            "parameters": self.parameters, "buffers": self.buffers, "total_bytes": self.total_bytes,
            "bytes_by_dtype": dict(self.bytes_by_dtype), "devices": dict(self.devices),
            "shared_storages": [list(g) for g in self.shared_storages],
            "other_entries": dict(self.other_entries),
            "pickled_classes": list(self.pickled_classes),
            "notes": list(self.notes), "metadata": _jsonable(self.metadata),
        }
        if self.tree is not None:
            d["tree"] = [dict(zip(("module", "tensors", "values", "parameters", "buffers"), row)) for row in self.tree]
        return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if dataclasses.is_dataclass(v):
        return _jsonable(dataclasses.asdict(v))
    return repr(v)


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor of A compares with its counterpart in B."""

    name: str                      # the name in A
    name_b: str                    # the name in B (differs under prefix alignment)
    shape_a: Tuple[int, ...]
    shape_b: Tuple[int, ...]
    dtype_a: str
    dtype_b: str
    status: str = ""               # exact | close | mismatch | not_compared ("" when values were not read)
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    mismatched: int = 0            # elements outside the tolerance
    numel: int = 0
    atol: Optional[float] = None
    rtol: Optional[float] = None
    note: str = ""
    form_a: str = ""               # how torch holds each side (``TensorRef.form``), set where they differ
    form_b: str = ""
    #: ||A - B||_2 / ||B||_2 over the values (float64 sums of squares): 0.0 when exact, inf where ||B|| is 0
    #: and A is not, nan where a NaN meets a number; None where values were not compared or not measurable
    rel_change: Optional[float] = None
    index: int = 0                 # the pair's position in A's file order (sorting; not in the JSON)

    _INTEGRAL = frozenset({"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"})

    @staticmethod
    def change_rank(v: Optional[float]) -> Tuple[int, float]:
        """Sort key part for a relative change, largest first: inf, then unknown (None / nan), then finite."""
        if v is None or v != v:
            return 1, 0.0
        if v == math.inf:
            return 0, 0.0
        return 2, -v

    @property
    def integral(self) -> bool:
        """Both sides integers or bools (step counters, indices): their relative change says little of a weight's."""
        return self.dtype_a in TensorDiff._INTEGRAL and self.dtype_b in TensorDiff._INTEGRAL

    @staticmethod
    def sort_key(sort: str):
        """The key that orders TensorDiffs for ``diff --sort``: ``change`` (floating tensors first, each group
        by relative change, largest first: inf, then unmeasured/nan, then finite; integer tensors after),
        ``name`` (A's name), ``size`` (most elements first) or ``file`` (A's order). Ties keep A's order.

        >>> ds = [TensorDiff("a", "a", (4,), (4,), "float32", "float32", rel_change=0.1, index=0),
        ...       TensorDiff("n", "n", (), (), "int64", "int64", rel_change=1.0, index=1),
        ...       TensorDiff("b", "b", (2,), (2,), "float32", "float32", rel_change=0.5, index=2)]
        >>> [d.name for d in sorted(ds, key=TensorDiff.sort_key("change"))]
        ['b', 'a', 'n']
        """
        if sort == "change":
            return lambda d: (d.integral,) + TensorDiff.change_rank(d.rel_change) + (d.index,)
        if sort == "name":
            return lambda d: (d.name, d.index)
        if sort == "size":
            return lambda d: (-math.prod(d.shape_a), d.index)
        if sort == "file":
            return lambda d: d.index
        raise ValueError(f"unknown sort order {sort!r}")

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name}
        if self.form_a or self.form_b:
            d.update(form_a=self.form_a, form_b=self.form_b)
        if self.name_b != self.name:
            d["name_b"] = self.name_b
        if self.shape_a != self.shape_b:
            d.update(shape_a=list(self.shape_a), shape_b=list(self.shape_b))
        else:
            d["shape"] = list(self.shape_a)
        if self.dtype_a != self.dtype_b:
            d.update(dtype_a=self.dtype_a, dtype_b=self.dtype_b)
        else:
            d["dtype"] = self.dtype_a
        if self.status:
            d["status"] = self.status
            d["rel_change"] = _num(self.rel_change)
        if self.status in ("close", "mismatch"):
            d.update(max_abs=_num(self.max_abs), max_rel=_num(self.max_rel), mismatched=self.mismatched,
                     numel=self.numel, atol=self.atol, rtol=self.rtol)
        if self.note:
            d["note"] = self.note
        return d


def _num(v: Optional[float]) -> Any:
    # JSON has no inf/nan: spell them as strings.
    if v is None or math.isfinite(v):
        return v
    return str(v)


@dataclass(frozen=True)
class DiffResult:
    """The result of ``diff``: how two state_dicts differ in keys, shapes, dtypes and values."""

    path_a: str
    path_b: str
    format_a: str
    format_b: str
    entry_a: Optional[str]
    entry_b: Optional[str]
    count_a: int
    count_b: int
    only_in_a: Tuple[str, ...]
    only_in_b: Tuple[str, ...]
    shape_mismatch: Tuple[TensorDiff, ...]
    dtype_mismatch: Tuple[TensorDiff, ...]
    value_mismatch: Tuple[TensorDiff, ...]
    value_close: Tuple[TensorDiff, ...]
    exact: int
    not_compared: Tuple[TensorDiff, ...]
    values_compared: bool
    atol: Optional[float]
    rtol: Optional[float]
    prefix_alignment: Any          # align.Alignment
    equal: bool
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    #: pairs torch holds differently (a Parameter with attributes vs a plain tensor, sparse vs dense, a conj
    #: view vs resolved values): a difference even where the values are equal
    form_mismatch: Tuple[TensorDiff, ...] = ()
    common: int = -1               # pairs compared (after --filter); -1: count_a - len(only_in_a)
    filter: Optional[str] = None   # --filter REGEX: every list, count and the verdict cover the matching names only
    #: with a filter: (pairs, only in A, only in B) before it
    filter_totals: Optional[Tuple[int, int, int]] = None
    sort: str = "file"             # the order of every list: change | name | size | file
    depth: Optional[int] = None    # --depth N: names folded N levels into ``modules``
    #: (module, tensors, changed, max relative change, elements): tensors counts names in A or B (B-only ones
    #: as A would spell them); changed those not exact (values, shape, dtype or form differ, or in one file only);
    #: the change is the floating tensors' largest, the integer ones' (step counters) where no floating one changed
    modules: Optional[Tuple[Tuple[str, int, int, Optional[float], int], ...]] = None
    #: where a side held several state_dicts: which was taken and why (``A: took state_dict_ema of ...``)
    notes: Tuple[str, ...] = ()
    renames: Tuple[str, ...] = ()  # --rename rules applied to A's names before matching (REGEX=REPL)

    @property
    def pairs(self) -> int:
        return self.common if self.common >= 0 else self.count_a - len(self.only_in_a)

    def to_dict(self) -> Dict[str, Any]:
        d = self._to_dict()
        d["notes"] = list(self.notes)
        d["sort"] = self.sort
        if self.renames:
            d["renames"] = list(self.renames)
        d["filter"] = None if self.filter is None else {
            "regex": self.filter, "pairs": self.pairs, "pairs_total": self.filter_totals[0],
            "only_in_a": len(self.only_in_a), "only_in_a_total": self.filter_totals[1],
            "only_in_b": len(self.only_in_b), "only_in_b_total": self.filter_totals[2]}
        if self.modules is not None:
            d["depth"] = self.depth
            d["modules"] = [{"module": m, "tensors": n, "changed": c, "max_rel_change": _num(v), "numel": e}
                            for m, n, c, v, e in self.modules]
        return d

    def _to_dict(self) -> Dict[str, Any]:
        return {
            "equal": self.equal,
            "a": {"path": self.path_a, "format": self.format_a, "entry": self.entry_a, "tensors": self.count_a},
            "b": {"path": self.path_b, "format": self.format_b, "entry": self.entry_b, "tensors": self.count_b},
            "prefix_alignment": self.prefix_alignment.to_dict(),
            "only_in_a": list(self.only_in_a), "only_in_b": list(self.only_in_b),
            "shape_mismatch": [d.to_dict() for d in self.shape_mismatch],
            "dtype_mismatch": [d.to_dict() for d in self.dtype_mismatch],
            "form_mismatch": [d.to_dict() for d in self.form_mismatch],
            "value_mismatch": [d.to_dict() for d in self.value_mismatch],
            "value_close": [d.to_dict() for d in self.value_close],
            "not_compared": [d.to_dict() for d in self.not_compared],
            "values_compared": self.values_compared, "exact_equal": self.exact,
            "atol": self.atol, "rtol": self.rtol,
        }


@dataclass(frozen=True)
class KeptTensor:
    """A source tensor that fits the target: its target name, shape and dtype."""

    name: str
    source_name: str
    shape: Tuple[int, ...]
    dtype: str
    source_dtype: str

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.source_name != self.name:
            d["source_name"] = self.source_name
        if self.source_dtype != self.dtype:
            d["cast_from"] = self.source_dtype
        return d


@dataclass(frozen=True)
class ShapeDrop:
    """A source tensor whose name the target has, with another shape."""

    source_name: str
    name: str
    source_shape: Tuple[int, ...]
    target_shape: Tuple[int, ...]

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "source_shape": list(self.source_shape),
                             "target_shape": list(self.target_shape)}
        if self.source_name != self.name:
            d["source_name"] = self.source_name
        return d


@dataclass(frozen=True)
class FilterResult:
    """The result of ``filter`` / ``load_into``: what of the source fits the target, and why not the rest."""

    source: str
    source_format: str
    source_entry: Optional[str]
    target: str
    kept: Tuple[KeptTensor, ...]
    dropped_unexpected: Tuple[str, ...]            # source names the target has no key for
    dropped_shape_mismatch: Tuple[ShapeDrop, ...]
    missing: Tuple[str, ...]                       # target names the output does not provide
    prefix_alignment: Any                          # align.Alignment
    renames: Tuple[str, ...] = ()
    output: Optional[str] = None
    output_format: Optional[str] = None
    verified: Optional[Dict[str, Any]] = None
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    filled: Tuple[str, ...] = ()    # --complete: missing target keys written from filled_from
    filled_from: str = ""

    @property
    def cast(self) -> Tuple[KeptTensor, ...]:
        return tuple(k for k in self.kept if k.dtype != k.source_dtype)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": {"path": self.source, "format": self.source_format, "entry": self.source_entry},
            "target": self.target,
            "prefix_alignment": self.prefix_alignment.to_dict(), "renames": list(self.renames),
            "kept": [k.to_dict() for k in self.kept],
            "dropped_unexpected": list(self.dropped_unexpected),
            "dropped_shape_mismatch": [d.to_dict() for d in self.dropped_shape_mismatch],
            "missing": list(self.missing),
            "cast": [{"name": k.name, "from": k.source_dtype, "to": k.dtype} for k in self.cast],
            "output": self.output, "output_format": self.output_format, "verified": self.verified,
            "filled": list(self.filled), "filled_from": self.filled_from or None,
        }


@dataclass(frozen=True)
class ConvertResult:
    """The result of ``convert``: what was written where, and how it was checked."""

    source: str
    source_format: str
    entry: Optional[str]
    entry_source: str
    output: str
    format: str                      # torch_zip | safetensors | onnx
    tensors: int                     # tensors written
    files: Tuple[str, ...] = ()
    tied: Tuple[Tuple[str, str], ...] = ()   # (name not stored, the stored twin) for safetensors
    cast_to: Optional[str] = None
    bytes_written: int = 0
    checked: Optional[Dict[str, Any]] = None
    details: Optional[Dict[str, Any]] = None  # e.g. ONNX export: opset, inputs, max difference
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    densified: Tuple[Tuple[str, str], ...] = ()  # --dense: (name, "sparse_coo -> densified float32")
    #: how names were changed: ("prefix", "module."), ("rule", "REGEX=REPL")..., ("renamed", "N of M")
    renamed: Tuple[Tuple[str, str], ...] = ()
    #: GGUF quantized tensors written as their dequantized values: (name, "Q4_K -> float32")
    dequantized: Tuple[Tuple[str, str], ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        d = {"output": self.output, "format": self.format, "tensors": self.tensors,
             "source": {"path": self.source, "format": self.source_format, "entry": self.entry,
                        "entry_source": self.entry_source},
             "files": list(self.files), "tied": {a: b for a, b in self.tied}, "cast_to": self.cast_to,
             "bytes_written": self.bytes_written, "checked": self.checked}
        if self.densified:
            d["densified"] = {a: b for a, b in self.densified}
        if self.dequantized:
            d["dequantized"] = {a: b for a, b in self.dequantized}
        if self.renamed:
            d["names"] = {"prefix_stripped": dict(self.renamed).get("prefix", ""),
                          "rules": [v for k, v in self.renamed if k == "rule"],
                          "renamed": dict(self.renamed).get("renamed", "")}
        if self.details is not None:
            d["details"] = _jsonable(self.details)
        return d


@dataclass(frozen=True)
class RemapResult:
    """The result of ``remap``: which location tags were rewritten, and the check of the output."""

    source: str
    output: str
    format: str
    storages: int                    # storage records whose tag was looked at
    tensors: int
    mapped: Dict[str, int]           # "cuda:1 -> cuda:0": storages
    unchanged: Dict[str, int]        # tags no rule matched: storages
    checked: Optional[Dict[str, Any]] = None
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    copied: Tuple[str, ...] = ()     # a shard folder's other files (config.json...), copied as they are

    def to_dict(self) -> Dict[str, Any]:
        d = {"output": self.output, "format": self.format, "tensors": self.tensors, "storages": self.storages,
             "source": self.source, "mapped": dict(self.mapped), "unchanged": dict(self.unchanged),
             "checked": self.checked}
        if self.copied:
            d["copied"] = list(self.copied)
        return d


@dataclass(frozen=True)
class CheckResult:
    """One check of ``verify``: pass, fail or skip, with the reason and the first culprit."""

    name: str
    device: Optional[str]
    status: str                     # pass | fail | skip
    detail: str
    culprit: Optional[str] = None   # the first failing tensor or output
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "device": self.device, "status": self.status, "detail": self.detail}
        if self.culprit is not None:
            d["culprit"] = self.culprit
        if self.max_abs is not None:
            d.update(max_abs=_num(self.max_abs), max_rel=_num(self.max_rel))
        return d


@dataclass(frozen=True)
class VerifyReport:
    """The result of ``verify``: the environment, and every check that applied."""

    path: str
    format: str
    entry: Optional[str]
    environment: Dict[str, Any]
    devices: Tuple[str, ...]
    checks: Tuple[CheckResult, ...]
    ok: bool
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()

    @property
    def first_failure(self) -> Optional[CheckResult]:
        return next((c for c in self.checks if c.status == "fail"), None)

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "format": self.format, "entry": self.entry,
                "environment": _jsonable(self.environment), "devices": list(self.devices),
                "checks": [c.to_dict() for c in self.checks]}


@dataclass(frozen=True)
class ScanGlobal:
    """A global a pickle names: how the pickle uses it and what that makes it."""

    name: str
    verdict: str                     # safe | needs code | dangerous
    uses: Tuple[str, ...]            # referenced, instantiated, called...
    where: Tuple[str, ...]           # which pickles (data.pkl, main pickle, .metadata > bytes at 120...)
    note: str = ""                   # what a deny-listed global does

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "verdict": self.verdict, "uses": list(self.uses),
                             "where": list(self.where)}
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class ScanFile:
    """What ``scan`` found in one path (a file, or a DCP folder); ``error``: why it could not be read."""

    path: str
    pickles: int
    globals: Tuple[ScanGlobal, ...]
    format: str = ""
    advice: Optional[str] = None     # the add_safe_globals line torch.load(weights_only=True) needs
    problems: Tuple[str, ...] = ()   # where a pickle stopped, what was ambiguous
    weights_only: Optional[bool] = None  # torch.load(weights_only=True) reads it as it is (None: not torch.load's)
    error: Optional[str] = None      # one line: why it is unreadable (then nothing else was found)

    @property
    def dangerous_names(self) -> Tuple[str, ...]:
        return tuple(g.name for g in self.globals if g.verdict == "dangerous")

    @property
    def needs_code(self) -> Tuple[str, ...]:
        return tuple(g.name for g in self.globals if g.verdict == "needs code")

    @property
    def verdict(self) -> str:
        """``dangerous`` | ``unreadable`` | ``needs code`` | ``safe`` (what ran before a read failed counts)."""
        if self.dangerous_names:
            return "dangerous"
        if self.error is not None:
            return "unreadable"
        return "needs code" if self.needs_code else "safe"

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "format": self.format, "verdict": self.verdict, "error": self.error,
                "pickles": self.pickles, "dangerous": list(self.dangerous_names),
                "needs_code": list(self.needs_code), "globals": [g.name for g in self.globals],
                "details": [g.to_dict() for g in self.globals], "add_safe_globals": self.advice,
                "weights_only_loads": self.weights_only, "problems": list(self.problems)}


@dataclass(frozen=True)
class ScanResult:
    """The result of ``scan``: one entry per file; exit 1 when any is dangerous, else 2 when any is unreadable."""

    files: Tuple[ScanFile, ...]
    dangerous: bool
    exit_code = property(lambda self: exit_code(self))  # decided in one place: exit_code()
    skipped: Tuple[Tuple[str, str], ...] = ()  # (path, why): files of scanned folders that were not scanned

    @property
    def unreadable(self) -> Tuple[ScanFile, ...]:
        return tuple(f for f in self.files if f.verdict == "unreadable")

    def counts(self) -> Dict[str, int]:
        """How many files of each verdict, and in all."""
        out = {"files": len(self.files), "dangerous": 0, "unreadable": 0, "needs_code": 0, "safe": 0}
        for f in self.files:
            out[f.verdict.replace(" ", "_")] += 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"dangerous": self.dangerous, "counts": self.counts(), "files": [f.to_dict() for f in self.files],
                "skipped": [{"path": p, "reason": why} for p, why in self.skipped]}


def exit_code(result: Any) -> int:
    """The exit code a command's result means, for every command in one place: 1 when a check found
    something (the files differ, verify failed, a file is dangerous), 2 when a file to scan could not be
    read (and none was dangerous), else 0. Errors (a ``CkptError``) carry their own: 2 for bad input, 1 for a
    check that failed while writing (``CheckFailedError``)."""
    if isinstance(result, DiffResult):
        return 0 if result.equal else 1
    if isinstance(result, VerifyReport):
        return 0 if result.ok else 1
    if isinstance(result, ScanResult):
        return 1 if result.dangerous else 2 if result.unreadable else 0
    return 0
