"""Records -> text: tables (tabulate) and JSON. No torch import, no printing."""
from __future__ import annotations

import json
import math
import os
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps's own string writer (ensure_ascii)
from typing import Any, Dict, List, Optional

from .records import (ConvertResult, DiffResult, FilterResult, InspectResult, RemapResult, ScanResult,
                      TensorInfo, VerifyReport)
from .text import printable


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
    if r.entry_source == "all_tensors":
        summary.append(["state_dict", "none found (every tensor listed by path)"])
    else:
        how = {"state_dict": "", "pickled_module": " (from the pickled module)",
               "script_module": " (from the TorchScript module)"}.get(r.entry_source, "")
        summary.append(["state_dict", (r.entry or "top level") + how])
    summary.append(["tensors", f"{len(r.tensors)}, {r.total_params:,} values, {human_bytes(r.total_bytes)}"])
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
        out.append(tabulate(_clean([[m, n, f"{p:,}"] for m, n, p in r.tree]), headers=["module", "tensors", "params"],
                            tablefmt="simple", colalign=("left", "right", "right")))
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


def diff_text(r: DiffResult, limit: int = 50) -> str:
    """The human view of a DiffResult: what was compared, then each kind of difference, then the verdict."""
    from tabulate import tabulate

    def side(path, fmt, entry, n):
        return f"{path}  ({fmt}, state_dict: {entry or 'top level'}, {n} tensors)"

    common = r.count_a - len(r.only_in_a)
    head = [["A", side(r.path_a, r.format_a, r.entry_a, r.count_a)],
            ["B", side(r.path_b, r.format_b, r.entry_b, r.count_b)],
            ["prefix alignment", r.prefix_alignment.describe()],
            ["keys", f"{common} common, {len(r.only_in_a)} only in A, {len(r.only_in_b)} only in B"]]
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
    if r.only_in_a:
        out += [f"only in A ({len(r.only_in_a)}): " + printable(_names(list(r.only_in_a))), ""]
    if r.only_in_b:
        out += [f"only in B ({len(r.only_in_b)}): " + printable(_names(list(r.only_in_b))), ""]
    if r.shape_mismatch:
        rows = [[d.name, _shape(d.shape_a), _shape(d.shape_b)] for d in r.shape_mismatch[:limit]]
        out += [f"shape mismatch ({len(r.shape_mismatch)}):",
                tabulate(_clean(rows), headers=["name", "A", "B"], tablefmt="simple", disable_numparse=True), ""]
    if r.dtype_mismatch:
        rows = [[d.name, d.dtype_a, d.dtype_b, d.status or "-", _g(d.max_abs)] for d in r.dtype_mismatch[:limit]]
        out += [f"dtype mismatch ({len(r.dtype_mismatch)}):",
                tabulate(_clean(rows), headers=["name", "A", "B", "values", "max abs"], tablefmt="simple",
                         disable_numparse=True), ""]
    if r.form_mismatch:
        rows = [[d.name, d.form_a, d.form_b, d.status or "-"] for d in r.form_mismatch[:limit]]
        out += [f"held differently by torch ({len(r.form_mismatch)}):",
                tabulate(_clean(rows), headers=["name", "A", "B", "values"], tablefmt="simple",
                         disable_numparse=True), ""]
    diffs = list(r.value_mismatch) + list(r.value_close)
    if diffs:
        rows = [[d.name, _shape(d.shape_a), d.dtype_a if d.dtype_a == d.dtype_b else f"{d.dtype_a}/{d.dtype_b}",
                 "differs" if d.status == "mismatch" else "close", _g(d.max_abs), _g(d.max_rel),
                 f"{d.mismatched:,}/{d.numel:,}"] for d in diffs[:limit]]
        more = f" (first {limit})" if len(diffs) > limit else ""
        out += [f"values not bit-equal ({len(diffs)}){more}:",
                tabulate(_clean(rows), headers=["name", "shape", "dtype", "", "max abs", "max rel", "outside tol"],
                         tablefmt="simple", disable_numparse=True), ""]
    if r.not_compared:
        out += [f"not compared ({len(r.not_compared)}): "
                + printable("; ".join(f"{d.name}: {d.note}" for d in r.not_compared[:5])), ""]
    out.append("result: " + ("EQUAL" if r.equal else "DIFFERENT")
               + ("" if r.values_compared else " (names, shapes and dtypes only)"))
    return "\n".join(out)


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
             ["missing", f"{len(r.missing)} target keys keep their fresh initialization"]]
    if r.cast:
        head.append(["cast", f"{len(r.cast)} tensors to the target's dtype"])
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
        out += [f"missing, keep their initialization ({len(r.missing)}): " + printable(_names(list(r.missing))), ""]
    if r.cast:
        out += [f"cast ({len(r.cast)}): " + printable(_names([f"{k.name} {k.source_dtype}->{k.dtype}"
                                                                for k in r.cast])), ""]
    renamed = [k for k in r.kept if k.source_name != k.name]
    if renamed and not r.prefix_alignment.active:
        out += [f"renamed ({len(renamed)}): " + printable(_names([f"{k.source_name} -> {k.name}" for k in renamed])),
                ""]
    if r.output:
        checks = "; ".join(f"{name}: {'ok' if c.get('ok') else 'FAILED'} ({c.get('how')})"
                           for name, c in (r.verified or {}).items())
        out.append(printable(f"wrote {len(r.kept)} tensors to {r.output} ({r.output_format})"
                             + (f"; checked {checks}" if checks else "")))
    return "\n".join(out).rstrip("\n")


