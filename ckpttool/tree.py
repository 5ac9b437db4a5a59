"""Walking a checkpoint's entry tree: finding the state_dict, naming tensors.

The state_dict is found the way timm and Lightning users expect: the whole
file when it is a flat name -> tensor dict, else the first of
``STATE_DICT_KEYS`` that holds one, else a pickled module's own parameters and
persistent buffers, named exactly as ``module.state_dict()`` would name them.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .errors import FormatError, KeyNotFoundError, UsageError
from .formats.safe_pickle import Stub
from .pickles.reading import tensor_parts
from .checkpoint import Checkpoint, TensorRef

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema",
                   "ema_state_dict", "ema", "net", "network", "weights", "params")


@dataclass(frozen=True)
class StateDict:
    """The tensors a checkpoint holds as its state_dict, and where they came from."""

    entry: Optional[str]       # path of the entry in the tree ("model_state_dict"), None for the top level
    source: str                # "state_dict" | "pickled_module" | "script_module" | "all_tensors"
    tensors: "collections.OrderedDict[str, TensorRef]"
    module_class: Optional[str] = None
    #: submodules whose tensors torch's state_dict() finds by code of their own (quantized packed params):
    #: (name, class, tensors it holds). Their entries are missing from ``tensors``.
    unmodeled: Tuple[Tuple[str, str, int], ...] = ()
    #: every entry of the file that is a state_dict (or a module holding one): (key, tensors); and why this one
    candidates: Tuple[Tuple[str, int], ...] = ()
    reason: str = ""
    #: the ``_metadata`` torch's state_dict() carries (each module's version, which load_state_dict reads):
    #: the file's own for a saved state_dict, made from the module classes for a pickled module
    torch_metadata: Optional[Any] = None
    #: entries that are a module's parameters: state_dict() gives them detached (plain tensors, not Parameters)
    detached: frozenset = frozenset()


def is_tensor_dict(obj: Any) -> bool:
    """A non-empty dict whose values are all tensors (tensor subclasses pickled as objects too): a state_dict."""
    if not (isinstance(obj, dict) and obj and all(map(isinstance, obj, itertools.repeat(str)))):
        return False
    if all(map(isinstance, obj.values(), itertools.repeat(TensorRef))):  # map: no generator frame per item
        return True
    entries = [as_entry(v) for v in obj.values()]
    return all(e is not None for e in entries) and any(e.kind != "value" for e in entries)


def as_entry(v: Any) -> Optional[TensorRef]:
    """A state_dict value as one entry: a tensor, a tensor subclass's object, or what a quantized module's
    state_dict() holds besides tensors (its ``dtype``, a ``(weight, bias)`` tuple, a ``None`` bias)."""
    if isinstance(v, TensorRef):
        return v
    if v is None or type(v).__name__ == "TorchDtype":
        return _value(v)
    if type(v) is tuple and len(v) == 2:
        return _packed(*v)
    return tensor_like(v)


# packages whose objects are tensors (tensor subclasses that pickle themselves as objects, not through torch's
# _rebuild_from_type_v2): in a state_dict, one such object is one tensor, its inner tensors its parts
_TENSOR_PACKAGES = ("torchao.", "torch.distributed.tensor.", "torch.distributed._tensor.", "torch._subclasses.",
                    "bitsandbytes.", "torch.nested.")


def tensor_like(obj: Any) -> Optional[TensorRef]:
    """``obj`` as one tensor: a TensorRef, or a tensor subclass's object (a class named ``...Tensor`` or of a
    tensor package, holding tensors) as a composite written back as it was built; else None."""
    if isinstance(obj, TensorRef):
        return obj
    if not isinstance(obj, Stub) or module_kind(obj):
        return None
    qual = obj.qualname
    if "Tensor" not in type(obj).stub_name and not qual.startswith(_TENSOR_PACKAGES):
        return None
    parts = tensor_parts(obj)
    if not parts:
        return None
    return TensorRef(shape=(), dtype=parts[0][1].dtype, device=parts[0][1].device, kind="subclass", subclass=qual,
                     explicit_nbytes=sum(p.nbytes for _, p in parts), parts=tuple(parts), rebuild=obj)


def _stub_state(obj: Stub) -> Optional[dict]:
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]  # (dict, slotstate)
    return state if isinstance(state, dict) else None


def module_kind(obj: Any) -> Optional[str]:
    """``"pickled"`` for a pickled nn.Module, ``"script"`` for a TorchScript module, else None."""
    if not isinstance(obj, Stub):
        return None
    state = _stub_state(obj)
    if state is None:
        return None
    if "_parameters" in state and "_modules" in state:
        return "pickled"
    if type(obj).stub_module.startswith("__torch__"):
        return "script"
    return None


# A shared submodule is visited once per name it has (as torch does); a file whose modules
# share children at every level would need 2**depth visits: refuse past this many.
MAX_MODULE_VISITS = 1_000_000


# modules whose state_dict() entries come from code of their own (_save_to_state_dict), not _parameters/_buffers
_OWN_STATE_DICT = ("torch.ao.nn.quantized.", "torch.nn.quantized.", "torch.ao.nn.intrinsic.quantized.",
                   "torch.nn.intrinsic.quantized.", "torch.ao.nn.sparse.quantized.")


def _scalar_tensor(value: Any, name: str) -> Optional[TensorRef]:
    """``torch.tensor(value)`` of a Python float (float32) or int (int64), as a record over its bytes: what a
    quantized module's ``_save_to_state_dict`` puts under ``scale`` and ``zero_point``."""
    import struct
    from .checkpoint import StorageRef
    from .spans import BufferSpan
    if type(value) is float:
        dtype, data = "float32", struct.pack("<f", value)
    elif type(value) is int and -(1 << 63) <= value < (1 << 63):
        dtype, data = "int64", struct.pack("<q", value)
    else:
        return None
    storage = StorageRef(key=name, dtype=dtype, device="cpu", nbytes=len(data), source=BufferSpan(data))
    return TensorRef(shape=(), dtype=dtype, stride=(), storage=storage, device="cpu")


