"""No command runs any part of a checkpoint without --trust (DESIGN.md, principle 2).

Live payloads (test_safe_pickle's, each creating a marker file when a stock unpickler runs it;
and test_scan's ``BYPASSES``) are planted in every container a command reads: a bare pickle, a
real torch zip's data.pkl, a real legacy file's main pickle and its sys_info pickle, a real
state_dict's data.pkl with one more entry, a real pickled full model wrapped in a checkpoint dict
with one more entry, and the ``.metadata`` of a real torch.distributed.checkpoint folder. Every
command (inspect, diff both ways, filter with the payload as source and as target, remap, convert
to .pt / .safetensors / .onnx, verify alone / with --model / with --against, scan) then runs on
it without --trust, under an audit hook. Afterwards no marker exists, nothing was spawned or
executed, the exit code is 0, 1 or 2 (convert to ONNX: 2, a refusal; scan: 1) with no
traceback, and any output filter/convert wrote holds tensors only.
"""
from __future__ import annotations

import json
import os
import pickletools
import shutil
import sys
import time
import warnings
import zipfile

import pytest
import torch

from payloads import (BYPASSES, PAYLOAD_IDS, PAYLOADS, audited, embed, ext_registry, make_ctx,  # noqa: F401
                      markers_in, record_headers, u, zip_with_pickle)
from click.testing import CliRunner

from ckpttool.cli import cli  # imported before any audited window
from ckpttool.scanning import scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "fixtures")
SPEC = "mypkg:ClassNet"
SHAPE = "1x3x8x8"

# Events that mean something ran: a process, a shell, Python source from a string or a file,
# or the stock unpickler's import of a global.
EXEC_EVENTS = {"os.system", "subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "cpython.run_file",
               "cpython.run_command", "cpython.run_module", "pickle.find_class", "os.exec", "os.spawn",
               "webbrowser.open", "ctypes.dlopen", "socket.connect"}


# =============================================================================================
# Containers
# =============================================================================================

def body_of(data: bytes) -> bytes:
    """A payload pickle's opcodes without PROTO, FRAME and STOP: to splice into another pickle."""
    assert data[:1] == b"\x80", data[:8]
    b = data[2:]
    if b[:1] == b"\x95":
        b = b[9:]
    assert b.endswith(b"."), b[-8:]
    return b[:-1]


