"""``filter``: keep the pretrained tensors that fit a target model, and say what happened to the rest.

The everyday recipe, done right::

    pretrained = {k: v for k, v in pretrained.items() if k in model_dict}
    model_dict.update(pretrained); model.load_state_dict(model_dict)

silently keeps nothing when the checkpoint was saved under ``module.``, and
crashes on a key whose shape changed (a new head). Here names are aligned
first (wrapper prefixes, ``--rename`` rules), shapes are checked, dtypes cast
to the target's, and the report lists what was kept, what was dropped and why,
and which of the target's tensors keep their fresh initialization.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .align import Alignment, Rename, align as find_alignment, pair_names
from .errors import CheckFailedError, CkptError, UsageError
from .checkpoint import Checkpoint, TensorRef
from .results import FilterResult, KeptTensor, ShapeDrop
from .modelspec import tied_groups
from .tree import StateDict, open_state_dict

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


def materialize(result: FilterResult, src: StateDict, device: Any = None,
                progress: Progress = None) -> "collections.OrderedDict[str, Any]":
    """The kept tensors as torch tensors under the target's names and dtypes (tied ones stay tied)."""
    from .torch_bridge import torch_dtype
    out: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
    made: Dict[Tuple, Any] = {}
    total = sum(src.tensors[k.source_name].nbytes for k in result.kept)
    done = 0
    for k in result.kept:
        ref = src.tensors[k.source_name]
        plain = ref.rebuild is None or getattr(ref.rebuild, "name", "") == "_rebuild_parameter_with_state"
        if ref.kind != "dense" or not ref.has_data or not plain:
            raise UsageError(f"tensor {k.source_name} is a {ref.form} tensor without plain data; filter cannot "
                             f"carry it", result.source)
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


def _complete(tensors: "collections.OrderedDict[str, Any]", result: FilterResult, built: Any,
              target: Optional[str], target_key: Optional[str], seed: int):
    """The kept tensors and, for each missing key, the model's own (or the target file's) tensor, in the
    target's order; and where the filled ones came from, in words."""
    if built is not None:
        full = built.state_dict()
        how = f"the model's own initialisation (torch.manual_seed({seed}), built on the CPU)"
    else:
        _, tsd = open_state_dict(target, target_key)
        full = collections.OrderedDict()
        for name in result.missing:
            ref = tsd.tensors[name]
            if ref.kind != "dense" or not ref.has_data:
                raise UsageError(f"--complete: the target's {name} is a {ref.form} tensor without plain data",
                                 target)
            full[name] = ref.to_torch()
        how = "the target checkpoint's tensors"
    out: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
    order = list(full) if built is not None else [k.name for k in result.kept] + list(result.missing)
    # a missing name tied to a kept one in the model (the same parameter): the kept tensor, so they stay tied
    tied = {}
    if built is not None:
        kept_by_storage = {full[n].untyped_storage().data_ptr(): n for n in tensors if n in full
                           and full[n].numel()}
        tied = {n: kept_by_storage[full[n].untyped_storage().data_ptr()] for n in result.missing
                if full[n].numel() and full[n].untyped_storage().data_ptr() in kept_by_storage}
    for name in order:
        if name in tensors:
            out[name] = tensors[name]
        elif name in tied:
            out[name] = tensors[tied[name]]
        elif name in result.missing:
            out[name] = full[name].detach()
    for name in tensors:  # (every kept name is a target name; kept in case the orders differ)
        out.setdefault(name, tensors[name])
    return out, how


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
    extension or ``to``) is read back with torch's / safetensors' own loader
    before it is put in place; with a model it is loaded with ``strict=False`` and
    the missing and unexpected keys must be exactly the report's.

    ``complete``: write the target's full state_dict, so the output loads strictly and exports: each key the
    source does not provide is the model's own initialisation (built on the CPU after
    ``torch.manual_seed(seed)``, the global RNG left as it was) or, with ``target``, the target file's
    tensor; listed in the result's ``filled``. The output is then checked with ``strict=True``.
    """
    from .formats.write import output_format, shards_to, write_state_dict
    from .writing import check_output
    if (model is None) == (target is None):
        raise UsageError("give the target as --model SPEC or --target PATH (one of them)")
    if model is None and model_args:
        raise UsageError("--arg goes with --model, not --target")
    if model is not None and target_key:
        raise UsageError("--target-key goes with --target, not --model")
    shard = None
    if max_shard_size not in (None, ""):
        from .formats.safetensors_writer import parse_size
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
    tensors = materialize(result, src, progress=progress)
    filled_from = ""
    if complete and result.missing:
        tensors, filled_from = _complete(tensors, result, built, target, target_key, seed)
        result = dataclasses.replace(result, filled=tuple(result.missing), filled_from=filled_from)
    checks: Dict[str, Any] = {}

    def check(tmp: str) -> None:
        loaded = _read_back(tmp, fmt)
        if set(loaded) != set(tensors):
            raise CheckFailedError("the written file does not hold the kept tensors under their names", out)
        for name, t in tensors.items():
            back = loaded[name]
            if back.dtype != t.dtype or tuple(back.shape) != tuple(t.shape) or not _bits_equal(back, t):
                raise CheckFailedError(f"tensor {name} reads back different from what was written", out)
        checks["read_back"] = {"ok": True, "how": "torch.load(weights_only=True)" if fmt == "torch"
                               else "safetensors.torch.load_file", "tensors": len(loaded)}
        if built is not None and complete:
            checks["load_into_model"] = _check_strict(built, loaded)
        elif built is not None:
            checks["load_into_model"] = _check_load(built, loaded, result, assign=device == "meta")

    if shard is not None and fmt == "torch":
        from .formats.write import write_torch_shards
        write_torch_shards(tensors, out, shard, check=check)
        fmt = "torch_sharded"
    elif shard is not None:
        from .formats.write import write_safetensors_shards
        write_safetensors_shards(tensors, out, shard, check=check)
        fmt = "safetensors_sharded"
    else:
        write_state_dict(tensors, out, fmt, check=check)
    return dataclasses.replace(result, output=out, output_format=fmt, verified=checks)


def _read_back(path: str, fmt: str) -> Mapping[str, Any]:
    import torch
    from safetensors.torch import load_file

    def load(p: str) -> Mapping[str, Any]:
        if fmt == "torch":
            return torch.load(p, map_location="cpu", weights_only=True)
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


def _bits_equal(a: Any, b: Any) -> bool:
    import torch
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


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
