"""torch.export archives (.pt2): read without torch, held to torch.export.load on files torch.export.save
(and AOTInductor) wrote here; every command on them; truncated and hostile variants one error line."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from clitools import js, run
from ckpttool.errors import FormatError
from ckpttool.formats import detect, open as open_checkpoint
from ckpttool.formats.pt2 import is_pt2
import payloads as P


class Small(torch.nn.Module):
    """A parameter, a persistent and a non-persistent buffer, a lifted tensor constant; two inputs, a tuple out."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.register_buffer("pb", torch.randn(4))
        self.register_buffer("npb", torch.randn(4), persistent=False)
        self.const = torch.randn(4)

    def forward(self, x, y):
        return self.lin(x) + self.pb + self.npb + self.const, y * 2


class Views(torch.nn.Module):
    """What the raw-bytes layout must keep: a tied weight, a view at an offset, a transposed buffer, bfloat16,
    int64, an empty buffer, and a tensor subclass (pickled whole)."""

    def __init__(self):
        super().__init__()
        from torch.testing._internal.two_tensor import TwoTensor
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        base = torch.arange(20, dtype=torch.float32)
        self.register_buffer("base", base)
        self.register_buffer("tail", base[5:9])
        self.register_buffer("tr", torch.randn(4, 3).t())
        self.register_buffer("bf", torch.randn(4).to(torch.bfloat16))
        self.register_buffer("ids", torch.arange(4))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.tw = torch.nn.Parameter(TwoTensor(torch.randn(4), torch.randn(4)))

    def forward(self, x):
        return self.b(self.a(x)) + self.tail + self.tr.sum(0) + self.bf.float() + self.ids + self.tw