def convert_text(r: ConvertResult) -> str:
    """The human view of a ConvertResult: source, output, and what was checked."""
    from tabulate import tabulate
    rows = [["source", f"{r.source}  ({r.source_format}, state_dict: {r.entry or 'top level'})"],
            ["output", f"{r.output}  ({r.format}, {r.tensors} tensors, {human_bytes(r.bytes_written)})"]]
    if len(r.files) > 1:
        rows.append(["files", f"{len(r.files)}: " + ", ".join(os.path.basename(f) for f in r.files[:4])
                     + (" ..." if len(r.files) > 4 else "")])
    if r.cast_to:
        rows.append(["dtype", f"floating tensors cast to {r.cast_to}"])
    if r.tied:
        rows.append(["tied", f"{len(r.tied)} stored once: " + ", ".join(f"{a} = {b}" for a, b in r.tied[:4])
                     + (" ..." if len(r.tied) > 4 else "")])
    for i, (name, how) in enumerate(r.densified):  # every one said: the output differs from the source here
        rows.append(["written plain" if i == 0 else "", f"{name}: {how}"])
    for k, v in (r.details or {}).items():
        rows.append([k.replace("_", " "), v if isinstance(v, str) else json.dumps(v)])
    c = r.checked or {}
    if c and r.format == "onnx":
        rows.append(["checked", "ok: onnx.checker, onnxruntime output vs torch's on the same input"])
    elif c:
        what = "names, shapes, dtypes" + (", every byte" if "bytes_compared" in c else "")
        rows.append(["checked", f"{'ok' if c.get('ok') else 'FAILED'}: read back, {what}"])
    return tabulate(_clean(rows), tablefmt="plain")


def remap_text(r: RemapResult) -> str:
    """The human view of a RemapResult."""
    from tabulate import tabulate
    rows = [["source", r.source], ["output", f"{r.output}  ({r.format}, {r.tensors} tensors)"],
            ["remapped", ", ".join(f"{k}: {n} storages" for k, n in r.mapped.items()) or "nothing matched"]]
    if r.unchanged:
        rows.append(["unchanged", ", ".join(f"{k}: {n} storages" for k, n in r.unchanged.items())])
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
            ["torch", f"{env.get('torch')} (CUDA build {env.get('cuda_build') or 'none'}), python {env.get('python')}"],
            ["cuda", f"available: {env.get('cuda_available')}, devices: {env.get('device_count')}"]]
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
    first = r.first_failure
    if first is None:
        out.append("result: PASS")
    else:
        where = f" on {first.device}" if first.device else ""
        culprit = f" ({first.culprit})" if first.culprit else ""
        out.append(printable(f"result: FAIL: {first.name}{where}{culprit}"))
    return "\n".join(out)


def scan_text(r: ScanResult) -> str:
    """The human view of a ScanResult: per file, the globals by verdict, dangerous first."""
    from tabulate import tabulate
    order = {"dangerous": 0, "needs code": 1, "safe": 2}
    out = []
    for f in r.files:
        verdict = "DANGEROUS" if f.dangerous_names else ("needs code to load" if f.needs_code else "safe")
        out.append(printable(f"{f.path}  ({f.format or '?'}, {f.pickles} pickle(s)): {verdict}"))
        rows = [[g.verdict, g.name, ", ".join(g.uses), g.note or ", ".join(g.where[:2]) + (" ..." if len(g.where) > 2 else "")]
                for g in sorted(f.globals, key=lambda g: (order[g.verdict], g.name))]
        if rows:
            out.append(tabulate(_clean(rows), headers=["verdict", "global", "used as", "where / note"],
                                tablefmt="simple"))
        else:
            out.append("(no globals: nothing to import)")
        for problem in f.problems[:10]:
            out.append(printable("note: " + problem))
        if len(f.problems) > 10:
            out.append(f"note: ... and {len(f.problems) - 10} more")
        if f.advice:
            out.append(printable("to read it with torch.load(weights_only=True): " + f.advice))
        out.append("")
    out.append("result: " + ("DANGEROUS" if r.dangerous else "no dangerous globals"))
    return "\n".join(out)
