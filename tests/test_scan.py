"""``ckpttool.scan``: every global each pickle of a file imports, how it is used, and its verdict.

The payloads of test_safe_pickle (each checked there to be live under the stock unpickler) are
planted in every place a pickle lives: a bare file, a real torch zip's data.pkl, the main pickle of
a real legacy file, the ``.metadata`` of a real torch.distributed.checkpoint folder, and as bytes
nested in a benign pickle; each must be flagged dangerous with the global that does the harm.
Real checkpoints (torchvision models, optimizer states, Lightning-style dicts, GPU-saved legacy
files, TorchScript, safetensors, ONNX) must not be, and the ``add_safe_globals`` line the scan
prints for a full model must really let ``torch.load(weights_only=True)`` read it.

A second family of payloads (``BYPASSES``) reaches a call without a ``REDUCE`` on a named global:
each is first shown to be live (stock ``pickle.loads``, ``torch.load(weights_only=False)`` or
``dcp.load`` in a throwaway process creates its marker), then the scan must flag it.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from payloads import (BYPASSES, PAYLOAD_IDS, PAYLOADS, by, call, dct, embed, glob, legacy_header, legacy_with_pickle,
                      lst, make_ctx, markers_in, pk, sglob, tup, u, zip_with_pickle)
from payloads import flag_record as _flag_record

import ckpttool
from ckpttool.errors import CkptError, FileAccessError, FormatError
from ckpttool.pickles.allowlist import BENIGN, weights_only_admits
from ckpttool.pickles.uses import scan_pickle
from ckpttool.scanning import DENY, classify, safe_globals_line, scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "fixtures")

# The globals whose call does the harm, per payload of test_safe_pickle (a nested pickle's own
# os.system is found through the bytes it is nested in).
EXPECTED = {
    "os.system": {"os.system"},
    "posix.system/STACK_GLOBAL": {"posix.system"},
    "subprocess.Popen": {"subprocess.Popen"},
    "subprocess.check_call": {"subprocess.check_call"},
    "builtins.eval": {"builtins.eval"},
    "__builtin__.exec/proto0": {"builtins.exec"},
    "builtins.open": {"builtins.open"},
    "io.open": {"io.open"},
    "shutil.copyfile": {"shutil.copyfile"},
    "getattr(__import__('os'),'system')": {"builtins.getattr", "builtins.__import__"},
    "importlib.import_module": {"builtins.getattr", "importlib.import_module"},
    "operator.methodcaller on pathlib.Path": {"operator.methodcaller"},
    "code.InteractiveInterpreter().runsource": {"operator.methodcaller", "code.InteractiveInterpreter"},
    "functools.partial then call": {"os.system"},
    "runpy.run_path": {"runpy.run_path"},
    "timeit.timeit": {"timeit.timeit"},
    "cProfile.run": {"cProfile.run"},
    "numpy.testing runstring": {"numpy.testing._private.utils.runstring"},
    "pickle.loads(nested)": {"pickle.loads", "os.system"},
    "_pickle.loads(nested)": {"_pickle.loads", "os.system"},
    "torch.storage._load_from_bytes(nested)": {"torch.storage._load_from_bytes", "os.system"},
    "INST": {"os.system"},
    "OBJ": {"os.system"},
    "NEWOBJ + BUILD sets __setstate__": {"os.system"},
    "NEWOBJ_EX + BUILD sets __setstate__": {"builtins.exec"},
    "EXT1 (copyreg registry)": {"<extension code 241>"},
    "EXT2 (copyreg registry)": {"<extension code 1234>"},
    "EXT4 (copyreg registry)": {"<extension code 1193047>"},
    "memo BINPUT/BINGET": {"os.system"},
    "memo PUT/GET text": {"os.system"},
    "memo MEMOIZE/LONG_BINGET": {"posix.system"},
    "FRAME + STACK_GLOBAL": {"os.system"},
    "dict of payloads (torch.save-like)": {"os.system"},
}
# Names a fix may reasonably also flag in these payloads (the instance whose __setstate__ is swapped,
# the partial that is called); never required.
# a payload that calls what another call returned is also flagged as that: the call of a computed object
MAY_ALSO_FLAG = {"types.SimpleNamespace", "functools.partial", "pathlib.Path", "<call of a computed object>"}

SCAN_CONTAINERS = ("bare", "zip", "legacy", "dcp", "nested")
WHERE = {"bare": "pickle", "zip": "data.pkl", "legacy": "main pickle", "dcp": ".metadata", "nested": "> bytes at"}
FORMAT = {"bare": "pickle", "zip": "torch_zip", "legacy": "torch_legacy", "dcp": "dcp", "nested": "pickle"}


# =============================================================================================
# Helpers: real DCP folders, files on disk, torch.load in a throwaway process
# =============================================================================================

@pytest.fixture(scope="session")
def real_dcp(tmp_path_factory):
    """A folder torch.distributed.checkpoint.save wrote (one process, no process group)."""
    import torch.distributed.checkpoint as dcp
    folder = tmp_path_factory.mktemp("dcp") / "ckpt"
    torch.manual_seed(0)
    sd = {"model": {"w": torch.randn(4, 3), "b": torch.zeros(4)}, "step": torch.tensor(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(sd, checkpoint_id=str(folder))
    names = sorted(os.listdir(folder))
    assert ".metadata" in names and any(n.endswith(".distcp") for n in names), names
    return str(folder)


def dcp_with_metadata(real: str, dst: str, metadata: bytes) -> str:
    """A copy of DCP folder ``real`` at ``dst`` whose .metadata is ``metadata``."""
    shutil.copytree(real, dst)
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        f.write(metadata)
    return dst


def place(container: str, data: bytes, tmp_path, make, real_dcp_folder: str) -> str:
    """``data`` (a pickle) where ``container`` keeps it."""
    if container == "dcp":
        return dcp_with_metadata(real_dcp_folder, os.path.join(str(tmp_path), "payload_dcp"), data)
    if container == "nested":
        # a benign pickle that merely holds the payload's bytes (as a tokenizer blob, a cached object...)
        return write(tmp_path, "nested.pkl", pk(dct(epoch=b"K\x03", blob=by(data), note=u("bytes only")), 4))
    return embed(container, data, tmp_path, make)


def write(tmp_path, name: str, data: bytes) -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def one(path) -> "ckpttool.ScanResult":
    r = scan([str(path)])
    assert len(r.files) == 1
    return r


def verdicts(f) -> dict:
    return {g.name: g.verdict for g in f.globals}


def by_name(f) -> dict:
    return {g.name: g for g in f.globals}


def run_py(code: str, *args: str, cwd=None, env_extra=None, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([FIXTURES, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


_LOAD_WITH_LINE = """
    import importlib, json, sys, warnings
    import torch
    path, line = sys.argv[1], sys.argv[2]
    out = {}
    try:
        torch.load(path, weights_only=True, map_location="cpu")
        out["plain"] = "loaded"
    except Exception as e:
        out["plain"] = type(e).__name__
    ns = {"torch": torch}
    if line:
        exec(line, ns)  # the line exactly as printed (its own imports included)
    obj = torch.load(path, weights_only=True, map_location="cpu")
    out["with_line"] = type(obj).__module__ + "." + type(obj).__name__
    print(json.dumps(out))
