"""``convert``: a checkpoint's state_dict to a torch.save file or safetensors, streamed from the bytes.

No code from the file runs: a pickled full model's state_dict comes from the
pickle's own records. Tensors are read from the source and written to the
output a storage (or a tensor) at a time, so memory stays near one chunk
whatever the checkpoint's size. The output is written beside its target,
read back through the readers and checked (names, shapes, dtypes; with
``check=True`` every byte) before it is renamed into place.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .align import Rename, apply_renames, common_prefix
from .dtypes import DTYPES, itemsize, parse_dtype  # noqa: F401 (DTYPES: where callers found it)
from .errors import CheckFailedError, CkptError, FileAccessError, UsageError
from .formats import open as open_checkpoint
from .formats.safetensors_writer import EntryOut, parse_size, write_safetensors, write_shards
from .formats.torch_writer import StorageOut, TensorOut, rebuild_out, storages_of, write_torch_zip
from .formats.write import shards_to, target_format
from .comparing import pieces
from .checkpoint import Checkpoint, TensorRef
from .results import ConvertResult
from .spans import read_pieces
from .text import plural
from .tree import StateDict, find_state_dict, open_state_dict
from .writing import atomic_output, check_output, folder_output, writing

Progress = Optional[Callable[[int, int], None]]
CHUNK = 1 << 24  # 16 MiB of source bytes per read
FLOATING = ("float64", "float32", "float16", "bfloat16")


def parse_metadata(items: Sequence[str]) -> Dict[str, str]:
    """``["k=v", ...]`` -> dict (values are kept as text, as safetensors stores them)."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"--metadata {item!r} is not KEY=VALUE")
        out[k] = v
    return out


def cast_chunks(raw: Callable[[], Iterator[bytes]], src: str, dst: str) -> Callable[[], Iterator[bytes]]:
    """Bytes of ``src`` elements -> bytes of the same elements as ``dst`` (chunks are whole elements)."""
    def gen() -> Iterator[bytes]:
        import torch
        from .torch_bridge import torch_dtype
        s, d = torch_dtype(src), torch_dtype(dst)
        for chunk in raw():
            if chunk:
                t = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(s).to(d)
                yield t.view(torch.uint8).numpy().tobytes()
    return gen


def _span_chunks(source: Any, start: int, size: int, elem: int) -> Callable[[], Iterator[bytes]]:
    """The bytes ``[start, start + size)`` of ``source`` in pieces of whole elements (``read_pieces``: each
    a view of a reused buffer where the source can ``readinto``; the writers write each before the next)."""
    step = max(elem, CHUNK - CHUNK % elem)
    return lambda: read_pieces(source, start, size, step)


def _needs_data(name: str, t: TensorRef, path: str) -> None:
    if not t.has_data:
        raise UsageError(f"tensor {name} has no data in the file (a {t.kind} tensor); it cannot be converted", path)
    if t.kind != "dense":
        raise UsageError(f"tensor {name} is a {t.kind} tensor; converting it is not supported", path)


def _out_dtype(t: TensorRef, cast: Optional[str]) -> str:
    return cast if cast and t.dtype in FLOATING and t.rebuild is None else t.dtype


def _written_as_rebuilt(t: TensorRef) -> bool:
    """Written to a torch.save file by the call the source wrote (sparse, nested, quantized, meta, subclasses...)."""
    return t.rebuild is not None


