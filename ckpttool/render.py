"""Records -> text: tables (tabulate) and JSON. No torch import, no printing."""
from __future__ import annotations

import collections
import json
import math
import os
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps's own string writer (ensure_ascii)
from typing import Any, Dict, List, Optional

from .results import (ConvertResult, DiffResult, FilterResult, InspectResult, RemapResult, ScanResult, TensorInfo,
                      VerifyReport)
from .text import plural, printable


def human_bytes(n: int) -> str:
    """Binary-prefixed size.

    >>> human_bytes(1536), human_bytes(3)
    ('1.5 KiB', '3 B')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def to_json(record: Any, indent: Optional[int] = 2) -> str:
    """The record's ``to_dict()`` as one JSON object (``indent=None``: one line, by the C encoder, 5x faster)."""
    if indent is None and type(record) is InspectResult:
        # The tensor rows written here and the rest by json: the same text, 2x faster for 20,000 tensors.
        try:
            rows = ", ".join(map(_info_json, record.tensors))
        except TypeError:  # a field of a type written otherwise than json writes it
            rows = None
        if rows is not None:
            rest = json.dumps(record.to_dict(tensors=False), default=repr, check_circular=False)
            return rest.replace('"tensors": []', f'"tensors": [{rows}]', 1)  # the first: a value's quotes are escaped
    return json.dumps(record.to_dict(), indent=indent, default=repr, check_circular=False)  # a fresh tree: no cycles


def _info_json(t: TensorInfo) -> str:
    """``json.dumps(t.to_dict())``. A TypeError where a field is not what readers make: a str (``_json_str``
    takes str only), an int (``int.__repr__`` takes ints only, as json writes them; bool is not expected)."""
    if t.stats is not None or t.form != "dense":
        return json.dumps(t.to_dict(), default=repr, check_circular=False)
    shape, storage, number = t.shape, t.storage, int.__repr__
    return (f'{{"name": {_json_str(t.name)}, "shape": [{", ".join(map(number, shape))}], '
            f'"dtype": {_json_str(t.dtype)}, "device": {_json_str(t.device)}, "nbytes": {number(t.nbytes)}, '
            f'"numel": {number(math.prod(shape))}, "stride": [{", ".join(map(number, t.stride))}], '
            f'"storage_offset": {number(t.storage_offset)}, '
            f'"storage": {"null" if storage is None else _json_str(storage)}}}')


def _form(t: TensorInfo) -> str:
    """``sparse_coo: indices int64 (2, 3), values float32 (3,)``; ``conj view``; empty for a dense tensor."""
    if t.form == "dense":
        return ""
    if not t.parts:
        return t.form
    shown = ", ".join(f"{n} {dt} {_shape(sh)}" for n, dt, sh, _ in t.parts[:4])
    return f"{t.form}: {shown}" + (f" (+{len(t.parts) - 4} more)" if len(t.parts) > 4 else "")


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _clean(rows: List[List[Any]]) -> List[List[Any]]:
    """Escape control characters in every text cell: names and values come from the file."""
    return [[printable(c) if isinstance(c, str) else c for c in row] for row in rows]