"""


def load_with_line(path: str, line) -> dict:
    """In a fresh process: torch.load(weights_only=True) without, then with, the printed line executed."""
    r = run_py(_LOAD_WITH_LINE, path, line or "")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# =============================================================================================
# 1. Every payload, in every place a pickle lives, is flagged with the global that does the harm
# =============================================================================================

@pytest.mark.parametrize("container", SCAN_CONTAINERS)
@pytest.mark.parametrize("name", PAYLOAD_IDS)
def test_payload_is_flagged_dangerous(name, container, tmp_path, make, real_dcp):
    ctx = make_ctx(tmp_path)
    path = place(container, PAYLOADS[name][0](ctx), tmp_path, make, real_dcp)
    r = one(path)
    f = r.files[0]
    assert markers_in(tmp_path) == []
    assert r.dangerous is True and r.exit_code == 1
    found = set(f.dangerous_names)
    expected = EXPECTED.get(name)
    if expected is None:  # a payload added to test_safe_pickle since: flagged, at least
        assert found, f"{name}: nothing flagged in {verdicts(f)}"
        return
    assert expected <= found, f"{name} in {container}: expected {sorted(expected)} flagged, got {verdicts(f)}"
    unexpected = found - expected - MAY_ALSO_FLAG
    assert not unexpected, f"{name} in {container}: also flagged {sorted(unexpected)}"
    assert f.format == FORMAT[container]
    g = by_name(f)
    for n in expected:
        assert g[n].verdict == "dangerous"
        assert any(WHERE[container] in w for w in g[n].where), (n, g[n].where)
        if n in DENY:
            assert g[n].note == DENY[n]


def test_payloads_nested_in_bytes_say_where(tmp_path, make):
    """The nested pickle is found at the offset of its bytes, and named as nested."""
    ctx = make_ctx(tmp_path)
    inner = PAYLOADS["os.system"][0](ctx)
    body = dct(a=by(b"not a pickle"), b=by(inner))
    path = write(tmp_path, "n.pkl", pk(body, 4))
    f = one(path).files[0]
    (where,) = by_name(f)["os.system"].where
    assert where.startswith("pickle > bytes at ")
    offset = int(where.rsplit(" ", 1)[1])
    assert offset > 0
    assert f.pickles == 2


@pytest.mark.parametrize("how", ["SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "_codecs.encode latin1",
                                 "two levels", "in a zip data.pkl"])
def test_nested_pickles_found_every_way_bytes_are_written(how, tmp_path, make):
    ctx = make_ctx(tmp_path)
    inner = PAYLOADS["builtins.eval"][0](ctx)
    if how == "SHORT_BINBYTES":
        blob = b"C" + bytes([len(inner)]) + inner
    elif how == "BINBYTES8":
        blob = b"\x8e" + struct.pack("<Q", len(inner)) + inner
    elif how == "BYTEARRAY8":
        blob = b"\x96" + struct.pack("<Q", len(inner)) + inner
    elif how == "_codecs.encode latin1":  # how protocol 2 writes bytes
        blob = call(glob("_codecs", "encode"), u(inner.decode("latin-1")), u("latin1"))
    elif how == "two levels":
        blob = by(pk(dct(x=by(inner))))
    else:
        blob = by(inner)
    data = pk(dct(blob=blob), 5 if how == "BYTEARRAY8" else 4)
    if how == "in a zip data.pkl":
        path = zip_with_pickle(make("state_dict.pt"), os.path.join(str(tmp_path), "n.pt"), data)
    else:
        path = write(tmp_path, "n.pkl", data)
    r = one(path)
    assert "builtins.eval" in r.files[0].dangerous_names, verdicts(r.files[0])
    assert r.dangerous


@pytest.mark.parametrize("label,index", [("protocol version", 1), ("sys_info", 2), ("storage keys", 4)])
def test_every_pickle_of_the_legacy_format_is_scanned(label, index, tmp_path, make):
    """torch's legacy loader unpickles them in turn with the stock unpickler (weights_only=False), and stops
    after a protocol version that is not 1001: the scan reads what it reads."""
    ctx = make_ctx(tmp_path)
    payload = PAYLOADS["os.system"][0](ctx)
    src = make("legacy.pt")
    raw = open(src, "rb").read()
    parts, start = [], 0
    for _ in range(5):  # the five pickles' spans, from their opcodes
        end = start + max(pos for _, _, pos in pickletools.genops(raw[start:])) + 1
        parts.append((start, end))
        start = end
    pieces = [raw[s:e] for s, e in parts]
    pieces[index] = payload
    path = write(tmp_path, "legacy_planted.pt", b"".join(pieces) + raw[parts[-1][1]:])
    f = one(path).files[0]
    assert f.format == "torch_legacy" and f.pickles == (2 if label == "protocol version" else 5)
    assert by_name(f)["os.system"].where == (label,)
    assert f.dangerous_names == ("os.system",)


def test_extra_pkl_records_of_a_zip_are_scanned(tmp_path, make):
    """Not only data.pkl: every .pkl record (TorchScript's constants.pkl, anything planted)."""
    ctx = make_ctx(tmp_path)
    src = make("state_dict.pt")
    dst = os.path.join(str(tmp_path), "extra.pt")
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        folder = next(n for n in zi.namelist() if n.endswith("/data.pkl"))[:-len("data.pkl")]
        for info in zi.infolist():
            zo.writestr(info, zi.read(info))
        zo.writestr(folder + "extra/hooks.pkl", PAYLOADS["subprocess.Popen"][0](ctx))
    f = one(dst).files[0]
    assert f.dangerous_names == ("subprocess.Popen",)
    assert by_name(f)["subprocess.Popen"].where == (folder + "extra/hooks.pkl",)
    assert f.pickles == 2


def test_torchscript_constants_pkl_is_scanned(tmp_path, make):
    ctx = make_ctx(tmp_path)
    src = make("torchscript.pt")
    dst = os.path.join(str(tmp_path), "ts_evil.pt")
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info)
            if info.filename.endswith("/constants.pkl"):
                data = PAYLOADS["builtins.eval"][0](ctx)
            zo.writestr(info, data)
    f = one(dst).files[0]
    assert f.format == "torchscript"
    assert f.dangerous_names == ("builtins.eval",)
    assert by_name(f)["builtins.eval"].where[0].endswith("constants.pkl")
    assert safe_globals_line(f) is None


