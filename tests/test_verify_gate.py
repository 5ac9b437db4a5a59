"""verify's gate: PASS means a plain torch.load(weights_only=True) of the file works here (or with the
--map-location the user names), and the report says what was proven and what was not.

The CUDA-tagged files are made on this CPU machine by torch.save itself, its location tagger told to
write cuda:0 / cuda:1 (fixtures/make_fixtures.py ``location_tags``), byte for byte what a GPU machine writes.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from clitools import assert_error, js, run
from ckpttool.errors import UsageError
from ckpttool.render import verify_text
from ckpttool.verifying import parse_map_location, verify

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2
CLASSNET = "mypkg:ClassNet"


def _makers():
    spec = importlib.util.spec_from_file_location("_ckpt_make_fixtures_gate",
                                                  os.path.join(FIXTURES, "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mf = _makers()


def save_cuda_tagged(kind: str, folder) -> str:
    """A ClassNet state_dict whose storages say cuda:0 (fc.* cuda:1), written by torch.save on this machine."""
    sd, tag_of = mf._gpu_tagged_state()
    with mf.location_tags(tag_of):
        if kind == "zip":
            path = str(folder / "gpu_sd.pt")
            torch.save(sd, path)
        elif kind == "legacy":
            path = str(folder / "gpu_sd_legacy.pt")
            torch.save(sd, path, _use_new_zipfile_serialization=False)
        else:  # HF's sharded .bin folder
            path = str(folder / "hf")
            os.makedirs(path)
            names = list(sd)
            weight_map = {}
            for i, part in enumerate((names[:9], names[9:])):
                shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
                torch.save({k: sd[k] for k in part}, os.path.join(path, shard))
                weight_map.update({k: shard for k in part})
            with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def check(d: dict, name: str, device=None) -> dict:
    found = [c for c in d["checks"] if c["name"] == name and c["device"] == device]
    assert len(found) == 1, [(c["name"], c["device"]) for c in d["checks"]]
    return found[0]


def report_lines(stdout: str) -> dict:
    """The lines under the table: proven / failed / not proven / result."""
    return {ln.split(":", 1)[0]: ln.split(": ", 1)[1] for ln in stdout.splitlines()
            if ln.startswith(("proven: ", "failed: ", "not proven: ", "result: "))}


# ---------------------------------------------------------------------------------------------
# a CUDA-tagged file on a machine without those GPUs


@pytest.mark.skipif(TWO_GPUS, reason="cuda:0 and cuda:1 are both here: a plain torch.load works")
@pytest.mark.parametrize("kind", ["zip", "legacy", "hf"])
def test_cuda_tagged_file_fails_without_map_location(tmp_path, kind):
    path = save_cuda_tagged(kind, tmp_path)
    with pytest.raises(RuntimeError):  # the claim, as torch itself decides it on this machine
        if kind != "hf":
            torch.load(path, weights_only=True)
        else:
            torch.load(os.path.join(path, "pytorch_model-00002-of-00002.bin"), weights_only=True)
    r = run("verify", path)
    assert r.exit_code == 1, (r.output, r.exception)
    lines = report_lines(r.stdout)
    assert r.stdout.splitlines()[-1] == "result: FAIL: torch.load"
    assert lines["failed"] == "torch.load; device tags"
    assert "torch.load" not in lines["proven"]
    d = js("verify", path, code=1)
    assert d["ok"] is False
    load = check(d, "torch.load")
    assert load["status"] == "fail" and "a plain torch.load fails here" in load["detail"]
    assert "cuda:1" in load["detail"] and "--map-location cpu" in load["detail"]
    tags = check(d, "device tags")
    assert tags["status"] == "fail" and "to fix the file: ckpttool remap" in tags["detail"]


@pytest.mark.parametrize("kind", ["zip", "legacy", "hf"])
def test_cuda_tagged_file_passes_with_map_location_cpu(tmp_path, kind):
    path = save_cuda_tagged(kind, tmp_path)
    r = run("verify", path, "--map-location", "cpu")
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.splitlines()[-1] == "result: PASS"
    lines = report_lines(r.stdout)
    assert "failed" not in lines
    assert "torch.load(weights_only=True, map_location='cpu')" in lines["proven"].split("; ")
    assert "device tags" in lines["proven"].split("; ")
    d = js("verify", path, "--map-location", "cpu")
    assert check(d, "torch.load")["detail"] == ("torch.load(weights_only=True, map_location='cpu') reads it as it is "
                                                "(storages tagged cuda:0, cuda:1 go to cpu)")
    assert check(d, "device tags")["detail"] == ("storages tagged cuda:0, cuda:1; map_location='cpu' puts them on "
                                                 "cpu, present here")


def test_map_location_cpu_then_model_runs(tmp_path):
    path = save_cuda_tagged("zip", tmp_path)
    d = js("verify", path, "--map-location", "cpu", "--model", CLASSNET, "--input-shape", "1x3x8x8")
    assert d["ok"] is True
    assert check(d, "loads into model", "cpu")["status"] == "pass"
    assert check(d, "computes the same", "cpu")["status"] == "pass"


@pytest.mark.skipif(CUDA, reason="the CPU-only view: cuda:1 mapped nowhere stays missing")
def test_map_location_pairs_every_tag_or_fail(tmp_path):
    path = save_cuda_tagged("zip", tmp_path)
    d = js("verify", path, "--map-location", "cuda:0=cpu", "--map-location", "cuda:1=cpu")
    assert d["ok"] is True
    assert check(d, "torch.load")["detail"].startswith(
        "torch.load(weights_only=True, map_location={'cuda:0': 'cpu', 'cuda:1': 'cpu'}) reads it")
    r = run("verify", path, "--map-location", "cuda:0=cpu")  # fc.* stays on cuda:1
    assert r.exit_code == 1
    assert r.stdout.splitlines()[-1] == "result: FAIL: torch.load"
    d = js("verify", path, "--map-location", "cuda:0=cpu", code=1)
    assert check(d, "torch.load")["detail"] == ("torch.load(weights_only=True, map_location={'cuda:0': 'cpu'}) fails "
                                                "here: it puts tensors on cuda:1, which this machine lacks")
    assert check(d, "device tags")["detail"].startswith(
        "map_location={'cuda:0': 'cpu'} puts the storages tagged cuda:1 on cuda:1, which this machine lacks; "
        "to fix the file: ckpttool remap ")


@pytest.mark.skipif(CUDA, reason="the CPU-only view")
def test_map_location_to_a_missing_gpu_fails(tmp_path):
    path = save_cuda_tagged("zip", tmp_path)
    d = js("verify", path, "--map-location", "cuda:0", code=1)
    assert check(d, "torch.load")["detail"] == ("torch.load(weights_only=True, map_location='cuda:0') fails here: it "
                                                "puts tensors on cuda:0, which this machine lacks")


@pytest.mark.skipif(CUDA, reason="the CPU-only view")
def test_torchscript_with_cuda_tags_fails_then_passes_mapped(make, tmp_path):
    """torch.jit.load honours the tags as torch.load does: a TorchScript archive saved on a GPU fails here."""
    gpu = str(tmp_path / "ts_cuda.pt")
    assert run("remap", make("torchscript.pt"), "-o", gpu, "--map", "cpu=cuda:1").exit_code == 0
    r = run("verify", gpu)
    assert r.exit_code == 1 and r.stdout.splitlines()[-1] == "result: FAIL: device tags"
    d = js("verify", gpu, code=1)
    assert "a plain torch.jit.load fails here" in check(d, "device tags")["detail"]
    r = run("verify", gpu, "--map-location", "cpu")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "result: PASS"


def test_plain_cpu_file_is_unchanged_by_map_location(make):
    d = js("verify", make("state_dict.pt"), "--map-location", "cpu")
    assert check(d, "torch.load")["status"] == "pass"
    assert check(d, "device tags")["detail"] == "storages tagged cpu, all present here"


# ---------------------------------------------------------------------------------------------
# the option itself


@pytest.mark.parametrize("args, message", [
    (["gpu"], "--map-location 'gpu' is not a device (cpu, cuda:0) or SRC=DST (cuda:1=cuda:0)"),
    (["cuda:1=tpu"], "--map-location 'cuda:1=tpu' is not a device (cpu, cuda:0) or SRC=DST (cuda:1=cuda:0)"),
    (["cpu", "cuda:0=cpu"], "--map-location takes one device, or SRC=DST pairs, not both"),
    (["cpu", "cuda:0"], "--map-location takes one device, or SRC=DST pairs (repeatable)"),
])
def test_bad_map_location_is_one_error_line(make, args, message):
    argv = ["verify", make("state_dict.pt")]
    for a in args:
        argv += ["--map-location", a]
    assert_error(run(*argv), f"ckpttool: error: {message}")


def test_parse_map_location():
    assert parse_map_location(None) is None and parse_map_location(()) is None
    assert parse_map_location("cpu") == "cpu" and parse_map_location(["cuda:1"]) == "cuda:1"
    assert parse_map_location(["cuda:1=cuda:0", "cuda:2=cpu"]) == {"cuda:1": "cuda:0", "cuda:2": "cpu"}
    with pytest.raises(UsageError):
        parse_map_location(["cuda:x"])


# ---------------------------------------------------------------------------------------------
# what the report says was proven


def test_report_lists_what_was_proven(make):
    path = make("state_dict.pt")
    r = run("verify", path, "--model", CLASSNET, "--input-shape", "1x3x8x8")
    assert r.exit_code == 0, (r.output, r.exception)
    tail = r.stdout.splitlines()[-3:]
    if not CUDA:
        assert tail == ["proven: readable; torch.load(weights_only=True); integrity; format round trip (torch_zip, "
                        "safetensors); device tags; loads into model (cpu); forward pass runs (cpu)",
                        "not proven: devices (cuda)",
                        "result: PASS"]
    else:
        assert tail[0].startswith("proven: readable; torch.load(weights_only=True); ") and "(cpu, cuda:0)" in tail[0]
        assert tail[1:] == ["result: PASS"]


def test_report_names_what_could_not_run(make):
    r = run("verify", make("state_dict.pt"))
    assert r.exit_code == 0
    lines = report_lines(r.stdout)
    assert lines["not proven"].endswith("loads into model; computes the same")
    assert r.stdout.splitlines()[-1] == "result: PASS"
    d = js("verify", make("state_dict.pt"))
    assert check(d, "computes the same")["detail"] == ("not run: it needs input shapes (--input NAME:1x3x224x224 or "
                                                       "--input-shape 1x3x224x224, one per input)")


def test_environment_rows_are_text(make):
    """No Python values in the report: 'not available', not 'available: False'."""
    out = verify_text(verify(make("state_dict.pt")))
    cuda_row = next(ln for ln in out.splitlines() if ln.startswith("cuda "))
    assert cuda_row.split(None, 1)[1] == (f"available, {torch.cuda.device_count()} device(s)" if CUDA
                                          else "not available")
    env_block = out.split("\n\n", 1)[0]
    assert not {"False", "True", "None"} & set(env_block.replace(",", " ").split()), env_block


def test_library_takes_map_location(tmp_path):
    path = save_cuda_tagged("zip", tmp_path)
    r = verify(path, map_location="cpu")
    assert r.ok is True and r.exit_code == 0
    assert verify_text(r).splitlines()[-1] == "result: PASS"


# ---------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_map_location_onto_cuda0(tmp_path):
    """cuda:0 and cuda:1 tags, all mapped onto cuda:0 (the one-GPU machine's view): PASS, and the model runs."""
    path = save_cuda_tagged("zip", tmp_path)
    d = js("verify", path, "--map-location", "cuda:1=cuda:0", "--model", CLASSNET, "--input-shape", "1x3x8x8")
    assert d["ok"] is True
    assert check(d, "torch.load")["detail"].startswith(
        "torch.load(weights_only=True, map_location={'cuda:1': 'cuda:0'}) reads it")
    assert check(d, "computes the same", "cuda:0")["status"] == "pass"
