"""``ckpttool.remap``: rewritten location tags, checked by loading the outputs with a plain ``torch.load``
(no map_location) and comparing every tensor, bit for bit, with the source."""
from __future__ import annotations

import collections
import importlib
import os
import pickletools
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from clitools import files_in

import ckpttool
from ckpttool.errors import CkptError, UsageError
from ckpttool.remapping import remap  # the module's own function: see test_public_api_*
from ckpttool.tree import all_tensors

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("_ckpt_make_fixtures_remap", os.path.join(FIXTURES, "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mf = _make_fixtures()


# ---------------------------------------------------------------------------------------------
# helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def tensors_of(obj, prefix=""):
    """Every tensor reachable in a loaded object (dicts, lists, modules, optimizer state), by path."""
    out = collections.OrderedDict()
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, torch.nn.Module):
        for k, v in obj.state_dict(keep_vars=True).items():
            out[f"{prefix}/{k}"] = v
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_of(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{prefix}/{i}"))
    return out


def assert_same_tensors(got, want, device: str = "cpu") -> None:
    a, b = tensors_of(got), tensors_of(want)
    assert list(a) == list(b)
    assert a, "no tensors compared"
    for name in b:
        x, y = a[name], b[name]
        assert x.device.type == torch.device(device).type, (name, x.device)
        assert (x.dtype, tuple(x.shape), x.stride(), x.storage_offset()) == \
            (y.dtype, tuple(y.shape), y.stride(), y.storage_offset()), name
        assert torch.equal(bits(x), bits(y)), f"{name}: bytes differ"


def devices(path: str) -> collections.Counter:
    """Device of each tensor as ckpttool reads the file (no torch.load, no GPU needed)."""
    return collections.Counter(t.device for _, t in all_tensors(ckpttool.open(path).root))


def device_by_name(path: str) -> dict:
    return {n: t.device for n, t in all_tensors(ckpttool.open(path).root)}


def plain_load(path, **kw):
    """What a user types: torch.load with no map_location."""
    return torch.load(path, **kw)


def zip_members(path: str) -> dict:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


# ---------------------------------------------------------------------------------------------
# GPU-tagged files made on this CPU machine with torch's own writer (fixtures' location_tags)


def save_tagged(obj, path, tag_of, legacy=False, **kw):
    with mf.location_tags(tag_of):
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy, **kw)
    return str(path)


def tag_by_ptr(tags: dict):
    return lambda storage: tags.get(storage.data_ptr())


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A pickled full ClassNet + Adam state, params on cuda:0 and fc.* on cuda:1, zip and legacy."""
    from mypkg import ClassNet
    folder = tmp_path_factory.mktemp("remap_ckpt")
    mf.seeded(0)
    model = ClassNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    tags = {}
    for name, t in model.state_dict(keep_vars=True).items():
        tags[t.untyped_storage().data_ptr()] = "cuda:1" if name.startswith("fc.") else "cuda:0"
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                tags[v.untyped_storage().data_ptr()] = "cuda:0"
    obj = {"model": model, "optimizer": opt.state_dict(), "epoch": 9}
    paths = {}
    for legacy in (False, True):
        paths[legacy] = save_tagged(obj, folder / f"train{'_legacy' if legacy else ''}.pt", tag_by_ptr(tags), legacy)
    return paths, obj


def cuda_tagged_torchscript(src: str, dst: str, tag: str = "cuda:0") -> str:
    """The TorchScript archive as a GPU machine writes it: its storages' 'cpu' tags spelled ``tag``.

    Made by editing the pickles' BINUNICODE 'cpu' strings (the only 'cpu' strings they hold),
    not with ckpttool, so that remap is not tested against itself.
    """
    old = b"X\x03\x00\x00\x00cpu"
    new = b"X" + struct.pack("<I", len(tag)) + tag.encode()
    replaced = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(".pkl") and info.filename.count("/") == 1:
                replaced += data.count(old)
                data = data.replace(old, new)
            zout.writestr(info.filename, data)
    assert replaced
    return dst


# ---------------------------------------------------------------------------------------------
# cuda -> cpu: plain torch.load works and gives the source's tensors


@pytest.mark.parametrize("fixture", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_gpu_tagged_to_cpu_loads_plainly(make, tmp_path, fixture):
    src = make(fixture)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            plain_load(src, weights_only=True)  # the problem remap solves
    out = str(tmp_path / "cpu.pt")
    r = remap(src, out, ["cuda=cpu"])
    assert r.output == out and r.format == ckpttool.detect(src)
    assert r.mapped == {"cuda:0 -> cpu": 17, "cuda:1 -> cpu": 2} and r.unchanged == {}
    assert r.tensors == 19
    assert ckpttool.detect(out) == ckpttool.detect(src)  # keeps the input's format
    got = plain_load(out, weights_only=True)
    want = torch.load(src, map_location="cpu", weights_only=True)
    assert got["epoch"] == want["epoch"] == 12
    assert_same_tensors(got, want)
    assert set(devices(out)) == {"cpu"}
    assert files_in(tmp_path) == {"cpu.pt"}


def test_zip_tensor_records_copied_as_they_are(make, tmp_path):
    src = make("gpu_tagged.pt")
    out = str(tmp_path / "cpu.pt")
    remap(src, out, ["cuda=cpu"])
    a, b = zip_members(src), zip_members(out)
    assert set(a) == set(b)
    for name in a:
        if not name.endswith(".pkl"):
            assert a[name] == b[name], name
    # and the output is still mmap-able by torch (records aligned as torch.save writes them)
    got = torch.load(out, mmap=True, weights_only=True)
    assert_same_tensors(got, torch.load(src, map_location="cpu", weights_only=True))


def test_legacy_storage_bytes_copied_as_they_are(make, tmp_path):
    src = make("gpu_tagged_legacy.pt")
    out = str(tmp_path / "cpu.pt")
    remap(src, out, ["cuda=cpu"])
    a, b = open(src, "rb").read(), open(out, "rb").read()
    # everything after the main pickle (the storage keys list and the raw storages) is the same
    same = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        same += 1
    sd = torch.load(src, map_location="cpu", weights_only=True)["model_state_dict"]
    assert same > sum(t.numel() * t.element_size() for t in sd.values())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_full_model_and_optimizer_state(training_checkpoint, tmp_path, legacy):
    paths, obj = training_checkpoint
    src = paths[legacy]
    out = str(tmp_path / "cpu.pt")
    r = remap(src, out, ["cuda=cpu"], check=True)
    assert r.checked["ok"] and r.checked["bytes_compared"] == r.tensors
    assert r.mapped["cuda:1 -> cpu"] == 2
    got = plain_load(out, weights_only=False)  # the pickled model needs its class: fixtures/mypkg
    want = torch.load(src, map_location="cpu", weights_only=False)
    assert type(got["model"]).__name__ == "ClassNet"
    assert got["model"].head.weight is got["model"].embed.weight
    assert got["epoch"] == 9
    assert_same_tensors(got, want)
    assert_same_tensors(got["model"], obj["model"])
    assert_same_tensors(got["optimizer"], obj["optimizer"])
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(got["model"].eval()(x), obj["model"].eval()(x))


def test_torchscript(make, tmp_path):
    ts = make("torchscript.pt")
    src = cuda_tagged_torchscript(ts, str(tmp_path / "ts_cuda.pt"))
    assert set(devices(src)) == {"cuda:0"}
    out = str(tmp_path / "ts_cpu.pt")
    r = remap(src, out, ["cuda=cpu"], check=True)
    assert r.format == "torchscript" and ckpttool.detect(out) == "torchscript"
    assert set(devices(out)) == {"cpu"}
    got = torch.jit.load(out)  # no map_location
    want = torch.jit.load(ts)
    assert_same_tensors(got.state_dict(), want.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(got(x), want(x))
    assert files_in(tmp_path) == {"ts_cuda.pt", "ts_cpu.pt"}


# ---------------------------------------------------------------------------------------------
# rules


def test_cuda1_to_cuda0_keeps_cuda0(make, tmp_path):
    src = make("gpu_tagged.pt")
    out = str(tmp_path / "one_gpu.pt")
    r = remap(src, out, ["cuda:1=cuda:0"], check=True)
    assert r.mapped == {"cuda:1 -> cuda:0": 2}
    assert r.unchanged == {"cuda:0": 17}
    assert devices(out) == {"cuda:0": 19}
    assert_same_tensors(torch.load(out, map_location="cpu", weights_only=True),
                        torch.load(src, map_location="cpu", weights_only=True))


@pytest.mark.parametrize("maps, fc, rest", [
    (["cuda:1=cuda:0", "cuda=cpu"], "cuda:0", "cpu"),
    (["cuda=cpu", "cuda:1=cuda:0"], "cpu", "cpu"),
    (["cuda:0=cpu", "cuda=cuda:2"], "cuda:2", "cpu"),
    (["cuda:0=cuda:1", "cuda:1=cuda:0"], "cuda:0", "cuda:1"),  # a swap: each tag is mapped once
])
def test_first_matching_rule_wins(make, tmp_path, maps, fc, rest):
    src = make("gpu_tagged_legacy.pt")
    out = str(tmp_path / "o.pt")
    remap(src, out, maps, check=True)
    by_name = device_by_name(out)
    for name, dev in by_name.items():
        assert dev == (fc if name.split("/")[-1].startswith("fc.") else rest), (name, dev)


def test_maps_as_pairs(make, tmp_path):
    out = str(tmp_path / "o.pt")
    r = remap(make("gpu_tagged.pt"), out, [("cuda", "cpu")])
    assert set(devices(out)) == {"cpu"} and r.tensors == 19


def test_rules_that_move_nothing_are_an_error_naming_the_devices(make, tmp_path):
    """A copy that maps nothing is a mistake (``--map cuda:0=cpu`` on a cuda:1 file): say which devices the
    file's tensors are on; write nothing."""
    src = make("gpu_tagged.pt")
    out = str(tmp_path / "o.pt")
    with pytest.raises(UsageError) as e:
        remap(src, out, ["mps=cpu", "cuda:3=cpu"], check=True)
    assert str(e.value) == "--map mps=cpu --map cuda:3=cpu moves no tensor: the file's tensors are on cuda:0 " \
                           f"(17 tensors), cuda:1 (2 tensors) ({src})"
    assert not os.path.exists(out)
    # a rule that matches one device is work to do; the other rule just matches nothing
    r = remap(src, out, ["mps=cpu", "cuda:1=cuda:0"], check=True)
    assert r.mapped == {"cuda:1 -> cuda:0": 2}
    # a change of format alone is work too
    r = remap(src, str(tmp_path / "legacy.pt"), ["mps=cpu"], to="legacy", check=True)
    assert r.mapped == {} and r.unchanged == {"cuda:0": 17, "cuda:1": 2}


def test_cpu_to_cuda_and_mps_tags(make, tmp_path):
    src = make("state_dict.pt")
    r = remap(src, str(tmp_path / "cuda.pt"), ["cpu=cuda"], check=True)
    assert r.mapped == {"cpu -> cuda": 19}
    assert set(devices(str(tmp_path / "cuda.pt"))) == {"cuda"}
    remap(src, str(tmp_path / "mps.pt"), ["cpu=mps"])
    assert set(devices(str(tmp_path / "mps.pt"))) == {"mps"}
    # still the same tensors (loaded with an explicit map_location, the only way on this machine)
    for name in ("cuda.pt", "mps.pt"):
        assert_same_tensors(torch.load(tmp_path / name, map_location="cpu", weights_only=True),
                            torch.load(src, weights_only=True))


def test_round_trip_cpu_cuda_cpu(make, tmp_path):
    src = make("legacy.pt")
    remap(src, str(tmp_path / "gpu.pt"), ["cpu=cuda:1"])
    assert set(devices(str(tmp_path / "gpu.pt"))) == {"cuda:1"}
    remap(str(tmp_path / "gpu.pt"), str(tmp_path / "back.pt"), ["cuda=cpu"])
    assert_same_tensors(plain_load(tmp_path / "back.pt", weights_only=True), torch.load(src, weights_only=True))


# ---------------------------------------------------------------------------------------------
# device-name strings that are not location tags keep their value


def _memo_shared_file(tmp_path, order: str, legacy: bool) -> tuple:
    dev0 = "".join(["cuda", ":0"])  # one string object: the pickler memoizes it once for both uses
    dev1 = "".join(["cuda", ":1"])
    a, b = torch.arange(6.0), torch.ones(3)
    tags = {a.untyped_storage().data_ptr(): dev0, b.untyped_storage().data_ptr(): dev1}
    config = {"device": dev0, "devices": [dev1, dev0]}
    if order == "config_first":
        obj = collections.OrderedDict([("config", config), ("a", a), ("b", b), ("note", dev1)])
    else:
        obj = collections.OrderedDict([("a", a), ("b", b), ("config", config), ("note", dev1)])
    path = save_tagged(obj, tmp_path / f"memo_{order}_{legacy}.pt", tag_by_ptr(tags), legacy)
    return path, {"a": a, "b": b}


def _main_pickle_ops(path: str) -> list:
    """Opcode names of the pickle that holds the object (data.pkl, or the 4th pickle of a legacy file)."""
    if zipfile.is_zipfile(path):
        data = next(v for k, v in zip_members(path).items() if k.endswith("/data.pkl"))
        return [op.name for op, _, _ in pickletools.genops(data)]
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, sys info
            for op, _, _ in pickletools.genops(f):
                pass
        return [op.name for op, _, _ in pickletools.genops(f)]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("order", ["config_first", "tensors_first"])
def test_memo_shared_config_strings_keep_their_value(tmp_path, order, legacy):
    path, tensors = _memo_shared_file(tmp_path, order, legacy)
    # the test means something only if the pickle really shares the strings through its memo
    ops = _main_pickle_ops(path)
    assert sum(1 for op in ops if op.endswith("GET")) >= 3
    out = str(tmp_path / "cpu.pt")
    r = remap(path, out, ["cuda=cpu"], check=True)
    assert r.mapped == {"cuda:0 -> cpu": 1, "cuda:1 -> cpu": 1}
    got = plain_load(out, weights_only=True)
    assert got["config"] == {"device": "cuda:0", "devices": ["cuda:1", "cuda:0"]}
    assert got["note"] == "cuda:1"
    for k, t in tensors.items():
        assert got[k].device.type == "cpu" and torch.equal(got[k], t)
    # and the other way: the tags move, the config does not
    out2 = str(tmp_path / "swap.pt")
    remap(path, out2, ["cuda:1=cuda:0", "cuda:0=cpu"])
    assert device_by_name(out2) == {"a": "cpu", "b": "cuda:0"}
    got = torch.load(out2, map_location="cpu", weights_only=True)
    assert got["config"] == {"device": "cuda:0", "devices": ["cuda:1", "cuda:0"]} and got["note"] == "cuda:1"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_protocols(tmp_path, legacy, protocol):
    """torch.save(..., pickle_protocol=4) files (FRAME, MEMOIZE) are torch.save files too."""
    sd = {f"w{i}": torch.randn(20, 20, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    sd["device"] = "cuda:0"
    path = save_tagged(sd, tmp_path / "p.pt", lambda s: "cuda:0", legacy, pickle_protocol=protocol)
    out = str(tmp_path / "cpu.pt")
    remap(path, out, ["cuda=cpu"], check=True)
    got = plain_load(out, weights_only=False)
    assert got["device"] == "cuda:0"
    for k, v in sd.items():
        if k != "device":
            assert got[k].device.type == "cpu" and torch.equal(got[k], v), k


# ---------------------------------------------------------------------------------------------
# refusals and safety


def test_safetensors_refused(make, tmp_path):
    with pytest.raises(UsageError, match="safetensors") as e:
        remap(make("model.safetensors"), str(tmp_path / "o.safetensors"), ["cuda=cpu"])
    assert e.value.exit_code == 2
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("maps", [["cuda->cpu"], ["=cpu"], ["cuda="], ["cuda=cpu=x"], ["CUDA=cpu"], ["cuda:x=cpu"], []])
def test_bad_maps_refused(make, tmp_path, maps):
    with pytest.raises(UsageError):
        remap(make("gpu_tagged.pt"), str(tmp_path / "o.pt"), maps)
    assert files_in(tmp_path) == set()


def test_refuses_to_write_over_its_input(make, tmp_path):
    src = make("gpu_tagged.pt")
    before = open(src, "rb").read()
    with pytest.raises(UsageError, match="one of the inputs"):
        remap(src, src, ["cuda=cpu"], force=True)
    os.symlink(src, tmp_path / "link.pt")
    with pytest.raises(UsageError, match="one of the inputs"):
        remap(src, str(tmp_path / "link.pt"), ["cuda=cpu"], force=True)
    assert open(src, "rb").read() == before


def test_refuses_existing_output_without_force(make, tmp_path):
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="output exists"):
        remap(make("gpu_tagged.pt"), str(out), ["cuda=cpu"])
    assert out.read_bytes() == b"old"
    remap(make("gpu_tagged.pt"), str(out), ["cuda=cpu"], force=True)
    assert set(devices(str(out))) == {"cpu"}
    assert files_in(tmp_path) == {"o.pt"}


@pytest.mark.parametrize("fixture", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_failure_mid_write_leaves_nothing_and_keeps_the_old_output(monkeypatch, make, tmp_path, fixture):
    rm = importlib.import_module("ckpttool.remapping")

    def boom(data, new_location, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(rm, "rewrite_locations", boom)
    out = tmp_path / "o.pt"
    with pytest.raises(RuntimeError, match="boom"):
        remap(make(fixture), str(out), ["cuda=cpu"])
    assert files_in(tmp_path) == set()
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        remap(make(fixture), str(out), ["cuda=cpu"], force=True)
    assert out.read_bytes() == b"old" and files_in(tmp_path) == {"o.pt"}


def test_check_compares_every_byte(make, tmp_path):
    r = remap(make("gpu_tagged.pt"), str(tmp_path / "o.pt"), ["cuda=cpu"], check=True)
    assert r.checked["ok"] and r.checked["bytes_compared"] == 19
    r = remap(make("gpu_tagged.pt"), str(tmp_path / "p.pt"), ["cuda=cpu"])
    assert "bytes_compared" not in (r.checked or {})


def test_bytes_changed_in_the_copy_are_caught(monkeypatch, make, tmp_path):
    """A byte that changes between reading and writing a record: the CRC-32 the writer computes no longer matches
    the record's, so the rewrite fails (with or without --check) and nothing is written."""
    rm = importlib.import_module("ckpttool.remapping")
    real = rm._copy_stored

    def corrupt(path, record, *a, **k):
        for block in real(path, record, *a, **k):
            if "/data/" in record.name and block:
                block = bytes([block[0] ^ 0xFF]) + bytes(block[1:])
            yield block
    monkeypatch.setattr(rm, "_copy_stored", corrupt)
    for check in (True, False):
        with pytest.raises(CkptError, match="fails its CRC-32 check: corrupt"):
            remap(make("gpu_tagged.pt"), str(tmp_path / "o.pt"), ["cuda=cpu"], check=check)
        assert files_in(tmp_path) == set()


def test_a_corrupt_record_in_the_input_is_refused(make, tmp_path):
    """A tensor byte flipped on disk (the record's CRC-32 no longer matches): a one-line error naming the record."""
    import shutil
    import zipfile
    src = tmp_path / "in.pt"
    shutil.copyfile(make("gpu_tagged.pt"), src)
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 16)
    with open(src, "r+b") as f:
        head = f.read()[info.header_offset:info.header_offset + 30]
        start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        f.seek(start + 5)
        b = f.read(1)
        f.seek(start + 5)
        f.write(bytes([b[0] ^ 0x55]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CkptError, match=f"record {info.filename} fails its CRC-32 check: corrupt"):
        remap(str(src), str(out / "o.pt"), ["cuda=cpu"])
    assert files_in(out) == set()


# ---------------------------------------------------------------------------------------------
# the public API


def test_public_api_remap_is_callable_after_the_cli_ran(make, tmp_path):
    """``ckpttool.remap(...)`` must stay the function even once the CLI (or anyone) imported ckpttool.remap."""
    src = make("gpu_tagged.pt")
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckpttool.cli import cli\n"
        "r = CliRunner().invoke(cli, ['remap', sys.argv[1], '-o', sys.argv[2], '--map', 'cuda=cpu'])\n"
        "assert r.exit_code == 0, r.output\n"
        "import ckpttool\n"
        "res = ckpttool.remap(sys.argv[1], sys.argv[3], ['cuda=cpu'])\n"
        "assert isinstance(res, ckpttool.RemapResult)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "a.pt"), str(tmp_path / "b.pt")],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert set(devices(str(tmp_path / "b.pt"))) == {"cpu"}


# ---------------------------------------------------------------------------------------------
# on a GPU: the remapped files load where they say


@pytest.mark.parametrize("fixture", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda1_to_cuda0_loads_on_cuda0(make, tmp_path, fixture):
    src = make(fixture)
    out = str(tmp_path / "o.pt")
    remap(src, out, ["cuda:1=cuda:0"])
    got = plain_load(out, weights_only=True)
    sd = got["model_state_dict"]
    assert {t.device for t in sd.values()} == {torch.device("cuda", 0)}
    assert_same_tensors(got, torch.load(src, map_location="cpu", weights_only=True), device="cuda")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cpu_to_cuda_loads_on_the_gpu(make, tmp_path, legacy):
    src = make("legacy.pt" if legacy else "state_dict.pt")
    out = str(tmp_path / "o.pt")
    remap(src, out, ["cpu=cuda"])
    got = plain_load(out, weights_only=True)
    want = torch.load(src, weights_only=True)
    assert_same_tensors(got, want, device="cuda")
    assert {t.device for t in tensors_of(got).values()} == {torch.device("cuda", 0)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_full_model_remapped_to_cuda0_runs_there(training_checkpoint, tmp_path):
    paths, obj = training_checkpoint
    out = str(tmp_path / "o.pt")
    remap(paths[False], out, ["cuda=cuda:0"])
    got = plain_load(out, weights_only=False)
    assert_same_tensors(got["model"], obj["model"], device="cuda")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(got["model"].eval()(x.cuda()).cpu(), obj["model"].eval()(x), atol=1e-5)


def _zip_of(path, pickle_bytes: bytes, records: dict, byteorder: str = "little"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return str(path)


_W = (b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
      b"FloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:1K\x04tQK\x00K\x04\x85K\x01\x85\x89"
      b"ccollections\nOrderedDict\n)RtRu.")


def test_big_endian_zip_is_not_written_as_legacy(tmp_path):
    """The legacy format has no byte order of its own here: the big-endian bytes would load as garbage."""
    path = _zip_of(tmp_path / "big.pt", _W, {"0": struct.pack(">4f", 1, 2, 3, 4)}, byteorder="big")
    assert torch.load(path, map_location="cpu", weights_only=True)["w"].tolist() == [1, 2, 3, 4]
    with pytest.raises(UsageError, match="big-endian"):
        remap(path, str(tmp_path / "o.pt"), ["cuda=cpu"], to="legacy")
    assert files_in(tmp_path) == {"big.pt"}
    remap(path, str(tmp_path / "z.pt"), ["cuda=cpu"])  # the zip format keeps its byte order
    assert torch.load(tmp_path / "z.pt", weights_only=True)["w"].tolist() == [1, 2, 3, 4]


def test_bytes_after_the_pickle_do_not_become_the_legacy_files_storages(tmp_path):
    import pickle
    trail = pickle.dumps(["0"], protocol=2) + struct.pack("<q", 4) + struct.pack("<4f", 9, 9, 9, 9)
    path = _zip_of(tmp_path / "t.pt", _W + trail, {"0": struct.pack("<4f", 1, 2, 3, 4)})
    remap(path, str(tmp_path / "o.pt"), ["cuda=cpu"], to="legacy")
    assert torch.load(tmp_path / "o.pt", weights_only=True)["w"].tolist() == [1, 2, 3, 4]


def test_a_storage_id_of_the_other_formats_arity_is_refused_as_torch_refuses_it(tmp_path):
    """torch's zip loader unpacks 5 fields of a storage id, its legacy loader 6: another length fails there."""
    six = _W.replace(b"K\x04tQ", b"K\x04NtQ")
    path = _zip_of(tmp_path / "six.pt", six, {"0": struct.pack("<4f", 1, 2, 3, 4)})
    with pytest.raises(Exception):
        torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(CkptError, match="6 fields where torch.load unpacks 5"):
        remap(path, str(tmp_path / "o.pt"), ["cuda=cpu"])