def test_swapped_data_pkl_keeps_real_tensors_and_is_still_flagged(tmp_path, make):
    """A real state_dict's own data.pkl, with one more entry that calls os.system."""
    ctx = make_ctx(tmp_path)
    src = make("state_dict.pt")
    with zipfile.ZipFile(src) as z:
        real = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert real.endswith(b".")
    data = real[:-1] + u("hook") + call(glob("os", "system"), u(ctx.cmd)) + b"s."
    path = zip_with_pickle(src, os.path.join(str(tmp_path), "swapped.pt"), data)
    assert set(ckpttool.open(path).root) >= {"stem.weight", "hook"}  # still a readable state_dict
    f = one(path).files[0]
    assert f.dangerous_names == ("os.system",)
    assert verdicts(f)["torch._utils._rebuild_tensor_v2"] == "safe"


def test_scan_of_many_paths_is_dangerous_when_any_is(tmp_path, make):
    ctx = make_ctx(tmp_path)
    bad = write(tmp_path, "bad.pkl", PAYLOADS["os.system"][0](ctx))
    good = make("state_dict.pt")
    r = scan([good, bad, good])
    assert [f.path for f in r.files] == [good, bad, good]
    assert [bool(f.dangerous_names) for f in r.files] == [False, True, False]
    assert r.dangerous and r.exit_code == 1
    r = scan([good, make("model.safetensors")])
    assert not r.dangerous and r.exit_code == 0
    d = r.to_dict()
    assert d["dangerous"] is False and [x["path"] for x in d["files"]] == [good, make("model.safetensors")]


def test_scan_is_in_the_public_api(make):
    assert ckpttool.scan is scan
    assert "scan" in ckpttool.__all__ and "ScanResult" in ckpttool.__all__
    assert isinstance(ckpttool.scan([make("state_dict.pt")]), ckpttool.ScanResult)


# =============================================================================================
# 2. Real checkpoints are not dangerous, and the add_safe_globals line works
# =============================================================================================

@pytest.fixture(scope="module")
def tv_files(tmp_path_factory):
    """torchvision models (weights=None) saved as state_dicts and as full models."""
    import torchvision
    folder = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None)
    paths = {"resnet18_sd": str(folder / "resnet18_sd.pt"), "resnet18_full": str(folder / "resnet18_full.pt"),
             "vit_full": str(folder / "vit_b_16_full.pt"), "optim": str(folder / "optim.pt"),
             "lightning": str(folder / "lightning.ckpt")}
    torch.save(r18.state_dict(), paths["resnet18_sd"])
    torch.save(r18, paths["resnet18_full"])
    torch.save(torchvision.models.vit_b_16(weights=None), paths["vit_full"])  # pickles functools.partial
    opt = torch.optim.AdamW(r18.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    r18(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "epoch": 1}, paths["optim"])
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
                "hyper_parameters": argparse.Namespace(lr=0.1, layers=[64, 128], name="r18", dropout=None),
                "state_dict": {"model." + k: v for k, v in r18.state_dict().items()}}, paths["lightning"])
    return paths


def _assert_benign(f, needs_code=()):
    assert f.dangerous_names == (), verdicts(f)
    assert set(f.needs_code) == set(needs_code), verdicts(f)


