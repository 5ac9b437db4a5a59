"""`ckpttool verify` as a user runs it: the report, JSON, exit codes, the exact error lines."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from clitools import assert_error, js, run


R18 = "torchvision.models:resnet18"
SHAPE = "1x3x32x32"
CLASSNET = "mypkg:ClassNet"
CUDA = torch.cuda.is_available()


def check(d: dict, name: str, device=None) -> dict:
    found = [c for c in d["checks"] if c["name"] == name and c["device"] == device]
    assert len(found) == 1, [(c["name"], c["device"]) for c in d["checks"]]
    return found[0]


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """resnet18 weights (seed 0), other weights (seed 1), the full pickle of the first, and ONNX of each via the CLI."""
    import torchvision
    d = tmp_path_factory.mktemp("cli_verify")
    paths = {}
    for name, seed in (("weights", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(weights=None).eval()
        paths[name] = str(d / f"{name}.pt")
        torch.save(model.state_dict(), paths[name])
        if seed == 0:
            paths["full"] = str(d / "full_model.pth")
            torch.save(model, paths["full"])
            paths["torchscript"] = str(d / "scripted.pt")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), paths["torchscript"])
        onnx_path = str(d / f"{name}.onnx")
        r = run("convert", paths[name], "-o", onnx_path, "--model", R18, "--input-shape", SHAPE)
        assert r.exit_code == 0, (r.output, r.exception)
        paths[f"{name}_onnx"] = onnx_path
    paths["safetensors"] = str(d / "model.safetensors")
    assert run("convert", paths["weights"], "-o", paths["safetensors"]).exit_code == 0
    return paths


@pytest.fixture(scope="module")
def missing_key(r18, tmp_path_factory):
    sd = torch.load(r18["weights"], weights_only=True)
    del sd["layer3.1.bn2.running_var"]
    path = str(tmp_path_factory.mktemp("cli_verify_bad") / "missing.pt")
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------
# the text report


def test_text_report_clean(r18):
    r = run("verify", r18["weights"], "--model", R18, "--input-shape", SHAPE)
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    # the environment first
    assert lines[0].startswith("file") and r18["weights"] in lines[0] and "torch_zip" in lines[0]
    assert lines[1].split()[0] == "torch" and torch.__version__ in lines[1]
    assert f"CUDA build {torch.version.cuda or 'none'}" in lines[1]
    assert lines[2].split()[0] == "cuda"
    assert lines[2].split(None, 1)[1] == (f"available, {torch.cuda.device_count()} device(s)" if CUDA
                                          else "not available")
    assert any(ln.strip().startswith("cpu:") for ln in lines[3:6])
    # then the table, then the verdict
    header = next(ln for ln in lines if ln.startswith("check"))
    assert header.split() == ["check", "device", "status", "detail"]
    for name in ("readable", "integrity", "format round trip", "device tags", "loads into model",
                 "computes the same") + (("device round trip",) if CUDA else ()):
        assert any(ln.startswith(name) for ln in lines), name
    assert "FAIL" not in r.stdout
    assert lines[-1] == "result: PASS"


def test_help_has_examples():
    r = run("verify", "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.stdout and "--against" in r.stdout and "--input-shape" in r.stdout


# ---------------------------------------------------------------------------------------------
# JSON


def test_json_schema(r18):
    d = js("verify", r18["weights"], "--model", R18, "--input-shape", SHAPE)
    assert d["ok"] is True
    assert d["path"] == r18["weights"] and d["format"] == "torch_zip" and d["entry"] is None
    assert d["devices"][0] == "cpu"
    env = d["environment"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is CUDA
    assert env["cuda_build"] == torch.version.cuda
    assert env["devices"][0]["device"] == "cpu" and env["devices"][0]["name"]
    assert env["device_count"] == len(env["devices"]) - 1
    names = [c["name"] for c in d["checks"]]
    for name in ("readable", "integrity", "format round trip", "device tags", "loads into model",
                 "computes the same") + (("device round trip",) if CUDA else ()):
        assert name in names
    for c in d["checks"]:
        assert set(c) >= {"name", "device", "status", "detail"}
        assert c["status"] in ("pass", "skip") and isinstance(c["detail"], str)
        assert c["device"] is None or isinstance(c["device"], str)
        assert "culprit" not in c
    assert {c["device"] for c in d["checks"] if c["name"] == "format round trip"} == {"torch_zip", "safetensors"}
    assert {c["device"] for c in d["checks"] if c["name"] == "device round trip"} == set(d["devices"]) - {"cpu"}


def test_json_failure_has_culprit_and_exit_1(missing_key):
    d = js("verify", missing_key, "--model", R18, "--input-shape", SHAPE, code=1)
    assert d["ok"] is False
    c = check(d, "loads into model", "cpu")
    assert c["status"] == "fail" and c["culprit"] == "layer3.1.bn2.running_var"
    assert "layer3.1.bn2.running_var" in c["detail"]
    assert check(d, "computes the same")["status"] == "skip"


def test_text_failure_missing_key(missing_key):
    r = run("verify", missing_key, "--model", R18, "--input-shape", SHAPE)
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stderr == ""
    assert any(ln.startswith("loads into model") and " FAIL " in ln for ln in r.stdout.splitlines())
    assert r.stdout.splitlines()[-1] == "result: FAIL: loads into model on cpu (layer3.1.bn2.running_var)"


def test_wrong_shape_names_the_tensor(r18, tmp_path):
    sd = torch.load(r18["weights"], weights_only=True)
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"][:32].clone()
    path = tmp_path / "narrow.pt"
    torch.save(sd, path)
    d = js("verify", path, "--model", R18, "--input-shape", SHAPE, code=1)
    c = check(d, "loads into model", "cpu")
    assert c["status"] == "fail" and c["culprit"] == "layer1.0.conv1.weight"
    assert check(d, "computes the same")["status"] == "skip"


# ---------------------------------------------------------------------------------------------
# the seed workflows


def test_onnx_against_pytorch_original(r18):
    r = run("verify", r18["weights_onnx"], "--against", r18["weights"], "--model", R18, "--input-shape", SHAPE)
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.splitlines()[-1] == "result: PASS"
    d = js("verify", r18["weights_onnx"], "--against", r18["weights"], "--model", R18, "--input-shape", SHAPE)
    m = check(d, "matches original", "cpu")
    assert m["status"] == "pass" and "max abs diff" in m["detail"] and m["max_abs"] < 1e-4
    assert check(d, "same tensors as original")["status"] == "skip"


def test_onnx_from_different_weights_fails(r18):
    r = run("verify", r18["other_onnx"], "--against", r18["weights"], "--model", R18, "--input-shape", SHAPE)
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stdout.splitlines()[-1] == "result: FAIL: matches original on cpu (output0)"
    assert "max abs diff" in r.stdout
    d = js("verify", r18["other_onnx"], "--against", r18["weights"], "--model", R18, "--input-shape", SHAPE,
           code=1)
    m = check(d, "matches original", "cpu")
    assert m["status"] == "fail" and m["culprit"] == "output0" and m["max_abs"] > 1e-2


def test_safetensors_against_full_pickle_with_trust(r18):
    d = js("verify", r18["safetensors"], "--against", r18["full"], "--trust", "--input-shape", SHAPE)
    assert d["ok"] is True
    assert check(d, "same tensors as original")["status"] == "pass"
    assert check(d, "loads into model", "cpu")["status"] == "pass"
    assert check(d, "matches original", "cpu")["status"] == "pass"


def test_safetensors_migration_of_fixture_full_model(make, tmp_path):
    """The README's workflow on the fixture (tied weights): convert the pickle, verify the result against it."""
    full = make("full_model.pth")
    st = tmp_path / "model.safetensors"
    assert run("convert", full, "-o", st).exit_code == 0
    r = run("verify", st, "--against", full, "--trust", "--input-shape", "1x3x8x8")
    assert r.exit_code == 0, r.stdout
    assert r.stdout.splitlines()[-1] == "result: PASS"


