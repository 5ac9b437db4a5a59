"""verify of a .pt2: without --trust the program is not loaded and the report says so (its load check fails,
as torch.load's does for a file weights_only refuses: never PASS as if it ran); with --trust torch's own
loader runs it on a seeded input from its signature, its weights are held to ckpttool's bit for bit, and
--against compares its outputs with the original's."""
from __future__ import annotations

import os
import struct
import zipfile

import pytest
import torch

from clitools import js, run
from ckpttool.verifying import PT2_NOT_LOADED, verify
from test_pt2 import Small, aoti_package, export_save

CLASSNET = "mypkg:ClassNet"  # fixtures/ is on sys.path (conftest)


def check(d: dict, name: str, device=None) -> dict:
    found = [c for c in d["checks"] if c["name"] == name and c["device"] == device]
    assert len(found) == 1, [(c["name"], c["device"]) for c in d["checks"]]
    return found[0]


def names(d: dict):
    return [c["name"] for c in d["checks"]]


@pytest.fixture(scope="module")
def classnet(tmp_path_factory):
    """A ClassNet exported in eval mode, the same model pickled whole (torch.save(model)), and another
    ClassNet's state_dict."""
    from mypkg import ClassNet
    d = tmp_path_factory.mktemp("vpt2")
    torch.manual_seed(0)
    model = ClassNet().eval()
    out = {"pt2": export_save(model, (torch.randn(2, 3, 8, 8),), d / "classnet.pt2")}
    torch.save(model, d / "full.pt")
    torch.manual_seed(1)
    torch.save(ClassNet().state_dict(), d / "other.pt")
    out.update(full=str(d / "full.pt"), other=str(d / "other.pt"))
    torch.manual_seed(0)
    out["dynamic"] = export_save(Small(), (torch.randn(2, 8), torch.randn(3)), d / "dyn.pt2",
                                 dynamic_shapes=({0: torch.export.Dim("batch")}, None))
    return out


def test_without_trust_the_program_is_not_loaded(classnet):
    r = run("verify", classnet["pt2"])
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stdout.splitlines()[-1] == "result: FAIL: torch.export.load"
    d = js("verify", classnet["pt2"], code=1)
    assert d["ok"] is False
    assert check(d, "torch.export.load") == {"name": "torch.export.load", "device": None, "status": "fail",
                                             "detail": PT2_NOT_LOADED}
    assert check(d, "computes the same")["status"] == "skip"
    assert check(d, "readable")["status"] == "pass"
    assert check(d, "format round trip", "safetensors")["status"] == "pass"
    assert "torch.load" not in names(d)  # torch.load cannot read a .pt2: its check does not apply
    assert "same weights as loader" not in names(d)


def test_with_trust_it_runs_and_its_weights_are_the_loaders(classnet):
    d = js("verify", classnet["pt2"], "--trust")
    assert d["ok"] is True
    load = check(d, "torch.export.load")
    assert load["status"] == "pass" and load["detail"].startswith("torch.export.load(path) under --trust: 19 weight")
    same = check(d, "same weights as loader")
    assert same["status"] == "pass" and same["detail"].startswith("20 tensor(s) bit-equal")
    ran = check(d, "computes the same", "cpu")
    assert ran["status"] == "pass" and "on seeded inputs x 2x3x8x8" in ran["detail"]
    assert check(d, "integrity")["status"] == "pass"
    r = run("verify", classnet["pt2"], "--trust")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "result: PASS"


def test_against_the_original_model_passes(classnet):
    d = js("verify", classnet["pt2"], "--trust", "--against", classnet["full"])
    assert d["ok"] is True
    match = check(d, "matches original", "cpu")
    assert match["status"] == "pass" and "via its own code (--trust)" in match["detail"]
    assert check(d, "same tensors as original")["detail"].startswith("19 bit-exact")


def test_against_other_weights_fails(classnet):
    r = run("verify", classnet["pt2"], "--trust", "--against", classnet["other"], "--model", CLASSNET)
    assert r.exit_code == 1, (r.output, r.exception)
    d = js("verify", classnet["pt2"], "--trust", "--against", classnet["other"], "--model", CLASSNET, code=1)
    assert check(d, "matches original", "cpu")["status"] == "fail"
    assert check(d, "same tensors as original")["status"] == "fail"
    assert check(d, "same weights as loader")["status"] == "pass"  # the file itself is read right


