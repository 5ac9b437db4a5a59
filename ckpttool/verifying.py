"""``verify``: the pre-deployment gate. Does the checkpoint load, round-trip and compute the same everywhere?

Checks, each pass / fail / skip with the reason:

1. ``readable``: the file opens through the safe readers (no code runs), and ``scan`` finds nothing
   dangerous in it (every pickle a loader would run, read as the loader reads it); what --trust would
   import is named.
   ``torch.load``: a plain ``torch.load(path, weights_only=True)`` would read the file on this machine
   (its globals admitted, its opcodes ones the weights_only loader runs, its device tags present here);
   where it would not, the check fails, naming the ``add_safe_globals`` line or the ``remap`` that makes
   it, unless ``--trust`` says the file may be loaded with ``weights_only=False``.
2. ``format round trip``: the state_dict written as a torch zip and as safetensors (streamed, in a
   temporary folder), read back through the readers, every tensor compared bit for bit, shared
   storages kept.
3. ``device round trip``: on each device other than the CPU (where the bytes are read), every tensor moved
   there the way ``torch.load(map_location=)`` would, brought back and compared bit for bit, one tensor at
   a time; device tags the machine lacks are reported with the ``ckpttool remap`` command that fixes the
   file. Without a model and without a GPU, nothing here needs torch, and torch is not imported (its
   import alone is ~630 MB and 2 s).
4. ``loads into model``: ``load_state_dict(strict=True)`` on each device (``--model SPEC``, or the
   file's own pickled model with ``--trust``). A ``.pt2`` carries its program: ``torch.export.load``
   (``aoti_load_package`` for an AOTInductor package) loads it, only with ``--trust`` (it unpickles the
   example inputs, falling back to weights_only=False, and dlopens compiled code); without it that check
   fails ("not loaded"), as ``torch.load`` does for a file weights_only refuses. Loaded, ``same weights as
   loader`` holds every weight and constant ckpttool read to the loader's, bit for bit.
5. ``computes the same``: a seeded forward pass in eval mode, TF32 off, on each device, compared with
   the CPU's; with ``--against ORIGINAL``, compared with the original's outputs on the same input.
   Inputs are ``--input NAME:SHAPE`` or ``--input-shape SHAPE``, or an ONNX graph's (a .pt2 program's) own
   input shapes.

PASS means: nothing failed, a plain ``torch.load(weights_only=True)`` of the file works here (with the
``--map-location`` the user names, if any), and every comparison asked for ran. What a check could not
run is not a pass: a comparison with ``--against`` that cannot run (no inputs, no model) is an error
naming everything missing at once, before any check runs; the report lists what was proven and what not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import platform
import re
import shlex
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .errors import UsageError
from .formats import open as open_checkpoint
from .comparing import bytes_equal, pieces, same_bits
from .modelspec import trusted_module
from .onnx_export import SHAPES_NEEDED, parse_inputs, shape_text
from .checkpoint import Checkpoint, TensorRef
from .results import CheckResult, VerifyReport
from .running import difference, run_onnx, seeded_inputs
from .tree import StateDict, find_state_dict, module_kind, open_state_dict
from .writing import scratch_folder

# Outputs across devices / runtimes: kernels differ in summation order, so fp32 gets a little room.
OUTPUT_TOLERANCE = {"float32": (1e-4, 1e-4), "float64": (1e-7, 1e-7), "float16": (1e-2, 1e-2),
                    "bfloat16": (5e-2, 5e-2)}

# A .pt2 is loaded only with --trust: torch.export.load unpickles its example inputs (falling back to
# weights_only=False) and its object constants, and an AOTInductor package is a shared library it dlopens.
PT2_NOT_LOADED = "not loaded: loading a .pt2 deserializes pickles and may run compiled code: --trust"
PT2_LOADERS = ("torch.export.load", "aoti_load_package")


def environment() -> Dict[str, Any]:
    """torch, CUDA and device facts, as torch reports them; read from torch's files where torch is not needed."""
    from .torch_bridge import accelerator_possible, torch_facts
    env: Dict[str, Any] = {"python": platform.python_version(),
                           "devices": [{"device": "cpu", "name": platform.processor() or platform.machine()}]}
    if not accelerator_possible():  # no GPU torch could see: its version from its files, no 630 MB import
        facts = torch_facts()
        env.update(torch=facts["torch"], cuda_build=facts["cuda"], cuda_available=False, device_count=0)
    else:
        import torch
        env.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
        for i in range(env["device_count"]):
            props = torch.cuda.get_device_properties(i)
            env["devices"].append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                                   "memory": int(props.total_memory)})
    from importlib import metadata
    for dist in ("onnxruntime", "onnxruntime-gpu"):  # its version without its import (~60 MB)
        with contextlib.suppress(metadata.PackageNotFoundError):
            env["onnxruntime"] = metadata.version(dist)
            break
    return env


