"""``convert --to onnx``: export needs a model that runs, so it needs code.

Two ways to get one: a state_dict (any format) loaded into ``--model SPEC``
(the user's own code, weights checked to fit exactly), or a pickled full model
or TorchScript archive with ``--trust`` (the file's code is imported and run;
``--import-path`` says where it lives). Without ``--trust`` such a file is
refused, naming the classes it would import. After export the file is checked
with ``onnx.checker`` and onnxruntime's outputs are compared with torch's on
the same seeded inputs before the file is put in place.

The exporter is torch's current one (``torch.onnx.export(..., dynamo=True)``, which needs the
``onnxscript`` package); the TorchScript-based one runs only with ``legacy_exporter=True``
(``--legacy-exporter``), the only one that takes a TorchScript archive.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .dtypes import parse_dtype
from .errors import CheckFailedError, MissingDependencyError, TrustRequiredError, UsageError
from .checkpoint import Checkpoint
from .results import ConvertResult
from .running import difference, run_onnx, seeded_inputs
from .modelspec import trusted_module
from .tree import open_state_dict
from .writing import check_output, default_mode, fsync_dir, scratch_folder, uninterrupted

# onnxruntime vs torch on the same input: generous enough for kernel differences, tight enough for a wrong graph.
TOLERANCE = {"float32": (1e-4, 1e-3), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2), "float64": (1e-6, 1e-5)}


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1x3x224x224"`` -> (1, 3, 224, 224).

    >>> parse_shape("1x3x224x224"), parse_shape("8")
    ((1, 3, 224, 224), (8,))
    """
    try:
        shape = tuple(int(p) for p in str(text).lower().replace(",", "x").split("x") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} is not like 1x3x224x224")
    return shape


InputSpec = Tuple[Optional[str], Tuple[int, ...]]  # (input name or None, shape)

SHAPES_NEEDED = "--input NAME:1x3x224x224 or --input-shape 1x3x224x224, one per input"


def parse_inputs(inputs: Sequence[str] = (), input_shapes: Sequence[str] = ()) -> List[InputSpec]:
    """``--input NAME:SHAPE`` (named) or ``--input-shape SHAPE`` (in order) -> [(name or None, shape)].

    >>> parse_inputs(["x:1x3x8x8", "mask:1x8"])
    [('x', (1, 3, 8, 8)), ('mask', (1, 8))]
    >>> parse_inputs(input_shapes=["1x3x8x8"])
    [(None, (1, 3, 8, 8))]
    """
    if inputs and input_shapes:
        raise UsageError("--input NAME:SHAPE and --input-shape do not mix: name every input, or give every "
                         "shape in order")
    out: List[InputSpec] = []
    for text in inputs:
        name, sep, shape = str(text).rpartition(":")
        try:
            if not sep or not name.strip():
                raise UsageError("no name")
            dims = parse_shape(shape)
        except UsageError:
            raise UsageError(f"--input {text!r} is not like NAME:1x3x224x224") from None
        if any(n == name for n, _ in out):
            raise UsageError(f"--input {name!r} is given twice")
        out.append((name, dims))
    out += [(None, parse_shape(s)) for s in input_shapes]
    return out


def shape_text(shape: Sequence[Any]) -> str:
    """``(1, 3, 224, 224)`` -> ``1x3x224x224``; a symbolic dimension by its name, an unknown one as ``?``.

    >>> shape_text([1, 3, 8, 8]), shape_text(["batch", 3, None])
    ('1x3x8x8', 'batchx3x?')
    """
    return "x".join("?" if d is None else str(d) for d in shape) if len(shape) else "scalar"


def _stub_classes(ckpt: Checkpoint) -> List[str]:
    """The classes the file would import, its own (not torch's) first."""
    names = {g.qualname for g in ckpt.globals if g.handling == "stub"}
    return sorted(names, key=lambda n: (n.startswith("torch."), n))


