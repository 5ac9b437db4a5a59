"""Records -> text: tables (tabulate) and JSON. No torch import, no printing."""
from __future__ import annotations

import json
from typing import Any, Dict, List

from .records import InspectResult
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


def to_json(record: Any) -> str:
    """The record's ``to_dict()`` as one JSON object."""
    return json.dumps(record.to_dict(), indent=2, default=repr)


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
        headers = ["name", "shape", "dtype", "device", "size"]
        if stats:
            headers += ["min", "max", "mean", "std", "nan", "inf"]
        rows = []
        for t in r.tensors:
            row = [t.name, _shape(t.shape), t.dtype, t.device, human_bytes(t.nbytes)]
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