def resolve_devices(devices: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """The devices to check and a note on what the default skipped. Unavailable named devices: UsageError."""
    from .torch_bridge import accelerator_possible
    if not devices or all(d == "cpu" for d in devices):  # decided without importing torch where it can be
        if not devices and accelerator_possible():
            import torch
            if torch.cuda.is_available():
                return ["cpu", "cuda:0"], None
        return ["cpu"], None if devices else "no CUDA device on this machine: cuda skipped"
    import torch
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {d!r} is not a device (cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {d}: CUDA is not available on this machine "
                                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
            index = dev.index or 0
            if index >= torch.cuda.device_count():
                raise UsageError(f"--device {d}: this machine has {torch.cuda.device_count()} CUDA device(s)")
            out.append(f"cuda:{index}")
        elif dev.type == "mps":
            if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
                raise UsageError(f"--device {d}: MPS is not available on this machine")
            out.append("mps")
        elif dev.type == "cpu":
            out.append("cpu")
        else:
            raise UsageError(f"--device {d}: only cpu, cuda and mps are checked")
    if "cpu" not in out:
        out.insert(0, "cpu")  # the reference every other device is compared with
    return list(dict.fromkeys(out)), None


MapLocation = Union[None, str, Dict[str, str]]
_DEVICE = re.compile(r"^(cpu|meta|mps|cuda(:\d+)?)$")


def parse_map_location(items: Union[None, str, Sequence[str]]) -> MapLocation:
    """``--map-location``: one device (``cpu``: every storage goes there) or ``SRC=DST`` pairs (a dict, as
    torch.load takes it: each storage whose tag is exactly SRC goes to DST).

    >>> parse_map_location(["cpu"]), parse_map_location(["cuda:1=cuda:0"]), parse_map_location(())
    ('cpu', {'cuda:1': 'cuda:0'}, None)
    """
    if items is None or isinstance(items, str):
        items = [] if items is None else [items]
    items = list(items)
    if not items:
        return None
    pairs = [i for i in items if "=" in i]
    bad = [i for i in items if not all(_DEVICE.match(p.strip()) for p in i.split("=", 1))]
    if bad:
        raise UsageError(f"--map-location {bad[0]!r} is not a device (cpu, cuda:0) or SRC=DST (cuda:1=cuda:0)")
    if not pairs:
        if len(items) > 1:
            raise UsageError("--map-location takes one device, or SRC=DST pairs (repeatable)")
        return items[0].strip()
    if len(pairs) != len(items):
        raise UsageError("--map-location takes one device, or SRC=DST pairs, not both")
    return {src.strip(): dst.strip() for src, dst in (p.split("=", 1) for p in pairs)}


def _mapped(tag: str, mapping: MapLocation) -> str:
    """Where torch.load(map_location=mapping) puts a storage tagged ``tag``."""
    if mapping is None:
        return tag
    if isinstance(mapping, str):
        return mapping
    return mapping.get(tag, tag)


def _map_location_code(mapping: MapLocation) -> str:
    return f"map_location={mapping!r}"


def verify(path: str, model: Optional[str] = None, model_args: Sequence[str] = (), against: Optional[str] = None,
           devices: Sequence[str] = (), input_shapes: Sequence[str] = (), atol: Optional[float] = None,
           rtol: Optional[float] = None, key: Optional[str] = None, trust: bool = False,
           import_path: Sequence[str] = (), progress: Optional[Callable[[int, int], None]] = None,
           inputs: Sequence[str] = (), map_location: Union[None, str, Sequence[str]] = None) -> VerifyReport:
    """Run every check that applies to ``path``; see the module doc.

    ``inputs`` are ``NAME:SHAPE`` (``["x:1x3x224x224"]``), ``input_shapes`` plain shapes in order; with
    neither, an ONNX graph's own input shapes are used. ``map_location`` is a device (``"cpu"``) or
    ``SRC=DST`` pairs, as torch.load's: the file's storages are checked where it puts them.

    >>> r = verify("model.safetensors", model="torchvision.models:resnet18", input_shapes=["1x3x224x224"])  # doctest: +SKIP
    >>> r.ok, [(c.name, c.device, c.status) for c in r.checks][:2]  # doctest: +SKIP
    (True, [('readable', None, 'pass'), ('format round trip', 'torch_zip', 'pass')])
    """
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        if v is not None and not v >= 0:
            raise UsageError(f"{name} must be >= 0")
    specs = parse_inputs(inputs, input_shapes)
    mapping = parse_map_location(map_location)
    devs, skipped_note = resolve_devices(devices)
    env = environment()

    from .scanning import scan_file
    scanned = scan_file(_file_read(path))
    ckpt, sd = open_state_dict(path, key)
    runner = _Runner.for_path(ckpt, sd, model, model_args, trust, import_path, key)
    orig = orig_ckpt = None
    if against:
        orig_ckpt, orig_sd = open_state_dict(against)
        orig = _Runner.for_path(orig_ckpt, orig_sd, model, model_args, trust, import_path, None)
        if runner.module_factory is None and runner.onnx_path is None and orig.module_factory is not None and \
                ckpt.format != "pt2":  # a .pt2 runs its own program or nothing, never the original's model
            runner.borrow(orig, against)  # a migrated state_dict runs in the original's model
    # everything a comparison asked for needs, said at once before any check runs
    feeds, problems, wanted = _plan_inputs(specs, ckpt, orig_ckpt)
    needs: List[str] = []
    if orig is not None and ("onnx" in (ckpt.format, orig_ckpt.format) or ckpt.format == "pt2"):
        # ONNX initializers are named by the exporter: outputs are the only comparison with the original;
        # a .pt2 is a program: --against asks for its outputs
        if feeds is None and not problems:
            needs.append(wanted)
        if not runner.can_run:
            needs.append(runner.why_not)
        if not orig.can_run:
            needs.append(f"to run {against}: {orig.why_not}")
    if problems or needs:
        said = problems + ([f"comparing outputs with {against} needs: " + "; ".join(needs)] if needs else [])
        raise UsageError("; ".join(said), ckpt.path)

    checks: List[CheckResult] = []
    checks.append(_readable(ckpt, sd, scanned, trust))
    if scanned.weights_only is not None and ckpt.format != "pt2":  # torch.export.load reads a .pt2 (below)
        checks.append(_torch_load(ckpt, sd, scanned, trust, mapping))
    if skipped_note:
        checks.append(CheckResult("devices", "cuda", "skip", skipped_note))
    checks.append(_integrity(ckpt, sd))
    checks += _format_round_trip(ckpt, sd, progress)
    checks += _device_round_trip(ckpt, sd, devs, mapping)
    if orig is not None:
        checks.append(_same_tensors(ckpt, orig_ckpt, against, atol, rtol))
    loads = True
    if ckpt.format == "pt2":  # the program itself: loaded (with --trust), its weights held to ckpttool's
        checks += _pt2_load_checks(runner, ckpt, sd)
        loads = not any(c.status == "fail" for c in checks if c.name in PT2_LOADERS) or not runner.can_run
    elif runner.module_factory is None:
        checks.append(CheckResult("loads into model", None, "skip", runner.why_not))
    else:
        for dev in devs:
            checks.append(runner.load_check(dev))
            loads = loads and checks[-1].status != "fail"
    if not loads:
        checks.append(CheckResult("computes the same", None, "skip",
                                  "the program does not load (above)" if ckpt.format == "pt2" else
                                  "the state_dict does not load into the model (above): outputs would mean nothing"))
    elif feeds is None:
        checks.append(CheckResult("computes the same", None, "skip", f"not run: it needs {wanted}"))
    elif not runner.can_run:
        checks.append(CheckResult("computes the same", None, "skip", runner.why_not))
    else:
        import torch
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            checks += _compute(runner, orig, devs, feeds, atol, rtol, against)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if orig is not None and not any(c.name == "matches original" for c in checks):
        # --against: the outputs were not compared (no inputs, or the model does not load): said, not left out
        why = checks[-1].detail if checks and checks[-1].name == "computes the same" else "outputs not compared"
        checks.append(CheckResult("matches original", None, "skip", f"outputs not compared: {why}"))
    ok = not any(c.status == "fail" for c in checks)
    return VerifyReport(path=ckpt.path, format=ckpt.format, entry=sd.entry, environment=env, devices=tuple(devs),
                        checks=tuple(checks), ok=ok)


MAX_GRAPH_INPUT_NUMEL = 1 << 28  # an input shape taken from a graph, unasked: at most 1 GiB of float32

Feed = Tuple[Optional[str], Tuple[int, ...], str]  # (input name, shape, dtype); a torch model's may be unnamed


def _feeds_text(feeds: List[Feed]) -> str:
    return ", ".join((f"{n} " if n else "") + shape_text(s) for n, s, _ in feeds)


def _plan_inputs(specs, ckpt: Checkpoint, orig_ckpt: Optional[Checkpoint]) -> Tuple[Optional[List[Feed]], List[str],
                                                                                     Optional[str]]:
    """``(feeds, problems, wanted)``: the model's inputs (name, shape, dtype) in the order it takes them, or None
    where nothing says them; what is wrong with the inputs given (every problem, for one error); and, where
    the feeds are None, what would say them.

    An ONNX graph (this file's, else the original's) names its inputs and says their dtypes and shapes:
    ``--input NAME:SHAPE`` must use its names, ``--input-shape`` give one shape per input, and with neither,
    a graph whose input shapes are all fixed gives them itself.
    """
    # an ONNX graph's inputs, or a torch.export program's user inputs (the .pt2 reader's, the same form)
    source = next((c for c in (ckpt, orig_ckpt) if c is not None and c.format in ("onnx", "pt2")
                   and c.metadata.get("inputs") is not None), None)
    graph = source.metadata["inputs"] if source is not None else None
    wanted = f"input shapes ({SHAPES_NEEDED})"
    if graph is None:  # a torch model: the shapes given, in the order given, as float32
        if not specs:
            return None, [], wanted
        return [(n, s, "float32") for n, s in specs], [], None
    where = source.path
    what = "the ONNX graph" if source.format == "onnx" else "the exported program"
    names = [g["name"] for g in graph]
    given = {n: s for n, s in specs if n is not None}
    if specs and not given:  # --input-shape: one per graph input, in order
        if len(specs) != len(graph):
            return None, [f"{what} of {where} takes {len(graph)} input(s) ({', '.join(names)}), "
                          f"--input-shape gave {len(specs)}"], None
        return [(g["name"], s, g["dtype"]) for g, (_, s) in zip(graph, specs)], [], None
    problems = []
    unknown = [n for n in given if n not in names]
    if unknown:
        problems.append(f"{what} of {where} takes inputs {', '.join(names)}, not {', '.join(unknown)}")
    feeds: List[Feed] = []
    open_dims = []
    for g in graph:
        shape = given.get(g["name"], g.get("shape"))
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            open_dims.append((g["name"], shape_text(shape) if shape is not None else "of unknown rank"))
            continue
        if g["name"] not in given and math.prod(shape) > MAX_GRAPH_INPUT_NUMEL:  # the file's word: not a 1 TB input
            open_dims.append((g["name"], f"{shape_text(shape)}, too large to make up"))
            continue
        feeds.append((g["name"], tuple(shape), g["dtype"]))
    open_text = (", ".join(f"--input {n}:SHAPE" for n, _ in open_dims) + f" ({what} of {where} leaves "
                 f"dimensions open: " + ", ".join(f"{n} {d}" for n, d in open_dims) + ")") if open_dims else None
    if open_text and given:
        problems.append(f"it needs {open_text}")
    if problems or open_text:
        return None, problems, open_text
    return feeds, [], None


def _compute(runner: "_Runner", orig: Optional["_Runner"], devs: List[str], feeds: List[Feed], atol, rtol,
             against: Optional[str]) -> List[CheckResult]:
    checks = runner.compute_checks(devs, feeds, atol, rtol)
    if orig is not None:
        if not orig.can_run:
            checks.append(CheckResult("matches original", None, "skip", f"{against}: {orig.why_not}"))
        else:
            checks.append(runner.against(orig, feeds, atol, rtol, against))
    return checks


# ---------------------------------------------------------------------------------------------
# 1-3: from the bytes


def _file_read(path: str) -> str:
    """What verify scans: the file a model or adapter folder's library reads (its other files are not loaded,
    and not what is verified), or the path itself (a file, a DCP or shard folder)."""
    if os.path.isdir(path):
        from .formats import detect
        from .formats.folders import find
        if detect(path) != "dcp":
            entry = find(path).entry
            if not entry.endswith(".index.json"):
                return entry
    return path


def _readable(ckpt: Checkpoint, sd: StateDict, scanned, trust: bool = False) -> CheckResult:
    from .scanning import NATIVE_CODE
    if ckpt.format == "pt2" and trust and set(scanned.dangerous_names) == {NATIVE_CODE}:
        # an AOTInductor package is native code by design: --trust allows loading it (the pickles stay held to scan)
        return CheckResult("readable", None, "pass",
                           f"pt2, {len(sd.tensors)} tensors in {sd.entry or 'the top level'}, read with no code run; "
                           f"it carries compiled native code, run under --trust")
    if scanned.dangerous_names:
        return CheckResult("readable", None, "fail",
                           f"scan calls it DANGEROUS: {', '.join(scanned.dangerous_names[:6])}"
                           f"{' ...' if len(scanned.dangerous_names) > 6 else ''} (see: ckpttool scan {ckpt.path})")
    stubs = sorted({g.qualname for g in ckpt.globals if g.handling == "stub"},
                   key=lambda n: (n.startswith("torch."), n))
    detail = f"{ckpt.format}, {len(sd.tensors)} tensors in {sd.entry or 'the top level'}, no code run"
    if stubs:
        detail += f"; running its pickled objects needs --trust (imports {', '.join(stubs[:4])}" \
                  f"{' ...' if len(stubs) > 4 else ''})"
    return CheckResult("readable", None, "pass", detail)


def _torch_load(ckpt: Checkpoint, sd: StateDict, scanned, trust: bool, mapping: MapLocation = None) -> CheckResult:
    """Would a plain ``torch.load(path, weights_only=True)`` (with the user's map_location) read this file here?"""
    name = "torch.load"
    call = "torch.load(weights_only=True" + (f", {_map_location_code(mapping)})" if mapping is not None else ")")
    if importlib.util.find_spec("torch") is None:  # found without importing it (630 MB): not installed here
        return CheckResult(name, None, "fail", "torch is not installed here, so a plain torch.load cannot read it: "
                                               "pip install 'ckpttool[torch]'")
    tags = sorted({t.device for t in sd.tensors.values()})
    missing = sorted({_mapped(d, mapping) for d in tags if not _device_present(_mapped(d, mapping))})
    if missing:
        if mapping is None:
            return CheckResult(name, None, "fail",
                               f"a plain torch.load fails here: the file puts tensors on {', '.join(missing)}, which "
                               f"this machine lacks; --map-location cpu checks torch.load(map_location='cpu') instead "
                               f"(the device tags check names the remap that fixes the file)")
        return CheckResult(name, None, "fail", f"{call} fails here: it puts tensors on {', '.join(missing)}, which "
                                               f"this machine lacks")
    where = f" (storages tagged {', '.join(tags)} go to {', '.join(sorted({_mapped(d, mapping) for d in tags}))})" \
        if mapping is not None and tags else ""
    if scanned.weights_only:
        return CheckResult(name, None, "pass", f"{call} reads it as it is{where}")
    how = f"it needs: {scanned.advice}" if scanned.advice else \
        "no add_safe_globals line makes it (" + "; ".join(p.split(": ", 1)[-1] for p in scanned.problems
                                                         if "no add_safe_globals" in p)[:300] + ")"
    if trust:
        return CheckResult(name, None, "pass", f"loads only with weights_only=False, allowed by --trust; {how}{where}")
    return CheckResult(name, None, "fail", f"{call} refuses it; {how}; or pass --trust "
                                           "if the file may run code with weights_only=False")


def _integrity(ckpt: Checkpoint, sd: StateDict) -> CheckResult:
    """Zip archives carry a CRC-32 per record: recompute each storage's, streamed, and name what fails.
    A record whose CRC-32 is 0 was written without one (``torch.serialization.set_crc32_options(False)``)."""
    import zlib
    from .errors import FormatError
    from .formats.archive import Archive
    if ckpt.format not in ("torch_zip", "torchscript", "pt2"):
        return CheckResult("integrity", None, "skip", f"{ckpt.format} files carry no checksums")
    users: Dict[str, List[str]] = {}
    for name, t in sd.tensors.items():
        if t.storage is not None:
            users.setdefault(t.storage.key, []).append(name)
    checked = unchecked = 0
    with Archive.open(ckpt.path) as archive:
        for record in archive.records:
            if not record.crc:
                unchecked += 1
                continue
            crc = 0
            try:
                with archive.open_record(record, check_crc=False) as f:  # computed here, to name the tensor
                    while True:
                        block = f.read(1 << 24)
                        if not block:
                            break
                        crc = zlib.crc32(block, crc)
            except FormatError as e:
                return CheckResult("integrity", None, "fail", f"record {record.name} unreadable: {e.message}",
                                   culprit=record.name)
            if crc != record.crc:
                key = record.name.rpartition("/")[2]
                names = users.get(key, []) if "/data/" in record.name else []
                if ckpt.format == "pt2":  # its storages are keyed by their record's name in the archive folder
                    names = users.get(record.name.partition("/")[2], [])
                what = f"tensor {names[0]}" if names else f"record {record.name}"
                return CheckResult("integrity", None, "fail", f"{what}: CRC-32 mismatch (the bytes changed after "
                                                              f"writing)", culprit=names[0] if names else record.name)
            checked += 1
    if not checked:
        return CheckResult("integrity", None, "skip", f"written without CRC-32 checksums (all {unchecked} zip "
                                                      f"records declare 0): nothing to check")
    more = f"; {unchecked} written without one (not checked)" if unchecked else ""
    return CheckResult("integrity", None, "pass", f"CRC-32 of {checked} zip records match{more}")


def _same_tensors(ckpt: Checkpoint, orig: Checkpoint, label: str, atol: Optional[float] = None,
                  rtol: Optional[float] = None) -> CheckResult:
    """With --against: the state_dicts themselves, tensor by tensor (ONNX initializers have other names).

    Bit-exact unless --atol/--rtol allow more: a migration must not change a bit.
    """
    if "onnx" in (ckpt.format, orig.format):
        return CheckResult("same tensors as original", None, "skip",
                           "ONNX initializers are named by the exporter, not by the state_dict")
    from .diffing import diff
    tolerant = atol is not None or rtol is not None
    r = diff(ckpt, orig, atol=atol, rtol=rtol)
    if r.equal and r.value_close and not tolerant:
        d = r.value_close[0]
        return CheckResult("same tensors as original", None, "fail",
                           f"{len(r.value_close)} tensor(s) not bit-exact vs {label}; first: {d.name} (max abs diff "
                           f"{d.max_abs:.3g}; pass --atol/--rtol to allow it)", culprit=d.name)
    if r.equal:
        return CheckResult("same tensors as original", None, "pass",
                           f"{r.exact} bit-exact, {len(r.value_close)} within tolerance vs {label}"
                           + (f" ({r.prefix_alignment.describe('this file', 'the original')})"
                              if r.prefix_alignment.active else ""))
    for kind, items in (("differs in value", r.value_mismatch), ("differs in shape", r.shape_mismatch),
                        ("differs in dtype", r.dtype_mismatch)):
        if items:
            d = items[0]
            extra = f" (max abs diff {d.max_abs:.3g})" if d.max_abs is not None else ""
            return CheckResult("same tensors as original", None, "fail",
                               f"{len(items)} tensor(s) {kind} vs {label}; first: {d.name}{extra}", culprit=d.name)
    missing = r.only_in_b or r.only_in_a
    side = "missing here" if r.only_in_b else "not in the original"
    return CheckResult("same tensors as original", None, "fail", f"{len(missing)} tensor(s) {side}; first: "
                                                                 f"{missing[0]}", culprit=missing[0])


def _format_round_trip(ckpt: Checkpoint, sd: StateDict, progress) -> List[CheckResult]:
    from .converting import not_plain, safetensors_entries, torch_tree
    from .formats.safetensors_writer import write_safetensors
    from .formats.torch_writer import write_torch_zip
    out: List[CheckResult] = []
    # every tensor torch.save can hold: dense ones with data, and those rebuilt by a call of their own
    # (sparse, nested, quantized, subclasses, meta), written back by that call
    every = {n: t for n, t in sd.tensors.items() if (t.has_data and t.kind == "dense") or t.rebuild is not None}
    plain = {n: t for n, t in every.items() if not not_plain(t)}
    if not every:
        return [CheckResult("format round trip", None, "skip", "no tensor with data")]
    # progress: the bytes written, the torch zip's then the safetensors' (reading back follows each write)
    total = sum(t.nbytes for t in every.values()) + sum(t.nbytes for t in plain.values())
    done = [0]

    def tick(n: int) -> None:
        done[0] = min(done[0] + n, total)
        if progress:
            progress(done[0], total)

    with scratch_folder(prefix="ckpttool-verify-") as tmpdir:
        # torch zip: everything, views and shared storages as they are
        p = os.path.join(tmpdir, "rt.pt")
        try:
            write_torch_zip(p, torch_tree(every, None, ckpt.path), progress=tick)
            out.append(_compare_back("format round trip", "torch_zip", every, p, shared=True))
        except UsageError as e:
            out.append(CheckResult("format round trip", "torch_zip", "fail", e.message))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(p)
        # safetensors: the plain dense tensors of the dtypes it can hold; tied twins stored once
        others = len(every) - len(plain)
        p = os.path.join(tmpdir, "rt.safetensors")
        try:
            if not plain:
                raise UsageError(f"none of the {others} tensors is a plain dense tensor, all safetensors holds")
            entries, dropped = safetensors_entries(plain, None, ckpt.path)
            done[0] = sum(t.nbytes for t in every.values())  # the torch zip's part is done, however it ended
            write_safetensors(p, entries, {"format": "pt", **dropped}, progress=tick)
        except UsageError as e:
            out.append(CheckResult("format round trip", "safetensors", "skip", e.message))
        else:
            r = _compare_back("format round trip", "safetensors", plain, p, shared=False, dropped=dropped)
            if others and r.status == "pass":
                r = dataclasses.replace(r, detail=f"{r.detail}; {others} tensors it cannot hold (sparse, quantized, "
                                                  "views with bits...) not tried")
            out.append(r)
    return out


def _storage_groups(tensors: Dict[str, TensorRef]) -> List[Tuple[str, ...]]:
    groups: Dict[int, List[str]] = {}
    for n, t in tensors.items():
        groups.setdefault(id(t.storage), []).append(n)
    return sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)


def _compare_back(name: str, fmt: str, src: Dict[str, TensorRef], path: str, shared: bool,
                  dropped: Optional[Dict[str, str]] = None) -> CheckResult:
    back = find_state_dict(open_checkpoint(path)).tensors
    expected = list(src)  # tied names stored once in safetensors come back from its header
    missing = [n for n in expected if n not in back]
    if missing or len(back) != len(expected):
        return CheckResult(name, fmt, "fail", f"{len(missing)} tensors missing after the round trip",
                           culprit=missing[0] if missing else None)
    for n in expected:
        a, b = src[n], back[n]
        if (a.shape, a.dtype, a.value_form) != (b.shape, b.dtype, b.value_form):
            return CheckResult(name, fmt, "fail", f"{n} reads back as {b.form} {b.dtype} {list(b.shape)}, was "
                                                  f"{a.form} {a.dtype} {list(a.shape)}", culprit=n)
        pairs = [(a, b)] if not a.is_composite else [(pa, pb) for (_, pa), (_, pb) in zip(a.parts, b.parts)]
        if a.is_composite and [(k, p.dtype, p.shape) for k, p in a.parts] != \
                [(k, p.dtype, p.shape) for k, p in b.parts]:
            return CheckResult(name, fmt, "fail", f"{n}: its parts differ after the round trip", culprit=n)
        for x, y in pairs:
            if not x.has_data or bytes_equal(x, y):  # two reused buffers and a memcmp, where both are contiguous
                continue
            for pa, pb in zip(pieces(x, 1 << 22), pieces(y, 1 << 22)):
                if not same_bits(pa, pb):
                    return CheckResult(name, fmt, "fail", f"{n}: values differ after the round trip", culprit=n)
    detail = f"{len(expected)} tensors bit-equal"
    if shared:
        want, got = _storage_groups(src), _storage_groups(back)
        if want != got:
            first = next(iter(set(want) ^ set(got)))
            return CheckResult(name, fmt, "fail", f"shared storages not preserved: {', '.join(first)}",
                               culprit=first[0])
        if want:
            detail += f", {len(want)} shared storages kept"
    for n, keep in (dropped or {}).items():
        if back[n].storage is not back[keep].storage:
            return CheckResult(name, fmt, "fail", f"tied {n} does not come back as its twin {keep}", culprit=n)
    if dropped:
        detail += f", {len(dropped)} tied tensors stored once and restored from the header"
    return CheckResult(name, fmt, "pass", detail)


def _device_round_trip(ckpt: Checkpoint, sd: StateDict, devs: List[str],
                       mapping: MapLocation = None) -> List[CheckResult]:
    out = []
    tags = sorted({t.device for t in sd.tensors.values() if t.has_data or t.is_composite})
    if ckpt.format == "dcp":  # dcp.load reads every chunk with torch.load(map_location="cpu"), whatever its tag
        out.append(CheckResult("device tags", None, "pass", f"storages tagged {', '.join(tags) or 'nothing'}; "
                                                            f"dcp.load reads them onto the CPU"))
        tags = []
    missing = [d for d in tags if not _device_present(_mapped(d, mapping))]
    if missing:
        kinds = sorted({d.partition(":")[0] for d in missing})
        fix = " ".join(f"--map {k}=cpu" for k in kinds)  # cuda=cpu covers every cuda:N
        loader = "torch.jit.load" if ckpt.format == "torchscript" else "torch.load"
        if mapping is None:
            detail = (f"the file's storages say {', '.join(missing)}, which this machine lacks: a plain {loader} "
                      f"fails here, {loader}(map_location='cpu') is needed (--map-location cpu checks that)")
        else:
            detail = (f"{_map_location_code(mapping)} puts the storages tagged {', '.join(missing)} on "
                      f"{', '.join(sorted({_mapped(d, mapping) for d in missing}))}, which this machine lacks")
        if ckpt.format == "pt2":  # torch.export.load has no map_location, and remap does not rewrite a program
            detail = (f"the program's weights say {', '.join(missing)}, which this machine lacks: "
                      f"torch.export.load puts them there and fails here; export it again on a machine with that "
                      f"device, or on the CPU")
            out.append(CheckResult("device tags", None, "fail", detail))
        else:
            out.append(CheckResult("device tags", None, "fail", f"{detail}; to fix the file: ckpttool remap "
                                                                f"{shlex.quote(ckpt.path)} -o FIXED.pt {fix}"))
    elif mapping is not None and any(_mapped(d, mapping) != d for d in tags):
        moved = sorted({_mapped(d, mapping) for d in tags})
        out.append(CheckResult("device tags", None, "pass", f"storages tagged {', '.join(tags)}; "
                                                            f"{_map_location_code(mapping)} puts them on "
                                                            f"{', '.join(moved)}, present here"))
    elif ckpt.format != "dcp":
        out.append(CheckResult("device tags", None, "pass", f"storages tagged {', '.join(tags) or 'nothing'}, "
                                                            f"all present here"))
    for dev in devs:
        if dev == "cpu":  # where the bytes are read and compared (format round trip): nothing to move
            continue
        bad = None
        count = 0
        for name, t in sd.tensors.items():
            if not t.has_data or t.kind != "dense":
                continue
            x = t.to_torch()
            try:
                y = x.to(dev).cpu()
            except (RuntimeError, TypeError) as e:  # a dtype the device has no kernels for
                out.append(CheckResult("device round trip", dev, "skip", f"{name}: {type(e).__name__}: "
                                                                         f"{str(e).splitlines()[0]}"))
                bad = "skip"
                break
            if x.dtype != y.dtype or x.shape != y.shape or not _bits(x).equal(_bits(y)):
                bad = name
                break
            count += 1
        if bad == "skip":
            continue
        if bad:
            out.append(CheckResult("device round trip", dev, "fail", f"{bad} comes back different from {dev}",
                                   culprit=bad))
        else:
            out.append(CheckResult("device round trip", dev, "pass", f"{count} tensors to {dev} and back, bit-equal"))
    return out


def _bits(x: Any) -> Any:
    import torch
    return x.contiguous().view(-1).view(torch.uint8) if x.numel() else torch.empty(0, dtype=torch.uint8)


def _device_present(tag: str) -> bool:
    from .torch_bridge import accelerator_possible
    kind, _, index = tag.partition(":")
    if kind in ("cpu", "meta"):  # meta holds no data: every machine has it
        return True
    if not accelerator_possible():
        return False
    import torch
    if kind == "cuda":
        return torch.cuda.is_available() and (not index or int(index) < torch.cuda.device_count())
    if kind == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return False


# ---------------------------------------------------------------------------------------------
# 4-5: with code


class _Runner:
    """Something that runs: a model (SPEC + the state_dict, or the file's own with --trust) or an ONNX graph."""

    def __init__(self, ckpt: Checkpoint, sd: StateDict):
        self.ckpt, self.sd = ckpt, sd
        self.module_factory: Optional[Callable[[], Any]] = None  # () -> (module on cpu, strict state_dict or None)
        self.onnx_path: Optional[str] = None
        self.program: Optional["_Program"] = None  # a .pt2, loaded by torch's own loader (--trust)
        self.why_not = ""
        self.label = ""

    @property
    def can_run(self) -> bool:
        return self.module_factory is not None or self.onnx_path is not None or self.program is not None

    @classmethod
    def for_path(cls, ckpt: Checkpoint, sd: StateDict, model: Optional[str], model_args: Sequence[str],
                 trust: bool, import_path: Sequence[str], key: Optional[str]) -> "_Runner":
        r = cls(ckpt, sd)
        if ckpt.format == "onnx":
            r.onnx_path = ckpt.path
            r.label = "onnxruntime"
            r.why_not = "an ONNX graph has no load_state_dict; it is run by onnxruntime"
            return r
        if ckpt.format == "pt2":  # its own program or nothing (a --model is the --against side's)
            r.why_not = PT2_NOT_LOADED
            if trust:
                r.program = _Program(ckpt)
                r.label = f"{r.program.loader} (--trust)"
            return r
        if model:
            from .modelspec import resolve
            resolve(model)  # a bad SPEC is an error before any check runs

            def build():
                from .modelspec import build_model
                net, _ = build_model(model, model_args, device="cpu")
                return net, {n: t.to_torch() for n, t in sd.tensors.items()}
            r.module_factory, r.label = build, model
            return r
        if sd.source in ("pickled_module", "script_module") or ckpt.format == "torchscript":
            if not trust:
                r.why_not = "the file's model runs only with --trust (or pass --model SPEC)"
                return r

            def own():
                net = trusted_module(ckpt, key, import_path)
                return net, None
            r.module_factory, r.label = own, "its own code (--trust)"
            return r
        bundled = [k for k, v in (ckpt.root.items() if isinstance(ckpt.root, dict) else ())
                   if module_kind(v) == "pickled"]
        if bundled and trust:  # a training checkpoint with its model pickled beside the state_dict
            def bundled_model():
                net = trusted_module(ckpt, str(bundled[0]), import_path)
                return net, {n: t.to_torch() for n, t in sd.tensors.items()}
            r.module_factory, r.label = bundled_model, f"the model pickled in its entry {bundled[0]} (--trust)"
            return r
        r.why_not = ("the file's pickled model runs only with --trust (or pass --model SPEC)" if bundled
                     else "a state_dict alone does not run: pass --model SPEC")
        return r

    def borrow(self, other: "_Runner", where: str) -> None:
        """Run this state_dict in ``other``'s model (the original a safetensors file was migrated from)."""
        sd = self.sd

        def build():
            net, _ = other.module_factory()
            return net, {n: t.to_torch() for n, t in sd.tensors.items()}
        self.module_factory, self.label = build, f"the model of {where}"

    def _module_on(self, dev: str) -> Tuple[Any, Optional[Dict[str, Any]]]:
        net, sd = self.module_factory()
        return net.to(dev).eval(), sd

    def load_check(self, dev: str) -> CheckResult:
        net, sd = self._module_on(dev)  # a bad --model or an unimportable class is an error (exit 2)
        if sd is None:  # the file's own module: its state_dict, from our reader, loaded back strictly
            sd = {n: t.to_torch() for n, t in self.sd.tensors.items()}
        sd = {n: t.to(dev) for n, t in sd.items()}
        try:
            result = net.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            culprit = line.split("for ", 1)[1].split(":", 1)[0] if "size mismatch for " in line else None
            return CheckResult("loads into model", dev, "fail", line, culprit=culprit)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                             f"{' ...' if len(unexpected) > 3 else ''})")
            return CheckResult("loads into model", dev, "fail", "strict load: " + "; ".join(parts),
                               culprit=(missing or unexpected)[0])
        return CheckResult("loads into model", dev, "pass", f"load_state_dict(strict=True) into {self.label}: "
                                                            f"{len(sd)} tensors")

    def outputs(self, dev: str, inputs: List[Any]) -> List[Any]:
        """Outputs on ``dev`` as CPU tensors."""
        import torch
        if self.program is not None:
            return self.program.outputs(dev, inputs)
        if self.onnx_path is not None:
            return run_onnx(self.onnx_path, inputs)
        net, sd = self._module_on(dev)
        if sd is not None:
            net.load_state_dict({n: t.to(dev) for n, t in sd.items()}, strict=False)
        # floating inputs in the model's own precision (an fp16 export compared with its fp32 original)
        own = next((p.dtype for p in list(net.parameters()) + list(net.buffers()) if p.is_floating_point()), None)
        inputs = [x.to(own) if own is not None and x.is_floating_point() else x for x in inputs]
        with torch.no_grad():
            try:
                y = net(*[x.to(dev) for x in inputs])
            except Exception as e:  # the model's forward on these shapes
                raise UsageError(f"the model cannot run on these inputs: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}", self.ckpt.path) from None
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        return [t.detach().cpu() for t in ys]

    def compute_checks(self, devs: List[str], feeds: List[Feed], atol, rtol) -> List[CheckResult]:
        inputs = _inputs(feeds)
        ref = self.outputs("cpu", inputs)
        shown = _feeds_text(feeds)
        out = [CheckResult("computes the same", "cpu", "pass",
                           f"reference: {len(ref)} output(s) {', '.join(shape_text(r.shape) for r in ref)} "
                           f"via {self.label}, on seeded inputs {shown}")]
        for dev in devs:
            if dev == "cpu":
                continue
            if self.onnx_path is not None:
                out.append(CheckResult("computes the same", dev, "skip", "ONNX files are run on the CPU here"))
                continue
            if self.program is not None and self.program.aoti:
                out.append(CheckResult("computes the same", dev, "skip", "an AOTInductor package runs on the device "
                                                                         "it was compiled for only"))
                continue
            out.append(_compare_outputs("computes the same", dev, self.outputs(dev, inputs), ref, atol, rtol,
                                        "vs cpu"))
        return out

    def against(self, orig: "_Runner", feeds: List[Feed], atol, rtol, label: str) -> CheckResult:
        inputs = _inputs(feeds)
        shown = _feeds_text(feeds)
        return _compare_outputs("matches original", "cpu", self.outputs("cpu", inputs),
                                orig.outputs("cpu", inputs), atol, rtol, f"vs {label} via {orig.label}",
                                f" (inputs {shown})")