def test_torchscript_with_trust(r18):
    d = js("verify", r18["torchscript"], "--trust", "--input-shape", SHAPE)
    assert d["ok"] is True
    assert check(d, "loads into model", "cpu")["status"] == "pass"
    assert check(d, "computes the same", "cpu")["status"] == "pass"


@pytest.mark.skipif(CUDA, reason="the CPU-only view of a GPU-saved file")
def test_gpu_saved_file_on_cpu_machine(committed):
    path = committed("gpu_tagged.pt")
    d = js("verify", path, "--model", CLASSNET, "--input-shape", "1x3x8x8", code=1)
    # a plain torch.load of it fails on this machine: not a pass
    assert d["ok"] is False and d["entry"] == "model_state_dict" and d["devices"] == ["cpu"]
    assert check(d, "torch.load")["status"] == "fail" and "cuda:1" in check(d, "torch.load")["detail"]
    tags = check(d, "device tags")
    assert tags["status"] == "fail" and f"ckpttool remap {path} -o FIXED.pt --map" in tags["detail"]
    assert check(d, "devices", "cuda")["status"] == "skip"
    assert not [c for c in d["checks"] if c["name"] == "device round trip"]  # no device but the CPU here
    assert check(d, "loads into model", "cpu")["status"] == "pass"
    assert check(d, "computes the same", "cpu")["status"] == "pass"