def export_save(model, args, path, **kw) -> str:
    torch.manual_seed(0)
    ep = torch.export.export(model.eval(), args, **kw)
    torch.export.save(ep, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    out = {"small": export_save(Small(), (torch.randn(2, 8), torch.randn(3)), d / "small.pt2"),
           "views": export_save(Views(), (torch.randn(2, 4),), d / "views.pt2"),
           "dynamic": export_save(Small(), (torch.randn(2, 8), torch.randn(3)), d / "dyn.pt2",
                                  dynamic_shapes=({0: torch.export.Dim("batch")}, None))}
    import torchvision
    out["resnet18"] = export_save(torchvision.models.resnet18(weights=None), (torch.randn(1, 3, 32, 32),),
                                  d / "resnet18.pt2")
    from mypkg import ClassNet
    out["classnet"] = export_save(ClassNet(), (torch.randn(2, 3, 8, 8),), d / "classnet.pt2")
    return out


def rewrite(src: str, dst, changes: dict) -> str:
    """Copy ``src`` with records replaced (bytes), dropped (None) or added, names relative to its archive folder."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        folder = zi.namelist()[0].split("/")[0] + "/"
        for info in zi.infolist():
            rel = info.filename[len(folder):]
            if rel in changes:
                if changes[rel] is not None:
                    zo.writestr(info.filename, changes[rel])
            else:
                zo.writestr(info, zi.read(info))
        for rel, data in changes.items():
            if data is not None and folder + rel not in zi.namelist():
                zo.writestr(folder + rel, data)
    return str(dst)


def member(path: str, rel: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(z.namelist()[0].split("/")[0] + "/" + rel)


def assert_same_as_loader(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)  # names and order
    for name, t in ours.items():
        r = theirs[name]
        assert (t.shape, t.dtype) == (tuple(r.shape), str(r.dtype).replace("torch.", "")), name
        if type(r) in (torch.Tensor, torch.nn.Parameter):
            assert (t.stride, t.storage_offset, t.device) == (tuple(r.stride()), r.storage_offset(), str(r.device))
            assert t.is_parameter == isinstance(r, torch.nn.Parameter), name
            x = t.to_torch()
            assert x.reshape(-1).view(torch.uint8).equal(r.detach().reshape(-1).view(torch.uint8)), name
        else:  # a subclass torch.load rebuilt from its pickle
            assert t.subclass == f"{type(r).__module__}.{type(r).__name__}", name


@pytest.mark.parametrize("name", ["small", "views", "dynamic", "resnet18", "classnet"])
def test_weights_and_constants_are_torch_export_loads(files, name):
    ckpt = open_checkpoint(files[name])
    ep = torch.export.load(files[name])
    assert ckpt.format == "pt2"
    assert_same_as_loader(ckpt.root["state_dict"], ep.state_dict)
    tensors = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    assert_same_as_loader(ckpt.root.get("constants", {}), tensors)
    assert ("constants" in ckpt.root) == bool(tensors)


def test_aliases_share_one_storage_as_torch_loads_them(files):
    root = open_checkpoint(files["views"]).root["state_dict"]
    assert root["a.weight"].storage is root["b.weight"].storage
    assert root["tail"].storage is root["base"].storage and root["tail"].storage_offset == 5
    assert root["tr"].stride == (1, 3)
    assert root["tw"].kind == "subclass"


def _placeholder_shape(ep, name):
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name)
    return [int(d) if isinstance(d, int) else str(d) for d in node.meta["val"].shape], \
        str(node.meta["val"].dtype).replace("torch.", "")


@pytest.mark.parametrize("name", ["small", "dynamic", "resnet18"])
def test_inputs_and_outputs_are_the_programs_signature(files, name):
    meta = open_checkpoint(files[name]).metadata
    ep = torch.export.load(files[name])
    sig = ep.graph_signature
    assert [i["name"] for i in meta["inputs"]] == list(sig.user_inputs)
    assert [o["name"] for o in meta["outputs"]] == list(sig.user_outputs)
    for item in meta["inputs"]:
        shape, dtype = _placeholder_shape(ep, item["name"])
        assert (item["shape"], item["dtype"]) == (shape, dtype)
    outputs = {n.name: n for n in ep.graph.nodes}
    for item in meta["outputs"]:
        val = outputs[item["name"]].meta["val"]
        assert item["shape"] == [int(d) if isinstance(d, int) else str(d) for d in val.shape]
        assert item["dtype"] == str(val.dtype).replace("torch.", "")


def test_dynamic_dim_is_named(files):
    meta = open_checkpoint(files["dynamic"]).metadata
    dim = meta["inputs"][0]["shape"][0]
    assert isinstance(dim, str) and dim.startswith("s")
    assert meta["dynamic_dims"][0]["name"] == dim
    rows = dict(meta["details"])
    assert rows["inputs"].startswith(f"x: float32 ({dim}, 8)")


def test_metadata(files):
    meta = open_checkpoint(files["small"]).metadata
    assert meta["torch_version"] == torch.__version__
    assert meta["archive_folder"] == "small"
    assert meta["models"] == ["model"]
    assert meta["compiled"] == []
    rows = dict(meta["details"])
    assert rows["program"] == f"torch.export (pt2), written by torch {torch.__version__}"
    assert rows["inputs"] == "x: float32 (2, 8); y: float32 (3,)"
    assert rows["outputs"].endswith("float32 (3,)") and rows["outputs"].count(": float32") == 2
    assert rows["constants"].endswith("const, npb")


def test_detection(files, tmp_path):
    assert detect(files["small"]) == "pt2"
    assert is_pt2(zipfile.ZipFile(files["small"]).namelist())
    p = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, p)
    assert not is_pt2(zipfile.ZipFile(p).namelist())


def test_several_programs(tmp_path):
    from torch.export.pt2_archive._package import load_pt2, package_pt2
    torch.manual_seed(0)
    eps = {"model": torch.export.export(Small(), (torch.randn(2, 8), torch.randn(3))),
           "head": torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))}
    path = str(tmp_path / "two.pt2")
    package_pt2(path, exported_programs=eps)
    ckpt = open_checkpoint(path)
    loaded = load_pt2(path).exported_programs
    assert ckpt.metadata["models"] == ["head", "model"]
    assert_same_as_loader(ckpt.root["state_dict"], loaded["model"].state_dict)
    assert_same_as_loader(ckpt.root["programs"]["head"]["state_dict"], loaded["head"].state_dict)


def test_read_without_torch(files):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ckpttool.formats import open\n"
            f"c = open({files['views']!r})\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print(len(c.root['state_dict']), c.root['state_dict']['tail'].read_bytes()[:4].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["11", struct.pack("<f", 5.0).hex()]


# ---------------------------------------------------------------------------------------------
# the commands


def test_cli_inspect(files):
    r = run("inspect", files["small"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == files["small"]
    assert "format      pt2 (archive folder 'small')" in lines
    assert "inputs      x: float32 (2, 8); y: float32 (3,)" in lines
    assert any(ln.startswith("outputs     ") for ln in lines)
    names = [ln.split()[0] for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("name "))) + 2:]]
    assert names == ["lin.weight", "lin.bias", "pb"]
    d = js("inspect", files["small"])
    assert d["format"] == "pt2"
    assert [(t["name"], t["shape"]) for t in d["tensors"]] == [("lin.weight", [4, 8]), ("lin.bias", [4]),
                                                               ("pb", [4])]


def test_cli_diff_with_safetensors(files, tmp_path):
    from safetensors.torch import save_file
    ep = torch.export.load(files["resnet18"])
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.detach().contiguous() for k, v in ep.state_dict.items()}, str(ref))
    r = run("diff", files["resnet18"], ref)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1] == "result: EQUAL"
    changed = {k: v.detach().clone() for k, v in ep.state_dict.items()}
    changed["fc.bias"][0] += 1
    save_file(changed, str(tmp_path / "changed.safetensors"))
    d = js("diff", files["resnet18"], tmp_path / "changed.safetensors", code=1)
    assert [v["name"] for v in d["value_mismatch"]] == ["fc.bias"]


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_cli_convert_to_safetensors(files, tmp_path, name):
    from safetensors.torch import load_file
    out = tmp_path / "w.safetensors"
    r = run("convert", files[name], "-o", out)
    assert r.exit_code == 0, r.output
    got = load_file(str(out))
    ep = torch.export.load(files[name])
    assert list(got) == list(ep.state_dict)
    for k, v in ep.state_dict.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.detach()), k


def _with_payload(src: str, dst, tmp_path) -> str:
    """``src`` with its example inputs (a torch.save archive) holding a pickle that calls os.system."""
    ctx = P.make_ctx(tmp_path)
    inner_src = tmp_path / "inputs.pt"
    inner_src.write_bytes(member(src, "data/sample_inputs/model.pt"))
    P.zip_with_pickle(str(inner_src), str(tmp_path / "evil_inputs.pt"), P._nested(ctx))
    return rewrite(src, dst, {"data/sample_inputs/model.pt": (tmp_path / "evil_inputs.pt").read_bytes()}), ctx


def test_cli_scan(files, tmp_path):
    r = run("scan", files["small"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1] == "result: no dangerous globals"
    evil, ctx = _with_payload(files["small"], tmp_path / "evil.pt2", tmp_path)
    d = js("scan", evil, code=1)
    assert d["dangerous"] is True
    assert "os.system" in d["files"][0]["dangerous"]
    # reading it runs nothing (ckpttool never reads the example inputs), and lists the weights all the same
    r = run("inspect", evil)
    assert r.exit_code == 0, r.output
    assert P.markers_in(tmp_path) == []


def test_cli_scan_flags_a_pickled_weight(files, tmp_path):
    ctx = P.make_ctx(tmp_path)
    config = json.loads(member(files["views"], "data/weights/model_weights_config.json"))
    record = config["config"]["tw"]["path_name"]  # the TwoTensor, pickled whole
    inner = tmp_path / "tw.pt"
    inner.write_bytes(member(files["views"], f"data/weights/{record}"))
    P.zip_with_pickle(str(inner), str(tmp_path / "evil_tw.pt"), P._nested(ctx))
    evil = rewrite(files["views"], tmp_path / "evil.pt2",
                   {f"data/weights/{record}": (tmp_path / "evil_tw.pt").read_bytes()})
    d = js("scan", evil, code=1)
    assert "os.system" in d["files"][0]["dangerous"]
    assert P.markers_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# truncated and hostile


def _error(path) -> str:
    r = run("inspect", path)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpttool: error: "), lines
    return lines[0]


def _config(path: str, edit) -> bytes:
    doc = json.loads(member(path, "data/weights/model_weights_config.json"))
    edit(doc["config"]["lin.weight"])
    return json.dumps(doc).encode()


HOSTILE = {
    "format": ({"archive_format": b"zip"}, "says 'zip', not 'pt2'"),
    "version": ({"archive_version": b"7"}, "reads archive version '0' only"),
    "no version": ({"archive_version": None}, "no record small/archive_version"),
    "bad json": ({"models/model.json": b"{\"graph_module\": "}, "is not valid JSON"),
    "deep json": ({"models/model.json": b"[" * 200_000 + b"]" * 200_000}, "nests its JSON too deeply"),
    "not an object": ({"models/model.json": b"[1, 2]"}, "is a list, not a JSON object"),
    "no config": ({"data/weights/model_weights_config.json": None}, "has no record"),
    "no weight": ({"data/weights/weight_0": None}, "has no record small/data/weights/weight_0"),
    "short weight": ({"data/weights/weight_0": b"\0" * 100}, "reach past its 25-element storage"),
    "odd weight": ({"data/weights/weight_0": b"\0" * 130}, "not a whole number of float32 elements"),
    "models name": ({"models/notes.txt": b"hi"}, "is not a models/NAME.json"),
    "no inputs": ({"data/sample_inputs/model.pt": None}, "reads the example inputs"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_variants(files, tmp_path, case):
    changes, text = HOSTILE[case]
    line = _error(rewrite(files["small"], tmp_path / "small.pt2", changes))
    assert text in line and line.endswith(f"({tmp_path / 'small.pt2'})"), line


@pytest.mark.parametrize("edit, text", [
    (lambda m: m["tensor_meta"].update(dtype=99), "dtype is 99"),
    (lambda m: m["tensor_meta"].update(sizes=[{"as_int": "4"}, {"as_int": 8}]), "is a string, not an integer"),
    (lambda m: m["tensor_meta"].update(sizes=[{"as_int": -4}, {"as_int": 8}]), "negative"),
    (lambda m: m["tensor_meta"].update(strides=[{"as_int": 8}]), "2 sizes but 1 strides"),
    (lambda m: m["tensor_meta"].update(storage_offset={"as_int": 1 << 62}), "reach past"),
    (lambda m: m["tensor_meta"].update(sizes=[{"as_expr": {"expr_str": "s0"}}, {"as_int": 8}]),
     "is not an integer size"),
    (lambda m: m.update(path_name="../../etc/passwd"), "has no record"),
    (lambda m: m.pop("tensor_meta"), "has no 'tensor_meta'"),
    (lambda m: m["tensor_meta"].update(layout=1), "not strided"),
])
def test_hostile_weight_configs(files, tmp_path, edit, text):
    path = rewrite(files["small"], tmp_path / "small.pt2",
                   {"data/weights/model_weights_config.json": _config(files["small"], edit)})
    assert text in _error(path)


def test_truncated(files, tmp_path):
    data = open(files["small"], "rb").read()
    for cut in (len(data) // 2, len(data) - 30):
        p = tmp_path / f"cut{cut}.pt2"
        p.write_bytes(data[:cut])
        _error(p)


def test_big_json_is_refused_before_it_is_read(files, tmp_path, monkeypatch):
    import ckpttool.formats.pt2 as pt2
    monkeypatch.setattr(pt2, "MAX_MODEL_JSON", 1000)
    with pytest.raises(FormatError, match=r"models/model.json declares \d+ bytes, more than the 1000 B"):
        open_checkpoint(files["small"])


# ---------------------------------------------------------------------------------------------
# AOTInductor


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 5)  # 160 bytes, padded to 192 in the library: the blob's layout is tested
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))


def aoti_package(base) -> str:
    """A small AOTInductor package, compiled once per test session (~15 s); skips where it cannot compile."""
    path = os.path.join(str(base), "aoti_tiny.pt2")
    if not os.path.exists(path):
        torch.manual_seed(0)
        ep = torch.export.export(Tiny().eval(), (torch.randn(2, 8),))
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=path)
        except Exception as e:  # no C++ compiler, no Python headers...
            pytest.skip(f"AOTInductor cannot compile here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return path


@pytest.fixture(scope="module")
def aoti(tmp_path_factory):
    return aoti_package(tmp_path_factory.getbasetemp())


def test_aoti_inspect_lists_the_compiled_library_and_its_weights(aoti, tmp_path):
    ckpt = open_checkpoint(aoti)
    assert ckpt.format == "pt2"
    so = [c for c in ckpt.metadata["compiled"] if c["name"].endswith(".so")]
    assert len(so) == 1 and so[0]["kind"] == "shared library" and so[0]["size"] > 0
    rows = dict(ckpt.metadata["details"])
    assert rows["program"] == "AOTInductor package (pt2), torch version not recorded"
    assert rows["compiled"].endswith("(AOTInductor: runs native code on load)")
    r = run("inspect", aoti)
    assert r.exit_code == 0, r.output
    assert any(ln.startswith("compiled ") and ".wrapper.so" in ln for ln in r.stdout.splitlines())
    # the weights, as the library holds them: held to what AOTInductor's own runner extracts from it
    lib = tmp_path / "model.so"
    lib.write_bytes(member(aoti, so[0]["name"]))
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(lib), 1)
    theirs = runner.extract_constants_map(False)
    assert sorted(ckpt.root["state_dict"]) == sorted(theirs) == ["a.weight", "b.weight"]
    for name, t in ckpt.root["state_dict"].items():
        assert torch.equal(t.to_torch(), theirs[name]), name
    torch.manual_seed(0)
    model = Tiny()
    assert torch.equal(ckpt.root["state_dict"]["b.weight"].to_torch(), model.b.weight.detach())


def test_aoti_hostile_constants_info(aoti, tmp_path):
    with zipfile.ZipFile(aoti) as z:
        cpp = next(n for n in z.namelist() if n.endswith(".wrapper.cpp"))
    rel = cpp.split("/", 1)[1]
    text = member(aoti, rel).decode()
    bad = text.replace("constants_info_[1].data_size = 64;", "constants_info_[1].data_size = 6400000;")
    assert bad != text
    line = _error(rewrite(aoti, tmp_path / "aoti_tiny.pt2", {rel: bad.encode()}))
    assert "constants blob holds 256 bytes" in line or "ends at byte" in line, line
    bad = text.replace('constants_info_[0].dtype = cached_torch_dtype_float32;',
                       'constants_info_[0].dtype = cached_torch_dtype_evil;')
    assert "a dtype ckpttool does not know" in _error(rewrite(aoti, tmp_path / "aoti_tiny.pt2", {rel: bad.encode()}))


# ---------------------------------------------------------------------------------------------
# resource bounds: what a small hostile file could make the reader allocate or loop over


def _cli_bounded(args, timeout: int, tmp_path):
    """``ckpttool ARGS`` in a child under ``ulimit -v 4000000`` (as the attack harness runs it): it must end within
    ``timeout`` seconds (a quadratic loop or an allocation of GiBs fails the test rather than hang it)."""
    cmd = "ulimit -v 4000000; exec " + " ".join(
        f"'{a}'" for a in [sys.executable, "-W", "ignore", "-m", "ckpttool", *map(str, args)])
    try:
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ckpttool {' '.join(map(str, args))} ran past {timeout} s")


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1 and lines[0].startswith("ckpttool: error: "), \
        (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    return lines[0]


def _deflated(src: str, dst, changes: dict) -> str:
    """``rewrite`` with every record deflated (so a big record is a small file)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zo:
        folder = zi.namelist()[0].split("/")[0] + "/"
        for info in zi.infolist():
            rel = info.filename[len(folder):]
            zo.writestr(info.filename, changes[rel] if rel in changes else zi.read(info))
    return str(dst)


def test_model_json_cap_is_64_mib(files, tmp_path):
    path = _deflated(files["small"], tmp_path / "small.pt2", {"models/model.json": b" " * ((64 << 20) + 1)})
    assert "declares 67108865 bytes, more than the 64.0 MiB ckpttool reads of it" in _error(path)


@pytest.mark.parametrize("unit, count", [(b"[],", 3 << 20), (b'{"a":0},', 9 << 18), (b"0,", 9 << 20)])
def test_json_that_would_build_too_much_is_refused_before_json_loads(files, tmp_path, unit, count):
    body = b"[" + unit * count + b"0]"
    assert len(body) < 64 << 20
    path = _deflated(files["small"], tmp_path / "small.pt2", {"models/model.json": body})
    line = _error(path)
    assert "JSON arrays and objects" in line and "more than the 2097152 and 8388608 ckpttool parses" in line, line
    # the weights config is bounded the same way
    path = _deflated(files["small"], tmp_path / "cfg.pt2", {"data/weights/model_weights_config.json": body})
    assert "JSON arrays and objects" in _error(path)


def test_200_mb_of_empty_lists_is_one_line_under_a_4_gb_address_space(files, tmp_path):
    """The attack as found: 200 MB of ``[],`` deflated (under the old 256 MiB cap), json.loads past 4 GB."""
    body = b"[" + b"[]," * ((200 << 20) // 3) + b"[]]"
    path = _deflated(files["small"], tmp_path / "big.pt2", {"models/model.json": body})
    for args in (["inspect", path], ["inspect", "--stats", path]):
        assert "model.json declares" in _one_error_line(_cli_bounded(args, 120, tmp_path))


def _elf(sections: list, body: bytes) -> bytes:
    """A 64-bit little-endian ELF image: header, ``body`` at offset 64, section headers after it (``sections``:
    (type, addr, offset, size, link, entsize); a null section is put first)."""
    shoff = 64 + len(body)
    sh = bytes(64) + b"".join(struct.pack("<IIQQQQIIQQ", 0, t, 0, addr, off, size, link, 0, 8, ent)
                              for t, addr, off, size, link, ent in sections)
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HH", head, 0x3A, 64, len(sections) + 1)
    return bytes(head) + body + sh


def _wrapper_cpp(consts) -> bytes:
    """constants_info_ lines for (name, fqn, nbytes) float32 constants, as AOTInductor's wrapper writes them."""
    out = []
    for i, (name, fqn, nbytes) in enumerate(consts):
        for k, v in (("name", f'"{name}"'), ("dtype", "cached_torch_dtype_float32"), ("offset", "0"),
                     ("data_size", str(nbytes)), ("from_folded", "false"),
                     ("type", "static_cast<int32_t>(torch::aot_inductor::ConstantType::Parameter)"),
                     ("shape", f"{{{nbytes // 4}}}"), ("stride", "{1}"),
                     ("layout", "static_cast<int32_t>(cached_torch_layout_strided)"),
                     ("device_type", "cached_torch_device_type_cpu"), ("original_fqn", f'"{fqn}"')):
            out.append(f"    constants_info_[{i}].{k} = {v};")
    return ("\n".join(out) + "\n").encode()


def _aoti_only(path, cpp: bytes, so: bytes, so_compress=zipfile.ZIP_DEFLATED) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/archive_format", "pt2")
        z.writestr("m/archive_version", "0")
        z.writestr("m/data/aotinductor/model/model.wrapper.cpp", cpp, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("m/data/aotinductor/model/model.wrapper.so", so, compress_type=so_compress)
    return str(path)


def test_elf_symbols_with_no_nul_in_the_string_table_are_read_in_linear_time(tmp_path):
    """200,000 symbols all naming offset 0 of a 4 MiB string table with no NUL: each name is looked for only as far
    as the longest wanted one (it was copied and decoded whole per symbol: 800 GB of copies)."""
    nsyms, strsize = 200_000, 4 << 20
    syms = struct.pack("<IBBHQQ", 0, 0, 0, 1, 0, 0) * nsyms
    so = _elf([(2, 0, 64, len(syms), 2, 24), (3, 0, 64 + len(syms), strsize, 0, 0)], syms + b"A" * strsize)
    path = _aoti_only(tmp_path / "elf.pt2", _wrapper_cpp([("c0", "w", 4)]), so)
    r = _cli_bounded(["inspect", path], 60, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no shared library with _binary_constants_bin_start" in r.stdout


def test_elf_symbol_count_is_bounded(tmp_path, monkeypatch):
    import ckpttool.formats.pt2 as pt2
    monkeypatch.setattr(pt2, "MAX_ELF_SYMBOLS", 1000)
    syms = bytes(24) * 1001
    so = _elf([(2, 0, 64, len(syms), 2, 24), (3, 0, 64 + len(syms), 1, 0, 0)], syms + b"\0")
    with pytest.raises(FormatError, match="ELF symbol tables hold more than the 1000 symbols"):
        open_checkpoint(_aoti_only(tmp_path / "elf.pt2", _wrapper_cpp([("c0", "w", 4)]), so))


def _library(blob: bytes) -> bytes:
    """A library whose constants blob lies at ``_binary_constants_bin_start`` (a .data section at address 0x1000)."""
    strtab = b"\0_binary_constants_bin_start\0_binary_constants_bin_end\0"
    syms = bytes(24) + struct.pack("<IBBHQQ", 1, 0, 0, 1, 0x1000, 0) + \
        struct.pack("<IBBHQQ", 29, 0, 0, 1, 0x1000 + len(blob), 0)
    return _elf([(1, 0x1000, 64, len(blob), 0, 0), (2, 0, 64 + len(blob), len(syms), 3, 24),
                 (3, 0, 64 + len(blob) + len(syms), len(strtab), 0, 0)], blob + syms + strtab)


def test_constants_info_of_a_source_of_blank_lines_is_read_in_linear_time(tmp_path):
    """Two million blank lines before a constants_info_ line (the old ``^\\s*`` under re.M rescanned the run from
    every line start: quadratic), and a line that only mentions it."""
    blob = struct.pack("<4f", 1, 2, 3, 4)
    cpp = b"\n" * 2_000_000 + b"x constants_info_[\n" + b"\r\n" * 100_000 + _wrapper_cpp([("c0", "w.x", 16)])
    path = _aoti_only(tmp_path / "blank.pt2", cpp, _library(blob))
    r = _cli_bounded(["inspect", "--json", path], 60, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(t["name"], t["shape"]) for t in json.loads(r.stdout)["tensors"]] == [("w.x", [4])]


def test_constants_info_lines_as_the_regex_read_them():
    from ckpttool.formats.pt2 import _Reader
    text = ("  constants_info_[0].name = \"a;b\";  \n"
            "constants_info_[0].offset = 0;\r\n"
            "x constants_info_[1].name = \"no\";\n"          # not at the start of its line
            "\t constants_info_[2].shape = {3, 4};\n"
            "constants_info_[3].dtype = x; // trailing\n"    # does not end with ';'
            "constants_info_[4].stride = {1};")              # the last line, no newline
    assert list(_Reader.info_lines(text)) == [(0, "name", '"a;b"'), (0, "offset", "0"), (2, "shape", "{3, 4}"),
                                              (4, "stride", "{1}")]


def test_a_deflated_library_is_inflated_once_whatever_order_its_constants_are_read_in(tmp_path, monkeypatch):
    """A deflated wrapper .so with 64 constants named opposite to their order in its blob: read in name order
    (``inspect --stats --sort name``), each read went back to the library's first byte and inflated it again."""
    import ckpttool.formats.archive as archive
    n, size = 64, 4096
    blob = b"".join(struct.pack("<f", float(i)) * (size // 4) for i in range(n))
    consts = [(f"c{i}", f"w{n - i:03d}", size) for i in range(n)]
    path = _aoti_only(tmp_path / "deflated.pt2", _wrapper_cpp(consts), _library(blob))
    calls = []
    real = archive._inflate

    def counting(chunks, record, *a, **kw):
        if record.name.endswith(".so"):
            calls.append(record.name)
        return real(chunks, record, *a, **kw)
    monkeypatch.setattr(archive, "_inflate", counting)
    sd = open_checkpoint(path).root["state_dict"]
    for name in sorted(sd):  # w001 (the last in the blob) first
        i = n - int(name[1:])
        assert sd[name].read_bytes() == struct.pack("<f", float(i)) * (size // 4), name
    assert len(calls) == 1, len(calls)
    r = run("inspect", "--stats", "--sort", "name", path)
    assert r.exit_code == 0, r.output


def test_a_big_deflated_library_is_refused_in_one_line(tmp_path, monkeypatch):
    import ckpttool.formats.pt2 as pt2
    monkeypatch.setattr(pt2, "MAX_INFLATED", 1000)
    path = _aoti_only(tmp_path / "big.pt2", _wrapper_cpp([("c0", "w", 4096)]), _library(bytes(4096)))
    with pytest.raises(FormatError, match=r"is compressed and .*more than the 1000 B ckpttool inflates"):
        open_checkpoint(path)


def test_diff_compares_the_constants_a_program_computes_with(tmp_path):
    """Two programs whose weights are equal but whose non-persistent buffer differs compute differently:
    diff says DIFFERENT and names the constant; equal constants are said compared."""
    torch.manual_seed(1)
    m = Small()
    a = export_save(m, (torch.randn(2, 8), torch.randn(3)), tmp_path / "a.pt2")
    m.npb.mul_(7)
    b = export_save(m, (torch.randn(2, 8), torch.randn(3)), tmp_path / "b.pt2")
    r = run("diff", a, b)
    assert r.exit_code == 1, r.output
    assert "constants DIFFER" in r.stdout and "npb" in r.stdout
    same = run("diff", a, a)
    assert same.exit_code == 0 and "constants: 2 compared too, equal" in same.stdout