def _inputs(feeds: List[Feed]) -> List[Any]:
    """Seeded inputs for the feeds (running.seeded_inputs: the same tensors ONNX export checks with)."""
    return seeded_inputs([(shape, dtype) for _, shape, dtype in feeds])


def _compare_outputs(name: str, dev: str, got: List[Any], ref: List[Any], atol, rtol, what: str,
                     on: str = "") -> CheckResult:
    if len(got) != len(ref):
        return CheckResult(name, dev, "fail", f"{len(got)} outputs {what}, expected {len(ref)}")
    worst_abs = worst_rel = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        if tuple(g.shape) != tuple(r.shape):
            return CheckResult(name, dev, "fail", f"output{i}: shape {list(g.shape)} {what}, expected "
                                                  f"{list(r.shape)}", culprit=f"output{i}")
        # the looser of the two dtypes' tolerances: an fp16 export is held to fp16's, not to its original's fp32
        a_def, r_def = (max(pair) for pair in zip(*(OUTPUT_TOLERANCE.get(str(t.dtype).replace("torch.", ""), (0.0, 0.0))
                                                     for t in (g, r))))
        at = a_def if atol is None else atol
        rt = r_def if rtol is None else rtol
        d = difference(g, r, at, rt)
        max_abs, max_rel = d.max_abs, d.max_rel
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
        if not d.close:
            return CheckResult(name, dev, "fail", f"output{i} {what}: max abs diff {max_abs:.3g}, max rel "
                                                  f"{max_rel:.3g} (atol {at}, rtol {rt}){on}", culprit=f"output{i}",
                               max_abs=max_abs, max_rel=max_rel)
    return CheckResult(name, dev, "pass", f"{len(got)} output(s) {what}: max abs diff {worst_abs:.3g}, "
                                          f"max rel {worst_rel:.3g}{on}", max_abs=worst_abs, max_rel=worst_rel)