def inspect_text(r: InspectResult) -> str:
    """The human view of an InspectResult: a summary block, then the tensor (or module) table."""
    from tabulate import tabulate

    summary: List[List[str]] = [["format", r.format + _format_detail(r.metadata)],
                                ["file size", human_bytes(r.file_size)]]
    if r.format == "onnx":  # issue 17 (verify/ONNX helper): the graph's interface, from the ONNX reader
        summary += _onnx_rows(r.metadata)
    summary += _reader_rows(r.metadata)
    if r.entry_source == "all_tensors":
        summary.append(["state_dict", "none found (every tensor listed by path)"])
    else:
        how = {"state_dict": "", "pickled_module": " (from the pickled module)",
               "script_module": " (from the TorchScript module)"}.get(r.entry_source, "")
        summary.append(["state_dict", (r.entry or "top level") + how])
    split = f" ({r.parameters:,} in parameters, {r.buffers:,} in buffers)" if r.parameters is not None else ""
    entries = sum(1 for t in r.tensors if t.form.startswith("value "))  # a quantized module's dtype: no tensor
    count = f"{len(r.tensors) - entries}" + (f" (+{entries} state_dict entr{'y' if entries == 1 else 'ies'} that "
                                            f"{'is' if entries == 1 else 'are'} no tensor)" if entries else "")
    summary.append(["tensors", f"{count}, {r.total_params:,} values{split}, {human_bytes(r.total_bytes)}"])
    if r.bytes_by_dtype:
        summary.append(["dtypes", ", ".join(f"{d} {human_bytes(b)}" for d, b in
                                            sorted(r.bytes_by_dtype.items(), key=lambda kv: -kv[1]))])
    if r.devices:
        summary.append(["devices", ", ".join(f"{d}: {n}" for d, n in r.devices.items())])
    if r.shared_storages:
        shown = [" = ".join(g[:3]) + (" ..." if len(g) > 3 else "") for g in r.shared_storages[:5]]
        more = f" (+{len(r.shared_storages) - 5} more)" if len(r.shared_storages) > 5 else ""
        summary.append(["shared", f"{len(r.shared_storages)} storage(s) shared: " + "; ".join(shown) + more])
    for i, (k, v) in enumerate(r.other_entries.items()):
        summary.append(["entries" if i == 0 else "", f"{k}: {v}"])
    meta = r.metadata.get("metadata") if r.format.startswith("safetensors") else None
    if meta:
        summary.append(["metadata", ", ".join(f"{k}={v}" for k, v in meta.items())])
    for i, n in enumerate(r.notes):
        summary.append(["notes" if i == 0 else "", n])
    out = [printable(r.path), tabulate(_clean(summary), tablefmt="plain"), ""]
    if r.tree is not None:
        split = bool(r.tree) and len(r.tree[0]) == 5  # parameters and buffers apart, where the file says which
        headers = ["module", "tensors", "values"] + (["parameters", "buffers"] if split else [])
        out.append(tabulate(_clean([[row[0], row[1]] + [f"{v:,}" for v in row[2:]] for row in r.tree]),
                            headers=headers, tablefmt="simple", colalign=("left",) + ("right",) * (len(headers) - 1)))
    elif r.tensors:
        stats = any(t.stats is not None for t in r.tensors)
        forms = any(t.form != "dense" for t in r.tensors)
        headers = ["name", "shape", "dtype", "device", "size"] + (["form"] if forms else [])
        if stats:
            headers += ["min", "max", "mean", "std", "nan", "inf"]
        rows = []
        for t in r.tensors:
            row = [t.name, _shape(t.shape), t.dtype, t.device, human_bytes(t.nbytes)]
            if forms:
                row.append(_form(t))
            if stats:
                s: Dict[str, Any] = t.stats or {}
                row += [_num(s.get(k)) for k in ("min", "max", "mean", "std", "nan", "inf")]
            rows.append(row)
        out.append(tabulate(_clean(rows), headers=headers, tablefmt="simple", disable_numparse=True))
    else:
        out.append("(no tensors)")
    return "\n".join(out)


def _onnx_rows(meta: Dict[str, Any]) -> List[List[str]]:
    """An ONNX graph's inputs and outputs (``image  float32 (batch, 3, 224, 224)``) and its producer."""
    rows = []
    for label in ("inputs", "outputs"):
        for i, v in enumerate(meta.get(label) or []):
            if isinstance(v, dict):
                shape = v.get("shape")
                shown = "rank unknown" if shape is None else \
                    _shape(["?" if d is None else d for d in shape])
                text = f"{v.get('name')}: {v.get('dtype')} {shown}"
            else:
                text = str(v)
            rows.append([label if i == 0 else "", text])
    if meta.get("producer"):
        rows.append(["producer", str(meta["producer"])])
    return rows


