"""``inspect``: what a checkpoint holds, from its metadata (and, with stats, its data)."""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import CkptError, UsageError
from .formats import open as open_checkpoint
from .formats.safe_pickle import Stub
from .checkpoint import Checkpoint, TensorRef
from .results import InspectResult, new_tensor_info
from .spans import read_pieces
from .tree import StateDict, children, find_state_dict, is_tensor_dict, module_kind, module_state_dict
from .text import plural, safe_repr

Progress = Optional[Callable[[int, int], None]]


def inspect(path: str, key: Optional[str] = None, filter: Optional[str] = None, sort: str = "file",
            depth: Optional[int] = None, stats: bool = False, progress: Progress = None) -> InspectResult:
    """Summarize a checkpoint of any format: its state_dict's tensors and everything else it holds.

    >>> r = inspect("fixtures/seed_checkpoint.tar")
    >>> r.format, r.entry, r.total_params, [t.name for t in r.tensors][:2]
    ('torch_zip', 'model_state_dict', 1796, ['scale', 'stem.weight'])
    """
    ckpt = open_checkpoint(path)
    try:
        sd = find_state_dict(ckpt, key)
        return summarize(ckpt, sd, filter=filter, sort=sort, depth=depth, stats=stats, progress=progress)
    except CkptError as e:
        if e.path is None and not isinstance(e, UsageError):
            e.path = ckpt.path  # errors found while walking the tree are about this file
        raise


def summarize(ckpt: Checkpoint, sd: StateDict, filter: Optional[str] = None, sort: str = "file",
              depth: Optional[int] = None, stats: bool = False, progress: Progress = None) -> InspectResult:
    """Build the InspectResult of an opened checkpoint and its chosen state_dict."""
    if sort not in ("file", "name", "size"):
        raise UsageError(f"unknown sort order {sort!r} (file, name or size)")
    if depth is not None and depth < 1:
        raise UsageError("--depth must be at least 1")
    items: List[Tuple[str, TensorRef]] = list(sd.tensors.items())
    if filter:
        try:
            rx = re.compile(filter)
        except re.error as e:
            raise UsageError(f"--filter is not a valid regular expression: {e}") from None
        items = [(n, t) for n, t in items if rx.search(n)]
    if sort == "name":
        items.sort(key=lambda nt: nt[0])
    elif sort == "size":
        items.sort(key=lambda nt: (-(nt[1].encoded_nbytes if nt[1].encoding and nt[1].encoded_nbytes is not None
                                     else nt[1].nbytes), nt[0]))  # the size shown: a GGUF tensor's in the file

    # storage -> the name of its first tensor, or the list of its tensors' names once a second one shares it
    groups: Dict[int, Any] = {}
    computed = _stats(items, progress) if stats else {}
    by_dtype: Dict[str, int] = {}
    devices: Dict[str, int] = {}
    infos_list = []
    total_params = total_bytes = 0
    for name, t in items:  # one pass: 20,000-tensor files are inspected too
        storage = t.storage
        if storage is not None:
            first = groups.setdefault(id(storage), name)
            if first is not name:
                if type(first) is list:
                    first.append(name)
                else:
                    groups[id(storage)] = [first, name]
        dtype, device = t.dtype, t.device
        numel, nbytes = (t.numel, t.nbytes) if t.kind != "value" else (0, 0)  # a dtype entry counts no values
        if t.parts:  # its parts' bytes: a per-channel quantized tensor's scales and zero points are its too
            nbytes = sum(b for _, b in _leaf_bytes(t))
        elif t.encoding and t.encoded_nbytes is not None:  # a GGUF quantized tensor: what it takes in the file
            nbytes = t.encoded_nbytes
        total_params += numel
        total_bytes += nbytes
        if t.parts:  # each part's bytes under its own dtype (a packed bias is float32, its weight qint8)
            for pdtype, pbytes in _leaf_bytes(t):
                by_dtype[pdtype] = by_dtype.get(pdtype, 0) + pbytes
        else:  # an encoded tensor's bytes under its encoding (Q4_K), the values it reads as are its dtype
            held = t.encoding or dtype
            by_dtype[held] = by_dtype.get(held, 0) + nbytes
        devices[device] = devices.get(device, 0) + 1
        info = new_tensor_info(name, t.shape, dtype, device, nbytes, t.stride, t.storage_offset,
                               storage.key if storage is not None else None, computed.get(name) if stats else None)
        if t.kind != "dense" or t.subclass or t.metadata or t.rebuild is not None or t.encoding:  # a form of its own: said, with its parts
            d = info.__dict__
            d["form"] = t.form
            d["parts"] = tuple((n, p.dtype, p.shape, p.nbytes) for n, p in t.parts)
            d["explicit_numel"] = t.explicit_numel
        infos_list.append(info)
    infos = tuple(infos_list)
    shared = tuple(tuple(g) for g in groups.values() if type(g) is list)

    known = sd.source == "pickled_module"  # its _parameters and _buffers say which is which
    params = sum(t.numel for n, t in items if n in sd.detached) if known else None
    tree = _fold(items, depth, sd.detached if known else None) if depth else None
    stubs = tuple(sorted({g.qualname for g in ckpt.globals if g.handling == "stub"}))
    notes = _notes(ckpt, sd, stubs)
    return InspectResult(
        path=ckpt.path, format=ckpt.format, file_size=ckpt.file_size, entry=sd.entry, entry_source=sd.source,
        tensors=infos, total_params=total_params, total_bytes=total_bytes,
        bytes_by_dtype=dict(by_dtype), devices=dict(devices), shared_storages=shared,
        other_entries=_other_entries(ckpt.root, sd.entry), pickled_classes=stubs, notes=notes,
        metadata={k: v for k, v in ckpt.metadata.items() if not k.startswith("_")}, tree=tree,
        parameters=params, buffers=None if params is None else total_params - params)