def test_resnet18_state_dict_is_all_safe(tv_files):
    r = one(tv_files["resnet18_sd"])
    f = r.files[0]
    assert not r.dangerous and r.exit_code == 0
    _assert_benign(f)
    assert f.format == "torch_zip" and f.pickles == 1
    assert {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"} <= set(verdicts(f))
    assert safe_globals_line(f) is None


def test_resnet18_full_model_needs_code_and_the_printed_line_loads_it(tv_files):
    f = one(tv_files["resnet18_full"]).files[0]
    _assert_benign(f, needs_code={
        "torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock",
        "torch.nn.modules.conv.Conv2d", "torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
        "torch.nn.modules.linear.Linear", "torch.nn.modules.container.Sequential"})
    g = by_name(f)
    assert g["torchvision.models.resnet.ResNet"].uses == ("built", "instantiated")
    assert g["torchvision.models.resnet.ResNet"].where == ("resnet18_full/data.pkl",)
    line = safe_globals_line(f)
    assert "torch.serialization.add_safe_globals([" in line and line.endswith("])")
    assert "from torchvision.models.resnet import BasicBlock, ResNet" in line
    got = load_with_line(tv_files["resnet18_full"], line)
    assert got["plain"] != "loaded"  # negative control: weights_only=True refuses it without the line
    assert got["with_line"] == "torchvision.models.resnet.ResNet"


def test_vit_b_16_full_model_partial_is_safe_and_the_line_loads_it(tv_files):
    f = one(tv_files["vit_full"]).files[0]
    assert f.dangerous_names == ()
    v = verdicts(f)
    assert v["functools.partial"] == "safe"
    assert v["torch.nn.modules.normalization.LayerNorm"] == "needs code"  # partial(LayerNorm, eps=1e-6)
    assert "torchvision.models.vision_transformer.VisionTransformer" in f.needs_code
    line = safe_globals_line(f)
    got = load_with_line(tv_files["vit_full"], line)
    assert got["with_line"] == "torchvision.models.vision_transformer.VisionTransformer"


def test_optimizer_and_scheduler_state_is_safe(tv_files):
    f = one(tv_files["optim"]).files[0]
    _assert_benign(f)
    assert safe_globals_line(f) is None
    torch.load(tv_files["optim"], weights_only=True)  # what "safe" promises


def test_lightning_checkpoint_with_namespace_is_safe_and_the_line_loads_it(tv_files):
    f = one(tv_files["lightning"]).files[0]
    _assert_benign(f)
    assert verdicts(f)["argparse.Namespace"] == "safe"
    line = safe_globals_line(f)
    assert line == "from argparse import Namespace; torch.serialization.add_safe_globals([Namespace])"
    got = load_with_line(tv_files["lightning"], line)
    assert got["plain"] != "loaded" and got["with_line"] == "builtins.dict"


@pytest.mark.parametrize("name,fmt,pickles", [
    ("gpu_tagged_legacy.pt", "torch_legacy", 5), ("gpu_tagged.pt", "torch_zip", 1), ("legacy.pt", "torch_legacy", 5),
    ("all_dtypes.pt", "torch_zip", 1), ("legacy_all_dtypes.pt", "torch_legacy", 5),
    ("renamed_archive.bin", "torch_zip", 1), ("state_dict.pt", "torch_zip", 1),
])
def test_plain_state_dicts_are_all_safe(name, fmt, pickles, make):
    f = one(make(name)).files[0]
    assert (f.format, f.pickles) == (fmt, pickles)
    _assert_benign(f)
    assert all(g.verdict == "safe" for g in f.globals), verdicts(f)
    assert safe_globals_line(f) is None


def test_committed_gpu_legacy_file_is_safe(committed):
    f = one(committed("gpu_tagged_legacy.pt")).files[0]
    _assert_benign(f)
    assert f.format == "torch_legacy"


@pytest.mark.parametrize("name", ["full_model.pth", "seed_checkpoint.tar", "legacy_full_model.pt"])
def test_pickled_classnet_needs_code(name, make):
    f = one(make(name)).files[0]
    assert f.dangerous_names == ()
    assert {"mypkg.ClassNet", "mypkg.Block", "torch.nn.modules.conv.Conv2d"} <= set(f.needs_code)
    assert "from mypkg import Block, ClassNet" in safe_globals_line(f)


def test_classnet_line_loads_the_full_model(make):
    path = make("full_model.pth")
    got = load_with_line(path, safe_globals_line(one(path).files[0]))
    assert got["plain"] != "loaded" and got["with_line"] == "mypkg.ClassNet"


def test_torchscript_archive(make):
    f = one(make("torchscript.pt")).files[0]
    assert f.format == "torchscript" and f.pickles >= 2
    assert f.dangerous_names == ()
    assert f.needs_code and all(n.startswith("__torch__.") for n in f.needs_code), f.needs_code
    assert safe_globals_line(f) is None  # loaded with torch.jit.load, not torch.load


@pytest.mark.parametrize("name,fmt", [("model.safetensors", "safetensors"), ("all_dtypes.safetensors", "safetensors"),
                                      ("onnx_external", "onnx")])
def test_files_without_pickles_have_no_globals(name, fmt, make):
    r = one(make(name))
    f = r.files[0]
    assert (f.format, f.pickles, f.globals) == (fmt, 0, ())
    assert not r.dangerous and safe_globals_line(f) is None


def test_sharded_safetensors_folder_has_no_globals(make):
    """A Hugging Face folder of safetensors shards carries no pickle: clean, not an error."""
    r = one(make("sharded_safetensors"))
    f = r.files[0]
    assert f.pickles == 0 and f.globals == ()
    assert not r.dangerous and r.exit_code == 0


def test_sharded_bin_folder_scans_every_shard(make):
    f = one(make("sharded_bin")).files[0]
    assert f.pickles == 2 and f.dangerous_names == ()
    assert {w.split(":")[0] for g in f.globals for w in g.where} == {
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}


def test_real_dcp_folder_is_not_dangerous(real_dcp):
    """What torch.distributed.checkpoint.save writes (tensors: TensorProperties pickles the
    memory-format enum as ``_MEM_FORMAT_ENCODING(0)``) is not a payload."""
    r = one(real_dcp)
    f = r.files[0]
    assert f.format == "dcp" and f.pickles >= 1
    # DCP's own metadata classes are data (the only classes issue 8 lets the .metadata reader build)
    assert by_name(f)["torch.distributed.checkpoint.metadata.Metadata"].verdict == "safe"
    assert f.dangerous_names == (), verdicts(f)
    assert r.exit_code == 0


def test_dcp_folder_of_non_tensor_values_is_not_dangerous(tmp_path):
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"step": 3, "name": "run-1"}, checkpoint_id=str(tmp_path / "ck"))
    r = one(tmp_path / "ck")
    assert r.files[0].format == "dcp"
    assert not r.dangerous, verdicts(r.files[0])


# =============================================================================================
# 3. How a global is used decides what it is
# =============================================================================================

def scan_bytes(data: bytes, tmp_path, name="c.pkl"):
    return one(write(tmp_path, name, data)).files[0]


def test_newobj_and_build_is_needs_code(tmp_path):
    f = scan_bytes(pk(glob("mypkg", "Thing") + b")\x81" + dct(a=b"K\x01", b=u("x")) + b"b"), tmp_path)
    g = by_name(f)["mypkg.Thing"]
    assert (g.verdict, g.uses, g.note) == ("needs code", ("built", "instantiated"), "")


def test_newobj_ex_is_needs_code(tmp_path):
    f = scan_bytes(pk(sglob("mypkg", "Thing") + b")}\x92" + dct(a=b"K\x01") + b"b", 4), tmp_path)
    assert by_name(f)["mypkg.Thing"].verdict == "needs code"


def test_reduce_of_an_unknown_callable_is_dangerous(tmp_path):
    f = scan_bytes(pk(call(glob("mypkg.factory", "make_model"), u("resnet"))), tmp_path)
    g = by_name(f)["mypkg.factory.make_model"]
    assert (g.verdict, g.uses, g.note) == ("dangerous", ("called",), "")


def test_reduce_of_a_class_is_dangerous_too(tmp_path):
    """Calling a class runs its __init__ with the pickle's arguments: not the same as NEWOBJ."""
    f = scan_bytes(pk(call(glob("mypkg", "ClassNet"), b"J" + struct.pack("<i", 10))), tmp_path)
    assert by_name(f)["mypkg.ClassNet"].verdict == "dangerous"


@pytest.mark.parametrize("body", [
    pytest.param(dct(cls=glob("mypkg", "ClassNet")), id="dict-value"),
    pytest.param(lst(glob("mypkg", "ClassNet")), id="list-item"),
    pytest.param(call(glob("collections", "OrderedDict"), lst(tup(u("k"), glob("mypkg", "ClassNet")))),
                 id="argument-of-a-safe-call"),
])
def test_a_class_only_referenced_is_needs_code(body, tmp_path):
    f = scan_bytes(pk(body), tmp_path)
    g = by_name(f)["mypkg.ClassNet"]
    assert (g.verdict, g.uses) == ("needs code", ("referenced",))
    assert f.dangerous_names == ()


