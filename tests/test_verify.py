"""``ckpttool.verify``: every check passes on clean files, and each fails on purpose naming its culprit."""
from __future__ import annotations

import shlex
import shutil
import struct
import sys
import warnings
import zipfile

import pytest
import torch

import ckpttool
from ckpttool.converting import convert
from ckpttool.errors import CkptError, UsageError
from ckpttool.records import CheckResult, VerifyReport
from ckpttool.render import verify_text
from ckpttool.verifying import verify

R18 = "torchvision.models:resnet18"
SHAPE = "1x3x32x32"
CLASSNET = "mypkg:ClassNet"  # fixtures/ is on sys.path (conftest's autouse fixture)
CLASSNET_SHAPE = "1x3x8x8"
CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# helpers


def by_key(report: VerifyReport) -> dict:
    """(name, device) -> CheckResult; every pair appears once."""
    out = {}
    for c in report.checks:
        assert (c.name, c.device) not in out, f"check {c.name} on {c.device} reported twice"
        out[(c.name, c.device)] = c
    return out


def named(report: VerifyReport, name: str) -> list:
    return [c for c in report.checks if c.name == name]


def assert_all_pass(report: VerifyReport) -> None:
    bad = [c for c in report.checks if c.status == "fail"]
    assert not bad, [c.to_dict() for c in bad]
    assert report.ok is True and report.exit_code == 0 and report.first_failure is None
    assert verify_text(report).splitlines()[-1] == "result: PASS"


def assert_only_torch_load_fails(report: VerifyReport, *words: str) -> None:
    """Every check passes but ``torch.load``: a plain torch.load(weights_only=True) would fail here, and the
    gate says so (exit 1) with what fixes it."""
    bad = [c for c in report.checks if c.status == "fail"]
    assert [c.name for c in bad] == ["torch.load"], [c.to_dict() for c in bad]
    assert report.ok is False and report.exit_code == 1
    for w in words:
        assert w in bad[0].detail, bad[0].detail
    assert verify_text(report).splitlines()[-1].startswith("result: FAIL")


def assert_only_device_load_fails(report: VerifyReport, *words: str) -> None:
    """Every check passes but ``torch.load`` and ``device tags``: the file's storages name devices this machine
    lacks, so a plain torch.load(weights_only=True) fails here; the gate says so (exit 1) and how to go on."""
    bad = [c for c in report.checks if c.status == "fail"]
    assert [c.name for c in bad] == ["torch.load", "device tags"], [c.to_dict() for c in bad]
    assert report.ok is False and report.exit_code == 1
    for w in words:
        assert w in bad[0].detail, bad[0].detail
    assert verify_text(report).splitlines()[-1] == "result: FAIL: torch.load"


def assert_runs_everywhere(report: VerifyReport) -> None:
    """loads into model and computes the same pass on every checked device."""
    c = by_key(report)
    for dev in report.devices:
        assert c[("loads into model", dev)].status == "pass", c[("loads into model", dev)]
        assert c[("computes the same", dev)].status == "pass", c[("computes the same", dev)]
        if dev != "cpu":  # the CPU holds the bytes the format round trip compared: nothing moves there
            assert c[("device round trip", dev)].status == "pass", c[("device round trip", dev)]
    assert ("device round trip", "cpu") not in c


