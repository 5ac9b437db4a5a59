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