def test_tensor_subclass_type_referenced_in_rebuild_from_type_v2_is_needs_code(tmp_path):
    """torch.save of a tensor subclass: _rebuild_from_type_v2(_rebuild_tensor_v2, mypkg.MyTensor, ...)."""
    pid = tup(u("storage"), glob("torch", "FloatStorage"), u("0"), u("cpu"), b"K\x06") + b"Q"
    args = tup(pid, b"K\x00", tup(b"K\x06"), tup(b"K\x01"), b"\x89", call(glob("collections", "OrderedDict")))
    body = call(glob("torch._tensor", "_rebuild_from_type_v2"), glob("torch._utils", "_rebuild_tensor_v2"),
                glob("mypkg", "MyTensor"), args, b"}")
    f = scan_bytes(pk(dct(t=body)), tmp_path)
    v = verdicts(f)
    assert v["mypkg.MyTensor"] == "needs code"
    assert v["torch._tensor._rebuild_from_type_v2"] == "safe"
    assert v["torch._utils._rebuild_tensor_v2"] == "safe"
    assert f.dangerous_names == ()


def test_deny_listed_global_merely_referenced_is_dangerous_with_its_note(tmp_path):
    f = scan_bytes(pk(dct(hook=glob("os", "system"))), tmp_path)
    g = by_name(f)["os.system"]
    assert (g.verdict, g.uses, g.note) == ("dangerous", ("referenced",), "runs a shell command")


@pytest.mark.parametrize("name", sorted(DENY))
def test_every_deny_listed_global_called_is_dangerous_and_named(name, tmp_path):
    module, _, qual = name.rpartition(".")
    f = scan_bytes(pk(call(sglob(module, qual), u("x")), 4), tmp_path)
    g = by_name(f)[name]
    assert g.verdict == "dangerous" and g.note == DENY[name] and g.uses == ("called",)


def test_stack_global_with_computed_names_is_dangerous(tmp_path):
    """The module name is the result of a call: str("os") is data, computed as the loader computes it."""
    module = call(glob("builtins", "str"), u("os"))
    f = scan_bytes(pk(module + u("system") + b"\x93" + tup(u("id")) + b"R", 4), tmp_path)
    assert "os.system" in f.dangerous_names


def test_stack_global_with_names_only_the_load_knows_is_dangerous(tmp_path):
    module = call(glob("mypkg", "name_of_a_module"), b")")
    f = scan_bytes(pk(module + u("system") + b"\x93" + tup(u("id")) + b"R", 4), tmp_path)
    assert "<computed global>" in f.dangerous_names


def test_stack_global_with_memoized_names_resolves_them(tmp_path):
    data = pk(u("os") + b"\x94" + u("system") + b"\x94" + b"00" + b"h\x00h\x01\x93" + tup(u("id")) + b"R", 4)
    f = scan_bytes(data, tmp_path)
    assert by_name(f)["os.system"].verdict == "dangerous"


@pytest.mark.parametrize("module,name,mapped,verdict", [
    ("__builtin__", "set", "builtins.set", "safe"),
    ("__builtin__", "eval", "builtins.eval", "dangerous"),
    ("copy_reg", "_reconstructor", "copyreg._reconstructor", "safe"),
    ("__builtin__", "getattr", "builtins.getattr", "dangerous"),
])
def test_protocol_2_python2_names_are_mapped(module, name, mapped, verdict, tmp_path):
    f = scan_bytes(pk(call(glob(module, name), lst())), tmp_path)
    assert verdicts(f) == {mapped: verdict}


class Plain:
    """A module-level class pickled by value in every protocol."""

    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_object_in_every_protocol_is_needs_code(protocol):
    r = scan_pickle(pickle.dumps(Plain(), protocol=protocol))
    uses = r.uses
    name = f"{Plain.__module__}.Plain"
    assert classify(name, uses[name]) == "needs code", uses
    assert all(classify(n, h) != "dangerous" for n, h in uses.items()), uses
    assert r.nested == [] and r.error is None


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_namespace_pickled_by_python_is_safe(protocol, tmp_path):
    f = scan_bytes(pickle.dumps({"hp": argparse.Namespace(lr=0.1)}, protocol=protocol), tmp_path)
    assert f.dangerous_names == () and verdicts(f)["argparse.Namespace"] == "safe"


def test_partial_of_a_class_stored_not_called_is_safe(tmp_path):
    """What vit_b_16 pickles: norm_layer = partial(LayerNorm, eps=1e-6), never called by the pickle."""
    body = glob("functools", "partial") + tup(glob("torch.nn.modules.normalization", "LayerNorm")) + b"\x81" + \
        tup(glob("torch.nn.modules.normalization", "LayerNorm"), b")", dct(eps=b"G" + struct.pack(">d", 1e-6)),
            b"N") + b"b"
    f = scan_bytes(pk(dct(norm_layer=body)), tmp_path)
    assert f.dangerous_names == ()
    assert verdicts(f)["torch.nn.modules.normalization.LayerNorm"] == "needs code"


def test_extension_codes_are_dangerous_even_unregistered(tmp_path):
    f = scan_bytes(pk(b"\x82\x07" + tup() + b"R"), tmp_path)
    assert f.dangerous_names == ("<extension code 7>",)


@settings(max_examples=200, deadline=None, database=None)
@given(module=st.from_regex(r"[a-z_][a-z0-9_]{0,8}(\.[a-z_][a-z0-9_]{0,8}){0,2}", fullmatch=True),
       name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True))
def test_an_unknown_callable_is_never_silently_safe(module, name):
    full = f"{module}.{name}"
    if weights_only_admits(full) or full in BENIGN:
        return
    assert classify(full, {"referenced", "called"}) == "dangerous"


# =============================================================================================
# 4. Calls that do not look like REDUCE of a named global: live, and flagged
# =============================================================================================

BYPASS_IDS = list(BYPASSES)