def _value(value: Any) -> TensorRef:
    """A state_dict entry that is no tensor (a dtype, None), as a record written back as it is."""
    from .checkpoint import Value
    return TensorRef(shape=(), dtype=str(value) if value is not None else "none", kind="value",
                     explicit_nbytes=0, explicit_numel=0, rebuild=Value(value))


def _packed(weight: Any, bias: Any) -> Optional[TensorRef]:
    """A quantized Linear's ``(weight, bias)`` tuple, as its state_dict() holds it: one entry, two parts."""
    if not isinstance(weight, TensorRef) or not (bias is None or isinstance(bias, TensorRef)):
        return None
    parts = (("weight", weight),) + ((("bias", bias),) if bias is not None else ())
    return TensorRef(shape=weight.shape, dtype=weight.dtype, device=weight.device, kind="packed",
                     explicit_nbytes=sum(p.nbytes for _, p in parts), explicit_numel=sum(p.numel for _, p in parts),
                     parts=parts, rebuild=(weight, bias))


def quantized_entries(node: Any) -> Optional[List[Tuple[str, TensorRef]]]:
    """The state_dict() entries of a torch.ao quantized module, as its own ``_save_to_state_dict`` writes them
    (torch/ao/nn/quantized/modules: conv.py, linear.py, functional_modules.py), or None if it is not one these
    rules know. Entries of its ``_parameters`` / ``_buffers`` and children are not included."""
    if not isinstance(node, Stub):
        return None
    qual, state = node.qualname, node.state
    if not qual.startswith(_OWN_STATE_DICT):
        return None
    if isinstance(state, tuple) and len(state) == 15 and isinstance(state[10], TensorRef) \
            and state[10].kind == "quantized":  # _ConvNd.__getstate__: (..., w, b, scale, zero_point, training)
        scale, zero_point = _scalar_tensor(state[12], "scale"), _scalar_tensor(state[13], "zero_point")
        if scale is None or zero_point is None or not (state[11] is None or isinstance(state[11], TensorRef)):
            return None
        bias = state[11] if state[11] is not None else _value(None)
        return [("weight", state[10]), ("bias", bias), ("scale", scale), ("zero_point", zero_point)]
    st = _stub_state(node)
    if st is None:
        return None
    if type(node).stub_name == "LinearPackedParams":  # dtype, then the (weight, bias) tuple
        packed = st.get("_packed_params")
        inner = packed.state[0] if isinstance(packed, Stub) and isinstance(packed.state, tuple) and packed.state \
            and isinstance(packed.state[0], tuple) and len(packed.state[0]) == 2 else None
        pair = _packed(*inner) if inner else None
        if pair is None or "dtype" not in st:
            return None
        return [("dtype", _value(st["dtype"])), ("_packed_params", pair)]
    linear = any(isinstance(c, Stub) and type(c).stub_name == "LinearPackedParams"
                 for _, c in _items(st.get("_modules")))
    if linear or type(node).stub_name == "QFunctional":  # scale and zero_point, as tensors
        scale, zero_point = _scalar_tensor(st.get("scale"), "scale"), _scalar_tensor(st.get("zero_point"),
                                                                                      "zero_point")
        if scale is None or zero_point is None:
            return None
        return [("scale", scale), ("zero_point", zero_point)]
    others = {k: v for k, v in st.items() if k not in ("_parameters", "_buffers", "_modules")}
    return None if _holds_tensors(others) else []  # tensors outside its parameters: a rule of its own, unknown