def _model_from_spec(ckpt: Checkpoint, key: Optional[str], spec: str, args: Sequence[str]) -> Tuple[Any, Dict[str, Any]]:
    from .filtering import filter_state_dict, load_into, tied_through
    from .modelspec import build_model, tied_groups
    model, device = build_model(spec, args)
    plan = filter_state_dict(ckpt, model, key=key)  # reads no data: refuse before loading anything
    through = set(tied_through(plan, tied_groups(model)))
    # a BatchNorm counter the file lacks is filled by the model itself; a tied twin by its kept twin
    missing = [n for n in plan.missing if n not in through and not n.endswith("num_batches_tracked")]
    if missing or plan.dropped_shape_mismatch:
        first = plan.dropped_shape_mismatch[0].name if plan.dropped_shape_mismatch else missing[0]
        raise UsageError(f"the state_dict does not fit --model {spec}: {len(missing) + len(plan.dropped_shape_mismatch)}"
                         f" of the model's tensors would keep their random initialization (first: {first})",
                         ckpt.path, hint="check with `ckpttool filter SOURCE --model SPEC -o x.pt --json`")
    report = load_into(model, ckpt, key=key)
    note = {"loaded_into": f"{spec} ({len(report.kept)} tensors)"}
    if report.dropped_unexpected:
        note["unused_keys"] = len(report.dropped_unexpected)
    return model, note


def export_onnx(source: Union[str, Checkpoint], out: str, key: Optional[str] = None, dtype: Optional[str] = None,
                force: bool = False, progress: Any = None, trust: bool = False, import_path: Sequence[str] = (),
                model: Optional[str] = None, model_args: Sequence[str] = (), input_shapes: Sequence[str] = (),
                opset: Optional[int] = None, dynamic_batch: bool = False, inputs: Sequence[str] = (),
                legacy_exporter: bool = False) -> ConvertResult:
    """Export the model of ``source`` to ONNX at ``out``; check it and compare onnxruntime with torch.

    Inputs are ``inputs`` (``["x:1x3x224x224"]``, which also names the graph's inputs) or
    ``input_shapes`` (``["1x3x224x224"]``, in the order forward takes them). Everything the export
    lacks (input shapes, a model, ``--trust``, a package) is named at once, in one error.

    >>> r = export_onnx("weights.pt", "m.onnx", model="torchvision.models:resnet18",
    ...                 inputs=["image:1x3x224x224"])  # doctest: +SKIP
    >>> r.details["exporter"], r.details["input_names"]  # doctest: +SKIP
    ('dynamo', ['image'])
    """
    specs = parse_inputs(inputs, input_shapes)
    _cast_name(dtype)  # a --dtype it does not know is an error before anything runs
    ckpt, sd = open_state_dict(source if isinstance(source, Checkpoint) else os.fspath(source), key)
    has_code = sd.source in ("pickled_module", "script_module") or ckpt.format == "torchscript"
    needs: List[str] = []  # every missing requirement, said at once
    if not specs:
        needs.append(f"the model's input shapes ({SHAPES_NEEDED})")
    if not model and not has_code:
        needs.append("a model to run this state_dict (--model SPEC, with --arg k=v)")
    if ckpt.format == "torchscript" and not model and not legacy_exporter:
        needs.append("--legacy-exporter (a TorchScript archive is exported only by the TorchScript-based exporter)")
    if opset is not None and opset < 18 and not legacy_exporter:
        needs.append(f"--legacy-exporter for --opset {opset} (torch.onnx.export(dynamo=True) writes opset 18 or later)")
    missing_packages = [m for m in (("onnx", "onnxruntime") + (() if legacy_exporter else ("onnxscript",)))
                        if importlib.util.find_spec(m) is None]
    if missing_packages:
        needs.append("the package(s) " + ", ".join(missing_packages) + " (pip install 'ckpttool[onnx]')")
    if has_code and not model and not trust:
        classes = _stub_classes(ckpt)
        shown = ", ".join(classes[:6]) + (" ..." if len(classes) > 6 else "")
        what = (f"exporting runs the TorchScript code this archive carries ({sd.module_class} and "
                f"{max(len(classes) - 1, 0)} other classes)" if ckpt.format == "torchscript"
                else f"exporting this file runs its code: it would import {shown}")
        raise TrustRequiredError(what + (f"; it also needs {'; '.join(needs)}" if needs else ""), ckpt.path,
                                 hint="if you trust the file, pass --trust (and --import-path DIR for its code); "
                                      "or pass --model SPEC to load its state_dict into your own code")
    if needs:
        kind = MissingDependencyError if len(needs) == 1 and missing_packages else UsageError
        raise kind("ONNX export needs " + "; ".join(needs), ckpt.path)
    files = list(ckpt.files or (ckpt.path,)) + [ckpt.path]
    out = check_output(os.fspath(out), files, force)
    check_output(out + ".data", files, force)  # where external data goes when the model passes 2 GB
    details: Dict[str, Any] = {}
    if model:
        net, details = _model_from_spec(ckpt, key, model, model_args)
    else:
        net = trusted_module(ckpt, key, import_path)
        details["loaded_with"] = "its own code (--trust)"
    return _export(net, ckpt, sd.entry, sd.source, out, specs, dtype, opset, dynamic_batch, details, legacy_exporter)