def test_bypass_payloads_are_live_under_stock_pickle(tmp_path):
    """Without this, a clean scan of them could just mean a broken payload."""
    cases = {}
    for i, name in enumerate(BYPASS_IDS):
        folder = tmp_path / f"b{i}"
        folder.mkdir()
        ctx = make_ctx(folder)
        (folder / "payload.pkl").write_bytes(BYPASSES[name](ctx))
        cases[name] = str(folder)
    code = """
        import json, os, pickle, sys, tempfile
        cases = json.loads(sys.argv[1])
        for name, folder in cases.items():
            tempfile.tempdir = os.path.join(folder, "MARKER_tmpdir_parent")
            os.makedirs(tempfile.tempdir, exist_ok=True)
            try:
                pickle.loads(open(os.path.join(folder, "payload.pkl"), "rb").read())
            except BaseException as e:
                print("raised", name, type(e).__name__, e, file=sys.stderr)
            if not os.listdir(tempfile.tempdir):
                os.rmdir(tempfile.tempdir)  # only a payload that made something there leaves it
        print(json.dumps([n for n, f in cases.items()
                          if not any(m.startswith("MARKER") for m in os.listdir(f))]))
    """
    r = run_py(code, json.dumps(cases), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    missing = json.loads(r.stdout.strip().splitlines()[-1])
    assert missing == [], f"payloads that do nothing under pickle.loads: {missing}\n{r.stderr[-2000:]}"


@pytest.mark.parametrize("container", ["bare", "zip", "legacy"])
@pytest.mark.parametrize("name", BYPASS_IDS)
def test_bypass_payload_is_flagged_dangerous(name, container, tmp_path, make):
    ctx = make_ctx(tmp_path)
    path = embed(container, BYPASSES[name](ctx), tmp_path, make)
    r = one(path)
    f = r.files[0]
    assert markers_in(tmp_path) == []
    assert r.dangerous, f"{name} in {container}: the pickle calls a function, the scan says {verdicts(f)}"
    # and what it would tell the user to allow never includes the function it calls
    assert safe_globals_line(f) is None


def test_suggested_line_never_lists_a_function_the_pickle_calls(tmp_path):
    """The 'benign' line for the DUP payload would tell the user to allow shutil.copyfile."""
    ctx = make_ctx(tmp_path)
    f = one(write(tmp_path, "dup.pkl", BYPASSES["DUP launders the callable"](ctx))).files[0]
    line = safe_globals_line(f) or ""
    assert "shutil.copyfile" not in line, line


def _legacy_magic_reencoded(tmp_path, make, ctx) -> str:
    """A legacy file whose magic-number pickle is spelled MARK POP_MARK LONG1: torch.load still reads it."""
    from ckpttool.formats.torch_legacy import MAGIC_NUMBER
    head = legacy_header(make("legacy.pt"))
    with open(make("legacy.pt"), "rb") as fh:
        pickle.load(fh)
        rest_of_header = head[fh.tell():]
    magic = b"\x80\x02(1\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little") + b"."
    main = PAYLOADS["os.system"][0](ctx)
    return write(tmp_path, "magic.pt", magic + rest_of_header + main + pickle.dumps([], protocol=2))


def _legacy_module_pid(tmp_path, make, ctx) -> str:
    """The legacy persistent id ('module', cls, file, source) returns cls itself: here, a function."""
    main = pk(tup(u("module"), glob("shutil", "copyfile"), u(""), u("")) + b"Q" + tup(u(os.devnull), u(ctx.marker))
              + b"R")
    return legacy_with_pickle(make("legacy.pt"), os.path.join(str(tmp_path), "modpid.pt"), main)


def _dcp_bytes_item(tmp_path, make, ctx) -> str:
    """dcp.save pickles non-tensor values into the .distcp file; dcp.load torch.load()s them (weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    folder = str(tmp_path / "dcp_bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"extra": _MkdirOnLoad(ctx.marker), "step": 3}, checkpoint_id=folder)
    return folder


class _MkdirOnLoad:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


_TORCH_LOADERS = {
    "legacy magic re-encoded (rest of the file unscanned)": (
        _legacy_magic_reencoded, "import torch, sys; torch.load(sys.argv[1], weights_only=False)"),
    "legacy 'module' persistent id returns a function": (
        _legacy_module_pid, "import torch, sys; torch.load(sys.argv[1], weights_only=False)"),
    "DCP non-tensor value in the .distcp file": (
        _dcp_bytes_item, "import sys, warnings; warnings.simplefilter('ignore'); "
                         "import torch.distributed.checkpoint as dcp; sd = {'extra': None, 'step': 0}; "
                         "dcp.load(sd, checkpoint_id=sys.argv[1])"),
}


@pytest.mark.parametrize("name", list(_TORCH_LOADERS))
def test_torch_specific_bypass_is_live_and_flagged(name, tmp_path, make):
    build, loader = _TORCH_LOADERS[name]
    ctx = make_ctx(tmp_path)
    path = build(tmp_path, make, ctx)
    r = one(path)
    assert markers_in(tmp_path) == []
    verdict = (r.dangerous, r.files[0].format, r.files[0].pickles, verdicts(r.files[0]))
    # live: torch's own loader runs it (in a throwaway process)
    p = run_py(loader, path, cwd=str(tmp_path))
    assert markers_in(tmp_path) == ["MARKER"], f"payload not live under torch: {p.stderr[-1500:]}"
    assert verdict[0] is True, f"{name}: torch runs it, the scan says {verdict}"


def test_printed_line_cannot_carry_code(tmp_path):
    """A global's name is text from the file; the add_safe_globals line is meant to be pasted into Python."""
    evil = "OrderedDict]); __import__('os').system('touch PWNED'); (["
    f = scan_bytes(pk(sglob("collections", evil) + b")\x81" + b"}b", 4), tmp_path)
    line = safe_globals_line(f)
    if line is not None:
        call_node = ast.parse(line, mode="exec").body
        assert len(call_node) == 1, f"the printed line is several statements: {line}"
        elts = call_node[0].value.args[0].elts
        for e in elts:
            while isinstance(e, ast.Attribute):
                e = e.value
            assert isinstance(e, ast.Name), line
    assert f.dangerous_names or line is None or "__import__" not in line, line


# =============================================================================================
# 5. Malformed input is a FormatError (exit 2), never a traceback
# =============================================================================================