def _leaf_bytes(t: TensorRef, depth: int = 0) -> List[Tuple[str, int]]:
    """(dtype, bytes) of a tensor's innermost parts."""
    if not t.parts or depth > 8:
        return [(t.dtype, t.nbytes)]
    return [leaf for _, p in t.parts for leaf in _leaf_bytes(p, depth + 1)]


def _fold(items, depth: int, params: Optional[frozenset] = None) -> Tuple[Tuple[Any, ...], ...]:
    """(module, tensors, values) per module N levels deep; with ``params`` (the names that are parameters),
    (module, tensors, values, in parameters, in buffers)."""
    rows: Dict[str, List[int]] = collections.OrderedDict()
    for name, t in items:
        parts = name.split(".")
        module = ".".join(parts[:min(depth, len(parts) - 1)]) or "(top)"
        row = rows.setdefault(module, [0, 0, 0])
        row[0] += 1
        row[1] += t.numel
        if params is not None and name in params:
            row[2] += t.numel
    if params is None:
        return tuple((m, n, v) for m, (n, v, _) in rows.items())
    return tuple((m, n, v, p, v - p) for m, (n, v, p) in rows.items())


def _notes(ckpt: Checkpoint, sd: StateDict, stubs) -> Tuple[str, ...]:
    notes = []
    if sd.source == "pickled_module":
        notes.append(f"holds pickled class {sd.module_class}; its state_dict is readable here, running it "
                     f"needs its code and --trust")
    elif sd.source == "script_module":
        notes.append(f"TorchScript module {sd.module_class}; state_dict names as torch.jit.load(...).state_dict()")
    elif sd.source == "all_tensors":
        notes.append("no state_dict found: listing every tensor in the file by its path")
    if len(sd.candidates) > 1:
        shown = ", ".join(f"{k} ({plural(n, 'tensor')})" for k, n in sd.candidates)
        notes.append(f"state_dict candidates: {shown}; took {sd.entry}: {sd.reason}; --key chooses another")
    for name, qual, n in sd.unmodeled[:3]:
        notes.append(f"INCOMPLETE: module {name} ({qual}) holds {n} tensor(s) its own state_dict() code names "
                     "(quantized packed parameters); not listed, and convert, diff, filter and verify refuse")
    top_modules = sorted({o.qualname for o in _module_stubs(ckpt.root)} - {sd.module_class})
    for m in top_modules[:3]:
        notes.append(f"holds pickled class {m}; its state_dict is readable here, running it needs its code "
                     f"and --trust")
    other = [s for s in stubs if not s.startswith("torch.")]
    if other:  # a walk of the whole tree: only when the pickle named classes at all
        module_classes = {o.qualname for o in _all_stubs(ckpt.root) if module_kind(o)}
        other = [s for s in other if s not in module_classes]
    if other and ckpt.format not in ("torchscript", "dcp"):
        notes.append(f"references {len(other)} other class(es) the reader did not import: "
                     f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}")
    if ckpt.metadata.get("note"):
        notes.append(ckpt.metadata["note"])
    return tuple(notes)


