"""``filter``: keep the pretrained tensors that fit a target model, and say what happened to the rest.

The everyday recipe, done right::

    pretrained = {k: v for k, v in pretrained.items() if k in model_dict}
    model_dict.update(pretrained); model.load_state_dict(model_dict)

silently keeps nothing when the checkpoint was saved under ``module.``, and
crashes on a key whose shape changed (a new head). Here names are aligned
first (wrapper prefixes, ``--rename`` rules), shapes are checked, dtypes cast
to the target's, and the report lists what was kept, what was dropped and why,
and which of the target's tensors keep their fresh initialization.

``filter_checkpoint`` writes with convert's streaming writers (``torch_tree`` +
``write_torch_zip``, ``safetensors_entries`` + ``write_safetensors``): each kept
storage goes from the source file to the output a chunk at a time, cast to the
target's dtype as it streams, so memory stays near one chunk whatever the
checkpoint's size. ``load_into`` fills a live model, so it holds the tensors
(``materialize``).
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .align import Alignment, Rename, align as find_alignment, pair_names
from .checkpoint import Checkpoint, StorageRef, TensorRef
# convert's streaming writers and its comparison; the underscored ones are to become public (issue 18)
from .converting import (cast_chunks, compare_bytes, covers_storage, shard_item, safetensors_entries,
                         torch_tree)
from .dtypes import itemsize
from .errors import CheckFailedError, CkptError, FormatError, UsageError
from .formats import open as open_checkpoint
from .formats.safetensors_writer import EntryOut, dtype_code, parse_size, write_safetensors, write_shards
from .formats.torch_writer import StorageOut, TensorOut, storages_of, write_torch_zip
from .formats.write import output_format, shards_to, write_torch_shard_files
from .modelspec import tied_groups
from .results import FilterResult, KeptTensor, ShapeDrop
from .torch_bridge import from_torch
from .tree import StateDict, find_state_dict, open_state_dict
from .writing import atomic_output, check_output, folder_output, writing

TargetShapes = Dict[str, Tuple[Tuple[int, ...], str]]  # name -> (shape, dtype name)
Progress = Optional[Callable[[int, int], None]]


def _dtype_name(dt: Any) -> str:
    return str(dt).replace("torch.", "")


def target_shapes(target: Any, key: Optional[str] = None) -> Tuple[TargetShapes, str, List[str]]:
    """(name -> (shape, dtype), a description, files read) of a target.

    ``target`` is an ``nn.Module`` (its ``state_dict()``: parameters and persistent
    buffers), a mapping of names to tensors, or a checkpoint path (its state_dict,
    or the entry ``key``).
    """
    if isinstance(target, (str, os.PathLike)):
        ckpt, sd = open_state_dict(os.fspath(target), key)
        shapes = {n: (t.shape, t.dtype) for n, t in sd.tensors.items()}
        return shapes, ckpt.path, list(ckpt.files or (ckpt.path,))
    if hasattr(target, "state_dict") and callable(target.state_dict):
        sd = target.state_dict()
        return ({n: (tuple(t.shape), _dtype_name(t.dtype)) for n, t in sd.items()},
                f"{type(target).__module__}.{type(target).__qualname__}", [])
    if isinstance(target, Mapping):
        out: TargetShapes = {}
        for n, t in target.items():
            if isinstance(t, TensorRef):
                out[n] = (t.shape, t.dtype)
            elif hasattr(t, "shape") and hasattr(t, "dtype"):
                out[n] = (tuple(t.shape), _dtype_name(t.dtype))
        return out, "state_dict", []
    raise UsageError(f"cannot use a {type(target).__name__} as a filter target")


def _plan(source: Union[str, Checkpoint], target: Any, key: Optional[str], target_key: Optional[str],
          renames: Sequence[Union[str, Rename]], align: bool) -> Tuple[FilterResult, StateDict, List[str]]:
    rules = [r if isinstance(r, Rename) else Rename.parse(r) for r in renames]
    ckpt, src = open_state_dict(source if isinstance(source, Checkpoint) else os.fspath(source), key)
    shapes, description, target_files = target_shapes(target, target_key)
    if not shapes:
        raise UsageError(f"the target {description} has no tensors")
    src_names, tgt_names = list(src.tensors), list(shapes)
    alignment = find_alignment(src_names, tgt_names, rules) if align else Alignment()
    pairs, unexpected, only_target = pair_names(src_names, tgt_names, alignment, rules)
    by_target = {t: s for s, t in pairs.items()}
    kept: List[KeptTensor] = []
    shape_drops: List[ShapeDrop] = []
    for name in tgt_names:  # the target's order: the output reads like the model's state_dict
        s = by_target.get(name)
        if s is None:
            continue
        ref = src.tensors[s]
        shape, dtype = shapes[name]
        if tuple(ref.shape) != tuple(shape):
            shape_drops.append(ShapeDrop(source_name=s, name=name, source_shape=ref.shape, target_shape=tuple(shape)))
        else:
            kept.append(KeptTensor(name=name, source_name=s, shape=tuple(shape), dtype=dtype, source_dtype=ref.dtype))
    kept_names = {k.name for k in kept}
    result = FilterResult(
        source=ckpt.path, source_format=ckpt.format, source_entry=src.entry, target=description,
        kept=tuple(kept), dropped_unexpected=tuple(unexpected), dropped_shape_mismatch=tuple(shape_drops),
        missing=tuple(n for n in tgt_names if n not in kept_names), prefix_alignment=alignment,
        renames=tuple(f"{r.pattern.pattern}={r.repl}" for r in rules))
    return result, src, list(ckpt.files or (ckpt.path,)) + target_files


def filter_state_dict(source: Union[str, Checkpoint], target: Any, key: Optional[str] = None,
                      target_key: Optional[str] = None, renames: Sequence[Union[str, Rename]] = (),
                      align: bool = True) -> FilterResult:
    """Which tensors of ``source`` fit ``target`` (a model, a state_dict, or a checkpoint path).

    Reads no tensor data. A source tensor is kept when its name (after prefix
    alignment and the ``renames`` rules, in order) is one of the target's and its
    shape is the target's; its dtype is then cast to the target's.

    >>> r = filter_state_dict("resnet50.pth", torchvision.models.resnet50(num_classes=120))  # doctest: +SKIP
    >>> [(d.name, d.source_shape, d.target_shape) for d in r.dropped_shape_mismatch]  # doctest: +SKIP
    [('fc.weight', (1000, 2048), (120, 2048)), ('fc.bias', (1000,), (120,))]
    """
    return _plan(source, target, key, target_key, renames, align)[0]


def _check_carriable(name: str, ref: TensorRef, source: str) -> None:
    """Refuse a kept tensor filter cannot carry: anything but plain dense data (a parameter saved with
    attributes gives its data)."""
    plain = ref.rebuild is None or getattr(ref.rebuild, "name", "") == "_rebuild_parameter_with_state"
    if ref.kind != "dense" or not ref.has_data or not plain:
        raise UsageError(f"tensor {name} is a {ref.form} tensor without plain data; filter cannot carry it", source)


def materialize(result: FilterResult, src: StateDict, device: Any = None,
                progress: Progress = None) -> "collections.OrderedDict[str, Any]":
    """The kept tensors as torch tensors under the target's names and dtypes (tied ones stay tied): what
    ``load_into`` loads into a live model. ``filter_checkpoint`` streams them instead (``_carried``)."""
    from .torch_bridge import torch_dtype
    out: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
    made: Dict[Tuple, Any] = {}
    total = sum(src.tensors[k.source_name].nbytes for k in result.kept)
    done = 0
    for k in result.kept:
        ref = src.tensors[k.source_name]
        _check_carriable(k.source_name, ref, result.source)
        # Two names over the same bytes (tied weights) become one tensor, so torch.save keeps them tied.
        ident = (id(ref.storage), ref.storage_offset, ref.shape, ref.stride, ref.dtype) if ref.storage else (id(ref),)
        t = made.get(ident)
        if t is None:
            try:
                t = ref.to_torch()
            except CkptError as e:
                if e.path is None:
                    e.path = result.source
                raise
            if k.dtype != ref.dtype:
                t = t.to(torch_dtype(k.dtype))
            if device is not None:
                t = t.to(device)
            made[ident] = t
        out[k.name] = t
        done += ref.nbytes
        if progress:
            progress(done, total)
    return out


def _carried(result: FilterResult, src: StateDict) -> "collections.OrderedDict[str, TensorRef]":
    """The kept tensors under the target's names, as TensorRefs the writers stream from the source file.

    Each is a plain dense tensor: a parameter saved with attributes gives its data; a conj / neg view is read
    and resolved in memory (the values torch loads, which its bytes alone are not). Anything else (sparse,
    quantized, a subclass...) is refused before anything is written.
    """
    made: Dict[int, TensorRef] = {}
    out: "collections.OrderedDict[str, TensorRef]" = collections.OrderedDict()
    for k in result.kept:
        ref = src.tensors[k.source_name]
        _check_carriable(k.source_name, ref, result.source)
        out[k.name] = _plain(ref, made, result.source)
    return out


def _compact(tensors: "collections.OrderedDict[str, TensorRef]") -> "collections.OrderedDict[str, TensorRef]":
    """A storage no kept tensor covers whole (its other bytes belong to dropped tensors, or to none): each kept
    view of it over a storage of its own, just the bytes it spans, so the output holds nothing that was dropped.
    A storage a kept tensor covers is written as it is, its views and ties kept, as convert writes it."""
    whole = {id(t.storage) for t in tensors.values() if covers_storage(t)}
    made: Dict[Tuple, TensorRef] = {}
    out: "collections.OrderedDict[str, TensorRef]" = collections.OrderedDict()
    for name, t in tensors.items():
        if id(t.storage) in whole:
            out[name] = t
            continue
        ident = (id(t.storage), t.storage_offset, t.shape, t.stride, t.dtype)  # one view under two names: tied
        got = made.get(ident)
        if got is None:
            start, length = t.span()
            s = t.storage
            storage = StorageRef(s.key, t.dtype, s.device, length, _Window(s.source, start, length), s.file)
            got = made[ident] = dataclasses.replace(t, storage=storage, storage_offset=0)
        out[name] = got
    return out


class _Window:
    """Bytes ``[start, start + size)`` of another span (a kept tensor's part of a storage)."""

    def __init__(self, source: Any, start: int, size: int):
        self.source, self.start, self.size = source, start, size
        self.path = getattr(source, "path", "")
        if hasattr(source, "readinto"):  # reads into a reused buffer (read_pieces) where the source has them
            self.readinto = self._readinto

    def _readinto(self, start: int, buf: Any) -> None:
        self._check(start, len(buf))
        self.source.readinto(self.start + start, buf)

    def _check(self, start: int, size: int) -> None:
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte span", self.path)

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        self._check(start, size)
        return self.source.read(self.start + start, size)


def _plain(ref: TensorRef, made: Dict[int, TensorRef], path: str) -> TensorRef:
    """``ref`` as a plain tensor of its values; one source tensor is one result (``made``), so ties stay."""
    got = made.get(id(ref))
    if got is None:
        if ref.bits:  # the bytes are not the values: torch's values, in memory (one tensor)
            try:
                got = from_torch(ref.to_torch())
            except CkptError as e:
                if e.path is None:
                    e.path = path
                raise
        elif ref.rebuild is not None:  # a parameter's attributes are not part of a state_dict's tensor
            got = dataclasses.replace(ref, rebuild=None)
        else:
            got = ref
        made[id(ref)] = got
    return got


def _view(x: Any) -> Tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


def _complete(tensors: "collections.OrderedDict[str, TensorRef]", dtypes: Dict[str, str], result: FilterResult,
              built: Any, target: Optional[str], target_key: Optional[str],
              seed: int) -> Tuple["collections.OrderedDict[str, TensorRef]", str]:
    """The kept tensors and, for each missing key, the model's own (or the target file's) tensor, in the
    target's order (``dtypes`` gets theirs); and where the filled ones came from, in words.

    The model's tensors have no file: each is held in memory (``from_torch``) until written. The target
    file's are streamed from it like the kept ones.
    """
    fills: Dict[str, TensorRef] = {}
    if built is not None:
        full = built.state_dict()
        how = f"the model's own initialisation (torch.manual_seed({seed}), built on the CPU)"
        order = list(full)
        # a missing name that is, in the model, the same tensor as a kept one (tied): the kept one, so they
        # stay tied in the output
        kept_views = {_view(full[n]): n for n in tensors if n in full and full[n].numel()}
        made: Dict[Tuple, TensorRef] = {}
        for name in result.missing:
            x = full[name].detach()
            view = _view(x) if x.numel() else (id(x),)
            if view in kept_views:
                fills[name] = tensors[kept_views[view]]
                dtypes[name] = dtypes[kept_views[view]]
                continue
            if view not in made:
                made[view] = from_torch(x)
            fills[name] = made[view]
            dtypes[name] = fills[name].dtype
    else:
        _, tsd = open_state_dict(target, target_key)
        how = "the target checkpoint's tensors"
        order = [k.name for k in result.kept] + list(result.missing)
        seen: Dict[int, TensorRef] = {}
        for name in result.missing:
            ref = tsd.tensors[name]
            if ref.kind != "dense" or not ref.has_data:
                raise UsageError(f"--complete: the target's {name} is a {ref.form} tensor without plain data",
                                 target)
            fills[name] = _plain(ref, seen, target)
            dtypes[name] = ref.dtype
    out: "collections.OrderedDict[str, TensorRef]" = collections.OrderedDict()
    for name in order:
        if name in tensors:
            out[name] = tensors[name]
        elif name in fills:
            out[name] = fills[name]
    for name in tensors:  # (every kept name is a target name; kept in case the orders differ)
        out.setdefault(name, tensors[name])
    return out, how


def _torch_tree(tensors: Mapping[str, TensorRef], dtypes: Mapping[str, str], path: str) -> Dict[str, TensorOut]:
    """convert's tree (each storage streamed once, ties and views kept; plain tensors, as a state_dict holds
    them) with each tensor cast to its own dtype in ``dtypes``: a storage is cast as it streams, once per dtype
    (convert casts to one --dtype; torch_tree taking a dtype per name would make this loop its own)."""
    tree = torch_tree(tensors, None, path, detached=frozenset(tensors))
    storages: Dict[Tuple[int, str], StorageOut] = {}
    made: Dict[Tuple[int, str], TensorOut] = {}
    for name, t in list(tree.items()):
        dst = dtypes[name]
        if t.dtype == dst:
            continue
        new = made.get((id(t), dst))
        if new is None:
            s = t.storage
            cast = storages.get((id(s), dst))
            if cast is None:
                size = itemsize(s.dtype) or 1
                cast = storages[(id(s), dst)] = StorageOut("", dst, s.nbytes // size * (itemsize(dst) or 1),
                                                           cast_chunks(s.chunks, s.dtype, dst))
            new = made[(id(t), dst)] = TensorOut(cast, t.shape, t.stride, t.offset, metadata=t.metadata)
        tree[name] = new
    out = dict(tree)  # a plain dict, as torch.save(dict) wrote it
    for i, s in enumerate(storages_of(out)):  # keys in first-use order, as torch.save numbers them
        s.key = str(i)
    return out


def _safetensors_entries(tensors: Mapping[str, TensorRef], dtypes: Mapping[str, str],
                         path: str) -> Tuple[List[EntryOut], Dict[str, str]]:
    """convert's entries (a tie written once, the other name for the header) with each tensor cast to its own
    dtype in ``dtypes`` as it streams; two tied names the target gives different dtypes are written apart."""
    for dtype in sorted(set(dtypes.values())):
        dtype_code(dtype)  # a UsageError naming the dtype safetensors lacks, before anything is written
    entries, dropped = safetensors_entries(tensors, None, path)
    by_name = {e.name: e for e in entries}
    for name, keep in list(dropped.items()):
        if dtypes[name] != dtypes[keep]:
            del dropped[name]
            by_name[name] = safetensors_entries({name: tensors[name]}, None, path)[0][0]
    out = []
    for name in tensors:
        if name in dropped:
            continue
        e = by_name[name]
        if dtypes[name] != e.dtype:
            e = EntryOut(name, dtypes[name], e.shape, cast_chunks(e.chunks, e.dtype, dtypes[name]))
        out.append(e)
    return out, dropped


def _check_strict(model: Any, tensors: Mapping[str, Any]) -> Dict[str, Any]:
    """--complete: the output loads into the model with strict=True."""
    try:
        model.load_state_dict(dict(tensors), strict=True)
    except RuntimeError as e:
        raise CheckFailedError(f"loading the output into the model with strict=True failed: "
                               f"{str(e).splitlines()[0]}") from None
    return {"ok": True, "how": "load_state_dict(strict=True)", "missing_keys": 0, "unexpected_keys": 0}


def _check_load(model: Any, tensors: Mapping[str, Any], result: FilterResult, assign: bool) -> Dict[str, Any]:
    """Load ``tensors`` into ``model`` with strict=False; the missing/unexpected keys must be the report's."""
    try:
        got = model.load_state_dict(dict(tensors), strict=False, assign=assign)
    except RuntimeError as e:
        raise CheckFailedError(f"loading the output into the model failed: {str(e).splitlines()[0]}") from None
    missing, unexpected = sorted(got.missing_keys), sorted(got.unexpected_keys)
    # BatchNorm fills in a missing num_batches_tracked itself (state_dicts without version metadata),
    # so torch may report fewer missing keys than the output lacks, never more.
    filled = set(result.missing) - set(missing)
    ok = set(missing) <= set(result.missing) and all(n.endswith("num_batches_tracked") for n in filled) \
        and not unexpected
    check = {"ok": ok, "how": "load_state_dict(strict=False)", "missing_keys": len(missing),
             "unexpected_keys": len(unexpected)}
    if filled:
        check["filled_by_the_model"] = sorted(filled)
    if not ok:
        raise CheckFailedError(
            f"loading the output gave {len(missing)} missing and {len(unexpected)} unexpected keys, the report "
            f"says {len(result.missing)} and 0 (first unexpected: {unexpected[:1]}, first missing not in report: "
            f"{sorted(set(missing) - set(result.missing))[:1]})")
    return check


def filter_checkpoint(source: str, out: str, model: Optional[str] = None, model_args: Sequence[str] = (),
                      target: Optional[str] = None, target_key: Optional[str] = None, key: Optional[str] = None,
                      renames: Sequence[Union[str, Rename]] = (), align: bool = True, to: Optional[str] = None,
                      force: bool = False, progress: Progress = None,
                      max_shard_size: Optional[Any] = None, complete: bool = False, seed: int = 0) -> FilterResult:
    """Write the tensors of ``source`` that fit the target to ``out``, and prove the output.

    The target is a model (``model`` SPEC with ``model_args``) or a checkpoint
    (``target``). The output (torch zip state_dict or safetensors, from ``out``'s
    extension or ``to``) is written by convert's streaming writers, a storage at a
    time from the source file (cast to the target's dtype as it streams), so memory
    stays near one chunk whatever the checkpoint's size. Before it is put in place it
    is read back: with torch's / safetensors' own loader (names, dtypes, shapes, ties),
    and every byte through the readers, compared with what was meant to be written;
    with a model it is loaded with ``strict=False`` and the missing and unexpected
    keys must be exactly the report's.

    ``complete``: write the target's full state_dict, so the output loads strictly and exports: each key the
    source does not provide is the model's own initialisation (built on the CPU after
    ``torch.manual_seed(seed)``, the global RNG left as it was) or, with ``target``, the target file's
    tensor; listed in the result's ``filled``. The output is then checked with ``strict=True``.

    >>> r = filter_checkpoint("resnet50.pth", "fit.pt", model="torchvision.models:resnet50",
    ...                       model_args=["num_classes=120"])  # doctest: +SKIP
    >>> r.missing, r.verified["load_into_model"]["ok"]  # doctest: +SKIP
    (('fc.weight', 'fc.bias'), True)
    """
    if (model is None) == (target is None):
        raise UsageError("give the target as --model SPEC or --target PATH (one of them)")
    if model is None and model_args:
        raise UsageError("--arg goes with --model, not --target")
    if model is not None and target_key:
        raise UsageError("--target-key goes with --target, not --model")
    shard = None
    if max_shard_size not in (None, ""):
        shard = parse_size(max_shard_size)
        fmt = output_format(out, shards_to(out, to))
    else:
        fmt = output_format(out, to)
    built = None
    if model is not None:
        from .modelspec import build_model
        if complete:  # real initial values, seeded: on the CPU, never meta
            import torch
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                built, device = build_model(model, model_args, device="cpu")
        else:
            built, device = build_model(model, model_args)
        target_obj: Any = built
    else:
        target_obj = target
    result, src, inputs = _plan(source, target_obj, key, target_key, renames, align)
    model_file = model.rpartition(":")[0] if model else ""
    out = check_output(out, inputs + [source] + ([target] if target else []) + ([model_file] if model_file else []),
                       force, folder=shard is not None)
    if not result.kept:
        raise UsageError(f"no tensor of the source fits the target ({len(result.dropped_unexpected)} names the "
                         f"target lacks, {len(result.dropped_shape_mismatch)} shapes that differ); nothing written",
                         result.source, hint="check the names with `ckpttool diff SOURCE TARGET --no-values`; "
                                             "--rename REGEX=REPL maps names")
    tensors = _carried(result, src)
    dtypes = {k.name: k.dtype for k in result.kept}  # the target decides each tensor's dtype
    if complete and result.missing:
        tensors, filled_from = _complete(tensors, dtypes, result, built, target, target_key, seed)
        result = dataclasses.replace(result, filled=tuple(result.missing), filled_from=filled_from)
    tensors = _compact(tensors)
    checks: Dict[str, Any] = {}
    ties: List[Tuple[str, str]] = []

    def check(tmp: str) -> None:
        loaded = _read_back(tmp, fmt)  # torch's / safetensors' own loader, mapped: no byte read here
        back = find_state_dict(open_checkpoint(tmp)).tensors  # the same file through the readers, for the bytes
        if set(loaded) != set(tensors) or set(back) != set(tensors):
            raise CheckFailedError("the written file does not hold the kept tensors under their names", out)
        for name, want in tensors.items():
            dtype, t, got = dtypes[name], loaded[name], back[name]
            if _dtype_name(t.dtype) != dtype or tuple(t.shape) != tuple(want.shape) or got.dtype != dtype \
                    or tuple(got.shape) != tuple(want.shape) or not _bits_equal(want, got, dtype):
                raise CheckFailedError(f"tensor {name} reads back different from what was written", out)
        for a, b in ties:
            if loaded[a].untyped_storage().data_ptr() != loaded[b].untyped_storage().data_ptr():
                raise CheckFailedError(f"tensors {a} and {b}, written over one storage, read back apart", out)
        checks["read_back"] = {"ok": True, "how": "torch.load(weights_only=True)" if fmt == "torch"
                               else "safetensors.torch.load_file", "tensors": len(loaded),
                               "bytes_compared": len(tensors)}
        if built is not None and complete:
            checks["load_into_model"] = _check_strict(built, loaded)
        elif built is not None:
            checks["load_into_model"] = _check_load(built, loaded, result, assign=device == "meta")

    done = [0, 0]  # bytes written, bytes to write

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], done[1])

    written = fmt
    try:
        with writing(out):
            if fmt == "torch":
                tree = _torch_tree(tensors, dtypes, result.source)
                done[1] = sum(s.nbytes for s in storages_of(tree))
                ties += _tied_pairs(tree)
                if shard is None:
                    with atomic_output(out) as tmp:
                        write_torch_zip(tmp, tree, progress=tick)
                        check(tmp)
                else:
                    with folder_output(out) as tmpdir:
                        write_torch_shard_files(
                            tmpdir, [shard_item(n, t) for n, t in tree.items()], shard,
                            lambda p, names: write_torch_zip(p, {n: tree[n] for n in names}, progress=tick))
                        check(tmpdir)
                    written = "torch_sharded"
            else:
                entries, dropped = _safetensors_entries(tensors, dtypes, result.source)
                ties += sorted(dropped.items())
                meta = {"format": "pt", **dropped}  # a tie once, the other name in the header (as convert)
                done[1] = sum(e.nbytes for e in entries)
                if shard is None:
                    with atomic_output(out) as tmp:
                        write_safetensors(tmp, entries, meta, progress=tick)
                        check(tmp)
                else:
                    with folder_output(out) as tmpdir:
                        write_shards(tmpdir, entries, shard, meta, progress=tick)
                        check(tmpdir)
                    written = "safetensors_sharded"
    except CkptError as e:  # what reading the source while writing meets (a truncated file) is about the source
        if e.path is None and not isinstance(e, CheckFailedError):
            e.path = result.source
        raise
    return dataclasses.replace(result, output=out, output_format=written, verified=checks)