@pytest.mark.parametrize("data", [
    pytest.param(b"\x80\x02R.", id="reduce-on-empty-stack"),
    pytest.param(b"\x80\x02\xff.", id="unknown-opcode"),
    pytest.param(b"\x80\x02X\x10\x00\x00\x00ab", id="truncated-string"),
    pytest.param(b"\x80\x04" + u("x") + b"\x93.", id="stack-global-one-name"),
    pytest.param(b"\x80\x02t.", id="tuple-without-mark"),
    pytest.param(b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", id="bad-utf8"),
    pytest.param(b"\x80\x02\x81.", id="newobj-on-empty-stack"),
    pytest.param(b"\x80\x02Fnot-a-float\n.", id="bad-float-text"),
])
def test_malformed_pickles_are_format_errors(data, tmp_path):
    r = scan_pickle(data)
    assert r.error and not r.uses.get("os.system")
    with pytest.raises(FormatError):
        scan([write(tmp_path, "bad.pkl", data)])


def test_a_dangerous_global_before_the_pickle_breaks_is_still_reported(tmp_path):
    # torch imports os.system before it finds the pickle truncated: what ran before the failure counts
    f = scan([write(tmp_path, "bad.pkl", b"\x80\x02" + glob("os", "system") + tup(u("echo")) + b"R")]).files[0]
    assert f.dangerous_names == ("os.system",) and any("stops" in p for p in f.problems)


def malformed_files(tmp_path, make, real_dcp_folder):
    src_zip, src_legacy = make("state_dict.pt"), make("legacy.pt")
    zbytes, lbytes = open(src_zip, "rb").read(), open(src_legacy, "rb").read()
    out = {
        "empty": write(tmp_path, "empty.pt", b""),
        "random": write(tmp_path, "random.pt", bytes(range(256)) * 4),
        "bare-truncated": write(tmp_path, "t.pkl", pk(dct(a=u("x" * 50)))[:30]),
        "zip-cut-in-half": write(tmp_path, "half.pt", zbytes[: len(zbytes) // 2]),
        "zip-data-pkl-truncated": zip_with_pickle(src_zip, os.path.join(str(tmp_path), "zt.pt"),
                                                  pk(dct(a=u("x" * 50)))[:-20]),
        "legacy-truncated-header": write(tmp_path, "lt.pt", lbytes[:40]),
        "legacy-main-pickle-garbage": legacy_with_pickle(src_legacy, os.path.join(str(tmp_path), "lg.pt"),
                                                         b"\x80\x02\xfe\xfe"),
        "dcp-metadata-garbage": dcp_with_metadata(real_dcp_folder, os.path.join(str(tmp_path), "dcpbad"),
                                                  b"\x80\x04garbage"),
    }
    enc = write(tmp_path, "encrypted.pt", zbytes)
    _flag_record(enc, "/data.pkl", flag=1)  # "encrypted": zipfile refuses with RuntimeError
    out["zip-encrypted-flag"] = enc
    m99 = write(tmp_path, "method99.pt", zbytes)
    _flag_record(m99, "/data.pkl", method=99)  # unknown compression: zipfile raises NotImplementedError
    out["zip-unknown-compression"] = m99
    ver = write(tmp_path, "version.pt", zbytes)
    _flag_record(ver, "/data.pkl", version=0xFF)  # "needs zip 25.5": zipfile raises NotImplementedError
    out["zip-version-needed-25.5"] = ver
    utf = write(tmp_path, "utf8.pt", zbytes)
    _flag_record(utf, "/data.pkl", bad_utf8_name=True)  # zipfile raises UnicodeDecodeError listing the names
    out["zip-name-not-utf8"] = utf
    return out


MALFORMED = ["empty", "random", "bare-truncated", "zip-cut-in-half", "zip-data-pkl-truncated",
             "legacy-truncated-header", "legacy-main-pickle-garbage", "dcp-metadata-garbage",
             "zip-unknown-compression", "zip-name-not-utf8"]


def test_a_record_torch_reads_though_zipfile_would_not_is_scanned(tmp_path, make, real_dcp):
    """miniz ignores the 'version needed' field that makes zipfile refuse: torch.load reads it, so scan does."""
    path = malformed_files(tmp_path, make, real_dcp)["zip-version-needed-25.5"]
    assert isinstance(torch.load(path, weights_only=True), dict)
    r = scan([path])
    assert not r.dangerous and r.files[0].pickles >= 1


def test_an_encrypted_record_is_never_clean(tmp_path, make, real_dcp):
    """torch.load refuses an encrypted data.pkl; scan never calls such a file clean (refused, or dangerous)."""
    path = malformed_files(tmp_path, make, real_dcp)["zip-encrypted-flag"]
    try:
        r = scan([path])
    except CkptError as e:
        assert e.path == path
    else:
        assert r.dangerous and r.exit_code == 1


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_files_are_format_errors(kind, tmp_path, make, real_dcp):
    path = malformed_files(tmp_path, make, real_dcp)[kind]
    with pytest.raises(CkptError) as info:
        scan([path])
    assert isinstance(info.value, FormatError), type(info.value)
    assert info.value.path, "the error names the file"


def test_missing_path_is_a_file_access_error(tmp_path):
    with pytest.raises(FileAccessError, match="no such file"):
        scan([str(tmp_path / "nope.pt")])


def test_folder_without_checkpoint_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CkptError):
        scan([str(tmp_path)])


def test_to_dict_matches_the_design(tmp_path, make):
    ctx = make_ctx(tmp_path)
    bad = write(tmp_path, "bad.pkl", PAYLOADS["os.system"][0](ctx))
    d = scan([bad, make("full_model.pth")]).to_dict()
    json.dumps(d)
    assert d["dangerous"] is True
    a, b = d["files"]
    assert a["path"] == bad and a["dangerous"] == ["os.system"] and a["globals"] == ["os.system"]
    assert b["dangerous"] == [] and "mypkg.ClassNet" in b["globals"] and "mypkg.ClassNet" in b["needs_code"]
    assert "torch.serialization.add_safe_globals([" in b["add_safe_globals"]
    assert a["add_safe_globals"] is None
    detail = next(x for x in a["details"] if x["name"] == "os.system")
    assert detail == {"name": "os.system", "verdict": "dangerous", "uses": ["called"], "where": ["pickle"],
                      "note": "runs a shell command"}


def test_scan_never_imports_torch(make, tmp_path):
    """The allow list is ckpttool's own table (checked against torch in test_allowlist): a scan costs what
    reading the file costs, even of a pickled full model or a safetensors file."""
    paths = [make("full_model.pth"), make("legacy.pt"), os.path.join(FIXTURES, "model.safetensors")]
    code = ("import json, sys, ckpttool; r = ckpttool.scan(sys.argv[1:]); print(json.dumps("
            "[r.exit_code, [f.format for f in r.files], 'torch' in sys.modules, 'numpy' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == [0, ["torch_zip", "torch_legacy", "safetensors"], False, False]


_DCP_BARE_PICKLE_ITEM = """
import os, sys, torch, torch.distributed.checkpoint as dcp
folder = sys.argv[1]
try:
    dcp.load({"t": torch.zeros(2), "extra": {"epoch": 0}}, checkpoint_id=folder, no_dist=True)
except Exception:
    pass
"""


def test_a_dcp_bytes_item_that_is_a_bare_pickle_is_scanned(tmp_path):
    """dcp.load hands each bytes item to torch.load, which unpickles what is not a zip: the scan finds the items
    where .metadata says they are, not only by zip signatures."""
    import torch.distributed.checkpoint as dcp
    from ckpttool.scanning import _dcp_bytes_items
    folder = str(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"t": torch.ones(2), "extra": {"epoch": 3}}, checkpoint_id=folder, no_dist=True)
    ((path, off, length, fqn),), unplaced = _dcp_bytes_items(folder, os.path.join(folder, ".metadata"))
    assert unplaced == 0
    marker = str(tmp_path / "MARKER")
    code = f"open({marker!r}, 'w').close()"
    payload = pk(call(glob("builtins", "exec"), u(code)), 2)
    assert len(payload) <= length
    data = bytearray(open(path, "rb").read())
    data[off:off + length] = payload + b"\0" * (length - len(payload))
    open(path, "wb").write(bytes(data))
    assert b"PK\x03\x04" not in data[off:off + length]  # nothing a signature search would find there
    r = scan([folder])
    assert markers_in(tmp_path) == [] and not os.path.exists(marker)
    assert "builtins.exec" in r.files[0].dangerous_names and r.exit_code == 1
    run_py(_DCP_BARE_PICKLE_ITEM, folder)
    assert os.path.exists(marker)  # the real loader runs it


def _exec_payload(marker: str) -> bytes:
    return pk(call(glob("builtins", "exec"), u(f"open({marker!r}, 'w').close()")), 2)


def _polyglot_gguf(tmp_path, marker):
    # "G" is BINFLOAT: the GGUF magic and version are an 8-byte float to the unpickler, then the payload runs
    body = _exec_payload(marker)[2:]
    return write(tmp_path, "model.pt", b"GGUF" + b"\x03\x00\x00\x00\x00" + body)


def _named_onnx(tmp_path, marker):
    return write(tmp_path, "model.onnx", _exec_payload(marker))


def _tar_link(tmp_path, marker, kind):
    import io as _io
    import tarfile
    path = str(tmp_path / "old.tar.pt")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, blob in (("storages", pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2)),
                           ("tensors", pickle.dumps(0, protocol=2))):  # what torch's tar loader reads first
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tar.addfile(ti, _io.BytesIO(blob))
        data = _exec_payload(marker)
        ti = tarfile.TarInfo("x")
        ti.size = len(data)
        tar.addfile(ti, _io.BytesIO(data))
        link = tarfile.TarInfo("pickle")
        link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        link.linkname = "x"
        tar.addfile(link)
    return path


def _npy_object_word(tmp_path, marker):
    header = "{'descr': 'object', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return write(tmp_path, "a.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
                 + _exec_payload(marker))