def _holds_tensors(obj: Any) -> int:
    return sum(1 for _ in itertools.islice(all_tensors(obj), 10_000))


# Module classes whose ``_version`` is not 1 (torch.nn and torch.ao.nn of torch 2.14; tests/test_tensor_kinds.py
# holds it to the installed torch): state_dict() records it in ``_metadata``, and load_state_dict reads entries
# by it (a quantized Linear of version 3 keeps its weight in ``_packed_params``).
MODULE_VERSIONS = {
    **{f"torch.ao.nn.intrinsic.qat.modules.conv_fused.{c}": 2 for c in (
        "ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "_ConvBnNd")},
    "torch.ao.nn.intrinsic.quantized.dynamic.modules.linear_relu.LinearReLU": 4,
    "torch.ao.nn.intrinsic.quantized.modules.bn_relu.BNReLU2d": 2,
    "torch.ao.nn.intrinsic.quantized.modules.bn_relu.BNReLU3d": 2,
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearLeakyReLU": 3,
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearReLU": 3,
    "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearTanh": 3,
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear": 4,
    **{f"torch.ao.nn.quantized.dynamic.modules.rnn.{c}": 2 for c in ("GRU", "LSTM", "RNNBase")},
    **{f"torch.ao.nn.quantized.modules.batchnorm.{c}": 2 for c in ("BatchNorm2d", "BatchNorm3d", "_BatchNorm")},
    "torch.ao.nn.quantized.modules.linear.Linear": 3,
    "torch.ao.nn.quantized.modules.linear.LinearPackedParams": 3,
    **{f"torch.ao.nn.quantized.modules.normalization.InstanceNorm{d}d": 2 for d in (1, 2, 3)},
    **{f"torch.nn.modules.batchnorm.{c}": 2 for c in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
        "SyncBatchNorm", "_BatchNorm", "_LazyNormBase", "_NormBase")},
    **{f"torch.nn.modules.instancenorm.{c}": 2 for c in (
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d",
        "LazyInstanceNorm3d", "_InstanceNorm")},
}


def module_state_dict(obj: Stub, members: Optional[Dict[str, Tuple[List[str], List[str]]]] = None,
                      path: Optional[str] = None, unmodeled: Optional[list] = None,
                      versions: Optional[list] = None, detached: Optional[set] = None
                      ) -> "collections.OrderedDict[str, TensorRef]":
    """The state_dict of a pickled or TorchScript module stub, in ``state_dict()`` order.

    For a pickled nn.Module: its ``_parameters``, then its ``_buffers`` not in
    ``_non_persistent_buffers_set``, then each child of ``_modules`` (None
    entries skipped, as torch does). Iterative, so depth costs no recursion; a
    module that contains itself is a FormatError.
    """
    out: "collections.OrderedDict[str, TensorRef]" = collections.OrderedDict()
    stack: List[Tuple[Any, Optional[str]]] = [(obj, "")]  # prefix None marks leaving a node
    on_path = set()
    seen: Dict[int, Any] = {}
    visits = 0
    while stack:
        node, prefix = stack.pop()
        if prefix is None:
            on_path.discard(id(node))
            continue
        visits += 1
        if visits > MAX_MODULE_VISITS:
            raise FormatError(f"module tree has more than {MAX_MODULE_VISITS:,} module visits "
                              f"(submodules shared at every level?)", path)
        if id(node) in on_path:
            raise FormatError(f"module {prefix.rstrip('.') or '(top)'} contains itself", path)
        on_path.add(id(node))
        stack.append((node, None))
        if versions is not None:  # (module name, its class's version), as state_dict()'s _metadata has them
            versions.append((prefix[:-1], MODULE_VERSIONS.get(node.qualname, 1)))
        known = seen.get(id(node))
        if known is None:  # a shared submodule is worked out once, then named under each of its names
            known = seen[id(node)] = _module_entries(node, members, unmodeled is not None)
        entries, kids, problems = known
        for name, t, is_detached in entries:
            out[prefix + name] = t
            if detached is not None and is_detached:
                detached.add(prefix + name)
        for name, qual, n in problems:
            unmodeled.append(((prefix + name).rstrip(".") or "(top)", qual, n))
        for name, child in reversed(kids):
            stack.append((child, f"{prefix}{name}."))
    return out


def _module_entries(node: Any, members, want_unmodeled: bool):
    """One module's own state_dict entries ``(name, tensor, detached)``, its children ``(name, module)`` and,
    if asked, the tensors its own code would name that are not modelled ``(name, qualname, count)``."""
    state = _stub_state(node) or {}
    entries, kids, problems = [], [], []
    if module_kind(node) == "pickled":
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(non_persistent, (set, frozenset, list, tuple)):
            non_persistent = set()
        for name, t in _items(state.get("_parameters")):
            if isinstance(t, TensorRef):
                entries.append((name, t, t.is_parameter))
        for name, t in _items(state.get("_buffers")):
            if isinstance(t, TensorRef) and name not in non_persistent:
                entries.append((name, t, False))
        own = quantized_entries(node)  # a quantized module's own state_dict() code, modelled
        for name, t in own or ():
            entries.append((name, t, False))
        kids = [(name, c) for name, c in _items(state.get("_modules"))
                if module_kind(c) or quantized_entries(c)]
        qual = f"{type(node).stub_module}.{type(node).stub_name}"
        if want_unmodeled and own is None:
            others = {k: v for k, v in state.items() if k not in ("_parameters", "_buffers", "_modules")}
            n = _holds_tensors(others) if qual.startswith(_OWN_STATE_DICT) else 0
            if n:
                problems.append(("", qual, n))
        if want_unmodeled:
            for name, c in _items(state.get("_modules")):  # a child module pickled otherwise (a tuple state)
                if isinstance(c, Stub) and not module_kind(c) and quantized_entries(c) is None:
                    n = _holds_tensors(c)
                    if n:
                        problems.append((name, c.qualname, n))
    elif quantized_entries(node):  # a quantized conv: its state is a tuple, its entries its own
        entries = [(name, t, False) for name, t in quantized_entries(node)]
    else:  # TorchScript
        qual = f"{type(node).stub_module}.{type(node).stub_name}"
        params, buffers = (members or {}).get(qual, (None, None))
        tensor_attrs = [(k, v) for k, v in state.items() if isinstance(v, TensorRef)]
        if params is None:  # class code not found: every tensor attribute is state
            entries = [(k, v, False) for k, v in tensor_attrs]
        else:
            entries = [(k, v, False) for wanted in (params, buffers) for k, v in tensor_attrs if k in wanted]
        kids = [(k, v) for k, v in state.items() if module_kind(v) == "script"]
    return entries, kids, problems


def _items(obj: Any):
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    return []


def children(obj: Any) -> Iterator[Tuple[str, Any]]:
    """The named children of a tree node (dict keys, list indices, a stub's state)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k), v
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield str(i), v
    elif isinstance(obj, Stub):
        state = _stub_state(obj)
        if state is not None:
            yield from ((str(k), v) for k, v in state.items())
        elif obj.state is not None:
            yield "state", obj.state
        for i, a in enumerate(obj.args):
            yield f"arg{i}", a
        for k, v in obj.items.items():
            yield str(k), v
        for i, v in enumerate(obj.list_items):
            yield str(i), v


# Paths deeper than this are not followed by all_tensors: no checkpoint nests its tensors so deep,
# and naming a tensor at depth d costs d, so a file of deep chains would cost depth**2.
MAX_TENSOR_DEPTH = 1000


def all_tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, TensorRef]]:
    """Every tensor in the tree with its ``/``-joined path, depth first (each node visited once).

    Paths are kept as parent links and joined only for the tensors found, so a deep
    tree without tensors costs time linear in its size. A tensor nested deeper
    than ``MAX_TENSOR_DEPTH`` is a FormatError.
    """
    seen = set()
    stack: List[Tuple[Any, Any, int]] = [(None if not prefix else (None, prefix), obj, 0)]
    while stack:
        link, node, depth = stack.pop()
        if isinstance(node, TensorRef):
            parts = []
            while link is not None:
                link, part = link
                parts.append(part)
            yield "/".join(reversed(parts)), node
            continue
        if node is None or isinstance(node, (str, bytes, int, float, bool)) or id(node) in seen:
            continue
        seen.add(id(node))
        if depth >= MAX_TENSOR_DEPTH:
            if any(isinstance(v, TensorRef) or not isinstance(v, (str, bytes, int, float, bool, type(None)))
                   for _, v in children(node)):
                raise FormatError(f"entries nested more than {MAX_TENSOR_DEPTH} levels deep")
            continue
        stack.extend(reversed([((link, k), v, depth + 1) for k, v in children(node)]))


def get_entry(root: Any, key: str, path: Optional[str] = None) -> Any:
    """Follow ``a/b/c`` through dicts, lists and stubs; KeyNotFoundError names what exists."""
    node = root
    walked = []
    for part in key.split("/"):
        found = False
        for k, v in children(node):
            if k == part:
                node, found = v, True
                break
        if not found:
            where = "/".join(walked) or "the top level"
            keys = [k for k, _ in children(node)][:12]
            raise KeyNotFoundError(f"no entry {part!r} under {where}; entries there: {', '.join(keys) or 'none'}",
                                   path)
        walked.append(part)
    return node


def _as_state_dict(node: Any, entry: Optional[str], ckpt: Checkpoint) -> Optional[StateDict]:
    if is_tensor_dict(node):
        meta = getattr(node, "_metadata", None)  # a saved state_dict's own (torch.save keeps the attribute)
        meta = meta if isinstance(meta, dict) else None
        if all(map(isinstance, node.values(), itertools.repeat(TensorRef))):
            return StateDict(entry, "state_dict", collections.OrderedDict(node), torch_metadata=meta)
        return StateDict(entry, "state_dict", collections.OrderedDict((k, as_entry(v)) for k, v in node.items()),
                         torch_metadata=meta)
    kind = module_kind(node)
    if kind:
        members = ckpt.metadata.get("_script_members")
        unmodeled: list = []
        versions: list = []
        detached: set = set()
        sd = module_state_dict(node, members, ckpt.path, unmodeled, versions if kind == "pickled" else None,
                               detached)
        meta = collections.OrderedDict((name, {"version": v}) for name, v in versions) if versions else None
        return StateDict(entry, f"{kind}_module", sd, type(node).stub_module + "." + type(node).stub_name,
                         tuple(unmodeled), torch_metadata=meta, detached=frozenset(detached))
    return None


def _choose(found: List[Tuple[str, StateDict]], ckpt: Checkpoint) -> StateDict:
    """Of several state_dicts a checkpoint holds, the one the library that wrote it loads (and why)."""
    keys = dict(found)
    candidates = tuple((k, len(sd.tensors)) for k, sd in found)
    ultralytics = any((sd.module_class or "").startswith("ultralytics.") for _, sd in found)
    ema = next((k for k in ("state_dict_ema", "model_ema") if k in keys), None)
    root = ckpt.root if isinstance(ckpt.root, dict) else {}
    if ultralytics and "ema" in keys:
        key, reason = "ema", "ultralytics loads ckpt['ema'] or ckpt['model'] (the EMA weights when present)"
    elif ema and "arch" in root:  # timm's CheckpointSaver writes 'arch'; its loaders default to use_ema=True
        key, reason = ema, f"a timm checkpoint: timm's load_state_dict / load_checkpoint take {ema} (use_ema=True, " \
                           "their default)"
    else:
        key = found[0][0]
        reason = f"the first of the usual state_dict keys ({', '.join(k for k, _ in found)})"
        if ema and key != ema:
            reason += f"; timm's loaders would take {ema} (use_ema=True)"
    return dataclasses.replace(keys[key], candidates=candidates, reason=reason)


def require_complete(sd: StateDict, path: Optional[str] = None) -> StateDict:
    """``sd``, unless torch's state_dict() of its module holds tensors ckpttool cannot name: then a UsageError
    (a smaller output, or a comparison that skips them, would be a silent difference)."""
    if sd.unmodeled:
        name, qual, n = sd.unmodeled[0]
        more = f" (and {len(sd.unmodeled) - 1} more modules)" if len(sd.unmodeled) > 1 else ""
        raise UsageError(f"module {name} ({qual}) holds {n} tensor(s) its own state_dict() code names (quantized "
                         f"packed parameters), which ckpttool does not model yet{more}: its state_dict cannot be "
                         "read completely; --key can name an entry that is a plain state_dict", path)
    return sd


def find_state_dict(ckpt: Checkpoint, key: Optional[str] = None) -> StateDict:
    """Pick the state_dict of ``ckpt`` (or of entry ``key``), as described in the module doc."""
    if key:
        node = get_entry(ckpt.root, key, ckpt.path)
        sd = _as_state_dict(node, key, ckpt)
        if sd is not None:
            return sd
        tensors = collections.OrderedDict(all_tensors(node))
        return StateDict(key, "all_tensors", tensors)
    sd = _as_state_dict(ckpt.root, None, ckpt)
    if sd is not None:
        return sd
    if isinstance(ckpt.root, dict):
        found = [(k, sd) for k in STATE_DICT_KEYS if k in ckpt.root
                 for sd in [_as_state_dict(ckpt.root[k], k, ckpt)] if sd is not None]
        if found:
            return _choose(found, ckpt)
        # An empty dict of tensors under a usual key is still the state_dict.
        for k in STATE_DICT_KEYS:
            if isinstance(ckpt.root.get(k), dict) and not ckpt.root[k]:
                return StateDict(k, "state_dict", collections.OrderedDict())
    return StateDict(None, "all_tensors", collections.OrderedDict(all_tensors(ckpt.root)))


def open_state_dict(src: Any, key: Optional[str] = None) -> Tuple[Checkpoint, "StateDict"]:
    """``(checkpoint, its state_dict)`` for a path or an opened Checkpoint; errors name the file."""
    from .formats import open as open_checkpoint
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    try:
        return ckpt, require_complete(find_state_dict(ckpt, key), ckpt.path)
    except FormatError as e:
        e.path = e.path or ckpt.path
        raise
    except KeyNotFoundError as e:
        e.path = e.path or ckpt.path
        raise