def _tied_pairs(tree: Mapping[str, TensorOut]) -> List[Tuple[str, str]]:
    """(first name, name) for the names written over one storage: torch must load them over one storage."""
    first: Dict[int, str] = {}
    pairs = []
    for name, t in tree.items():
        if not t.storage.nbytes:
            continue
        if id(t.storage) in first:
            pairs.append((first[id(t.storage)], name))
        else:
            first[id(t.storage)] = name
    return pairs


def _read_back(path: str, fmt: str) -> Mapping[str, Any]:
    """The output as torch's (``mmap=True``) / safetensors' own loader gives it: tensors over the mapped file,
    whose bytes are read only when used."""
    import torch
    from safetensors.torch import load_file

    def load(p: str) -> Mapping[str, Any]:
        if fmt == "torch":
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        from safetensors import safe_open
        got = load_file(p)
        with safe_open(p, "pt") as f:  # tied names stored once: the header names the kept one, as load_model reads it
            for name, kept in (f.metadata() or {}).items():
                if name not in got and kept in got and name != "format":
                    got[name] = got[kept]
        return got

    if os.path.isdir(path):  # shards: every file the index names, by torch's / safetensors' own loader
        import json
        index = "pytorch_model.bin.index.json" if fmt == "torch" else "model.safetensors.index.json"
        with open(os.path.join(path, index)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: Dict[str, Any] = {}
        for name in files:
            out.update(load(os.path.join(path, name)))
        return out
    return load(path)


def _bits_equal(want: TensorRef, got: TensorRef, dtype: str) -> bool:
    """Are ``got``'s bytes (read back from the output) those of ``want`` cast to ``dtype``? Compared a piece at a
    time (convert's --check comparison), never a whole tensor in memory."""
    try:
        compare_bytes("", want, got, dtype)
    except CheckFailedError:
        return False
    return True


def load_into(model: Any, source: Union[str, Checkpoint], device: Any = None, key: Optional[str] = None,
              renames: Sequence[Union[str, Rename]] = (), align: bool = True) -> FilterResult:
    """The whole fine-tuning recipe in one safe call: load what fits of ``source`` into ``model``.

    Any format; no code from the file runs; prefixes aligned, shapes checked,
    dtypes cast to the model's. Tensors go to ``device`` (default: where the
    model's first parameter is; a meta-device model gets them assigned on the CPU).
    Returns the report; the model's missing keys are checked to be the report's.

    >>> model = torchvision.models.resnet50(num_classes=120)           # doctest: +SKIP
    >>> report = ckpttool.load_into(model, "resnet50_imagenet.pth")    # doctest: +SKIP
    >>> report.missing                                                  # doctest: +SKIP
    ('fc.weight', 'fc.bias')
    """
    result, src, _ = _plan(source, model, key, None, renames, align)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    on_meta = first is not None and first.device.type == "meta"
    if device is None:
        device = "cpu" if first is None or on_meta else first.device
    tensors = materialize(result, src, device=device)
    groups = tied_groups(model)
    tied = groups if on_meta else []
    check = _check_load(model, tensors, result, assign=on_meta)
    for names in tied:  # assign=True gives each name its own Parameter: tie them again, as the model had them
        first = _get_member(model, names[0])
        for name in names[1:]:
            _set_member(model, name, first)
    through = tied_through(result, groups)
    if through:
        check["loaded_through_ties"] = through
    return dataclasses.replace(result, verified={"load_into_model": check})


def tied_through(result: FilterResult, groups: Sequence[Sequence[str]]) -> List[str]:
    """Missing names that are tied, in the model, to a kept one: loading the kept one fills them."""
    kept = {k.name for k in result.kept}
    out = []
    for names in groups:
        if any(n in kept for n in names):
            out += [n for n in names if n in result.missing]
    return sorted(out)


def _get_member(model: Any, name: str) -> Any:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _set_member(model: Any, name: str, value: Any) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value