def _cast_name(dtype: Optional[str]) -> Optional[str]:
    """``--dtype`` as convert takes it (fp16, half, torch.float16...) -> the torch dtype name, or None."""
    return parse_dtype(dtype)


# What the exporters say that is no news to the user of this command: its choice of exporter is in the
# report, and a requested opset the exporter could not write is refused in one line (below).
_KNOWN_NOISE_WARNINGS = (
    (r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning),  # asked for: --legacy-exporter
    (r"The feature will be removed\. Please remove usage of this function", DeprecationWarning),  # the same
    (r"no signature found for <torch\.ScriptMethod", UserWarning),  # a TorchScript forward's inputs: taken as given
)
_KNOWN_NOISE_LOGS = (
    "Setting ONNX exporter to use operator set version",  # an opset under 18: checked and refused below
    "The model version conversion is not supported by the onnxscript version converter",
    "Failed to convert the model to the target version",
)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: not ours to judge
            return True
        return not message.startswith(_KNOWN_NOISE_LOGS)


@contextlib.contextmanager
def _quiet_known_noise() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern, category in _KNOWN_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        drop = _DropKnownNoise()
        loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._compat",
                                                  "onnxscript.version_converter")]
        for lg in loggers:
            lg.addFilter(drop)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(drop)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else ""