def _all_stubs(root: Any):
    """Every stub object in the tree, each once."""
    seen, stack, out = set(), [root], []
    while stack:
        node = stack.pop()
        if id(node) in seen or isinstance(node, (str, bytes, int, float, bool, TensorRef)) or node is None:
            continue
        seen.add(id(node))
        if isinstance(node, Stub):
            out.append(node)
        stack.extend(v for _, v in children(node))
    return out


def _module_stubs(root: Any):
    """Top-level pickled modules (not their children) anywhere in a checkpoint dict."""
    if module_kind(root) == "pickled":
        return [root]
    if isinstance(root, dict):
        return [v for v in root.values() if isinstance(v, Stub) and module_kind(v) == "pickled"]
    return []


# ---------------------------------------------------------------------------------------------
# Describing the entries that are not the state_dict


_OPTIMIZER_HINTS = (
    ("SGD", {"momentum", "dampening", "nesterov"}),
    ("AdamW", {"betas", "amsgrad", "decoupled_weight_decay=True"}),
    ("Adam", {"betas", "amsgrad"}),
    ("RMSprop", {"alpha", "centered"}),
    ("Adagrad", {"lr_decay"}),
    ("Adadelta", {"rho"}),
)


def _guess_optimizer(group: dict) -> Optional[str]:
    keys = set(group)
    if group.get("decoupled_weight_decay") is True:
        keys.add("decoupled_weight_decay=True")
    for name, needed in _OPTIMIZER_HINTS:
        if needed <= keys:
            return name
    return None


def describe(value: Any, depth: int = 2) -> str:
    """A one-line description of a non-tensor entry, in bounded work whatever the value.

    ``depth`` is how many levels of an object's fields are described inside it.

    >>> describe({"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "params": [0, 1]}]})
    'SGD optimizer state: 2 params in 1 group, lr=0.1'
    """
    if value is None or isinstance(value, (bool, int, float)):
        return safe_repr(value)
    if isinstance(value, str):
        return safe_repr(value, 60)
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, TensorRef):
        return f"tensor {list(value.shape)} {value.dtype} on {value.device}"
    if isinstance(value, dict):
        if "param_groups" in value and "state" in value and isinstance(value["param_groups"], list):
            groups = [g for g in value["param_groups"] if isinstance(g, dict)]
            n = sum(len(g["params"]) for g in groups if isinstance(g.get("params"), (list, tuple)))
            kind = _guess_optimizer(groups[0]) if groups else None
            lrs = sorted({g.get("lr") for g in groups if type(g.get("lr")) in (int, float)})
            lr = f", lr={safe_repr(lrs[0])}" if len(lrs) == 1 else ""
            return f"{kind + ' ' if kind else ''}optimizer state: {n} params in {len(groups)} " \
                   f"group{'s' if len(groups) != 1 else ''}{lr}"
        if "last_epoch" in value and ("base_lrs" in value or "_last_lr" in value):
            return f"LR scheduler state: last_epoch={safe_repr(value['last_epoch'])}"
        if is_tensor_dict(value):
            n = sum(t.numel for t in value.values())
            return f"a state_dict of {plural(len(value), 'tensor')}, {plural(n, 'value')}"
        keys = [safe_repr(k, 30) if not isinstance(k, str) else k for k in list(value)[:6]]
        return f"dict of {len(value)} entries ({', '.join(keys)}{', ...' if len(value) > 6 else ''})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, (set, frozenset)):
        return f"set of {len(value)} items"
    if isinstance(value, Stub):
        kind = module_kind(value)
        if kind:
            try:
                n = f"{plural(len(module_state_dict(value)), 'tensor')} in its state_dict"
            except CkptError as e:
                n = f"state_dict unreadable: {e.message}"
            return f"pickled module {value.qualname} ({n})"
        state = value.state if isinstance(value.state, dict) else None
        if state is not None and all(isinstance(k, str) for k in state):
            if depth <= 0:
                return f"{value.qualname}(...)"
            fields = ", ".join(f"{k}={_short(v, depth - 1)}" for k, v in list(state.items())[:6])
            return f"{value.qualname}({fields}{', ...' if len(state) > 6 else ''})"
        return f"pickled object {value.qualname}"
    return safe_repr(value)