def torch_tree(tensors: Mapping[str, TensorRef], cast: Optional[str], path: str,
               metadata: Optional[Any] = None, detached: frozenset = frozenset()) -> "collections.OrderedDict":
    """TensorOut leaves over the source storages: each storage copied once, views and ties kept. A tensor the
    source rebuilt by a call of its own (sparse, nested, quantized, meta, a subclass) is written by that same
    call, its component tensors and storages written as the others are."""
    storages: Dict[Tuple[int, str], StorageOut] = {}
    made: Dict[Any, Any] = {}  # what the source shares (a tensor, a rebuild's dict) stays shared when written

    def storage_out(ref, dtype: str, dst: str) -> StorageOut:
        ident = (id(ref), dtype)
        s = storages.get(ident)
        if s is None:
            size = itemsize(dtype) or 1
            nbytes = ref.nbytes - ref.nbytes % size
            raw = _span_chunks(ref.source, 0, nbytes, size)
            if dst != dtype:
                s = StorageOut(str(len(storages)), dst, nbytes // size * itemsize(dst), cast_chunks(raw, dtype, dst))
            else:
                s = StorageOut(str(len(storages)), dtype, nbytes, raw)
            storages[ident] = s
        return s

    def tensor_out(t: TensorRef, name: str, dst: Optional[str] = None) -> Any:
        # one tensor object of the source (the same tensor under two names, or inside a subclass and its state)
        # is one written object: the writer fetches it from the pickle's memo, as torch.save does
        key = (id(t), dst)
        got = made.get(key)
        if got is None:
            got = made[key] = _tensor_out(t, name, dst)
        return got

    def _tensor_out(t: TensorRef, name: str, dst: Optional[str] = None) -> Any:
        if _written_as_rebuilt(t):
            try:
                return rebuild_out(t.rebuild, lambda u: tensor_out(u, name),
                                   lambda ref: storage_out(ref, ref.dtype, ref.dtype), made)
            except ValueError as e:
                raise UsageError(f"tensor {name} ({t.form}) cannot be written back: it holds {e}", path) from None
        _needs_data(name, t, path)
        s = storage_out(t.storage, t.dtype, dst or t.dtype)
        if name in detached:  # a module's parameter: state_dict() gives param.detach(), a plain tensor
            return TensorOut(s, tuple(t.shape), tuple(t.stride), t.storage_offset, metadata=t.metadata)
        return TensorOut(s, tuple(t.shape), tuple(t.stride), t.storage_offset, requires_grad=t.requires_grad,
                         metadata=t.metadata, parameter=t.is_parameter)

    out: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
    if metadata is not None:  # the state_dict's _metadata (module versions): load_state_dict reads it
        out._metadata = rebuild_out(metadata, lambda u: u, lambda ref: ref)
    held = [(name, t) for name, t in tensors.items() if cast and t.rebuild is not None and t.dtype in FLOATING]
    if held:  # every one, at once
        shown = ", ".join(f"{name} ({t.form})" for name, t in held[:5]) + (f" and {len(held) - 5} more"
                                                                           if len(held) > 5 else "")
        raise UsageError(f"--dtype does not apply to {plural(len(held), 'tensor')} torch rebuilds by a call of its "
                         f"own: {shown}; convert without --dtype", path)
    for name, t in tensors.items():
        out[name] = tensor_out(t, name, _out_dtype(t, cast))
    return out


def _contiguous_chunks(t: TensorRef) -> Callable[[], Iterator[bytes]]:
    if t.is_contiguous or t.numel <= 1:
        start, _ = t.span()
        return _span_chunks(t.storage.source, start, t.nbytes, t.itemsize)

    def gen() -> Iterator[bytes]:  # a strided view: gathered a block of rows at a time
        yield from t.iter_chunks()
    return gen


def safetensors_entries(tensors: Mapping[str, TensorRef], cast: Optional[str],
                        path: str) -> Tuple[List[EntryOut], Dict[str, str]]:
    """Entries to write and ``{dropped name: kept name}`` for tensors that share a storage.

    As ``safetensors.torch.save_model`` does: of names over the same bytes, the first
    (sorted) that covers its whole storage is written and the others are recorded in
    the metadata, so ``load_model`` ties them again. Views with no such name are
    written each on its own.
    """
    held = [(name, t) for name, t in tensors.items() if not_plain(t)]
    if held:
        raise UsageError(refusal("safetensors holds plain dense tensors only", held), path)
    _dtypes_held(tensors, cast, path)
    groups: Dict[int, List[str]] = collections.defaultdict(list)
    for name, t in tensors.items():
        _needs_data(name, t, path)
        groups[id(t.storage)].append(name)
    dropped: Dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        complete = sorted(n for n in names if covers_storage(tensors[n]))
        if complete:
            keep = complete[0]
            for n in names:
                if n != keep and _same_bytes_region(tensors[n], tensors[keep]):
                    dropped[n] = keep
    entries = []
    for name, t in tensors.items():
        if name in dropped:
            continue
        dst = _out_dtype(t, cast)
        raw = _contiguous_chunks(t)
        entries.append(EntryOut(name, dst, tuple(t.shape), cast_chunks(raw, t.dtype, dst) if dst != t.dtype else raw))
    return entries, dropped


def not_plain(t: TensorRef) -> bool:
    """Not a plain dense tensor: safetensors cannot hold it as it is."""
    return t.rebuild is not None or bool(t.metadata) or t.kind != "dense"


WRAPPERS = ("module", "_orig_mod")  # DataParallel / DDP, torch.compile: prefixes no model's own names have


def wrapper_prefix(names: Sequence[str]) -> str:
    """The wrapper prefix every name carries (``module.``, ``_orig_mod.module.``...), or ``""``."""
    parts = []
    for part in common_prefix(list(names)):
        if part not in WRAPPERS:
            break
        parts.append(part)
    return "".join(p + "." for p in parts)


def rename_state_dict(sd: StateDict, rules: Sequence[Rename], align: bool, path: str
                      ) -> Tuple[StateDict, Tuple[Tuple[str, str], ...]]:
    """``sd`` with a wrapper prefix stripped (``align``) and the rename rules applied; ``renamed`` says what
    changed: ``(("prefix", "module."), ("rule", "^backbone\\.=encoder."), ("renamed", "N of M")...)``.
    Two names landing on one, or a name renamed to nothing, is a UsageError: nothing is written."""
    prefix = wrapper_prefix(list(sd.tensors)) if align else ""
    if not prefix and not rules:
        return sd, ()

    def new(name: str) -> str:
        return apply_renames(name[len(prefix):], rules)

    out: "collections.OrderedDict[str, TensorRef]" = collections.OrderedDict()
    names: Dict[str, str] = {}
    changed = 0
    for name, t in sd.tensors.items():
        to = new(name)
        if not to:
            raise UsageError(f"--rename makes key {name!r} an empty name", path)
        if to in names:
            raise UsageError(f"keys {names[to]!r} and {name!r} both become {to!r}; check the --rename rules", path)
        names[to] = name
        out[to] = t
        changed += to != name
    meta = sd.torch_metadata
    if isinstance(meta, dict):  # each module's version, under its new name (a module's name + "." renamed)
        moved = collections.OrderedDict()
        for module, v in meta.items():
            m = str(module)
            if prefix and (m + ".").startswith(prefix):
                m = m[len(prefix):] if len(m) >= len(prefix) else ""
            m = apply_renames(m + "." if m else m, rules).rstrip(".") if rules else m
            moved.setdefault(m, v)
        meta = moved
    detached = frozenset(new(n) for n in sd.detached)
    said = ((("prefix", prefix),) if prefix else ()) + tuple(("rule", f"{r.pattern.pattern}={r.repl}")
                                                            for r in rules) + (("renamed", f"{changed} of {len(out)}"),)
    return dataclasses.replace(sd, tensors=out, torch_metadata=meta, detached=detached), said


def no_dense_form(t: TensorRef) -> Optional[str]:
    """Why ``--dense`` cannot give a plain tensor for ``t`` (None where torch can)."""
    if t.kind in ("nested", "jagged"):
        return "its rows differ in length"
    if t.kind == "meta":
        return "a meta tensor has no data"
    if t.kind == "value":
        return "a state_dict value that is not a tensor"
    if t.kind == "packed":
        return "a quantized module's packed (weight, bias), not one tensor"
    return None


def refusal(what: str, held: List[Tuple[str, TensorRef]]) -> str:
    """One line: which tensors a format cannot hold as they are, and the way forward that works for all."""
    shown = ", ".join(f"{name} ({t.form})" for name, t in held[:5]) + (f" and {len(held) - 5} more"
                                                                       if len(held) > 5 else "")
    no_dense = [(name, why) for name, t in held for why in [no_dense_form(t)] if why]
    out = f"{what}; {len(held)} tensor(s) here are not: {shown}; a .pt output (-o NAME.pt) holds them exactly"
    if not no_dense:
        out += (", or --dense writes the plain tensor torch gives for each (sparse densified, quantized "
                "dequantized, a view resolved: the form is not kept)")
    else:
        out += "; --dense cannot: no dense form for " + ", ".join(f"{name} ({why})" for name, why in no_dense[:3]) \
            + (f" and {len(no_dense) - 3} more" if len(no_dense) > 3 else "")
    return out


def _dtypes_held(tensors: Mapping[str, TensorRef], cast: Optional[str], path: str) -> None:
    """Every dtype safetensors cannot hold, with the tensors of it, in one line (before anything is written)."""
    from .formats.safetensors_writer import dtype_code
    bad: Dict[str, List[str]] = {}
    for name, t in tensors.items():
        dtype = cast if cast and t.dtype in FLOATING else t.dtype
        try:
            dtype_code(dtype)
        except UsageError:
            bad.setdefault(dtype, []).append(name)
    if bad:
        said = "; ".join(f"{dt}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
                         for dt, names in bad.items())
        raise UsageError(f"safetensors cannot hold {', '.join(bad)} tensors (the installed safetensors does not "
                         f"write and read them back): {said}; a .pt output (-o NAME.pt) holds them", path)


def densify(tensors: Mapping[str, TensorRef], path: str) -> Tuple[Dict[str, TensorRef], Dict[str, str]]:
    """``--dense``: each tensor that is not plain dense, as the dense tensor torch gives for it (imports torch).

    The tensor is written alone to a scratch torch.save file by the call the source wrote and loaded back with
    ``torch.load(weights_only=True)``: torch itself rebuilds it; then a sparse tensor is densified, a conj/neg
    view resolved, a quantized (or torchao) tensor dequantized. Returns the dense tensors as in-memory
    TensorRefs and, per name, what was done. A nested tensor (rows of different lengths), a meta tensor (no
    data) or a subclass with no dequantize() is refused.
    """
    import tempfile
    import warnings
    from .formats.torch_writer import write_torch_zip
    from .torch_bridge import from_torch
    out: Dict[str, TensorRef] = {}
    how: Dict[str, str] = {}
    todo = {n: t for n, t in tensors.items() if not_plain(t)}
    if not todo:
        return out, how
    no_dense = [(name, t, why) for name, t in todo.items() for why in [no_dense_form(t)] if why]
    if no_dense:  # all of them, at once
        shown = ", ".join(f"{name} ({t.form}: {why})" for name, t, why in no_dense[:3])
        raise UsageError(f"--dense: {len(no_dense)} tensor(s) have no dense form: {shown}"
                         f"{f' and {len(no_dense) - 3} more' if len(no_dense) > 3 else ''}; write them to .pt "
                         "(--to state_dict)", path)
    import torch
    with tempfile.TemporaryDirectory(prefix="ckpttool-dense-") as d:
        for name, t in todo.items():
            scratch = os.path.join(d, "one.pt")
            write_torch_zip(scratch, torch_tree({name: t}, None, path))
            _import_subclass_package(t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    x = torch.load(scratch, weights_only=True)[name]
                    if x.layout != torch.strided:
                        x, did = x.to_dense(), "densified (to_dense(); the layout is not kept)"
                    elif x.is_quantized or type(x) not in (torch.Tensor, torch.nn.Parameter):
                        # torchao's subclasses dequantize themselves
                        x, did = x.dequantize(), "dequantized (dequantize(); the quantization is not kept)"
                    elif x.is_conj() or x.is_neg():
                        x, did = x.resolve_conj().resolve_neg(), "resolved (the values torch gives; the view " \
                                                                 "bit is not kept)"
                    else:
                        x, did = x.detach(), "a plain tensor (the attributes are not kept)"
                    if type(x) not in (torch.Tensor, torch.nn.Parameter) or x.layout != torch.strided:
                        raise TypeError(f"it became a {type(x).__name__}")
                except Exception as e:  # noqa: BLE001 - torch's own refusal, said in one line
                    first = str(e).splitlines()[0][:120] if str(e) else ""
                    raise UsageError(f"--dense: torch cannot make tensor {name} ({t.form}) dense here: "
                                     f"{type(e).__name__}: {first}; write it to .pt (--to state_dict)", path) from None
            out[name] = from_torch(x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x, name)
            how[name] = f"{t.form} -> {out[name].dtype}, {did}"
    return out, how


# what torch.load(weights_only=True) needs imported to rebuild a subclass: known packages only, never a module
# the file names (importing one runs its top level: torch.utils.model_dump.__main__ runs a CLI)
_SUBCLASS_IMPORTS = {"torchao": ("torchao",), "torch.nested": ("torch.nested", "torch._dynamo"),
                     "torch.distributed.tensor": ("torch.distributed.tensor",)}


def _import_subclass_package(t: TensorRef) -> None:
    """torch.load(weights_only=True) rebuilds torchao's (and torch's nested / distributed) tensor subclasses
    only once their package is imported: the installed library's, from a fixed list."""
    import importlib
    import importlib.util
    module = (t.subclass or "").rpartition(".")[0]
    for prefix, imports in _SUBCLASS_IMPORTS.items():
        if module == prefix or module.startswith(prefix + "."):
            for name in imports:
                if importlib.util.find_spec(name.partition(".")[0]) is not None:
                    importlib.import_module(name)
            return


def covers_storage(t: TensorRef) -> bool:
    return t.storage_offset == 0 and t.is_contiguous and t.nbytes == t.storage.nbytes


def _same_bytes_region(a: TensorRef, b: TensorRef) -> bool:
    # a tied twin: the same shape, dtype, offset and stride over the same storage
    return (a.shape, a.dtype, a.storage_offset, a.stride) == (b.shape, b.dtype, b.storage_offset, b.stride)


def convert(source: Union[str, Checkpoint], out: str, to: Optional[str] = None, key: Optional[str] = None,
            dtype: Optional[str] = None, metadata: Union[Sequence[str], Mapping[str, str]] = (),
            max_shard_size: Optional[Union[str, int]] = None, force: bool = False, check: bool = False,
            progress: Progress = None, dense: bool = False, renames: Sequence[str] = (), align: bool = True,
            **onnx_options: Any) -> ConvertResult:
    """Convert ``source``'s state_dict to ``out`` (format from ``to`` or OUT's extension).

    Names: a wrapper prefix every key carries (``module.`` of DataParallel/DDP, ``_orig_mod.`` of
    torch.compile, nested in any order) is stripped unless ``align=False``, then the ``renames`` rules
    (``REGEX=REPL``, in order) apply, as filter does; the result's ``renamed`` says what changed.
    ``dense`` (safetensors only): write each tensor safetensors cannot hold as the dense tensor torch gives
    for it (lossy; see :func:`densify`), listed in the result's ``densified``. ``dtype`` (fp16/bf16/fp32)
    casts floating tensors only. ``metadata`` goes into a
    safetensors header; ``max_shard_size`` (``"5GB"``) makes OUT a folder of HF-style
    shards with ``model.safetensors.index.json``. ``check`` compares every byte of the
    output with the source after writing.

    >>> r = convert("full_model.pth", "model.safetensors")   # doctest: +SKIP
    >>> r.tensors, r.format                                    # doctest: +SKIP
    (19, 'safetensors')
    """
    if max_shard_size not in (None, ""):
        to = shards_to(os.fspath(out), to)
    fmt = target_format(os.fspath(out), to)
    if fmt == "onnx" and renames:
        raise UsageError("--rename is for state_dict, safetensors and dcp output (ONNX names come from the model)")
    rules = [Rename.parse(r) if isinstance(r, str) else r for r in renames]  # bad rules fail before any reading
    if fmt == "onnx":
        from .onnx_export import export_onnx
        return export_onnx(source, out, key=key, dtype=dtype, force=force, progress=progress, **onnx_options)
    if onnx_options:
        unused = ", ".join(sorted(k for k, v in onnx_options.items() if v not in (None, (), False)))
        if unused:
            raise UsageError(f"{unused}: only for --to onnx")
    cast = parse_dtype(dtype)
    meta = dict(metadata) if isinstance(metadata, Mapping) else parse_metadata(metadata)
    if meta and fmt != "safetensors":
        raise UsageError("--metadata is only for safetensors output")
    shard = parse_size(max_shard_size) if max_shard_size not in (None, "") else None
    if shard and fmt not in ("safetensors", "state_dict"):
        raise UsageError("--max-shard-size is for safetensors and state_dict (.bin shards) output")

    if dense and fmt != "safetensors":
        raise UsageError("--dense is for safetensors output (a torch.save file holds every tensor as it is)")
    ckpt, sd = open_state_dict(source if isinstance(source, Checkpoint) else os.fspath(source), key)
    if not sd.tensors:
        raise UsageError("the checkpoint holds no tensors to convert", ckpt.path)
    sd, renamed = rename_state_dict(sd, rules, align, ckpt.path)
    densified: Dict[str, str] = {}
    if dense:
        made, densified = densify(sd.tensors, ckpt.path)
        sd = dataclasses.replace(sd, tensors=collections.OrderedDict((n, made.get(n, t)) for n, t in sd.tensors.items()))
    out = check_output(os.fspath(out), list(ckpt.files or (ckpt.path,)) + [ckpt.path], force,
                       folder=bool(shard) or fmt == "dcp")
    total = 0
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    dropped: Dict[str, str] = {}
    try:
        if fmt == "dcp":
            with writing(out):
                files, checked = _write_dcp(out, sd, cast, check)
        elif fmt == "state_dict":
            tree = torch_tree(sd.tensors, cast, ckpt.path, sd.torch_metadata, sd.detached)
            total = sum(s.nbytes for s in storages_of(tree))
            with writing(out):
                if shard is None:
                    with atomic_output(out) as tmp:
                        write_torch_zip(tmp, tree, progress=tick)
                        checked = _check(tmp, sd, dict(tree), cast, check, dropped={})
                    files = [out]
                else:
                    files, checked = _write_torch_shards(out, tree, shard, sd, cast, check, tick)
        else:
            entries, dropped = safetensors_entries(sd.tensors, cast, ckpt.path)
            meta = {"format": "pt", **dropped, **meta}
            total = sum(e.nbytes for e in entries)
            with writing(out):
                if shard is None:
                    with atomic_output(out) as tmp:
                        write_safetensors(tmp, entries, meta, progress=tick)
                        checked = _check(tmp, sd, {e.name: e for e in entries}, cast, check, dropped)
                    files = [out]
                else:
                    files, checked = _write_shards(out, entries, meta, shard, sd, cast, check, dropped, tick)
    except CkptError as e:  # what the writer refuses is about this source
        if e.path is None:
            e.path = ckpt.path
        raise
    n = len(sd.tensors) - len(dropped)
    dequantized = tuple((name, f"{t.encoding} -> {cast or t.dtype}") for name, t in sd.tensors.items() if t.encoding)
    return ConvertResult(source=ckpt.path, source_format=ckpt.format, entry=sd.entry, entry_source=sd.source,
                         output=out, format=({"state_dict": "torch_sharded", "safetensors": "safetensors_sharded"}
                                             if shard else {"state_dict": "torch_zip"}).get(fmt, fmt), tensors=n,
                         files=tuple(files), tied=tuple(sorted(dropped.items())), cast_to=cast,
                         densified=tuple(densified.items()), renamed=renamed, dequantized=dequantized,
                         bytes_written=sum(os.path.getsize(f) for f in files), checked=checked)


def _write_shards(out: str, entries: List[EntryOut], meta: Dict[str, str], max_bytes: int, sd: StateDict,
                  cast: Optional[str], check: bool, dropped: Dict[str, str], tick) -> Tuple[List[str], Dict[str, Any]]:
    """OUT as a folder: shards + model.safetensors.index.json, built in a temporary folder then renamed."""
    with folder_output(out) as tmpdir:
        names = write_shards(tmpdir, entries, max_bytes, meta, progress=tick)
        checked = _check(tmpdir, sd, {e.name: e for e in entries}, cast, check, dropped)
    return [os.path.join(out, n) for n in names], checked


def shard_item(name: str, value: Any) -> Tuple[str, int, int]:
    """(name, storage identity, bytes) of a value to write: a plain tensor's storage; a tensor torch rebuilds
    from several (sparse, quantized, a subclass) by its first one and all of their bytes; none (meta): 0."""
    if isinstance(value, TensorOut):
        return name, id(value.storage), value.storage.nbytes
    storages = storages_of(value)
    return name, id(storages[0]) if storages else id(value), sum(s.nbytes for s in storages)


def _write_torch_shards(out: str, tree: Mapping[str, Any], max_bytes: int, sd: StateDict, cast: Optional[str],
                        check: bool, tick) -> Tuple[List[str], Dict[str, Any]]:
    """OUT as a folder of torch.save shards (``pytorch_model-0000N-of-0000M.bin``) + ``pytorch_model.bin.index.json``,
    streamed a storage at a time like a single .pt; tensors sharing a storage stay in one shard."""
    from .formats.write import write_torch_shard_files
    with folder_output(out) as tmpdir:
        names = write_torch_shard_files(
            tmpdir, [shard_item(n, t) for n, t in tree.items()], max_bytes,
            lambda p, shard: write_torch_zip(p, collections.OrderedDict((n, tree[n]) for n in shard), progress=tick))
        checked = _check(tmpdir, sd, dict(tree), cast, check, dropped={})
    return [os.path.join(out, n) for n in names], checked


# up to this many bytes of tensors, --to dcp writes one .distcp file (which DCP's writer holds in memory whole)
DCP_SINGLE_FILE = 256 << 20


def _write_dcp(out: str, sd: StateDict, cast: Optional[str], check: bool) -> Tuple[List[str], Dict[str, Any]]:
    """OUT as a torch.distributed.checkpoint folder, written by torch's own dcp.save (single process).

    dcp.save plans from the state_dict it is given and asks its planner for each tensor's data
    only when its FileSystemWriter writes that tensor. So it is given meta tensors (shapes and
    dtypes, no bytes) and a planner that reads each tensor from the source at that moment. The
    writer keeps every tensor of a .distcp file until the file is done, so a state_dict of more
    than DCP_SINGLE_FILE bytes is written one file per tensor (DCP's ``single_file_per_rank=False``):
    one tensor in memory at a time (read straight into its torch tensor; torch.save may hold a copy
    while it writes it). Either way the folder is DCP's own layout.
    """
    import warnings
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType
    from .torch_bridge import torch_dtype

    plan = {}
    for name, t in sd.tensors.items():
        _needs_data(name, t, "")
        plan[name] = torch.empty(t.shape, dtype=torch_dtype(_out_dtype(t, cast)), device="meta")

    class _ReadWhenWritten(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name = write_item.index.fqn
            t = sd.tensors[name]
            x = t.to_torch()
            dst = _out_dtype(t, cast)
            return x.to(torch_dtype(dst)) if dst != t.dtype else x

    class _Writer(dcp.FileSystemWriter):
        def storage_meta(self):  # the folder's final name, not the temporary one it is written in
            meta = super().storage_meta()
            return dataclasses.replace(meta, checkpoint_id=out) if meta is not None else meta

    total = sum(x.numel() * x.element_size() for x in plan.values())  # bytes as written, after any cast
    with folder_output(out) as tmpdir:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no process group: dcp says it assumes a single process
            writer = _Writer(tmpdir, single_file_per_rank=total <= DCP_SINGLE_FILE, thread_count=1, sync_files=True)
            try:
                dcp.save(plan, storage_writer=writer, planner=_ReadWhenWritten())
            except CheckpointException as e:  # dcp wraps whatever failed (a full disk, a corrupt source, Ctrl-C)
                inner = next((f[0] for f in e.failures.values() if isinstance(f, tuple) and f
                              and isinstance(f[0], BaseException)), None)
                if isinstance(inner, (CkptError, OSError, KeyboardInterrupt, MemoryError)):
                    raise inner from None  # ours (a corrupt source), a full disk, Ctrl-C: as anywhere else
                # torch.save inside dcp turns a failed write (a full disk) into a RuntimeError
                why = f"{type(inner).__name__}: {inner}" if inner is not None else str(e)
                raise FileAccessError("cannot write the output: torch.distributed.checkpoint.save failed: "
                                      + " ".join(why.split())[:200], out) from None
        checked = _check(tmpdir, sd, plan, cast, check, {})
        files = sorted(os.listdir(tmpdir))
    return [os.path.join(out, n) for n in files], checked


def _check(path: str, sd: StateDict, written: Mapping[str, Any], cast: Optional[str], every_byte: bool,
           dropped: Mapping[str, str]) -> Dict[str, Any]:
    """Read the output back through the readers; names, shapes, dtypes (and bytes) must be the source's."""
    back = find_state_dict(open_checkpoint(path)).tensors
    expected = list(sd.tensors)  # tied names dropped from a safetensors file come back from its header
    if sorted(back) != sorted(expected):
        missing = sorted(set(expected) - set(back))[:1]
        extra = sorted(set(back) - set(expected))[:1]
        raise CheckFailedError(f"output holds other names than the source (missing {missing}, extra {extra})")
    compared = 0
    for name in expected:
        src, got = sd.tensors[name], back[name]
        want_dtype = _out_dtype(src, cast)
        if got.shape != src.shape or got.dtype != want_dtype:
            raise CheckFailedError(f"tensor {name} reads back as {got.dtype} {list(got.shape)}, "
                                   f"expected {want_dtype} {list(src.shape)}")
        if got.form != src.value_form or [(n, p.dtype, p.shape) for n, p in got.parts] != \
                [(n, p.dtype, p.shape) for n, p in src.parts]:
            raise CheckFailedError(f"tensor {name} reads back as a {got.form} tensor, expected {src.value_form}")
        if every_byte:
            for (part, a), (_, b) in zip(src.parts, got.parts):
                if a.has_data:
                    compare_bytes(f"{name} ({part})", a, b, a.dtype)
            if src.has_data:
                compare_bytes(name, src, got, want_dtype)
            compared += 1
    for name, keep in dropped.items():
        if back[name].storage is not back[keep].storage:
            raise CheckFailedError(f"tied tensor {name} does not read back as its twin {keep}")
    result: Dict[str, Any] = {"ok": True, "tensors": len(expected), "names_shapes_dtypes": True}
    if every_byte:
        result["bytes_compared"] = compared
    return result


def compare_bytes(name: str, src: TensorRef, got: TensorRef, dtype: str) -> None:
    n = max(1, CHUNK // 8)
    chunks = pieces(src, n) if dtype == src.dtype else cast_chunks(lambda: pieces(src, n), src.dtype, dtype)()
    for a, b in zip(chunks, pieces(got, n)):  # C-order bytes, n elements a piece on both sides
        if a != b:
            raise CheckFailedError(f"tensor {name}: the output's bytes differ from the source's")