def test_against_without_trust_is_an_error(classnet):
    r = run("verify", classnet["pt2"], "--against", classnet["full"])
    assert r.exit_code == 2, (r.output, r.exception)
    line = r.stderr.splitlines()[0]
    assert line.startswith(f"ckpttool: error: comparing outputs with {classnet['full']} needs: {PT2_NOT_LOADED}")
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_dynamic_dims_need_an_input_shape(classnet):
    d = js("verify", classnet["dynamic"], "--trust")
    skipped = check(d, "computes the same")
    assert skipped["status"] == "skip"
    dim = skipped["detail"].split("leaves dimensions open: x ")[1].split("x8")[0]
    assert skipped["detail"] == (f"not run: it needs --input x:SHAPE (the exported program of {classnet['dynamic']} "
                                 f"leaves dimensions open: x {dim}x8)")
    d = js("verify", classnet["dynamic"], "--trust", "--input", "x:5x8", "--input", "y:3")
    ran = check(d, "computes the same", "cpu")
    assert ran["status"] == "pass" and "2 output(s) 5x4, 3" in ran["detail"]


def test_the_weights_check_holds_the_reader_to_the_loader(classnet, monkeypatch):
    """A reader that read fc.bias 4 bytes late (same shape, dtype, strides) is caught: the check can fail."""
    import ckpttool.formats.pt2 as pt2
    from ckpttool.spans import FileSpan
    real = pt2._Reader.view

    def late(self, storage, dtype, shape, stride, offset, label, *rest, **kw):
        if label == "'fc.bias'":
            src = storage.source
            storage = pt2.new_storage_ref(storage.key, storage.dtype, storage.device, storage.nbytes,
                                          FileSpan(src.path, src.offset + 4, src.size), storage.file)
        return real(self, storage, dtype, shape, stride, offset, label, *rest, **kw)
    monkeypatch.setattr(pt2._Reader, "view", late)
    r = verify(classnet["pt2"], trust=True)
    same = next(c for c in r.checks if c.name == "same weights as loader")
    assert (same.status, same.culprit, same.detail) == ("fail", "fc.bias", "state_dict fc.bias: its bytes differ "
                                                                           "from torch.export.load's")
    assert not r.ok


def test_integrity_names_a_changed_weight(classnet, tmp_path):
    data = bytearray(open(classnet["pt2"], "rb").read())
    with zipfile.ZipFile(classnet["pt2"]) as z:
        import json
        folder = z.namelist()[0].split("/")[0]
        config = json.loads(z.read(f"{folder}/data/weights/model_weights_config.json"))
        record = f"{folder}/data/weights/{config['config']['fc.weight']['path_name']}"
        info = z.getinfo(record)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's own
    start = info.header_offset + 30 + name_len + extra_len
    data[start] ^= 0xFF
    p = tmp_path / "classnet.pt2"
    p.write_bytes(bytes(data))
    d = js("verify", p, code=1)
    bad = check(d, "integrity")
    assert bad["status"] == "fail" and bad["culprit"] == "fc.weight", bad


# ---------------------------------------------------------------------------------------------
# AOTInductor


@pytest.fixture(scope="module")
def aoti(tmp_path_factory):
    return aoti_package(tmp_path_factory.getbasetemp())


def test_aoti_without_trust_is_refused(aoti):
    r = run("verify", aoti)
    assert r.exit_code == 1, (r.output, r.exception)
    d = js("verify", aoti, code=1)
    readable = check(d, "readable")
    assert readable["status"] == "fail" and "<native code>" in readable["detail"]
    assert check(d, "aoti_load_package") == {"name": "aoti_load_package", "device": None, "status": "fail",
                                             "detail": PT2_NOT_LOADED}
    assert not any(c["status"] == "pass" for c in d["checks"] if c["name"] in ("computes the same",
                                                                               "same weights as loader"))


def test_aoti_with_trust_runs_and_matches_its_library(aoti):
    d = js("verify", aoti, "--trust", "--input-shape", "2x8")
    assert d["ok"] is True, d
    assert check(d, "readable")["status"] == "pass"
    same = check(d, "same weights as loader")
    assert same["status"] == "pass" and same["detail"].startswith("2 weight(s) bit-equal")
    assert check(d, "computes the same", "cpu")["status"] == "pass"
    assert os.path.exists(aoti)