def test_flipped_bit_integrity_and_against(r18, tmp_path):
    import zipfile
    import struct
    with zipfile.ZipFile(r18["weights"]) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(open(r18["weights"], "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 3] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    a, b = torch.load(r18["weights"], weights_only=True), torch.load(bad, weights_only=True)
    (culprit,) = [k for k in a if not torch.equal(a[k], b[k])]
    r = run("verify", bad)
    assert r.exit_code == 1
    assert r.stdout.splitlines()[-1] == f"result: FAIL: integrity ({culprit})"
    d = js("verify", bad, "--against", r18["weights"], code=1)
    assert check(d, "integrity")["culprit"] == culprit
    same = check(d, "same tensors as original")
    assert same["status"] == "fail" and same["culprit"] == culprit


def test_full_pickle_without_trust_never_imports(tmp_path):
    pkg = "ckv_cli_planted"
    code = tmp_path / "code"
    (code / pkg).mkdir(parents=True)
    (code / pkg / "__init__.py").write_text(
        "import os\nfrom torch import nn\n"
        "open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'IMPORTED'), 'w').close()\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n        return self.lin(x)\n")
    marker = code / pkg / "IMPORTED"
    sys.path.insert(0, str(code))
    try:
        import importlib
        net = importlib.import_module(pkg).Net()
        torch.save(net, tmp_path / "full.pth")
    finally:
        sys.path.remove(str(code))
        sys.modules.pop(pkg, None)
    marker.unlink()
    try:
        d = js("verify", tmp_path / "full.pth", "--input-shape", "1x4", code=1)
        assert not marker.exists() and pkg not in sys.modules
        assert f"{pkg}.Net" in check(d, "readable")["detail"]
        assert d["ok"] is False and check(d, "torch.load")["status"] == "fail"
        loads = check(d, "loads into model")
        assert loads["status"] == "skip" and "--trust" in loads["detail"]
        assert check(d, "computes the same")["status"] == "skip"
        # with --trust and --import-path it runs (and the plant shows it)
        d = js("verify", tmp_path / "full.pth", "--input-shape", "1x4", "--trust", "--import-path", code)
        assert marker.exists()
        assert check(d, "computes the same", "cpu")["status"] == "pass"
    finally:
        sys.modules.pop(pkg, None)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    assert_error(run("verify", missing), f"ckpttool: error: no such file or directory ({missing})")
    assert_error(run("verify", missing, "--json"), f"ckpttool: error: no such file or directory ({missing})")


def test_missing_original(r18, tmp_path):
    missing = tmp_path / "orig.pt"
    assert_error(run("verify", r18["weights"], "--against", missing),
                 f"ckpttool: error: no such file or directory ({missing})")


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("dev", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda(r18, dev):
    assert_error(run("verify", r18["weights"], "--device", dev),
                 f"ckpttool: error: --device {dev}: CUDA is not available on this machine "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")


def test_bad_device(r18):
    assert_error(run("verify", r18["weights"], "--device", "gpu"),
                 "ckpttool: error: --device 'gpu' is not a device (cpu, cuda, cuda:1, mps)")


@pytest.mark.parametrize("shape", ["1xax3", "0x3", "x"])
def test_bad_input_shape(r18, shape):
    assert_error(run("verify", r18["weights"], "--input-shape", shape),
                 f"ckpttool: error: --input-shape {shape!r} is not like 1x3x224x224")


@pytest.mark.parametrize("opt", ["--atol", "--rtol"])
def test_negative_tolerance(r18, opt):
    assert_error(run("verify", r18["weights"], opt, "-1"), f"ckpttool: error: {opt} must be >= 0")


def test_tolerance_not_a_number(r18):
    r = run("verify", r18["weights"], "--atol", "tiny")
    assert r.exit_code == 2 and r.stdout == "" and "--atol" in r.stderr


def test_unknown_key(r18):
    r = run("verify", r18["weights"], "--key", "no_such_entry")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("ckpttool: error: no entry 'no_such_entry'")
    assert r.stderr.splitlines()[0].endswith(f"({r18['weights']})")


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"certainly not a checkpoint")
    r = run("verify", junk)
    assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("ckpttool: error: ") and r.stderr.splitlines()[0].endswith(f"({junk})")


def test_bad_model_spec_is_an_error_not_a_failed_check(r18):
    """A SPEC that is not MODULE:NAME is bad usage: exit 2 with the one error line, as convert does."""
    assert_error(run("verify", r18["weights"], "--model", "resnet18", "--input-shape", SHAPE),
                 "ckpttool: error: --model 'resnet18' is not MODULE:NAME or FILE.py:NAME",
                 hint="e.g. --model torchvision.models:resnet50 or --model nets/mine.py:ClassNet")


def test_onnx_input_shape_it_cannot_take(r18):
    """onnxruntime refusing the shape is the user's error: one line, exit 2, no traceback (not exit 1)."""
    r = run("verify", r18["weights_onnx"], "--input-shape", "1x3x64x64")
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) >= 1 and lines[0].startswith("ckpttool: error: ")
    assert lines[0].endswith(f"({r18['weights_onnx']})")
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_default_devices_include_cuda0(r18):
    d = js("verify", r18["weights"], "--model", R18, "--input-shape", SHAPE)
    assert d["devices"] == ["cpu", "cuda:0"]
    assert not [c for c in d["checks"] if c["name"] == "devices"]
    env = d["environment"]
    assert env["cuda_available"] is True and env["device_count"] == torch.cuda.device_count()
    assert env["devices"][1]["device"] == "cuda:0" and env["devices"][1]["name"] == torch.cuda.get_device_name(0)
    assert env["devices"][1]["memory"] == torch.cuda.get_device_properties(0).total_memory
    for name in ("device round trip", "loads into model", "computes the same"):
        assert check(d, name, "cuda:0")["status"] == "pass", check(d, name, "cuda:0")
    r = run("verify", r18["weights"])
    assert "cuda:0: " + torch.cuda.get_device_name(0) in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_device_beyond_count(r18):
    n = torch.cuda.device_count()
    assert_error(run("verify", r18["weights"], "--device", f"cuda:{n}"),
                 f"ckpttool: error: --device cuda:{n}: this machine has {n} CUDA device(s)")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_saved_file_has_no_device_tag_skip(tmp_path):
    from mypkg import ClassNet  # fixtures/ is on sys.path
    torch.manual_seed(0)
    path = tmp_path / "on_cuda.pt"
    torch.save(ClassNet().to("cuda:0").state_dict(), path)
    d = js("verify", path, "--model", CLASSNET, "--input-shape", "1x3x8x8", "--device", "cuda")
    assert d["ok"] is True
    tags = check(d, "device tags")
    assert tags["status"] == "pass" and "cuda:0" in tags["detail"]
    assert check(d, "computes the same", "cuda:0")["status"] == "pass"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_resnet18_computes_the_same_on_cuda(r18):
    r = run("verify", r18["weights"], "--model", R18, "--input-shape", SHAPE, "--device", "cuda:0")
    assert r.exit_code == 0, r.stdout
    assert r.stdout.splitlines()[-1] == "result: PASS"
    assert any(ln.startswith("computes the same") and "cuda:0" in ln and "pass" in ln
               for ln in r.stdout.splitlines())