def _export(net: Any, ckpt: Checkpoint, entry: Optional[str], entry_source: str, out: str,
            specs: List[InputSpec], dtype: Optional[str], opset: Optional[int], dynamic_batch: bool,
            details: Dict[str, Any], legacy: bool = False) -> ConvertResult:
    import torch
    try:
        import onnx
        importlib.import_module("onnxruntime")  # here, before exporting: the export is worthless unchecked
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxruntime: {e}") from None
    cast = _cast_name(dtype)
    tdt = getattr(torch, cast) if cast else torch.float32
    net = net.eval()
    if cast and not isinstance(net, torch.jit.ScriptModule):
        net = net.to(tdt)
    shapes = [s for _, s in specs]
    inputs = tuple(seeded_inputs([(s, cast or "float32") for s in shapes]))
    named = all(n is not None for n, _ in specs)
    # the legacy exporter names inputs input0...; the current one after forward's parameters unless named
    in_names: Optional[List[str]] = [n for n, _ in specs] if named else \
        ([f"input{i}" for i in range(len(inputs))] if legacy else None)
    with torch.no_grad():
        try:
            expected = net(*inputs)
        except Exception as e:  # the model's own forward: a shape it cannot take, mostly
            shown = ", ".join(shape_text(s) for s in shapes)
            raise UsageError(f"the model cannot run on inputs of shape {shown}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}", ckpt.path) from None
    outs = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise UsageError("the model's forward returns something other than tensors; ONNX export needs tensors")
    out_names = [f"output{i}" for i in range(len(outs))]
    folder = os.path.dirname(out)
    with scratch_folder(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=folder) as tmpdir:
        tmp = os.path.join(tmpdir, os.path.basename(out))
        with _quiet_known_noise():
            try:
                if legacy:
                    axes = {n: {0: "batch"} for n in (in_names or []) + out_names} if dynamic_batch else None
                    torch.onnx.export(net, inputs, tmp, dynamo=False, opset_version=opset, input_names=in_names,
                                      output_names=out_names, dynamic_axes=axes)
                else:
                    batch = torch.export.Dim("batch")
                    dyn = tuple({0: batch} for _ in inputs) if dynamic_batch else None
                    # external_data=False: one file, unless over ONNX's 2 GB limit (then OUT + OUT.data)
                    torch.onnx.export(net, inputs, tmp, dynamo=True, external_data=False, opset_version=opset,
                                      input_names=in_names, output_names=out_names, dynamic_shapes=dyn,
                                      verbose=False, report=False)
            except Exception as e:  # the exporter's many failure types: unsupported op, opset, untraceable code
                cause = e.__cause__ or e.__context__
                why = f"; cause: {type(cause).__name__}: {_first_line(cause)}" if cause is not None else ""
                raise UsageError(f"torch.onnx.export{'' if legacy else '(dynamo=True)'} failed: "
                                 f"{type(e).__name__}: {_first_line(e)}{why}"[:600], ckpt.path,
                                 hint=None if legacy else "--legacy-exporter uses the TorchScript-based exporter, "
                                                          "which traces instead of torch.export") from None
        written = set(os.listdir(tmpdir))
        if written - {os.path.basename(tmp), os.path.basename(tmp) + ".data"}:
            _consolidate(tmp, os.path.basename(out) + ".data")  # one external data file beside OUT
        try:
            onnx.checker.check_model(tmp)
        except Exception as e:
            raise CheckFailedError(f"onnx.checker rejects the exported model: {str(e).splitlines()[0]}") from None
        written_model = onnx.load(tmp, load_external_data=False)
        opsets = {imp.domain or "ai.onnx": imp.version for imp in written_model.opset_import}
        if opset is not None and opsets.get("ai.onnx") != opset:  # the exporter kept another one, quietly
            raise UsageError(f"--opset {opset}: the exporter could not write this model in opset {opset} (it wrote "
                             f"{opsets.get('ai.onnx')})", ckpt.path,
                             hint=f"pass --opset {opsets.get('ai.onnx')} or later, or --legacy-exporter for "
                                  f"opset {opset}" if not legacy else None)
        graph_inputs = [i.name for i in written_model.graph.input
                        if i.name not in {t.name for t in written_model.graph.initializer}]
        if len(graph_inputs) != len(inputs):
            raise CheckFailedError(f"the exported graph takes {len(graph_inputs)} inputs, the model "
                                   f"{len(inputs)}")
        got = run_onnx(tmp, inputs)
        atol, rtol = TOLERANCE.get(cast or "float32", TOLERANCE["float32"])
        max_abs = 0.0
        for name, want, have in zip(out_names, outs, got):
            if tuple(have.shape) != tuple(want.shape):
                raise CheckFailedError(f"{name}: onnxruntime gives shape {list(have.shape)}, torch "
                                       f"{list(want.shape)}")
            d = difference(have, want, atol, rtol)
            max_abs = max(max_abs, d.max_abs)
            if not d.close:
                raise CheckFailedError(f"{name}: onnxruntime differs from torch by up to {d.max_abs:.3g} "
                                       f"(atol {atol}, rtol {rtol})")
        files = sorted(os.listdir(tmpdir))
        _move_into_place(tmpdir, files, folder)
    details.update(exporter="torchscript (legacy)" if legacy else "dynamo", opset=opsets.get("ai.onnx"),
                   inputs=[list(s) for s in shapes], input_names=graph_inputs,
                   outputs=[list(o.shape) for o in outs], output_names=out_names, max_abs_diff_vs_torch=max_abs,
                   tolerance={"atol": atol, "rtol": rtol}, dynamic_batch=dynamic_batch)
    if len(files) > 1:
        details["external_data"] = [f for f in files if f != os.path.basename(out)]
    paths = [os.path.join(folder, f) for f in files]
    return ConvertResult(source=ckpt.path, source_format=ckpt.format, entry=entry, entry_source=entry_source,
                         output=out, format="onnx", tensors=_count_initializers(out), files=tuple(paths),
                         cast_to=cast, bytes_written=sum(os.path.getsize(p) for p in paths),
                         checked={"ok": True, "onnx_checker": True, "onnxruntime_vs_torch": True}, details=details)


def _consolidate(path: str, data_name: str) -> None:
    import onnx
    folder = os.path.dirname(path)
    before = set(os.listdir(folder))
    model = onnx.load(path)  # with its external data
    os.unlink(path)
    for f in before - {os.path.basename(path)}:
        os.unlink(os.path.join(folder, f))
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)


def _move_into_place(tmpdir: str, files: List[str], folder: str) -> None:
    for f in files:
        src = os.path.join(tmpdir, f)
        with open(src, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(src, default_mode())
    with uninterrupted():  # the graph and its external data move together, or a signal waits until they have
        for f in files:
            os.replace(os.path.join(tmpdir, f), os.path.join(folder, f))
        fsync_dir(folder)


def _count_initializers(path: str) -> int:
    import onnx
    return len(onnx.load(path, load_external_data=False).graph.initializer)