def _short(v: Any, depth: int) -> str:
    text = describe(v, depth) if isinstance(v, (dict, list, tuple, Stub, TensorRef)) else safe_repr(v, 30)
    return text if len(text) <= 80 else text[:77] + "..."


def _other_entries(root: Any, entry: Optional[str]) -> Dict[str, str]:
    if not isinstance(root, dict) or is_tensor_dict(root):
        return {}
    top = entry.split("/")[0] if entry else None
    return {str(k): describe(v) for k, v in root.items() if str(k) != top}


# ---------------------------------------------------------------------------------------------
# --stats: streamed over the data, a chunk at a time


def _stats(items, progress: Progress) -> Dict[str, Optional[Dict[str, Any]]]:
    try:
        import torch  # noqa: F401 - the statistics are torch's own
    except ImportError:
        raise UsageError("inspect --stats needs torch, which is not installed here: pip install 'ckpttool[torch]' "
                         "(inspect without --stats does not)") from None
    out: Dict[str, Optional[Dict[str, Any]]] = {}
    total = sum(t.nbytes for _, t in items)
    done = 0
    for name, t in items:
        out[name] = tensor_stats(t)
        done += t.nbytes
        if progress:
            progress(done, total)
    return out


def tensor_stats(t: TensorRef, chunk_bytes: int = 1 << 24) -> Optional[Dict[str, Any]]:
    """min/max/mean/std and NaN/Inf counts of a tensor, read in bounded chunks.

    Returns None for tensors without numeric data (meta, quantized, complex, strings). One read of each
    chunk into a reused buffer; floats are measured in their own precision as torch's own ``std()`` does
    (float16/bfloat16 widened to float32, exactly; float32 to about 1e-7 relative), integers and bools in
    float64; chunks are merged by Chan's formula. NaN and Inf (which min/max show) are counted and left
    out, their masks made only for a chunk that has any.
    """
    if not t.has_data or t.kind != "dense" or t.dtype.startswith("complex") or t.dtype in ("string",):
        return None
    import torch
    from .torch_bridge import torch_dtype
    dt = torch_dtype(t.dtype)
    work = dt if dt in (torch.float32, torch.float64) else (torch.float32 if dt.is_floating_point and
                                                             dt.itemsize <= 2 else torch.float64)
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    nans = infs = 0
    step = max(t.itemsize, chunk_bytes - chunk_bytes % t.itemsize)
    if t.is_contiguous and t.numel > 1:
        pieces = read_pieces(t.storage.source, t.span()[0], t.nbytes, step)
    else:
        pieces = t.iter_chunks(step)
    for chunk in pieces:
        if not chunk:
            continue
        raw = torch.frombuffer(chunk if isinstance(chunk, memoryview) else bytearray(chunk), dtype=torch.uint8)
        x = raw.view(dt)
        x = x if x.dtype == work else x.to(work)
        c_lo, c_hi = torch.aminmax(x) if x.numel() else (None, None)
        if c_lo is None:
            continue
        c_lo, c_hi = float(c_lo), float(c_hi)
        if work.is_floating_point and not (math.isfinite(c_lo) and math.isfinite(c_hi)):  # NaN propagates
            finite = torch.isfinite(x)
            nans += int(torch.isnan(x).sum())
            infs += int(torch.isinf(x).sum())
            x = x[finite]
            if not x.numel():
                continue
            c_lo, c_hi = (float(v) for v in torch.aminmax(x))
        n = x.numel()
        lo, hi = min(lo, c_lo), max(hi, c_hi)
        c_var, c_mean = (float(v) for v in torch.var_mean(x, correction=0))  # torch's own, in x's precision
        c_m2 = c_var * n
        delta = c_mean - mean
        tot = count + n
        mean += delta * n / tot
        m2 += c_m2 + delta * delta * count * n / tot
        count = tot
    finite = count > 0
    if "neg" in t.bits and finite:  # the values torch gives are the stored ones negated
        lo, hi, mean = -hi, -lo, -mean
    return {
        "min": lo if finite else None, "max": hi if finite else None,
        "mean": mean if finite else None,
        "std": math.sqrt(m2 / (count - 1)) if count > 1 else (0.0 if finite else None),
        "nan": nans, "inf": infs,
    }