_REAL_LOAD = """
import sys, torch, numpy
path, how = sys.argv[1], sys.argv[2]
try:
    torch.load(path, weights_only=False) if how == "torch" else numpy.load(path, allow_pickle=True)
except Exception:
    pass
"""


@pytest.mark.parametrize("build,how", [
    pytest.param(_polyglot_gguf, "torch", id="gguf-magic-then-pickle"),
    pytest.param(_named_onnx, "torch", id="pickle-named-onnx"),
    pytest.param(lambda t, m: _tar_link(t, m, "symlink"), "torch", id="tar-pickle-symlink"),
    pytest.param(lambda t, m: _tar_link(t, m, "hardlink"), "torch", id="tar-pickle-hardlink"),
    pytest.param(_npy_object_word, "numpy", id="npy-descr-object-word"),
])
def test_files_that_look_like_another_format_are_scanned_as_their_loader_reads_them(build, how, tmp_path):
    """Found by review: torch.load goes by neither extension nor magic (it unpickles any non-zip, non-tar file
    from byte 0), tarfile follows links, numpy reads the dtype however it is spelled."""
    marker = str(tmp_path / "MARKER")
    path = build(tmp_path, marker)
    r = scan([path])
    assert not os.path.exists(marker)
    assert "builtins.exec" in r.files[0].dangerous_names, verdicts(r.files[0])
    try:  # verify never passes it: refused (exit 2), or failed (exit 1)
        assert ckpttool.verify(path).exit_code == 1
    except CkptError as e:
        assert e.exit_code == 2
    run_py(_REAL_LOAD, path, how)
    assert os.path.exists(marker)  # the real loader runs it


# =============================================================================================
# The opcodes torch's weights_only loader runs: counted by the machine itself, for every torch.load input
# =============================================================================================

_WEIGHTS_ONLY_LOADS = """
    import sys, torch
    try:
        torch.load(sys.argv[1], weights_only=True, map_location="cpu")
        print("loaded")
    except Exception as e:
        print(type(e).__name__, str(e).replace(chr(10), " ")[-300:])
"""


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_weights_only_claim_matches_torch_for_every_protocol(protocol, tmp_path):
    """A state_dict of admitted globals only: weights_only reads protocol 2, refuses 4 and 5 (FRAME, MEMOIZE,
    SHORT_BINUNICODE), whatever the globals. scan's claim must be torch's answer."""
    path = str(tmp_path / f"p{protocol}.pt")
    torch.save({"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}, path, pickle_protocol=protocol)
    f = one(path).files[0]
    torch_says = run_py(_WEIGHTS_ONLY_LOADS, path).stdout.strip()
    assert f.weights_only is (torch_says == "loaded"), (f.problems, torch_says)
    if protocol > 2:
        assert any("FRAME" in p and "MEMOIZE" in p for p in f.problems), f.problems
        assert f.advice is None


def test_opcode_census_follows_the_machine_not_pickletools(tmp_path):
    """A text INT written as C's strtol reads it (``I0x10``): pickletools cannot parse it, the machine can; the
    census still names INT, so no add_safe_globals line is offered for a file weights_only refuses."""
    data = b"\x80\x02}X\x01\x00\x00\x00nctorchvision.models.resnet\nResNet\n)\x81I0x10\nbs."
    with pytest.raises(ValueError):
        list(pickletools.genops(data))
    assert "INT" in scan_pickle(data).opcodes
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", data)
        z.writestr("x/version", "3\n")
        z.writestr("x/byteorder", "little")
    f = one(path).files[0]
    assert f.advice is None and f.weights_only is False
    assert any("INT" in p for p in f.problems), f.problems