def _reader_rows(meta: Dict[str, Any]) -> List[List[str]]:
    """The rows a reader gives for inspect's summary (``metadata["details"]``: ``[[label, text], ...]``):
    a GGUF file's architecture, a torch.export program's inputs, an adapter's config. At most 24, each
    cut to one line."""
    rows = []
    for row in (meta.get("details") or [])[:24]:
        if isinstance(row, (list, tuple)) and len(row) == 2:
            rows.append([str(row[0]), _one_line(str(row[1]))])
    return rows


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _format_detail(meta: Dict[str, Any]) -> str:
    bits = []
    if meta.get("archive_folder") not in (None, "archive"):
        bits.append(f"archive folder {meta['archive_folder']!r}")
    if "shards" in meta:
        bits.append(f"{len(meta['shards'])} shards")
    if meta.get("external_data"):
        bits.append("external data: " + ", ".join(meta["external_data"]))
    if "opsets" in meta:
        bits.append("opset " + ", ".join(f"{d} {v}" for d, v in meta["opsets"].items()))
    return f" ({'; '.join(bits)})" if bits else ""


def _names(names, limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


BAR_WIDTH = 20  # cells of the longest bar in diff's module table
_EIGHTHS = " ▏▎▍▌▋▊▉"  # 0/8 .. 7/8 of a cell; a full cell is █

_SORT_SAID = {"change": "by relative change", "name": "by name", "size": "by size", "file": "in file order"}


def unicode_ok(stream=None) -> bool:
    """Can ``stream`` (default: sys.stdout) take the bar chart's block characters? Only a UTF-8 one."""
    import codecs
    import sys
    enc = getattr(stream if stream is not None else sys.stdout, "encoding", None) or ""
    try:
        return codecs.lookup(enc).name == "utf-8"
    except LookupError:
        return False


def change_bar(value: Optional[float], largest: float, width: int = BAR_WIDTH, unicode: bool = True) -> str:
    """A bar of ``value / largest * width`` cells, in eighths of a cell (█▉▊▋▌▍▎▏) or, without unicode, whole
    ``#`` cells. A value above 0 shows at least the smallest mark; inf the full width; None, nan and 0 nothing.

    >>> change_bar(0.5, 1.0, 4), change_bar(0.3, 1.0, 4), change_bar(1e-9, 1.0, 4), change_bar(0.3, 1.0, 4, False)
    ('██', '█▎', '▏', '#')
    """
    if value is None or value != value or value <= 0:
        return ""
    if value == math.inf or not largest or largest == math.inf:
        frac = 1.0 if value == math.inf or value >= largest else 0.0
    else:
        frac = min(value / largest, 1.0)
    if not unicode:
        return "#" * max(1, math.floor(frac * width + 0.5))
    eighths = max(1, math.floor(frac * width * 8 + 0.5))  # to the nearest eighth, halves up
    return "█" * (eighths // 8) + _EIGHTHS[eighths % 8].strip()


def _rel(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _shown(n: int, top: Optional[int], sort: str) -> str:
    """``(12)``, or ``(120, the first 20 by relative change; --all for every row)``."""
    if top is None or n <= top:
        return f"({n})"
    return f"({n}, the first {top} {_SORT_SAID.get(sort, '')}; --all for every row)"


def _cut_text(text: str, n: int) -> str:
    return printable(text if len(text) <= n else text[:n - 3] + "...")


def diff_text(r: DiffResult, top: Optional[int] = 20, unicode: Optional[bool] = None) -> str:
    """The human view of a DiffResult: what was compared, then each kind of difference (at most ``top`` rows a
    table, in the record's order; None: every row), the module table with ``--depth``, then the verdict.
    ``unicode``: the module table's bars in block characters (default: when stdout takes UTF-8), else ``#``."""
    from tabulate import tabulate
    from .results import TensorDiff

    def side(path, fmt, entry, n):
        return f"{path}  ({fmt}, state_dict: {entry or 'top level'}, {plural(n, 'tensor')})"

    def cut(items):
        return list(items) if top is None else list(items)[:top]

    head = [["A", side(r.path_a, r.format_a, r.entry_a, r.count_a)],
            ["B", side(r.path_b, r.format_b, r.entry_b, r.count_b)],
            ["prefix alignment", r.prefix_alignment.describe()]]
    if r.renames:
        head.append(["renames", "A's names: " + "; ".join(r.renames)])
    for i, note in enumerate(r.notes):  # another state_dict the file holds: said, not silently passed over
        head.append(["state_dicts" if i == 0 else "", note])
    if r.filter is not None:
        pairs, only_a, only_b = r.filter_totals or (0, 0, 0)
        head.append(["filter", f"'{r.filter}': {r.pairs} of {pairs} pairs, {len(r.only_in_a)} of {only_a} only in A, "
                               f"{len(r.only_in_b)} of {only_b} only in B (the counts, tables and result cover these)"])
    head.append(["keys", f"{r.pairs} common, {len(r.only_in_a)} only in A, {len(r.only_in_b)} only in B"])
    if r.values_compared:
        head.append(["values", f"{r.exact} exact, {len(r.value_close)} within tolerance, "
                               f"{len(r.value_mismatch)} different"
                               + (f", {len(r.not_compared)} not compared" if r.not_compared else "")])
        tol = "dtype defaults (float32 atol=1e-05 rtol=1.3e-06, float16 rtol=1e-03, bfloat16 rtol=1.6e-02; " \
              "integers exact)" if r.atol is None and r.rtol is None else \
            f"atol={_g(r.atol) if r.atol is not None else 'dtype default'}, " \
            f"rtol={_g(r.rtol) if r.rtol is not None else 'dtype default'} (integers exact)"
        head.append(["tolerance", tol])
    else:
        head.append(["values", "not compared (--no-values)"])
    out = [tabulate(_clean(head), tablefmt="plain"), ""]
    limit = len(r.only_in_a) + len(r.only_in_b) if top is None else top
    if r.only_in_a:
        out += [f"only in A ({len(r.only_in_a)}): " + printable(_names(list(r.only_in_a), limit)), ""]
    if r.only_in_b:
        out += [f"only in B ({len(r.only_in_b)}): " + printable(_names(list(r.only_in_b), limit)), ""]
    if r.modules is not None:
        out += _module_table(r, cut(r.modules), len(r.modules), top, unicode_ok() if unicode is None else unicode)
    if r.shape_mismatch:
        rows = [[d.name, _shape(d.shape_a), _shape(d.shape_b)] for d in cut(r.shape_mismatch)]
        out += [f"shape mismatch {_shown(len(r.shape_mismatch), top, r.sort)}:",
                tabulate(_clean(rows), headers=["name", "A", "B"], tablefmt="simple", disable_numparse=True), ""]
    if r.dtype_mismatch:
        rows = [[d.name, d.dtype_a, d.dtype_b, d.status or "-", _rel(d.rel_change), _g(d.max_abs)]
                for d in cut(r.dtype_mismatch)]
        out += [f"dtype mismatch {_shown(len(r.dtype_mismatch), top, r.sort)}:",
                tabulate(_clean(rows), headers=["name", "A", "B", "values", "rel change", "max abs"],
                         tablefmt="simple", disable_numparse=True), ""]
    if r.form_mismatch:
        rows = [[d.name, d.form_a, d.form_b, d.status or "-", _rel(d.rel_change)] for d in cut(r.form_mismatch)]
        out += [f"held differently by torch {_shown(len(r.form_mismatch), top, r.sort)}:",
                tabulate(_clean(rows), headers=["name", "A", "B", "values", "rel change"], tablefmt="simple",
                         disable_numparse=True), ""]
    diffs = list(r.value_mismatch) + list(r.value_close)
    if diffs:
        diffs.sort(key=TensorDiff.sort_key(r.sort))
        shown = cut(diffs)
        how = any(d.note for d in shown)  # a tensor of parts, a form: how it was compared, in words
        rows = [[d.name, _shape(d.shape_a), d.dtype_a if d.dtype_a == d.dtype_b else f"{d.dtype_a}/{d.dtype_b}",
                 "differs" if d.status == "mismatch" else "close", _rel(d.rel_change), _g(d.max_abs), _g(d.max_rel),
                 f"{d.mismatched:,}/{d.numel:,}" if d.numel else "-"] + ([_cut_text(d.note, 90)] if how else [])
                for d in shown]
        out += [f"values not bit-equal {_shown(len(diffs), top, r.sort)}:",
                tabulate(_clean(rows), headers=["name", "shape", "dtype", "status", "rel change", "max abs",
                                                "max rel", "outside tol"] + (["how"] if how else []),
                         tablefmt="simple", disable_numparse=True), ""]
    if r.not_compared:
        shown = cut(r.not_compared)
        out += [f"not compared ({len(r.not_compared)}): "
                + printable("; ".join(f"{d.name}: {d.note}" for d in shown))
                + (f" ... (+{len(r.not_compared) - len(shown)} more)" if len(shown) < len(r.not_compared) else ""), ""]
    out.append("result: " + ("EQUAL" if r.equal else "DIFFERENT")
               + ("" if r.values_compared else " (names, shapes and dtypes only)"))
    return "\n".join(out)


def _module_table(r: DiffResult, rows, total: int, top: Optional[int], unicode: bool) -> List[str]:
    """``--depth``: per module, its tensors, how many changed, the largest relative change and its bar."""
    from tabulate import tabulate
    finite = [v for _, _, _, v, _ in r.modules if v is not None and v == v and v != math.inf]
    largest = max(finite, default=0.0)
    if not finite and any(v == math.inf for _, _, _, v, _ in r.modules):
        largest = math.inf
    table = [[m, f"{n:,}", f"{c:,}", _rel(v), change_bar(v, largest, unicode=unicode)] for m, n, c, v, _ in rows]
    return [f"modules, names folded {r.depth} level{'s' if r.depth != 1 else ''} "
            f"{_shown(total, top, r.sort)}:",
            tabulate(_clean(table), headers=["module", "tensors", "changed", "max rel change", "bar (largest = full)"],
                     tablefmt="simple", colalign=("left", "right", "right", "right", "left"), disable_numparse=True),
            ""]


def filter_text(r: FilterResult, limit: int = 50) -> str:
    """The human view of a FilterResult: counts, then each group with its names, then the output."""
    from tabulate import tabulate
    head = [["source", f"{r.source}  ({r.source_format}, state_dict: {r.source_entry or 'top level'})"],
            ["target", r.target],
            ["prefix alignment", r.prefix_alignment.describe("the source", "the target")]]
    if r.renames:
        head.append(["renames", ", ".join(r.renames)])
    head += [["kept", str(len(r.kept))],
             ["dropped", f"{len(r.dropped_unexpected)} not in the target, "
                         f"{len(r.dropped_shape_mismatch)} shape differs"],
             ["missing", f"{len(r.missing)} target keys keep their fresh initialization" if not r.filled else
              f"{len(r.missing)} target keys, written from {r.filled_from} (--complete)"]]
    if r.cast:
        head.append(["cast", f"{plural(len(r.cast), 'tensor')} to the target's dtype"])
    out = [tabulate(_clean(head), tablefmt="plain"), ""]
    if r.dropped_shape_mismatch:
        rows = [[d.name if d.source_name == d.name else f"{d.source_name} -> {d.name}",
                 f"{_shape(d.source_shape)} -> {_shape(d.target_shape)}"] for d in r.dropped_shape_mismatch[:limit]]
        out += [f"dropped, shape differs ({len(r.dropped_shape_mismatch)}):",
                tabulate(_clean(rows), headers=["name", "source -> target"], tablefmt="simple",
                         disable_numparse=True), ""]
    if r.dropped_unexpected:
        out += [f"dropped, not in the target ({len(r.dropped_unexpected)}): "
                + printable(_names(list(r.dropped_unexpected))), ""]
    if r.missing:
        out += [(f"missing, keep their initialization ({len(r.missing)}): " if not r.filled else
                 f"missing, filled (--complete) ({len(r.missing)}): ") + printable(_names(list(r.missing))), ""]
    if r.cast:
        out += [f"cast ({len(r.cast)}): " + printable(_names([f"{k.name} {k.source_dtype}->{k.dtype}"
                                                                for k in r.cast])), ""]
    renamed = [k for k in r.kept if k.source_name != k.name]
    if renamed and not r.prefix_alignment.active:
        out += [f"renamed ({len(renamed)}): " + printable(_names([f"{k.source_name} -> {k.name}" for k in renamed])),
                ""]
    if r.output:
        checks = "; ".join(f"{name}: ok ({c.get('how')})"  # a failed check raises; only passed ones are here
                           for name, c in (r.verified or {}).items())
        out.append(printable(f"wrote {plural(len(r.kept) + len(r.filled), 'tensor')} to {r.output} ({r.output_format})"
                             + (f"; checked {checks}" if checks else "")))
    return "\n".join(out).rstrip("\n")


def convert_text(r: ConvertResult) -> str:
    """The human view of a ConvertResult: source, output, and what was checked."""
    from tabulate import tabulate
    rows = [["source", f"{r.source}  ({r.source_format}, state_dict: {r.entry or 'top level'})"],
            ["output", f"{r.output}  ({r.format}, {plural(r.tensors, 'tensor')}, {human_bytes(r.bytes_written)})"]]
    if len(r.files) > 1:
        rows.append(["files", f"{len(r.files)}: " + ", ".join(os.path.basename(f) for f in r.files[:4])
                     + (" ..." if len(r.files) > 4 else "")])
    if r.cast_to:
        rows.append(["dtype", f"floating tensors cast to {r.cast_to}"])
    if r.tied:
        rows.append(["tied", f"{len(r.tied)} stored once: " + ", ".join(f"{a} = {b}" for a, b in r.tied[:4])
                     + (" ..." if len(r.tied) > 4 else "")])
    if r.renamed:  # names are not the source's: said
        said = dict(r.renamed)
        bits = ([f"stripped {said['prefix']!r} from every key"] if said.get("prefix") else []) + \
            [f"--rename {v}" for k, v in r.renamed if k == "rule"]
        rows.append(["names", f"{'; '.join(bits)}: {said.get('renamed', '')} keys renamed"])
    for i, (name, how) in enumerate(r.densified):  # every one said: the output differs from the source here
        rows.append(["written plain" if i == 0 else "", f"{name}: {how}"])
    if r.dequantized:  # GGUF quantized types: what is written is their values, dequantized as gguf does
        kinds = collections.Counter(how for _, how in r.dequantized)
        rows.append(["dequantized", f"{len(r.dequantized)} quantized tensor(s) written as their values "
                     f"(gguf.quants.dequantize): " + ", ".join(f"{how} {n}" for how, n in sorted(kinds.items()))])
    rows += _detail_rows(r.details or {})
    c = r.checked or {}
    if c and r.format == "onnx":
        rows.append(["checked", "ok: onnx.checker, onnxruntime output vs torch's on the same input"])
    elif c:
        what = "names, shapes, dtypes" + (", every byte" if "bytes_compared" in c else "")
        rows.append(["checked", f"ok: read back, {what}"])  # a failed check raises CheckFailedError, exit 1
    return tabulate(_clean(rows), tablefmt="plain")


def _detail_rows(details: Dict[str, Any]) -> List[List[str]]:
    """A ConvertResult's details as text: ``inputs  image 1x3x224x224``, ``tolerance  atol 0.0001, rtol 0.001``,
    ``dynamic batch  no``: values as a person reads them, not as Python or JSON writes them."""
    rows = []
    for k, v in details.items():
        if k in ("input_names", "output_names"):  # shown with the shapes
            continue
        if k in ("inputs", "outputs") and isinstance(v, list):
            names = details.get(k[:-1] + "_names") or []
            text = ", ".join((f"{names[i]} " if i < len(names) else "") + "x".join(map(str, s)) if s else "scalar"
                             for i, s in enumerate(v))
        else:
            text = _value_text(v)
        rows.append([k.replace("_", " "), text])
    return rows


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value_text(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_value_text(x) for x in v)
    return "-" if v is None else str(v)


def remap_text(r: RemapResult) -> str:
    """The human view of a RemapResult."""
    from tabulate import tabulate
    rows = [["source", r.source], ["output", f"{r.output}  ({r.format}, {plural(r.tensors, 'tensor')})"],
            ["remapped", ", ".join(f"{k}: {plural(n, 'storage')}" for k, n in r.mapped.items()) or "nothing matched"]]
    if r.unchanged:
        rows.append(["unchanged", ", ".join(f"{k}: {plural(n, 'storage')}" for k, n in r.unchanged.items())])
    if r.copied:
        rows.append(["copied", f"{len(r.copied)} other files: " + ", ".join(r.copied[:4])
                     + (" ..." if len(r.copied) > 4 else "")])
    c = r.checked or {}
    if c:
        rows.append(["checked", "ok: read back, every tensor on its mapped device"
                     + (", every byte" if "bytes_compared" in c else "")])
    return tabulate(_clean(rows), tablefmt="plain")


def verify_text(r: VerifyReport) -> str:
    """The human view of a VerifyReport: the environment, each check, the verdict naming the first failure."""
    from tabulate import tabulate
    env = r.environment
    rows = [["file", f"{r.path}  ({r.format}, state_dict: {r.entry or 'top level'})"],
            ["torch", (f"{env.get('torch')} (CUDA build {env.get('cuda_build') or 'none'})" if env.get("torch") else
                       "not installed") + f", python {env.get('python')}"],
            ["cuda", f"available, {env.get('device_count')} device(s)" if env.get("cuda_available") else
             "not available"]]
    for d in env.get("devices", []):
        mem = f", {human_bytes(d['memory'])}" if d.get("memory") else ""
        rows.append(["", f"{d['device']}: {d.get('name') or '?'}{mem}"])
    if env.get("onnxruntime"):
        rows.append(["onnxruntime", env["onnxruntime"]])
    out = [tabulate(_clean(rows), tablefmt="plain"), ""]
    table = [[c.name, c.device or "", c.status.upper() if c.status == "fail" else c.status, c.detail]
             for c in r.checks]
    out.append(tabulate(_clean(table), headers=["check", "device", "status", "detail"], tablefmt="simple",
                        maxcolwidths=[None, None, None, 90]))
    out.append("")
    out += _proven_lines(r)
    first = r.first_failure
    if first is None:
        out.append("result: PASS")
    else:
        where = f" on {first.device}" if first.device else ""
        culprit = f" ({first.culprit})" if first.culprit else ""
        out.append(printable(f"result: FAIL: {first.name}{where}{culprit}"))
    return "\n".join(out)


def _proven_lines(r: VerifyReport) -> List[str]:
    """``proven: ...`` (the checks that ran and passed) and ``not proven: ...`` (those that could not run), each
    check named once with its devices or formats: what the verdict below does and does not rest on."""
    def grouped(status: str) -> str:
        where: Dict[str, List[str]] = {}
        for c in r.checks:
            if c.status == status:
                # the load that passed, as called: torch.load(weights_only=True, map_location='cpu')
                name = c.detail.partition(")")[0] + ")" if c.name == "torch.load" and \
                    c.detail.startswith("torch.load(") else c.name
                if c.name == "torch.load" and c.detail.startswith("loads only with weights_only=False"):
                    name = "torch.load(weights_only=False, allowed by --trust)"  # not the weights_only=True load
                if c.name == "computes the same" and c.detail.startswith("reference:"):
                    name = "forward pass runs"  # the reference itself: nothing compared with it on this device
                where.setdefault(name, [])
                if c.device and c.device not in where[name]:
                    where[name].append(c.device)
        return "; ".join(f"{n} ({', '.join(d)})" if d else n for n, d in where.items())
    lines = [f"proven: {grouped('pass') or 'nothing'}"]
    for status, label in (("fail", "failed"), ("skip", "not proven")):
        text = grouped(status)
        if text:
            lines.append(f"{label}: {text}")
    return [printable(ln) for ln in lines]


def scan_text(r: ScanResult) -> str:
    """The human view of a ScanResult: per file a header line (path, format, verdict), and for a file that is
    not plainly safe its globals by verdict, dangerous first; with several files, a safe one is its line alone,
    and the dangerous and unreadable ones are named again above the verdict line, which counts them."""
    from tabulate import tabulate
    order = {"dangerous": 0, "needs code": 1, "safe": 2}
    words = {"dangerous": "DANGEROUS", "unreadable": "UNREADABLE", "needs code": "needs code to load", "safe": "safe"}
    many = len(r.files) > 1
    out: List[str] = []
    for f in r.files:
        if f.error is not None and not f.globals:
            out.append(printable(f"{f.path}  ({f.format or '?'}): UNREADABLE: {f.error}"))
            if not many:
                out.append("")
            continue
        out.append(printable(f"{f.path}  ({f.format or '?'}, {f.pickles} pickle(s)): {words[f.verdict]}"))
        block = []
        if not many or f.verdict != "safe":
            rows = [[g.verdict, g.name, ", ".join(g.uses),
                     g.note or ", ".join(g.where[:2]) + (" ..." if len(g.where) > 2 else "")]
                    for g in sorted(f.globals, key=lambda g: (order[g.verdict], g.name))]
            if rows:
                block.append(tabulate(_clean(rows), headers=["verdict", "global", "used as", "where / note"],
                                      tablefmt="simple"))
            else:
                block.append("(no globals: nothing to import)")
        for problem in f.problems[:10]:
            block.append(printable("note: " + problem))
        if len(f.problems) > 10:
            block.append(f"note: ... and {len(f.problems) - 10} more")
        if f.advice:
            block.append(printable("to read it with torch.load(weights_only=True): " + f.advice))
        if block or not many:
            if many and len(out) > 1 and out[-2] != "":  # a block stands apart from the one-line files above it
                out.insert(len(out) - 1, "")
            out += block + [""]
    if many:
        if out and out[-1] != "":
            out.append("")
        for verdict in ("dangerous", "unreadable"):
            named = [f.path for f in r.files if f.verdict == verdict]
            if named:
                more = f" ... and {len(named) - 20} more" if len(named) > 20 else ""
                out.append(printable(f"{verdict}: {', '.join(named[:20])}{more}"))
    by_reason: Dict[str, List[str]] = {}
    for path, why in r.skipped:
        by_reason.setdefault(why, []).append(path)
    for why, named in by_reason.items():
        more = f" ... and {len(named) - 5} more" if len(named) > 5 else ""
        out.append(printable(f"not scanned ({why}): {', '.join(named[:5])}{more}"))
    out.append("result: " + _scan_verdict(r))
    return "\n".join(out)


def _scan_verdict(r: ScanResult) -> str:
    """``DANGEROUS: 1 of 12 files (1 unreadable)``, ``UNREADABLE: 1 of 3 files (...)``, ``no dangerous globals in
    12 files``; for one file the word alone."""
    n, bad, unreadable = len(r.files), sum(1 for f in r.files if f.dangerous_names), len(r.unreadable)
    if n == 1:
        return "DANGEROUS" if r.dangerous else "UNREADABLE" if unreadable else "no dangerous globals"
    if r.dangerous:
        return f"DANGEROUS: {bad} of {n} files" + (f" ({unreadable} unreadable)" if unreadable else "")
    if unreadable:
        rest = n - unreadable
        others = f" (no dangerous globals in the {rest} other{'s' * (rest > 1)})" if rest else ""
        return f"UNREADABLE: {unreadable} of {n} files{others}"
    return f"no dangerous globals in {n} files"