def zip_record_span(path: str, pick) -> tuple:
    """(record name, first byte of its data, its size) for the record ``pick(infos)`` chooses."""
    with zipfile.ZipFile(path) as z:
        info = pick(z.infolist())
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    assert local[:4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bit_in_largest_tensor(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst`` with one bit flipped in the middle of its largest data/<key> record."""
    name, start, size = zip_record_span(
        src, lambda infos: max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size))
    assert size > 1 << 16  # a real tensor record, not a small one or padding
    data = bytearray(open(src, "rb").read())
    data[start + size // 2] ^= 0x01
    with open(dst, "wb") as f:
        f.write(data)
    return name


def changed_tensor(a: str, b: str) -> str:
    """The one tensor whose values differ between two torch.save files (torch's own reading, as the oracle)."""
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert len(diff) == 1, diff
    return diff[0]


def resnet18_state_dict(seed: int) -> dict:
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """resnet18 (seed 0) as a state_dict in every format, its full pickle, its ONNX; and other weights (seed 1)."""
    import torchvision
    d = tmp_path_factory.mktemp("verify_r18")
    paths = {}
    sd = resnet18_state_dict(0)
    paths["zip"] = str(d / "weights.pt")
    torch.save(sd, paths["zip"])
    paths["legacy"] = str(d / "weights_legacy.pt")
    torch.save(sd, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["safetensors"] = str(d / "model.safetensors")
    convert(paths["zip"], paths["safetensors"])
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(sd)
    model.eval()
    paths["full"] = str(d / "full_model.pth")
    torch.save(model, paths["full"])
    paths["torchscript"] = str(d / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), paths["torchscript"])
    paths["onnx"] = str(d / "model.onnx")
    convert(paths["zip"], paths["onnx"], model=R18, input_shapes=[SHAPE])
    paths["other"] = str(d / "other_weights.pt")
    torch.save(resnet18_state_dict(1), paths["other"])
    paths["other_onnx"] = str(d / "other.onnx")
    convert(paths["other"], paths["other_onnx"], model=R18, input_shapes=[SHAPE])
    return paths


# ---------------------------------------------------------------------------------------------
# the API and the report


def test_public_api_is_verify():
    assert ckpttool.verify is verify
    assert ckpttool.VerifyReport is VerifyReport
    assert "verify" in ckpttool.__all__ and "VerifyReport" in ckpttool.__all__


def test_report_record_and_to_dict(r18):
    r = ckpttool.verify(r18["zip"], model=R18, input_shapes=[SHAPE])
    assert isinstance(r, VerifyReport)
    assert all(isinstance(c, CheckResult) for c in r.checks)
    assert r.path == r18["zip"] and r.format == "torch_zip" and r.entry is None
    d = r.to_dict()
    assert d["ok"] is True
    assert d["devices"] == list(r.devices)
    assert [c["name"] for c in d["checks"]] == [c.name for c in r.checks]
    for c in d["checks"]:
        assert set(c) >= {"name", "device", "status", "detail"}
        assert c["status"] in ("pass", "fail", "skip")
        assert isinstance(c["detail"], str) and c["detail"]
        assert "culprit" not in c  # nothing failed
    with pytest.raises(Exception):
        r.checks[0].status = "fail"  # frozen


def test_environment_block(r18):
    r = verify(r18["zip"])
    env = r.environment
    assert env["torch"] == torch.__version__
    assert env["cuda_build"] == torch.version.cuda
    assert env["cuda_available"] is torch.cuda.is_available()
    assert env["device_count"] == (torch.cuda.device_count() if CUDA else 0)
    assert env["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    devices = env["devices"]
    assert devices[0]["device"] == "cpu" and devices[0]["name"]
    assert [d["device"] for d in devices[1:]] == [f"cuda:{i}" for i in range(env["device_count"])]
    for i, d in enumerate(devices[1:]):
        assert d["name"] == torch.cuda.get_device_name(i)
        assert d["memory"] == torch.cuda.get_device_properties(i).total_memory
    assert r.to_dict()["environment"]["torch"] == torch.__version__
    text = verify_text(r)
    assert torch.__version__ in text and "cpu:" in text


# ---------------------------------------------------------------------------------------------
# clean cases


def test_resnet18_state_dict_passes_every_check(r18):
    r = verify(r18["zip"], model=R18, input_shapes=[SHAPE])
    assert_all_pass(r)
    c = by_key(r)
    assert c[("readable", None)].status == "pass"
    assert "no code run" in c[("readable", None)].detail
    assert c[("integrity", None)].status == "pass" and "CRC-32" in c[("integrity", None)].detail
    assert c[("format round trip", "torch_zip")].status == "pass"
    assert c[("format round trip", "safetensors")].status == "pass"
    assert "122 tensors bit-equal" in c[("format round trip", "torch_zip")].detail
    assert c[("device tags", None)].status == "pass"
    assert "cpu" in r.devices
    assert_runs_everywhere(r)
    assert "torchvision.models:resnet18" in c[("loads into model", "cpu")].detail
    assert "1 output(s) 1x1000 via" in c[("computes the same", "cpu")].detail


@pytest.mark.parametrize("fmt, kwargs", [
    ("zip", {"model": R18}),
    ("legacy", {"model": R18}),
    ("safetensors", {"model": R18}),
    ("torchscript", {"trust": True}),
    ("torchscript", {"model": R18}),
    ("full", {"trust": True}),
])
def test_resnet18_passes_on_every_format(r18, fmt, kwargs):
    r = verify(r18[fmt], input_shapes=[SHAPE], **kwargs)
    assert_all_pass(r)
    assert_runs_everywhere(r)
    rt = {c.device: c for c in named(r, "format round trip")}
    assert rt["torch_zip"].status == "pass" and rt["safetensors"].status == "pass"
    if kwargs.get("trust"):
        assert "--trust" in by_key(r)[("loads into model", "cpu")].detail


def test_integrity_skipped_for_formats_without_checksums(r18):
    for fmt in ("legacy", "safetensors"):
        c = by_key(verify(r18[fmt]))[("integrity", None)]
        assert c.status == "skip" and "checksum" in c.detail


def test_onnx_runs_in_onnxruntime(r18):
    r = verify(r18["onnx"], input_shapes=[SHAPE])
    assert_all_pass(r)
    c = by_key(r)
    assert r.format == "onnx"
    assert c[("loads into model", None)].status == "skip"
    assert c[("computes the same", "cpu")].status == "pass"
    assert "onnxruntime" in c[("computes the same", "cpu")].detail


def test_onnx_exported_checked_against_its_pytorch_original(r18):
    """Seed workflow: convert --model resnet18 to .onnx, then verify model.onnx --against weights.pt."""
    r = verify(r18["onnx"], against=r18["zip"], model=R18, input_shapes=[SHAPE])
    assert_all_pass(r)
    c = by_key(r)
    assert c[("same tensors as original", None)].status == "skip"
    assert "ONNX" in c[("same tensors as original", None)].detail
    m = c[("matches original", "cpu")]
    assert m.status == "pass" and "max abs diff" in m.detail
    assert m.max_abs is not None and m.max_abs < 1e-4


def test_state_dict_against_trusted_full_model_runs_in_originals_model(r18):
    r = verify(r18["zip"], against=r18["full"], trust=True, input_shapes=[SHAPE])
    assert_all_pass(r)
    c = by_key(r)
    assert c[("same tensors as original", None)].status == "pass"
    assert r18["full"] in c[("loads into model", "cpu")].detail
    m = c[("matches original", "cpu")]
    assert m.status == "pass" and m.max_abs == 0.0


def test_safetensors_migration_of_resnet18_against_its_full_pickle(r18):
    r = verify(r18["safetensors"], against=r18["full"], trust=True, input_shapes=[SHAPE])
    assert_all_pass(r)
    c = by_key(r)
    assert c[("same tensors as original", None)].status == "pass"
    assert c[("matches original", "cpu")].status == "pass"


def test_torchscript_against_full_model(r18):
    r = verify(r18["torchscript"], against=r18["full"], trust=True, input_shapes=[SHAPE])
    assert_all_pass(r)
    assert by_key(r)[("matches original", "cpu")].status == "pass"


def test_safetensors_migration_of_tied_model_against_its_full_pickle(make, tmp_path):
    """Seed workflow: ``convert full_model.pth model.safetensors`` then verify it --against the pickle.

    ClassNet ties head.weight to embed.weight; convert stores the twin once and records it in the
    header. The migration lost nothing, so verify must pass.
    """
    full = make("full_model.pth")
    st = str(tmp_path / "model.safetensors")
    convert(full, st)
    r = verify(st, against=full, trust=True, input_shapes=[CLASSNET_SHAPE])
    assert_all_pass(r)
    c = by_key(r)
    assert c[("same tensors as original", None)].status == "pass"
    assert c[("loads into model", "cpu")].status == "pass"
    assert c[("matches original", "cpu")].status == "pass"


def test_shared_storages_and_tied_tensors_in_round_trip(make):
    r = verify(make("state_dict.pt"))
    rt = {c.device: c for c in named(r, "format round trip")}
    assert rt["torch_zip"].status == "pass" and "1 shared storages kept" in rt["torch_zip"].detail
    assert rt["safetensors"].status == "pass" and "tied" in rt["safetensors"].detail


@pytest.mark.parametrize("name", ["all_dtypes.pt", "legacy_all_dtypes.pt"])
def test_all_dtypes_round_trip(make, name):
    r = verify(make(name))
    assert r.ok, [c.to_dict() for c in r.checks if c.status == "fail"]
    rt = {c.device: c for c in named(r, "format round trip")}
    assert rt["torch_zip"].status == "pass"
    if name == "all_dtypes.pt":
        # float8_e8m0fnu / fnuz / complex128: safetensors cannot hold them -> skip, naming the dtype
        assert rt["safetensors"].status == "skip"
        assert "safetensors cannot hold" in rt["safetensors"].detail
    assert ("device round trip", "cpu") not in by_key(r)


def test_sharded_safetensors(make):
    r = verify(make("sharded_safetensors"))
    assert r.ok and r.format == "safetensors_sharded"


def test_no_input_shape_skips_computes(r18):
    r = verify(r18["zip"], model=R18)
    assert r.ok
    c = named(r, "computes the same")
    assert len(c) == 1 and c[0].status == "skip" and "--input-shape" in c[0].detail
    assert named(r, "matches original") == []


def test_state_dict_alone_skips_model_checks(r18):
    r = verify(r18["zip"], input_shapes=[SHAPE])
    assert r.ok
    c = by_key(r)
    assert c[("loads into model", None)].status == "skip" and "--model" in c[("loads into model", None)].detail
    assert c[("computes the same", None)].status == "skip"


def test_key_picks_the_entry(committed):
    r = verify(committed("seed_checkpoint.tar"), key="model_state_dict", model=CLASSNET,
               input_shapes=[CLASSNET_SHAPE])
    assert_only_torch_load_fails(r, "add_safe_globals", "from mypkg import Block, ClassNet", "--trust")  # it also pickles the model
    r = verify(committed("seed_checkpoint.tar"), key="model_state_dict", model=CLASSNET,
               input_shapes=[CLASSNET_SHAPE], trust=True)
    assert_all_pass(r)
    assert r.entry == "model_state_dict"
    with pytest.raises(CkptError) as e:
        verify(committed("seed_checkpoint.tar"), key="no_such_entry")
    assert e.value.exit_code == 2 and "no_such_entry" in str(e.value)


def test_key_model_with_trust_runs_the_pickled_model(committed):
    r = verify(committed("seed_checkpoint.tar"), key="model", trust=True, input_shapes=[CLASSNET_SHAPE])
    assert_all_pass(r)
    assert_runs_everywhere(r)


def test_bundled_pickled_model_runs_with_trust(committed):
    """A training checkpoint bundling its model: with --trust the file's own model is what the state_dict loads into."""
    r = verify(committed("seed_checkpoint.tar"), trust=True, input_shapes=[CLASSNET_SHAPE])
    assert r.entry == "model_state_dict"
    loads = named(r, "loads into model")
    assert [(c.device, c.status) for c in loads] == [(d, "pass") for d in r.devices], [c.detail for c in loads]
    computes = named(r, "computes the same")
    assert [(c.device, c.status) for c in computes] == [(d, "pass") for d in r.devices], [c.detail for c in computes]
    assert_all_pass(r)


# ---------------------------------------------------------------------------------------------
# never running code without --trust


MARKER_MODULE = '''
import os
from torch import nn
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "IMPORTED"), "w") as f:
    f.write("imported")


class MarkedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)
'''


@pytest.fixture
def planted(tmp_path):
    """A full pickle of a class whose module writes IMPORTED beside itself when imported."""
    pkg = "ckv_planted_marker"
    code = tmp_path / "code"
    (code / pkg).mkdir(parents=True)
    (code / pkg / "__init__.py").write_text(MARKER_MODULE)
    marker = code / pkg / "IMPORTED"
    sys.path.insert(0, str(code))
    try:
        import importlib
        mod = importlib.import_module(pkg)
        torch.manual_seed(0)
        path = tmp_path / "planted_full.pth"
        torch.save(mod.MarkedNet(), path)
    finally:
        sys.path.remove(str(code))
        sys.modules.pop(pkg, None)
    assert marker.exists()
    marker.unlink()
    yield {"path": str(path), "code": str(code), "marker": marker, "pkg": pkg}
    sys.modules.pop(pkg, None)


def test_full_pickle_without_trust_skips_model_checks_and_imports_nothing(planted):
    r = verify(planted["path"], input_shapes=["2x4"])
    assert not planted["marker"].exists()
    assert planted["pkg"] not in sys.modules
    assert_only_torch_load_fails(r, f"from {planted['pkg']} import MarkedNet", "--trust")
    c = by_key(r)
    readable = c[("readable", None)]
    assert readable.status == "pass"
    assert f"{planted['pkg']}.MarkedNet" in readable.detail and "--trust" in readable.detail
    assert c[("loads into model", None)].status == "skip" and "--trust" in c[("loads into model", None)].detail
    assert c[("computes the same", None)].status == "skip" and "--trust" in c[("computes the same", None)].detail
    # the plant works: with --trust and --import-path the class is imported and runs
    r = verify(planted["path"], input_shapes=["2x4"], trust=True, import_path=[planted["code"]])
    assert planted["marker"].exists()
    assert_all_pass(r)
    assert_runs_everywhere(r)


def test_full_pickle_of_fixture_without_trust(make):
    r = verify(make("full_model.pth"), input_shapes=[CLASSNET_SHAPE])
    assert_only_torch_load_fails(r, "from mypkg import Block, ClassNet")
    c = by_key(r)
    assert "mypkg.ClassNet" in c[("readable", None)].detail
    assert c[("loads into model", None)].status == "skip" and "--trust" in c[("loads into model", None)].detail


# ---------------------------------------------------------------------------------------------
# GPU-trained checkpoints on this machine


def run_fix_command(detail: str, fixed: str) -> None:
    """Run the ``ckpttool remap ...`` command a device-tags skip suggests, writing ``fixed``."""
    from click.testing import CliRunner
    from ckpttool.cli import cli
    command = detail.split("to fix the file: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "ckpttool" and argv[1] == "remap" and "FIXED.pt" in argv
    argv = [fixed if a == "FIXED.pt" else a for a in argv[1:]]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, (argv, result.output, result.exception)


@pytest.mark.skipif(CUDA, reason="the CPU-only view of a GPU-saved file")
@pytest.mark.parametrize("name", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_gpu_tagged_checkpoint_verifies_on_cpu_machine(committed, name, tmp_path):
    path = committed(name)
    r = verify(path, model=CLASSNET, input_shapes=[CLASSNET_SHAPE])
    # a plain torch.load fails on this machine
    assert_only_device_load_fails(r, "cuda:0, cuda:1", "device tags", "--map-location cpu")
    assert r.entry == "model_state_dict" and r.devices == ("cpu",)
    c = by_key(r)
    tags = c[("device tags", None)]
    assert tags.status == "fail"
    assert "cuda:0, cuda:1" in tags.detail
    assert f"ckpttool remap {path} -o FIXED.pt --map " in tags.detail
    assert "map_location='cpu'" in tags.detail and "checked below" not in tags.detail
    assert c[("loads into model", "cpu")].status == "pass"
    assert c[("computes the same", "cpu")].status == "pass"
    # the suggested command fixes the file
    fixed = str(tmp_path / "FIXED.pt")
    run_fix_command(tags.detail, fixed)
    r = verify(fixed, model=CLASSNET, input_shapes=[CLASSNET_SHAPE])
    assert_all_pass(r)
    tags = by_key(r)[("device tags", None)]
    assert tags.status == "pass" and "cpu" in tags.detail


@pytest.mark.skipif(CUDA, reason="the CPU-only view of a GPU-saved file")
def test_suggested_remap_command_survives_a_path_with_spaces(committed, tmp_path):
    """The fix is a command to paste into a shell: a path with a space must be quoted."""
    folder = tmp_path / "my checkpoints"
    folder.mkdir()
    path = str(folder / "gpu run.pt")
    shutil.copyfile(committed("gpu_tagged.pt"), path)
    tags = by_key(verify(path))[("device tags", None)]
    assert tags.status == "fail"
    fixed = str(tmp_path / "FIXED.pt")
    run_fix_command(tags.detail, fixed)
    assert by_key(verify(fixed))[("device tags", None)].status == "pass"


def test_gpu_tagged_checkpoint_matches_cpu_original(committed, make):
    """The GPU-saved file holds the same tensors as the CPU one (same seed) and computes the same."""
    r = verify(committed("gpu_tagged.pt"), against=make("state_dict.pt"), model=CLASSNET,
               input_shapes=[CLASSNET_SHAPE])
    assert_only_device_load_fails(r, "cuda:0, cuda:1")
    c = by_key(r)
    assert c[("same tensors as original", None)].status == "pass"
    assert c[("matches original", "cpu")].status == "pass" and c[("matches original", "cpu")].max_abs == 0.0


# ---------------------------------------------------------------------------------------------
# each check failing on purpose


def test_flipped_bit_fails_integrity_naming_the_tensor(r18, tmp_path):
    bad = str(tmp_path / "flipped.pt")
    flip_bit_in_largest_tensor(r18["zip"], bad)
    culprit = changed_tensor(r18["zip"], bad)
    r = verify(bad)
    assert r.ok is False and r.exit_code == 1
    c = by_key(r)[("integrity", None)]
    assert c.status == "fail" and c.culprit == culprit
    assert culprit in c.detail and "CRC-32" in c.detail
    assert r.first_failure == c
    assert verify_text(r).splitlines()[-1] == f"result: FAIL: integrity ({culprit})"
    assert c.to_dict()["culprit"] == culprit


def test_flipped_bit_fails_same_tensors_as_original(r18, tmp_path):
    bad = str(tmp_path / "flipped.pt")
    flip_bit_in_largest_tensor(r18["zip"], bad)
    culprit = changed_tensor(r18["zip"], bad)
    r = verify(bad, against=r18["zip"])
    assert r.exit_code == 1
    c = by_key(r)[("same tensors as original", None)]
    assert c.status == "fail" and c.culprit == culprit and culprit in c.detail
    assert by_key(r)[("integrity", None)].culprit == culprit
    # the original's own integrity is not the question: the other direction fails the same way
    r2 = verify(r18["zip"], against=bad)
    c2 = by_key(r2)[("same tensors as original", None)]
    assert c2.status == "fail" and c2.culprit == culprit


def test_flipped_bit_in_torchscript_fails_integrity(r18, tmp_path):
    bad = str(tmp_path / "flipped_ts.pt")
    flip_bit_in_largest_tensor(r18["torchscript"], bad)
    r = verify(bad)
    c = by_key(r)[("integrity", None)]
    assert c.status == "fail" and c.culprit in resnet18_state_dict(0)


def test_same_tensors_tolerance(r18, tmp_path):
    bad = str(tmp_path / "flipped.pt")
    flip_bit_in_largest_tensor(r18["zip"], bad)
    r = verify(bad, against=r18["zip"], atol=1e-3)
    c = by_key(r)[("same tensors as original", None)]
    assert c.status == "pass" and "1 within tolerance" in c.detail
    other = verify(r18["other"], against=r18["zip"], atol=1e-3)
    c = by_key(other)[("same tensors as original", None)]
    assert c.status == "fail" and c.culprit == "conv1.weight" and "max abs diff" in c.detail


def test_missing_key_fails_load_naming_it(r18, tmp_path):
    sd = resnet18_state_dict(0)
    del sd["layer2.0.conv1.weight"]
    path = str(tmp_path / "missing.pt")
    torch.save(sd, path)
    r = verify(path, model=R18, input_shapes=[SHAPE])
    assert r.exit_code == 1 and r.ok is False
    for dev in r.devices:
        c = by_key(r)[("loads into model", dev)]
        assert c.status == "fail" and c.culprit == "layer2.0.conv1.weight"
        assert "missing" in c.detail and "layer2.0.conv1.weight" in c.detail
    comp = named(r, "computes the same")
    assert len(comp) == 1 and comp[0].status == "skip" and "does not load" in comp[0].detail
    assert verify_text(r).splitlines()[-1] == "result: FAIL: loads into model on cpu (layer2.0.conv1.weight)"


def test_wrong_shape_fails_load_naming_it(tmp_path):
    sd = resnet18_state_dict(0)
    sd["fc.weight"] = torch.zeros(10, 512)
    path = str(tmp_path / "shape.pt")
    torch.save(sd, path)
    r = verify(path, model=R18, input_shapes=[SHAPE])
    assert r.exit_code == 1
    c = by_key(r)[("loads into model", "cpu")]
    assert c.status == "fail" and c.culprit == "fc.weight"
    assert "fc.weight" in c.detail and "[10, 512]" in c.detail and "[1000, 512]" in c.detail
    assert named(r, "computes the same")[0].status == "skip"


def test_unexpected_key_fails_load_naming_it(tmp_path):
    sd = resnet18_state_dict(0)
    sd["extra.weight"] = torch.zeros(3)
    path = str(tmp_path / "unexpected.pt")
    torch.save(sd, path)
    r = verify(path, model=R18, input_shapes=[SHAPE])
    c = by_key(r)[("loads into model", "cpu")]
    assert c.status == "fail" and c.culprit == "extra.weight" and "unexpected" in c.detail


def test_onnx_from_different_weights_fails_matches_original(r18):
    r = verify(r18["other_onnx"], against=r18["zip"], model=R18, input_shapes=[SHAPE])
    assert r.exit_code == 1
    c = by_key(r)
    assert c[("computes the same", "cpu")].status == "pass"  # the ONNX file itself runs fine
    m = c[("matches original", "cpu")]
    assert m.status == "fail" and m.culprit == "output0"
    assert "max abs diff" in m.detail and m.max_abs is not None and m.max_abs > 1e-2
    assert m.to_dict()["culprit"] == "output0" and m.to_dict()["max_abs"] == pytest.approx(m.max_abs, rel=1e-2)
    assert verify_text(r).splitlines()[-1] == "result: FAIL: matches original on cpu (output0)"


def test_state_dict_from_different_weights_fails_both_comparisons(r18):
    r = verify(r18["other"], against=r18["zip"], model=R18, input_shapes=[SHAPE])
    c = by_key(r)
    assert c[("same tensors as original", None)].status == "fail"
    assert c[("matches original", "cpu")].status == "fail" and c[("matches original", "cpu")].culprit == "output0"
    # a loose enough tolerance lets outputs pass
    r = verify(r18["other"], against=r18["zip"], model=R18, input_shapes=[SHAPE], atol=1e6, rtol=1e6)
    assert by_key(r)[("matches original", "cpu")].status == "pass"


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("dev", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_device_without_cuda_is_an_error(r18, dev):
    with pytest.raises(UsageError) as e:
        verify(r18["zip"], devices=[dev])
    assert str(e.value) == (f"--device {dev}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    assert e.value.exit_code == 2


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_default_devices_skip_cuda_and_say_so(r18):
    r = verify(r18["zip"])
    assert r.devices == ("cpu",)
    c = by_key(r)[("devices", "cuda")]
    assert c.status == "skip" and "no CUDA" in c.detail
    explicit = verify(r18["zip"], devices=["cpu"])
    assert explicit.devices == ("cpu",) and not named(explicit, "devices")


@pytest.mark.parametrize("dev", ["gpu", "tpu:0", ""])
def test_bad_device_is_an_error(r18, dev):
    with pytest.raises(UsageError):
        verify(r18["zip"], devices=[dev])


@pytest.mark.parametrize("kwargs, message", [
    ({"input_shapes": ["1xax3"]}, "--input-shape '1xax3' is not like 1x3x224x224"),
    ({"input_shapes": ["0x3"]}, "--input-shape '0x3' is not like 1x3x224x224"),
    ({"atol": -1.0}, "--atol must be >= 0"),
    ({"rtol": -0.5}, "--rtol must be >= 0"),
    ({"atol": float("nan")}, "--atol must be >= 0"),
])
def test_bad_options_are_usage_errors(r18, kwargs, message):
    with pytest.raises(UsageError) as e:
        verify(r18["zip"], **kwargs)
    assert str(e.value) == message


def test_missing_file_and_missing_original(r18, tmp_path):
    missing = str(tmp_path / "nope.pt")
    for kwargs in ({"path": missing}, {"path": r18["zip"], "against": missing}):
        with pytest.raises(CkptError) as e:
            verify(**kwargs)
        assert e.value.exit_code == 2 and str(e.value) == f"no such file or directory ({missing})"


def test_bad_model_spec_is_a_usage_error(r18):
    """A --model SPEC that names nothing is the user's mistake (exit 2), not a failed check of the file (exit 1)."""
    with pytest.raises(UsageError) as e:
        verify(r18["zip"], model="torchvision.models:no_such_model", input_shapes=[SHAPE])
    assert "no_such_model" in str(e.value)


def test_onnx_input_shape_it_cannot_take_is_a_usage_error(r18):
    """The torch path turns a shape the model cannot take into a CkptError; the ONNX path must too."""
    with pytest.raises(CkptError) as e:
        verify(r18["onnx"], input_shapes=["1x3x64x64"])
    assert e.value.exit_code == 2


def test_onnx_wrong_number_of_inputs(r18):
    with pytest.raises(UsageError) as e:
        verify(r18["onnx"], input_shapes=[SHAPE, SHAPE])
    assert f"the ONNX graph of {r18['onnx']} takes 1 input(s) (x), --input-shape gave 2" in str(e.value)


def test_verify_leaves_tf32_settings_as_it_found_them(r18):
    """TF32 is off while verify computes; the caller's process keeps its own settings afterwards."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        r = verify(r18["zip"], model=R18, input_shapes=[SHAPE])
        assert r.ok
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_default_devices_include_cuda0(r18):
    r = verify(r18["zip"])
    assert r.devices == ("cpu", "cuda:0")
    assert not named(r, "devices")
    c = by_key(r)
    assert c[("device round trip", "cuda:0")].status == "pass"
    assert "cuda:0" in c[("device round trip", "cuda:0")].detail
    env = r.environment
    assert env["cuda_available"] is True and env["device_count"] == torch.cuda.device_count()
    cuda0 = env["devices"][1]
    assert cuda0["device"] == "cuda:0" and cuda0["name"] == torch.cuda.get_device_name(0)
    assert cuda0["memory"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_resnet18_computes_the_same_on_cuda_and_cpu(r18):
    r = verify(r18["zip"], model=R18, input_shapes=[SHAPE], devices=["cuda"])
    assert r.devices == ("cpu", "cuda:0")
    assert_all_pass(r)
    assert_runs_everywhere(r)
    c = by_key(r)[("computes the same", "cuda:0")]
    assert c.status == "pass" and "vs cpu" in c.detail and c.max_abs is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_onnx_is_run_on_cpu_only(r18):
    r = verify(r18["onnx"], input_shapes=[SHAPE], devices=["cuda:0"])
    c = by_key(r)[("computes the same", "cuda:0")]
    assert c.status == "skip" and "CPU" in c.detail


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_device_beyond_count_is_an_error(r18):
    n = torch.cuda.device_count()
    with pytest.raises(UsageError) as e:
        verify(r18["zip"], devices=[f"cuda:{n}"])
    assert str(e.value) == f"--device cuda:{n}: this machine has {n} CUDA device(s)"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_saved_file_verifies_without_device_tag_skip(tmp_path):
    torch.manual_seed(0)
    from mypkg import ClassNet  # fixtures/ is on sys.path
    path = str(tmp_path / "saved_on_cuda.pt")
    torch.save({"model_state_dict": ClassNet().cuda().state_dict(), "epoch": 1}, path)
    r = verify(path, model=CLASSNET, input_shapes=[CLASSNET_SHAPE])
    assert_all_pass(r)
    assert_runs_everywhere(r)
    tags = by_key(r)[("device tags", None)]
    assert tags.status == "pass" and "cuda:0" in tags.detail


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() >= 2, reason="needs exactly one CUDA GPU")
def test_gpu_two_gpu_file_on_one_gpu_names_only_the_missing_device(committed, tmp_path):
    path = committed("gpu_tagged.pt")
    r = verify(path, model=CLASSNET, input_shapes=[CLASSNET_SHAPE])
    assert_only_device_load_fails(r, "cuda:1")  # torch.load without map_location fails on one GPU
    tags = by_key(r)[("device tags", None)]
    assert tags.status == "fail"
    assert "storages say cuda:1," in tags.detail  # cuda:0 is here
    r = verify(path, model=CLASSNET, input_shapes=[CLASSNET_SHAPE], map_location=["cuda:1=cuda:0"])
    assert_all_pass(r)
    assert_runs_everywhere(r)
    fixed = str(tmp_path / "FIXED.pt")
    run_fix_command(tags.detail, fixed)
    assert by_key(verify(fixed))[("device tags", None)].status == "pass"


# ---------------------------------------------------------------------------------------------
# torch only where a check needs it


NO_TORCH_PROBE = """
import json, sys
from ckpttool.cli import main
from ckpttool.torch_bridge import accelerator_possible
gpu = accelerator_possible()
try:
    main(["verify", sys.argv[1], "--json"])
except SystemExit as e:
    code = e.code
print(json.dumps({"gpu": gpu, "torch": "torch" in sys.modules, "code": code}), file=sys.stderr)
"""


@pytest.mark.parametrize("name", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_verify_without_model_imports_torch_only_for_a_gpu(committed, name):
    """No model and no GPU: every check runs from the bytes, and torch (~630 MB, 2 s) is never imported."""
    import json
    import subprocess
    p = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, committed(name)], capture_output=True, text=True)
    facts = json.loads(p.stderr.strip().splitlines()[-1])
    assert facts["code"] == (0 if CUDA else 1), p.stderr  # without the GPUs its tags name, torch.load fails here
    assert facts["torch"] is facts["gpu"]  # imported exactly when a GPU could be there to round-trip through
    out = json.loads(p.stdout)
    assert out["ok"] is CUDA
    assert out["environment"]["torch"] == torch.__version__
    assert out["environment"]["cuda_build"] == torch.version.cuda
    assert out["environment"]["cuda_available"] is CUDA
    checks = {(c["name"], c["device"]): c for c in out["checks"]}
    assert checks[("format round trip", "torch_zip")]["status"] == "pass"
    if not CUDA:
        assert checks[("device tags", None)]["status"] == "fail"
        assert "ckpttool remap" in checks[("device tags", None)]["detail"]


def test_torch_facts_read_from_the_files_without_import(tmp_path, monkeypatch):
    """A ROCm build's version.py, found on sys.path and parsed, never run."""
    from ckpttool.torch_bridge import accelerator_possible, torch_facts
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('torch/__init__ must not run')\n")
    (pkg / "version.py").write_text("from typing import Optional\n__version__ = '9.1.0+rocm6.4'\ndebug = False\n"
                                    "cuda: Optional[str] = None\nhip: Optional[str] = '6.4.1'\n")
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert torch_facts() == {"torch": "9.1.0+rocm6.4", "cuda": None, "hip": "6.4.1"}
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("os.path.exists", lambda p: p == "/dev/kfd")
    assert accelerator_possible() is True
    monkeypatch.setattr("os.path.exists", lambda p: False)
    assert accelerator_possible() is False
    assert "torch" not in sys.modules


@pytest.mark.parametrize("platform,cuda,devs,files,expected", [
    ("linux", "12.4", [], (), False),                  # a CUDA build with no driver: the pip default on a CPU box
    ("linux", "12.4", ["/dev/nvidia0"], (), True),
    ("linux", "12.4", [], ("/dev/dxg",), True),        # WSL's GPU device
    ("linux", "12.6", [], ("/dev/nvhost-ctrl-gpu",), True),  # Jetson's integrated GPU
    ("linux", None, ["/dev/nvidia0"], (), False),      # a CPU build sees no GPU whatever the machine has
    ("win32", "12.4", [], (), True),                   # no device files to look at: torch is asked
])
def test_accelerator_probe(monkeypatch, platform, cuda, devs, files, expected):
    import ckpttool.torch_bridge as tb
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(tb, "torch_facts", lambda: {"torch": "2.9.0", "cuda": cuda, "hip": None})
    monkeypatch.setattr("glob.glob", lambda pattern: list(devs) if pattern.startswith("/dev/nvidia") else [])
    monkeypatch.setattr("os.path.exists", lambda p: p in files)
    assert tb.accelerator_possible() is expected


def test_accelerator_probe_asks_torch_once_imported():
    from ckpttool.torch_bridge import accelerator_possible, torch_facts
    assert accelerator_possible() is (torch.cuda.is_available() or torch.backends.mps.is_available())
    assert torch_facts() == {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip}