# ---------------------------------------------------------------------------------------------
# .pt2: torch.export programs and AOTInductor packages, run by torch's own loaders under --trust


def _pt2_loader(ckpt: Checkpoint) -> str:
    """The loader of a .pt2: torch.export.load where it holds an ExportedProgram, else AOTInductor's."""
    return "aoti_load_package" if ckpt.metadata.get("kind") == "AOTInductor package" else "torch.export.load"


class _Program:
    """A .pt2 as torch loads it (``torch.export.load``, or ``torch._inductor.aoti_load_package`` for a package
    holding only compiled code), loaded once, on first use; run with a seeded input as its graph says."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.loader = _pt2_loader(ckpt)
        self.aoti = self.loader == "aoti_load_package"
        self._loaded: Any = None
        self._modules: Dict[str, Any] = {}

    def load(self) -> Any:
        if self._loaded is None:
            if self.aoti:
                from torch._inductor import aoti_load_package
                self._loaded = aoti_load_package(self.ckpt.path)
            else:
                import torch
                self._loaded = torch.export.load(self.ckpt.path)
        return self._loaded

    def _callable(self, dev: str) -> Tuple[Any, str]:
        """What runs on ``dev`` and the device its inputs go to."""
        prog = self.load()
        if self.aoti:  # compiled for one device: it runs there
            where = str((self.ckpt.metadata.get("aoti") or {}).get("device") or "cpu").split()[0]
            return prog, where
        fn = self._modules.get(dev)
        if fn is None:
            ep = prog
            if dev != "cpu" or any(getattr(t, "device", None) is not None and t.device.type != "cpu"
                                   for t in list(ep.state_dict.values()) + list(ep.constants.values())):
                from torch.export.passes import move_to_device_pass
                ep = move_to_device_pass(ep, dev)
            fn = self._modules[dev] = ep.module()
        return fn, dev

    def outputs(self, dev: str, inputs: List[Any]) -> List[Any]:
        import torch
        fn, where = self._callable(dev)
        with torch.no_grad():
            try:
                y = fn(*[x.to(where) for x in inputs])
            except Exception as e:  # the program's own checks of its inputs (shapes, guards) and its kernels
                raise UsageError(f"the program cannot run on these inputs: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}", self.ckpt.path) from None
        return [t.detach().cpu() for t in _tensor_leaves(y)]


def _tensor_leaves(y: Any) -> List[Any]:
    import torch
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _tensor_leaves(v)]
    return []


def _pt2_load_checks(runner: "_Runner", ckpt: Checkpoint, sd: StateDict) -> List[CheckResult]:
    """``torch.export.load`` (or ``aoti_load_package``) of the file, with --trust; then the weights ckpttool
    read held to what that loader gives, bit for bit. Without --trust: a failed check, not a pass."""
    name = _pt2_loader(ckpt)
    program = runner.program
    if program is None:
        return [CheckResult(name, None, "fail", PT2_NOT_LOADED)]
    try:
        loaded = program.load()
    except ImportError as e:
        return [CheckResult(name, None, "fail", f"cannot load it here: {e}")]
    except Exception as e:  # whatever the loader raises on this file is the finding
        return [CheckResult(name, None, "fail", f"{name} fails: {type(e).__name__}: "
                                                f"{str(e).splitlines()[0][:200] if str(e) else ''}")]
    ours = {"state_dict": ckpt.root.get("state_dict") or {}, "constants": ckpt.root.get("constants") or {}}
    if program.aoti:
        fqns = list(loaded.get_constant_fqns())
        return [CheckResult(name, None, "pass", f"{name}(path) under --trust: a compiled model with {len(fqns)} "
                                                f"weight(s)"), _aoti_same_weights(ckpt, ours, fqns)]
    import torch
    theirs = {"state_dict": dict(loaded.state_dict),
              "constants": {k: v for k, v in loaded.constants.items() if isinstance(v, torch.Tensor)}}
    objects = len(loaded.constants) - len(theirs["constants"])
    out = [CheckResult(name, None, "pass", f"{name}(path) under --trust: {len(theirs['state_dict'])} weight(s), "
                                           f"{len(theirs['constants'])} tensor constant(s)"
                       + (f", {objects} object constant(s)" if objects else ""))]
    out.append(_same_as_loader(name, ours, theirs))
    return out


def _same_as_loader(loader: str, ours: Dict[str, Dict[str, Any]], theirs: Dict[str, Dict[str, Any]]) -> CheckResult:
    """Every tensor ckpttool read against the loader's: the same names in the same order, shapes, dtypes,
    strides, storage offsets and bytes."""
    check = "same weights as loader"
    exact = by_meta = 0
    for part in ("state_dict", "constants"):
        a, b = ours[part], theirs[part]
        if list(a) != list(b):
            only_a = [n for n in a if n not in b]
            only_b = [n for n in b if n not in a]
            what = (f"{len(only_a)} read by ckpttool, not by {loader}; first: {only_a[0]}" if only_a else
                    f"{len(only_b)} given by {loader}, not read by ckpttool; first: {only_b[0]}" if only_b else
                    "the same names in another order")
            return CheckResult(check, None, "fail", f"{part}: {what}",
                               culprit=(only_a or only_b or [None])[0])
        for n, t in a.items():
            r = b[n]
            theirs_meta = (tuple(r.shape), str(r.dtype).replace("torch.", ""))
            if not isinstance(t, TensorRef) or (tuple(t.shape), t.dtype) != theirs_meta:
                shown = f"{t.dtype} {list(t.shape)}" if isinstance(t, TensorRef) else type(t).__name__
                return CheckResult(check, None, "fail", f"{part} {n}: ckpttool reads {shown}, {loader} gives "
                                                        f"{theirs_meta[1]} {list(theirs_meta[0])}", culprit=n)
            if not (t.kind == "dense" and t.has_data and type(r).__name__ in ("Tensor", "Parameter")):
                by_meta += 1  # a subclass (pickled whole): its components are its own
                continue
            if (tuple(t.stride), t.storage_offset) != (tuple(r.stride()), r.storage_offset()):
                return CheckResult(check, None, "fail", f"{part} {n}: ckpttool reads strides {list(t.stride)} at "
                                                        f"offset {t.storage_offset}, {loader} gives {list(r.stride())} "
                                                        f"at {r.storage_offset()}", culprit=n)
            if not _bits(t.to_torch()).equal(_bits(r.detach().cpu())):
                return CheckResult(check, None, "fail", f"{part} {n}: its bytes differ from {loader}'s", culprit=n)
            exact += 1
    more = f"; {by_meta} tensor subclass(es) compared by shape and dtype" if by_meta else ""
    return CheckResult(check, None, "pass", f"{exact} tensor(s) bit-equal to {loader}'s (names, order, strides, "
                                            f"offsets){more}")


def _aoti_same_weights(ckpt: Checkpoint, ours: Dict[str, Dict[str, Any]], fqns: List[str]) -> CheckResult:
    """An AOTInductor package: the weights ckpttool read against the names its loader lists and, where they are
    in its shared library, the values AOTInductor's own runner extracts from it."""
    check = "same weights as loader"
    mine = {**ours["state_dict"], **ours["constants"]}
    if sorted(mine) != sorted(fqns):
        only_a = sorted(set(mine) - set(fqns))
        only_b = sorted(set(fqns) - set(mine))
        first = (only_a or only_b)[0]
        return CheckResult(check, None, "fail", f"{len(only_a)} weight(s) read by ckpttool and not named by "
                                                f"aoti_load_package, {len(only_b)} the other way; first: {first}",
                           culprit=first)
    aoti = ckpt.metadata.get("aoti") or {}
    lib = next((c["name"] for c in ckpt.metadata.get("compiled", ()) if c["name"].endswith(".wrapper.so")), None)
    if aoti.get("weights_in") != "library" or lib is None or not str(aoti.get("device") or "").startswith("cpu"):
        return CheckResult(check, None, "skip", f"{len(fqns)} name(s) match aoti_load_package's; their values are "
                                                "compared only for CPU packages holding them in the library")
    import torch
    from .formats.archive import Archive
    with scratch_folder(prefix="ckpttool-verify-") as tmpdir:
        so = os.path.join(tmpdir, "model.so")
        with Archive.open(ckpt.path) as archive, open(so, "wb") as f:
            rec = archive.find(lib)
            with archive.open_record(rec) as src:
                while True:
                    block = src.read(1 << 24)
                    if not block:
                        break
                    f.write(block)
        try:  # the runner AOTInductor's package loader uses, on the library alone
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)  # alive while its tensors are read:
            extracted = runner.extract_constants_map(False)  # they view its memory
        except (AttributeError, RuntimeError) as e:
            return CheckResult(check, None, "skip", f"{len(fqns)} name(s) match aoti_load_package's; AOTInductor's "
                                                    f"runner cannot read their values here: {str(e)[:160]}")
        for n, t in mine.items():
            r = extracted.get(n)
            if r is None or (tuple(r.shape), str(r.dtype).replace("torch.", "")) != (tuple(t.shape), t.dtype):
                return CheckResult(check, None, "fail", f"{n}: the compiled model holds "
                                                        f"{'nothing' if r is None else list(r.shape)} under this name",
                                   culprit=n)
            if not t.has_data or not _bits(t.to_torch()).equal(_bits(r.detach().cpu())):
                return CheckResult(check, None, "fail", f"{n}: its bytes differ from the compiled model's", culprit=n)
        del extracted, runner
    return CheckResult(check, None, "pass", f"{len(mine)} weight(s) bit-equal to those AOTInductor's runner "
                                            f"extracts from {lib.rpartition('/')[2]}")
