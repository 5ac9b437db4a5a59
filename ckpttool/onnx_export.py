"""``convert --to onnx``: export needs a model that runs, so it needs code.

Two ways to get one: a state_dict (any format) loaded into ``--model SPEC``
(the user's own code, weights checked to fit exactly), or a pickled full model
or TorchScript archive with ``--trust`` (the file's code is imported and run;
``--import-path`` says where it lives). Without ``--trust`` such a file is
refused, naming the classes it would import. After export the file is checked
with ``onnx.checker`` and onnxruntime's outputs are compared with torch's on
the same seeded inputs before the file is put in place.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import CheckFailedError, MissingDependencyError, TrustRequiredError, UsageError
from .records import Checkpoint, ConvertResult
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


@contextlib.contextmanager
def _import_path(dirs: Sequence[str]) -> Iterator[None]:
    added = [os.path.abspath(d) for d in dirs]
    for d in added:
        if not os.path.isdir(d):
            raise UsageError("--import-path is not a folder", d)
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def _stub_classes(ckpt: Checkpoint) -> List[str]:
    """The classes the file would import, its own (not torch's) first."""
    names = {g.qualname for g in ckpt.globals if g.handling == "stub"}
    return sorted(names, key=lambda n: (n.startswith("torch."), n))


def _trusted_module(ckpt: Checkpoint, key: Optional[str], import_path: Sequence[str]) -> Any:
    """Load the file with its code (the user said --trust) and pick the nn.Module in it."""
    import torch
    with _import_path(import_path):
        try:
            if ckpt.format == "torchscript":
                obj = torch.jit.load(ckpt.path, map_location="cpu")
            else:
                obj = torch.load(ckpt.path, map_location="cpu", weights_only=False)
        except Exception as e:  # the file's own code failed to import or run
            raise UsageError(f"loading the model with its code failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             ckpt.path, hint="--import-path DIR points at the folder holding the model's package")
    if key:
        for part in key.split("/"):
            obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    if isinstance(obj, dict):
        found = [v for v in obj.values() if isinstance(v, torch.nn.Module)]
        if not found:
            raise UsageError("the file holds no pickled model; pass --model SPEC for its state_dict", ckpt.path)
        obj = found[0]
    if not isinstance(obj, torch.nn.Module):
        raise UsageError(f"the file holds a {type(obj).__name__}, not a model", ckpt.path)
    return obj


def _model_from_spec(ckpt: Checkpoint, key: Optional[str], spec: str, args: Sequence[str]) -> Tuple[Any, Dict[str, Any]]:
    from .filtering import _tied_groups, filter_state_dict, load_into, tied_through
    from .modelspec import build_model
    model, device = build_model(spec, args)
    plan = filter_state_dict(ckpt, model, key=key)  # reads no data: refuse before loading anything
    through = set(tied_through(plan, _tied_groups(model)))
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
                opset: Optional[int] = None, dynamic_batch: bool = False) -> ConvertResult:
    """Export the model of ``source`` to ONNX at ``out``; check it and compare onnxruntime with torch."""
    shapes = [parse_shape(s) for s in input_shapes]
    if not shapes:
        raise UsageError("ONNX export needs the model's input shape: --input-shape 1x3x224x224 (one per input)")
    ckpt, sd = open_state_dict(source if isinstance(source, Checkpoint) else os.fspath(source), key)
    details: Dict[str, Any] = {}
    if model:
        net, details = _model_from_spec(ckpt, key, model, model_args)
    elif sd.source in ("pickled_module", "script_module") or ckpt.format == "torchscript":
        if not trust:
            classes = _stub_classes(ckpt)
            shown = ", ".join(classes[:6]) + (" ..." if len(classes) > 6 else "")
            what = (f"exporting runs the TorchScript code this archive carries ({sd.module_class} and "
                    f"{max(len(classes) - 1, 0)} other classes)" if ckpt.format == "torchscript"
                    else f"exporting this file runs its code: it would import {shown}")
            raise TrustRequiredError(what, ckpt.path,
                                     hint="if you trust the file, pass --trust (and --import-path DIR for its code); "
                                          "or pass --model SPEC to load its state_dict into your own code")
        net = _trusted_module(ckpt, key, import_path)
        details["loaded_with"] = "its own code (--trust)"
    else:
        raise UsageError("ONNX export needs a model to run this state_dict: pass --model SPEC (--arg k=v)",
                         ckpt.path)
    inputs = list(ckpt.files or (ckpt.path,)) + [ckpt.path]
    out = check_output(os.fspath(out), inputs, force)
    check_output(out + ".data", inputs, force)  # where external data goes when the model passes 2 GB
    return _export(net, ckpt, sd.entry, sd.source, out, shapes, dtype, opset, dynamic_batch, details)


def _export(net: Any, ckpt: Checkpoint, entry: Optional[str], entry_source: str, out: str,
            shapes: List[Tuple[int, ...]], dtype: Optional[str], opset: Optional[int], dynamic_batch: bool,
            details: Dict[str, Any]) -> ConvertResult:
    import torch
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxruntime: {e}") from None
    from .converting import DTYPES
    cast = DTYPES.get(str(dtype).lower()) if dtype else None
    tdt = getattr(torch, cast) if cast else torch.float32
    net = net.eval()
    if cast and not isinstance(net, torch.jit.ScriptModule):
        net = net.to(tdt)
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=gen).to(tdt) for s in shapes)
    in_names = [f"input{i}" for i in range(len(inputs))]
    with torch.no_grad():
        try:
            expected = net(*inputs)
        except Exception as e:  # the model's own forward: a shape it cannot take, mostly
            shown = ", ".join("x".join(map(str, s)) for s in shapes)
            raise UsageError(f"the model cannot run on inputs of shape {shown}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}", ckpt.path) from None
    outs = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise UsageError("the model's forward returns something other than tensors; ONNX export needs tensors")
    out_names = [f"output{i}" for i in range(len(outs))]
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    folder = os.path.dirname(out)
    with scratch_folder(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=folder) as tmpdir:
        tmp = os.path.join(tmpdir, os.path.basename(out))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(net, inputs, tmp, dynamo=False, opset_version=opset, input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes)
            except Exception as e:  # the exporter's many failure types: unsupported op, opset...
                raise UsageError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                                 ckpt.path) from None
        if len(os.listdir(tmpdir)) > 1:  # over 2 GB: one external data file beside OUT, not one per tensor
            _consolidate(tmp, os.path.basename(out) + ".data")
        try:
            onnx.checker.check_model(tmp)
        except Exception as e:
            raise CheckFailedError(f"onnx.checker rejects the exported model: {str(e).splitlines()[0]}") from None
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
                              for n, x in zip(in_names, inputs)})
        atol, rtol = TOLERANCE.get(cast or "float32", TOLERANCE["float32"])
        max_abs = 0.0
        for name, want, have in zip(out_names, outs, got):
            have_t = torch.from_numpy(have).to(torch.float64)
            want_t = want.detach().to(torch.float64)
            if tuple(have_t.shape) != tuple(want_t.shape):
                raise CheckFailedError(f"{name}: onnxruntime gives shape {list(have_t.shape)}, torch "
                                       f"{list(want_t.shape)}")
            diff = float((have_t - want_t).abs().max()) if want_t.numel() else 0.0
            max_abs = max(max_abs, diff)
            if not torch.allclose(have_t, want_t, atol=atol, rtol=rtol):
                raise CheckFailedError(f"{name}: onnxruntime differs from torch by up to {diff:.3g} "
                                       f"(atol {atol}, rtol {rtol})")
        opsets = {imp.domain or "ai.onnx": imp.version for imp in onnx.load(tmp, load_external_data=False).opset_import}
        files = sorted(os.listdir(tmpdir))
        _move_into_place(tmpdir, files, folder)
    details.update(opset=opsets.get("ai.onnx"), inputs=[list(s) for s in shapes],
                   outputs=[list(o.shape) for o in outs], max_abs_diff_vs_torch=max_abs,
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