def real_data_pkl(path: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def pickle_spans(raw: bytes, count: int):
    spans, start = [], 0
    for _ in range(count):
        end = start + max(pos for _, _, pos in pickletools.genops(raw[start:])) + 1
        spans.append((start, end))
        start = end
    return spans


@pytest.fixture(scope="session")
def real_dcp(tmp_path_factory):
    import torch.distributed.checkpoint as dcp
    folder = tmp_path_factory.mktemp("dcp_all") / "ckpt"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"stem.weight": torch.randn(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, checkpoint_id=str(folder))
    return str(folder)


def plant(container: str, data: bytes, tmp_path, make, real_dcp: str) -> str:
    d = str(tmp_path)
    if container in ("bare", "zip", "legacy"):
        return embed(container, data, tmp_path, make)
    if container == "dcp":
        dst = os.path.join(d, "payload_dcp")
        shutil.copytree(real_dcp, dst)
        with open(os.path.join(dst, ".metadata"), "wb") as f:
            f.write(data)
        return dst
    if container == "zip+state_dict":  # a real state_dict, plus "hook": <payload>
        src = make("state_dict.pt")
        real = real_data_pkl(src)
        return zip_with_pickle(src, os.path.join(d, "sd_hook.pt"), real[:-1] + u("hook") + body_of(data) + b"s.")
    if container == "zip+full_model":  # {"model": <real pickled ClassNet>, "hook": <payload>}
        src = make("full_model.pth")
        real = real_data_pkl(src)
        wrapped = b"\x80\x02}(" + u("model") + body_of(real) + u("hook") + body_of(data) + b"u."
        return zip_with_pickle(src, os.path.join(d, "full_hook.pt"), wrapped)
    if container == "legacy+sys_info":  # a real legacy checkpoint whose sys_info pickle is the payload
        raw = open(make("legacy.pt"), "rb").read()
        spans = pickle_spans(raw, 3)
        path = os.path.join(d, "legacy_sysinfo.pt")
        with open(path, "wb") as f:
            f.write(raw[:spans[2][0]] + data + raw[spans[2][1]:])
        return path
    raise AssertionError(container)


CONTAINERS = ("bare", "zip", "legacy", "dcp", "zip+state_dict", "zip+full_model", "legacy+sys_info")


# =============================================================================================
# Commands, none with --trust
# =============================================================================================

def o(out: str, name: str) -> str:
    return os.path.join(out, name)


COMMANDS = {
    "inspect": lambda p, c, out: ["inspect", p],
    "inspect --json --stats": lambda p, c, out: ["inspect", p, "--json", "--stats"],
    "inspect --depth": lambda p, c, out: ["inspect", p, "--depth", "2"],
    "diff payload clean": lambda p, c, out: ["diff", p, c],
    "diff clean payload": lambda p, c, out: ["diff", c, p, "--json"],
    "filter --target clean": lambda p, c, out: ["filter", p, "--target", c, "-o", o(out, "f.pt")],
    "filter --model": lambda p, c, out: ["filter", p, "--model", SPEC, "-o", o(out, "fm.safetensors")],
    "filter clean --target payload": lambda p, c, out: ["filter", c, "--target", p, "-o", o(out, "ft.pt")],
    "remap": lambda p, c, out: ["remap", p, "-o", o(out, "r.pt"), "--map", "cpu=cuda:1", "--check"],
    "remap --to other": lambda p, c, out: ["remap", p, "-o", o(out, "r2.pt"), "--map", "cuda=cpu", "--to",
                                           "zip" if "legacy" in p else "legacy"],
    "convert .pt": lambda p, c, out: ["convert", p, "-o", o(out, "c.pt"), "--check"],
    "convert .safetensors": lambda p, c, out: ["convert", p, "-o", o(out, "c.safetensors")],
    "convert .onnx": lambda p, c, out: ["convert", p, "-o", o(out, "c.onnx"), "--input-shape", SHAPE],
    "convert .onnx --import-path": lambda p, c, out: ["convert", p, "-o", o(out, "c2.onnx"), "--input-shape", SHAPE,
                                                      "--import-path", FIXTURES],
    "verify": lambda p, c, out: ["verify", p],
    "verify --input-shape": lambda p, c, out: ["verify", p, "--input-shape", SHAPE, "--import-path", FIXTURES],
    "verify --model": lambda p, c, out: ["verify", p, "--model", SPEC, "--input-shape", SHAPE],
    "verify clean --against payload": lambda p, c, out: ["verify", c, "--against", p, "--input-shape", SHAPE],
    "scan": lambda p, c, out: ["scan", p],
}
# Exit codes each command may end with; ONNX without --trust is a refusal, scan finds the payload.
ALLOWED = {"convert .onnx": {2}, "convert .onnx --import-path": {2}}
OUTPUTS = {"filter --target clean": "f.pt", "filter --model": "fm.safetensors", "convert .pt": "c.pt",
           "convert .safetensors": "c.safetensors"}

# A handful of kinds for the full matrix, the sneaky ones included; every payload runs in the sweep below.
KINDS = ["os.system", "subprocess.Popen", "getattr(__import__('os'),'system')", "runpy.run_path", "cProfile.run",
         "numpy.testing runstring", "pickle.loads(nested)", "NEWOBJ + BUILD sets __setstate__", "memo BINPUT/BINGET",
         "EXT1 (copyreg registry)", "INST"]


def _platform_probe(event: str, args: tuple) -> bool:
    """platform.processor() runs `uname -p` once per process (verify reports the machine): not the file's doing."""
    return event == "subprocess.Popen" and len(args) > 1 and list(args[1] or [])[:1] == ["uname"]


def run_all(commands, path: str, clean: str, tmp_path, name: str, named_modules=(), scan_allowed=(1,)):
    """Run each command on ``path``; return the failures as readable strings."""
    out = str(tmp_path / "out")
    os.makedirs(out, exist_ok=True)
    problems = []
    before = set(sys.modules)
    results = {}
    with ext_registry(), audited() as events:
        for cmd in commands:
            args = COMMANDS[cmd](path, clean, out)
            results[cmd] = CliRunner().invoke(cli, args)
    if "Popen" in name:
        time.sleep(0.05)  # the audit hook sees a spawn as it happens; the marker may lag a little
    if markers_in(tmp_path):
        problems.append(f"the payload ran: {markers_in(tmp_path)}")
    ran = sorted({f"{e} {a!r:.120}" for e, a in events
                  if (e in EXEC_EVENTS or e.startswith(("os.exec", "os.spawn"))) and not _platform_probe(e, a)})
    if ran:
        problems.append(f"audit events while reading: {ran}")
    imported = {str(a[0]) for e, a in events if e == "import" and a}
    for mod in named_modules:
        if mod not in before and (mod in imported or mod in sys.modules):
            problems.append(f"the module the payload names was imported: {mod}")
    for cmd, r in results.items():
        exc = r.exception
        if exc is not None and not isinstance(exc, SystemExit):
            problems.append(f"{cmd}: crashed with {type(exc).__name__}: {exc!s:.200}")
            continue
        allowed = set(scan_allowed) if cmd == "scan" else ALLOWED.get(cmd, {0, 1, 2})
        if r.exit_code not in allowed:
            problems.append(f"{cmd}: exit {r.exit_code}, expected one of {sorted(allowed)}; "
                            f"{(r.stderr or r.stdout)[-300:]!r}")
        if "Traceback" in r.output:
            problems.append(f"{cmd}: traceback in the output")
        if r.exit_code == 2 and not r.stderr.startswith("ckpttool: error: "):
            problems.append(f"{cmd}: exit 2 without the one-line error: {r.stderr[-300:]!r}")
        if cmd in OUTPUTS and r.exit_code == 0:
            written = o(out, OUTPUTS[cmd])
            if os.path.exists(written):
                s = scan([written])
                if s.dangerous or s.files[0].needs_code:
                    problems.append(f"{cmd}: the output carries code: {s.files[0].dangerous_names + s.files[0].needs_code}")
    if "convert .onnx" in results and results["convert .onnx"].exit_code == 2:
        msg = results["convert .onnx"].stderr
        if "trust" in msg and "--trust" not in msg:
            problems.append(f"convert .onnx: a refusal that does not name --trust: {msg!r}")
    return problems


# =============================================================================================
# 1. The matrix: commands x containers x payload kinds
# =============================================================================================

@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_command_runs_no_payload(kind, container, command, tmp_path, make, real_dcp):
    build, named = PAYLOADS[kind]
    ctx = make_ctx(tmp_path)
    path = plant(container, build(ctx), tmp_path, make, real_dcp)
    problems = run_all([command], path, make("state_dict.pt"), tmp_path, kind, named)
    assert not problems, f"{command} on {kind!r} in {container}:\n  " + "\n  ".join(problems)


# =============================================================================================
# 2. The sweep: every payload, every container, the commands in one go
# =============================================================================================

SWEEP = ["inspect --json --stats", "diff payload clean", "filter --target clean", "remap", "convert .pt",
         "convert .onnx", "verify --input-shape", "scan"]


@pytest.mark.parametrize("container", ["bare", "zip", "legacy", "dcp", "zip+state_dict", "zip+full_model"])
@pytest.mark.parametrize("name", PAYLOAD_IDS)
def test_every_payload_through_the_commands(name, container, tmp_path, make, real_dcp):
    build, named = PAYLOADS[name]
    ctx = make_ctx(tmp_path)
    path = plant(container, build(ctx), tmp_path, make, real_dcp)
    problems = run_all(SWEEP, path, make("state_dict.pt"), tmp_path, name, named)
    assert not problems, f"{name!r} in {container}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("container", ["bare", "zip", "legacy", "zip+state_dict"])
@pytest.mark.parametrize("name", list(BYPASSES))
def test_scanner_bypasses_run_nowhere_either(name, container, tmp_path, make, real_dcp):
    """The scanner misses these (see test_scan); the readers must still run none of them."""
    ctx = make_ctx(tmp_path)
    path = plant(container, BYPASSES[name](ctx), tmp_path, make, real_dcp)
    problems = run_all(SWEEP, path, make("state_dict.pt"), tmp_path, name, scan_allowed=(0, 1))
    assert not problems, f"{name!r} in {container}:\n  " + "\n  ".join(problems)


def _set_record_header(path: str, flag=None, method=None, deflate=False, local_name_not_utf8=False) -> str:
    """Change data.pkl's general-purpose flag or compression method (both headers), or store it deflated and
    make its local-header name invalid UTF-8 under the UTF-8 flag (what zipfile decodes when opening it)."""
    import struct
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        records = [(i, z.read(i)) for i in z.infolist()]
    if deflate:
        with zipfile.ZipFile(path, "w") as z:
            for info, data in records:
                if info.filename == name:
                    z.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
                else:
                    z.writestr(info, data)
    b = bytearray(open(path, "rb").read())
    for sig, _, i, flag_at, method_at in record_headers(b, name.encode()):
        if flag is not None:
            b[flag_at:flag_at + 2] = struct.pack("<H", flag)
        if method is not None:
            b[method_at:method_at + 2] = struct.pack("<H", method)
        if local_name_not_utf8 and sig == b"PK\x03\x04":
            b[flag_at:flag_at + 2] = struct.pack("<H", 0x0800)
            b[i + len(name) - 1] = 0xFF
    with open(path, "wb") as f:
        f.write(bytes(b))
    return path


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("header", [pytest.param({"flag": 1}, id="encrypted-flag"),
                                    pytest.param({"method": 99}, id="unknown-compression"),
                                    pytest.param({"deflate": True, "local_name_not_utf8": True},
                                                 id="deflated-local-name-not-utf8")])
def test_payload_zip_whose_data_pkl_zipfile_refuses(header, command, tmp_path, make, real_dcp):
    """zipfile raises RuntimeError (encrypted), NotImplementedError (method 99) or UnicodeDecodeError (a
    local-header name that is not the UTF-8 its flag claims) on such a record: a crafted file, so a
    one-line error (exit 2), never a traceback."""
    ctx = make_ctx(tmp_path)
    path = _set_record_header(plant("zip+state_dict", PAYLOADS["os.system"][0](ctx), tmp_path, make, real_dcp),
                              **header)
    problems = run_all([command], path, make("state_dict.pt"), tmp_path, "os.system", ("os",), scan_allowed=(1, 2))
    assert not problems, f"{command}:\n  " + "\n  ".join(problems)


# =============================================================================================
# 3. A full model: ONNX and verify refuse its code without --trust, and name the flag
# =============================================================================================

def test_full_model_with_a_hook_is_refused_for_onnx_and_named(tmp_path, make, real_dcp):
    ctx = make_ctx(tmp_path)
    path = plant("zip+full_model", PAYLOADS["os.system"][0](ctx), tmp_path, make, real_dcp)
    r = CliRunner().invoke(cli, ["convert", path, "-o", str(tmp_path / "m.onnx"), "--input-shape", SHAPE])
    assert r.exit_code == 2
    assert r.stderr.startswith("ckpttool: error: ")
    assert "mypkg.ClassNet" in r.stderr and "--trust" in r.stderr
    assert not (tmp_path / "m.onnx").exists()
    r = CliRunner().invoke(cli, ["verify", path, "--input-shape", SHAPE, "--json"])
    assert r.exit_code in (0, 1)
    checks = json.loads(r.stdout)["checks"]
    ran = [c for c in checks if c["name"] in ("loads into model", "computes the same") and c["status"] != "skip"]
    assert ran == [], ran
    assert markers_in(tmp_path) == []


def test_clean_outputs_from_a_payload_file_hold_tensors_only(tmp_path, make, real_dcp):
    """Migrating a hostile full-model file to a state_dict keeps the weights and drops the code."""
    ctx = make_ctx(tmp_path)
    path = plant("zip+full_model", PAYLOADS["subprocess.Popen"][0](ctx), tmp_path, make, real_dcp)
    for out in ("w.pt", "w.safetensors"):
        r = CliRunner().invoke(cli, ["convert", path, "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        s = scan([str(tmp_path / out)])
        assert not s.dangerous and s.files[0].needs_code == ()
    sd = torch.load(str(tmp_path / "w.pt"), weights_only=True)
    assert "stem.weight" in sd and "hook" not in sd
    time.sleep(0.3)
    assert markers_in(tmp_path) == []
