"""`ckpttool filter` as a user runs it: fitting pretrained weights to a model or a checkpoint,
the report (table and JSON), the written file, output safety and the error lines."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from clitools import js, run


from mypkg import ClassNet  # fixtures/mypkg, on sys.path through conftest


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listing(folder) -> set:
    return set(os.listdir(folder))


def error_line(r) -> str:
    """The one error line (and nothing else but an optional hint) on stderr, exit 2, no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert 1 <= len(lines) <= 2, r.stderr
    assert lines[0].startswith("ckpttool: error: ")
    if len(lines) == 2:
        assert lines[1].startswith("hint: ")
    assert "Traceback" not in r.output
    assert r.stdout == ""
    return lines[0]


def write_py(folder, name, text) -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def assert_kept_equal(out, source_sd, names=None, fmt="torch"):
    """OUT (read with torch's / safetensors' own loader) holds exactly ``names`` with the source's values; a
    tied name safetensors stores once is given back from the header, as ``load_model`` does."""
    got = torch.load(out, weights_only=True) if fmt == "torch" else load_file(out)
    if fmt != "torch":
        from safetensors import safe_open
        with safe_open(str(out), "pt") as f:
            for name, kept in (f.metadata() or {}).items():
                if name != "format" and name not in got and kept in got:
                    got[name] = got[kept]
    expected = list(names) if names is not None else list(source_sd)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].device.type == "cpu"
        assert got[name].dtype == source_sd[name].dtype, name
        assert torch.equal(got[name], source_sd[name].cpu()), name
    return got


# --- the seed's cases, with real torchvision models -------------------------------------------------

@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    torch.manual_seed(0)
    sd = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(sd, path)
    return str(path), sd


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("r18") / "resnet18.pt"
    torch.save(sd, path)
    return str(path), sd


def test_resnet50_into_120_classes(r50, tmp_path):
    path, sd = r50
    out = tmp_path / "fit.pt"
    d = js("filter", path, "--model", "torchvision.models:resnet50", "--arg", "num_classes=120", "-o", out)
    assert len(d["kept"]) == 318
    assert d["dropped_shape_mismatch"] == [
        {"name": "fc.weight", "source_shape": [1000, 2048], "target_shape": [120, 2048]},
        {"name": "fc.bias", "source_shape": [1000], "target_shape": [120]}]
    assert d["dropped_unexpected"] == []
    assert d["missing"] == ["fc.weight", "fc.bias"]
    assert d["cast"] == []
    assert d["output"] == str(out)
    assert d["verified"]["read_back"]["ok"] is True
    assert d["verified"]["load_into_model"] == {"ok": True, "how": "load_state_dict(strict=False)",
                                                "missing_keys": 2, "unexpected_keys": 0}
    kept = [k["name"] for k in d["kept"]]
    assert kept == [n for n in sd if not n.startswith("fc.")]
    assert_kept_equal(out, sd, kept)
    # The output loads into a fresh model, missing exactly the new head.
    model = torchvision.models.resnet50(weights=None, num_classes=120)
    res = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    for name, t in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(t, sd[name]), name
    assert listing(tmp_path) == {"fit.pt"}


def test_resnet50_into_120_classes_table(r50, tmp_path):
    path, _ = r50
    r = run("filter", path, "--model", "torchvision.models:resnet50", "--arg", "num_classes=120",
            "-o", tmp_path / "fit.pt")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    lines = out.splitlines()
    assert re.match(r"^kept\s+318$", next(l for l in lines if l.startswith("kept")))
    assert re.match(r"^dropped\s+0 not in the target, 2 shape differs$", next(l for l in lines if l.startswith("dropped ")))
    assert "dropped, shape differs (2):" in out
    assert re.search(r"^fc\.weight\s+\(1000, 2048\) -> \(120, 2048\)$", out, re.M)
    assert re.search(r"^fc\.bias\s+\(1000,\) -> \(120,\)$", out, re.M)
    assert "missing, keep their initialization (2): fc.weight, fc.bias" in out
    assert f"wrote 318 tensors to {tmp_path / 'fit.pt'} (torch)" in out
    assert "load_into_model: ok" in out


def test_resnet50_with_a_new_first_conv(r50, tmp_path):
    path, sd = r50
    nets = write_py(tmp_path, "nets.py",
                    "import torchvision\nfrom torch import nn\n\n"
                    "def factory(num_classes=1000):\n"
                    "    m = torchvision.models.resnet50(weights=None, num_classes=num_classes)\n"
                    "    m.conv1 = nn.Conv2d(3, 64, kernel_size=5, stride=2, padding=3)\n"
                    "    return m\n")
    out = tmp_path / "fit.pt"
    d = js("filter", path, "--model", f"{nets}:factory", "-o", out)
    # conv1 now has a bias the source lacks, and a 5x5 kernel.
    assert d["dropped_shape_mismatch"] == [
        {"name": "conv1.weight", "source_shape": [64, 3, 7, 7], "target_shape": [64, 3, 5, 5]}]
    assert d["missing"] == ["conv1.weight", "conv1.bias"]
    assert d["dropped_unexpected"] == []
    assert len(d["kept"]) == len(sd) - 1
    assert d["verified"]["load_into_model"]["ok"] is True
    assert_kept_equal(out, sd, [n for n in sd if n != "conv1.weight"])


def test_data_parallel_checkpoint_into_a_plain_model(tmp_path):
    torch.manual_seed(2)
    sd = nn.DataParallel(torchvision.models.resnet18(weights=None)).state_dict()
    assert all(k.startswith("module.") for k in sd)
    torch.save(sd, tmp_path / "dp.pt")
    out = tmp_path / "plain.pt"
    d = js("filter", tmp_path / "dp.pt", "--model", "torchvision.models:resnet18", "-o", out)
    assert d["prefix_alignment"] == {"a": "module.", "b": ""}
    assert len(d["kept"]) == len(sd) and d["missing"] == [] and d["dropped_unexpected"] == []
    assert d["kept"][0] == {"name": "conv1.weight", "shape": [64, 3, 7, 7], "dtype": "float32",
                            "source_name": "module.conv1.weight"}
    got = torch.load(out, weights_only=True)
    assert list(got) == [k[len("module."):] for k in sd]
    for k, v in got.items():
        assert torch.equal(v, sd["module." + k]), k
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(got)  # strict: every key there


def test_compiled_ddp_checkpoint_dict_into_a_plain_model(tmp_path):
    class DDPLike(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    torch.manual_seed(3)
    compiled = torch.compile(DDPLike(torchvision.models.resnet18(weights=None, num_classes=10)))
    sd = compiled.state_dict()
    assert all(k.startswith("_orig_mod.module.") for k in sd)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    out = tmp_path / "plain.safetensors"
    d = js("filter", tmp_path / "ckpt.pt", "--model", "torchvision.models:resnet18", "--arg", "num_classes=10",
           "-o", out)
    assert d["source"]["entry"] == "model"
    assert d["prefix_alignment"] == {"a": "_orig_mod.module.", "b": ""}
    assert len(d["kept"]) == len(sd) and d["missing"] == []
    assert d["output"] == str(out)
    got = load_file(out)
    assert len(got) == len(sd)
    for k, v in got.items():
        assert torch.equal(v, sd["_orig_mod.module." + k]), k
    torchvision.models.resnet18(weights=None, num_classes=10).load_state_dict(got)


def test_no_align_keeps_nothing_from_a_wrapped_checkpoint(tmp_path):
    sd = nn.DataParallel(nn.Linear(3, 2)).state_dict()
    torch.save(sd, tmp_path / "dp.pt")
    r = run("filter", tmp_path / "dp.pt", "--model", "torch.nn:Linear", "--arg", "in_features=3",
            "--arg", "out_features=2", "--no-align", "-o", tmp_path / "o.pt")
    assert error_line(r) == (
        "ckpttool: error: no tensor of the source fits the target (2 names the target lacks, 0 shapes that differ); "
        f"nothing written ({tmp_path / 'dp.pt'})")
    assert listing(tmp_path) == {"dp.pt"}


# --- --target, --target-key, --key, --rename -------------------------------------------------------

def test_target_checkpoint(r18, tmp_path):
    path, sd = r18
    target = tmp_path / "target.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), target)
    before = sha(target)
    out = tmp_path / "fit.pt"
    d = js("filter", path, "--target", target, "-o", out)
    assert d["target"] == str(target)
    assert [x["name"] for x in d["dropped_shape_mismatch"]] == ["fc.weight", "fc.bias"]
    assert d["missing"] == ["fc.weight", "fc.bias"]
    assert set(d["verified"]) == {"read_back"}
    assert_kept_equal(out, sd, [n for n in sd if not n.startswith("fc.")])
    assert sha(target) == before


def test_target_safetensors_and_output_safetensors(r18, tmp_path):
    path, sd = r18
    target = tmp_path / "target.safetensors"
    tsd = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("layer4")}
    save_file(tsd, target)
    before = sha(target)
    out = tmp_path / "fit.safetensors"
    d = js("filter", path, "--target", target, "-o", out)
    assert sorted(d["dropped_unexpected"]) == sorted(k for k in sd if k.startswith("layer4"))
    assert d["missing"] == [] and d["dropped_shape_mismatch"] == []
    assert d["output_format"] == "safetensors"
    assert_kept_equal(out, sd, list(tsd), fmt="safetensors")
    assert sha(target) == before
    assert listing(tmp_path) == {"target.safetensors", "fit.safetensors"}


def test_target_key_and_key(committed, make, tmp_path):
    sd = torch.load(committed("seed_checkpoint.tar"), weights_only=False)["model_state_dict"]
    out = tmp_path / "a.pt"
    d = js("filter", committed("seed_checkpoint.tar"), "--key", "model_state_dict",
           "--target", make("legacy.pt"), "--target-key", "state_dict", "-o", out)
    assert d["source"]["entry"] == "model_state_dict"
    assert len(d["kept"]) == 19 and d["missing"] == []
    got = assert_kept_equal(out, sd)
    assert got["embed.weight"].untyped_storage().data_ptr() == got["head.weight"].untyped_storage().data_ptr()
    # Without --key the state_dict is found as usual, and the report says which entry was used.
    d = js("filter", committed("seed_checkpoint.tar"), "--target", make("legacy.pt"), "-o", tmp_path / "b.pt")
    assert d["source"]["entry"] == "model_state_dict"
    r = run("filter", committed("seed_checkpoint.tar"), "--key", "model_state_dict", "--target", make("legacy.pt"),
            "-o", tmp_path / "c.pt")
    assert "state_dict: model_state_dict" in r.stdout
    # A --key that is not there.
    r = run("filter", committed("seed_checkpoint.tar"), "--key", "nope", "--target", make("legacy.pt"),
            "-o", tmp_path / "d.pt")
    line = error_line(r)
    assert "nope" in line and committed("seed_checkpoint.tar") in line
    r = run("filter", make("state_dict.pt"), "--target", committed("seed_checkpoint.tar"), "--target-key", "nope",
            "-o", tmp_path / "e.pt")
    assert "nope" in error_line(r)
    assert listing(tmp_path) == {"a.pt", "b.pt", "c.pt"}


def test_rename_rules_in_order_with_back_references(tmp_path):
    torch.manual_seed(4)
    src = {"encoder.layer1.weight": torch.randn(3, 3), "encoder.layer2.weight": torch.randn(4),
           "fc.weight": torch.randn(2, 3), "aux.weight": torch.randn(1)}
    torch.save(src, tmp_path / "src.pt")
    target = {"backbone.stage1.weight": torch.zeros(3, 3), "backbone.stage2.weight": torch.zeros(4),
              "head.weight": torch.zeros(2, 3)}
    torch.save(target, tmp_path / "tgt.pt")
    out = tmp_path / "o.pt"
    d = js("filter", tmp_path / "src.pt", "--target", tmp_path / "tgt.pt", "-o", out,
           "--rename", r"^encoder\.=backbone.", "--rename", r"^backbone\.layer(\d+)\.=backbone.stage\1.",
           "--rename", r"^fc\.=head.")
    assert d["renames"] == [r"^encoder\.=backbone.", r"^backbone\.layer(\d+)\.=backbone.stage\1.", r"^fc\.=head."]
    assert [(k["source_name"], k["name"]) for k in d["kept"]] == [
        ("encoder.layer1.weight", "backbone.stage1.weight"), ("encoder.layer2.weight", "backbone.stage2.weight"),
        ("fc.weight", "head.weight")]
    assert d["dropped_unexpected"] == ["aux.weight"]
    got = torch.load(out, weights_only=True)
    assert sorted(got) == sorted(target)
    assert torch.equal(got["backbone.stage1.weight"], src["encoder.layer1.weight"])
    assert torch.equal(got["backbone.stage2.weight"], src["encoder.layer2.weight"])
    assert torch.equal(got["head.weight"], src["fc.weight"])
    # In the other order the layer rule never sees backbone.: only head.weight fits.
    d = js("filter", tmp_path / "src.pt", "--target", tmp_path / "tgt.pt", "-o", tmp_path / "o2.pt",
           "--rename", r"^backbone\.layer(\d+)\.=backbone.stage\1.", "--rename", r"^encoder\.=backbone.",
           "--rename", r"^fc\.=head.")
    assert [k["name"] for k in d["kept"]] == ["head.weight"]
    r = run("filter", tmp_path / "src.pt", "--target", tmp_path / "tgt.pt", "-o", tmp_path / "o3.pt",
            "--rename", r"^fc\.=head.")
    assert r.exit_code == 0
    assert "renamed (1): fc.weight -> head.weight" in r.stdout


def test_rename_that_merges_two_keys(tmp_path):
    torch.save({"a.weight": torch.zeros(2), "b.weight": torch.ones(2)}, tmp_path / "src.pt")
    torch.save({"c.weight": torch.zeros(2)}, tmp_path / "tgt.pt")
    r = run("filter", tmp_path / "src.pt", "--target", tmp_path / "tgt.pt", "-o", tmp_path / "o.pt",
            "--rename", r"^[ab]\.=c.")
    assert error_line(r) == \
        "ckpttool: error: keys 'a.weight' and 'b.weight' both map to 'c.weight'; check the --rename rules"
    assert listing(tmp_path) == {"src.pt", "tgt.pt"}


def test_bad_rename_rule(tmp_path, make):
    r = run("filter", make("state_dict.pt"), "--target", make("state_dict.pt"), "-o", tmp_path / "o.pt",
            "--rename", "no-equals")
    assert error_line(r) == "ckpttool: error: --rename 'no-equals' is not REGEX=REPL"
    r = run("filter", make("state_dict.pt"), "--target", make("state_dict.pt"), "-o", tmp_path / "o.pt",
            "--rename", "(x=y")
    assert error_line(r).startswith("ckpttool: error: --rename '(x=y': not a valid regular expression: ")
    assert listing(tmp_path) == set()


def test_rename_after_stripping_the_wrapper_prefix(tmp_path):
    """--rename's help: "Rename source keys (after prefix alignment)". A DataParallel checkpoint of a
    network whose layers were since renamed: module. must be stripped, then the rules applied."""
    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

    torch.manual_seed(5)
    sd = nn.DataParallel(Old()).state_dict()
    torch.save(sd, tmp_path / "dp.pt")
    nets = write_py(tmp_path, "newnet.py",
                    "from torch import nn\n\nclass New(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.backbone = nn.Linear(4, 4)\n"
                    "        self.classifier = nn.Linear(4, 2)\n")
    out = tmp_path / "o.pt"
    r = run("filter", tmp_path / "dp.pt", "--model", f"{nets}:New", "-o", out, "--json",
            "--rename", r"^encoder\.=backbone.", "--rename", r"^fc\.=classifier.")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert [k["name"] for k in d["kept"]] == ["backbone.weight", "backbone.bias", "classifier.weight",
                                              "classifier.bias"]
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["backbone.weight"], sd["module.encoder.weight"])
    assert torch.equal(got["classifier.bias"], sd["module.fc.bias"])


# --- dtypes and tied weights --------------------------------------------------------------------------

def test_float16_source_is_cast_to_the_models_float32(r18, tmp_path):
    path, sd = r18
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save(half, tmp_path / "half.pt")
    out = tmp_path / "o.pt"
    d = js("filter", tmp_path / "half.pt", "--model", "torchvision.models:resnet18", "-o", out)
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    assert [c["name"] for c in d["cast"]] == floats
    assert all(c["from"] == "float16" and c["to"] == "float32" for c in d["cast"])
    assert next(k for k in d["kept"] if k["name"] == "conv1.weight")["cast_from"] == "float16"
    assert "cast_from" not in next(k for k in d["kept"] if k["name"] == "bn1.num_batches_tracked")
    got = torch.load(out, weights_only=True)
    for k, v in got.items():
        if k in floats:
            assert v.dtype == torch.float32
            assert torch.equal(v, half[k].float()), k
        else:
            assert v.dtype == torch.int64 and torch.equal(v, sd[k])
    r = run("filter", tmp_path / "half.pt", "--model", "torchvision.models:resnet18", "-o", tmp_path / "o2.pt")
    assert re.search(rf"^cast\s+{len(floats)} tensors to the target's dtype$", r.stdout, re.M)
    assert f"cast ({len(floats)}): conv1.weight float16->float32" in r.stdout


def test_tied_weights_stay_tied_in_pt_and_load_from_safetensors(committed, tmp_path):
    sd = torch.load(committed("seed_checkpoint.tar"), weights_only=False)["model_state_dict"]
    assert sd["embed.weight"].data_ptr() == sd["head.weight"].data_ptr()
    out = tmp_path / "tied.pt"
    d = js("filter", committed("seed_checkpoint.tar"), "--model", "mypkg:ClassNet", "-o", out)
    assert len(d["kept"]) == 19 and d["missing"] == []
    got = assert_kept_equal(out, sd)
    assert got["embed.weight"].untyped_storage().data_ptr() == got["head.weight"].untyped_storage().data_ptr()
    assert got["embed.weight"].data_ptr() == got["head.weight"].data_ptr()
    # safetensors holds no shared storage: the tie is stored once, the other name in the header (as convert and
    # safetensors' save_model do), and loads into a tied model
    out_st = tmp_path / "tied.safetensors"
    d = js("filter", committed("seed_checkpoint.tar"), "--model", "mypkg:ClassNet", "-o", out_st)
    assert d["verified"]["load_into_model"]["ok"] is True
    got = assert_kept_equal(out_st, sd, fmt="safetensors")
    model = ClassNet()
    model.load_state_dict(got)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight, sd["head.weight"])
    x = torch.randn(2, 3, 8, 8)
    ref = ClassNet()
    ref.load_state_dict(sd)
    assert torch.equal(model.eval()(x), ref.eval()(x))


# --- sources of every format -------------------------------------------------------------------------

def _load_source(name, path):
    if name == "legacy.pt":
        return torch.load(path, weights_only=True)["state_dict"]
    if name == "gpu_tagged.pt":
        return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    if name == "full_model.pth":
        return torch.load(path, weights_only=False).state_dict()
    if name == "torchscript.pt":
        return torch.jit.load(path, map_location="cpu").state_dict()
    if name == "model.safetensors":
        return load_file(path)
    if name == "sharded_safetensors":
        out = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(path, f)))
        return out
    if name == "sharded_bin":
        out = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".bin"):
                out.update(torch.load(os.path.join(path, f), weights_only=True))
        return out
    raise KeyError(name)


@pytest.mark.parametrize("name, fmt, entry", [
    ("legacy.pt", "torch_legacy", "state_dict"),
    ("gpu_tagged.pt", "torch_zip", "model_state_dict"),
    ("full_model.pth", "torch_zip", None),
    ("torchscript.pt", "torchscript", None),
    ("model.safetensors", "safetensors", None),
    ("sharded_safetensors", "safetensors_sharded", None),
    ("sharded_bin", "torch_sharded", None),
])
def test_sources_of_every_format(name, fmt, entry, make, committed, tmp_path):
    path = committed(name) if name == "gpu_tagged.pt" else make(name)
    src = _load_source(name, path)
    target_names = list(ClassNet().state_dict())
    out = tmp_path / "o.pt"
    d = js("filter", path, "--model", "mypkg:ClassNet", "-o", out)
    assert d["source"]["format"] == fmt and d["source"]["entry"] == entry
    kept = [n for n in target_names if n in src]
    assert [k["name"] for k in d["kept"]] == kept
    assert d["missing"] == [n for n in target_names if n not in src]
    assert sorted(d["dropped_unexpected"]) == sorted(n for n in src if n not in target_names)
    assert d["verified"]["load_into_model"]["ok"] is True
    assert_kept_equal(out, src, kept)


def test_gpu_tagged_source_is_written_for_the_cpu(committed, tmp_path):
    out = tmp_path / "o.safetensors"
    d = js("filter", committed("gpu_tagged.pt"), "--target", committed("model.safetensors"), "-o", out)
    src = torch.load(committed("gpu_tagged.pt"), map_location="cpu", weights_only=True)["model_state_dict"]
    assert d["missing"] == [] and d["dropped_unexpected"] == ["head.weight"]
    got = assert_kept_equal(out, src, [k for k in src if k != "head.weight"], fmt="safetensors")
    assert all(t.device.type == "cpu" for t in got.values())


def test_pickled_full_model_runs_no_code(tmp_path, monkeypatch):
    """A torch.save(model) of a class whose module, if imported, leaves a mark: filter must not import it."""
    pkg = tmp_path / "trapdir"
    pkg.mkdir()
    write_py(pkg, "trap_mod_ckpt.py", "from torch import nn\n"
                                      "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                                      "        self.fc = nn.Linear(3, 2)\n")
    monkeypatch.syspath_prepend(str(pkg))
    import trap_mod_ckpt
    torch.manual_seed(6)
    model = trap_mod_ckpt.Net()
    torch.save(model, tmp_path / "full.pth")
    sys.modules.pop("trap_mod_ckpt")
    marker = tmp_path / "imported"
    write_py(pkg, "trap_mod_ckpt.py", f"open({str(marker)!r}, 'w').close()\nraise SystemExit('code ran')\n")
    out = tmp_path / "o.pt"
    torch.save({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}, tmp_path / "t.pt")
    d = js("filter", tmp_path / "full.pth", "--target", tmp_path / "t.pt", "-o", out)
    assert not marker.exists() and "trap_mod_ckpt" not in sys.modules
    assert [k["name"] for k in d["kept"]] == ["fc.weight", "fc.bias"]
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["fc.weight"], model.fc.weight.detach())
    assert torch.equal(got["fc.bias"], model.fc.bias.detach())


# --- output safety -------------------------------------------------------------------------------------

@pytest.fixture
def src_copy(make, tmp_path):
    """A ClassNet state_dict in tmp_path/x/src.pt (so that other spellings of it can be made)."""
    folder = tmp_path / "x"
    folder.mkdir()
    path = folder / "src.pt"
    with open(make("state_dict.pt"), "rb") as f:
        path.write_bytes(f.read())
    return path


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot", "relative", "hardlink"])
@pytest.mark.parametrize("force", [False, True])
def test_output_never_overwrites_the_source(spelling, force, src_copy, tmp_path, monkeypatch):
    before = sha(src_copy)
    monkeypatch.chdir(tmp_path)
    if spelling == "same":
        out = str(src_copy)
    elif spelling == "symlink":
        (tmp_path / "link.pt").symlink_to(src_copy)
        out = str(tmp_path / "link.pt")
    elif spelling == "dotdot":
        out = "./x/../x/src.pt"
    elif spelling == "relative":
        out = "x/src.pt"
    else:
        os.link(src_copy, tmp_path / "hard.pt")
        out = str(tmp_path / "hard.pt")
    folder_before = listing(tmp_path / "x")
    r = run("filter", src_copy, "--model", "mypkg:ClassNet", "-o", out, *(["--force"] if force else []))
    line = error_line(r)
    assert line == f"ckpttool: error: output is one of the inputs; refusing to write over it ({os.path.abspath(out)})"
    assert sha(src_copy) == before
    assert listing(tmp_path / "x") == folder_before


def test_output_never_overwrites_the_source_through_a_symlinked_source(src_copy, tmp_path):
    (tmp_path / "alias.pt").symlink_to(src_copy)
    before = sha(src_copy)
    r = run("filter", tmp_path / "alias.pt", "--model", "mypkg:ClassNet", "-o", src_copy, "--force")
    assert "output is one of the inputs" in error_line(r)
    assert sha(src_copy) == before


def test_output_never_overwrites_the_target(make, tmp_path):
    target = tmp_path / "target.safetensors"
    with open(make("model.safetensors"), "rb") as f:
        target.write_bytes(f.read())
    before = sha(target)
    r = run("filter", make("state_dict.pt"), "--target", target, "-o", target, "--force")
    assert "output is one of the inputs" in error_line(r)
    assert sha(target) == before


def test_output_never_overwrites_a_shard_of_the_source(make, tmp_path):
    import shutil
    folder = tmp_path / "sharded"
    shutil.copytree(make("sharded_safetensors"), folder)
    shard = folder / "model-00001-of-00002.safetensors"
    before = sha(shard)
    r = run("filter", folder, "--model", "mypkg:ClassNet", "-o", shard, "--force")
    assert "output is one of the inputs" in error_line(r)
    assert sha(shard) == before


def test_output_never_overwrites_the_model_file(make, tmp_path):
    """The --model FILE.py is an input too: -o on it (with --to pt and --force) must not destroy the code."""
    nets = write_py(tmp_path, "nets.py", "import mypkg\n\ndef factory():\n    return mypkg.ClassNet()\n")
    before = sha(nets)
    r = run("filter", make("state_dict.pt"), "--model", f"{nets}:factory", "-o", nets, "--to", "pt", "--force")
    assert r.exit_code == 2, r.stdout
    assert "output is one of the inputs" in error_line(r)
    assert sha(nets) == before


def test_existing_output_needs_force(make, tmp_path):
    out = tmp_path / "o.pt"
    out.write_bytes(b"precious")
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", out)
    assert r.stderr.splitlines() == [f"ckpttool: error: output exists ({out})", "hint: pass --force to replace it"]
    assert r.exit_code == 2
    assert out.read_bytes() == b"precious"
    assert listing(tmp_path) == {"o.pt"}
    d = js("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", out, "--force")
    assert len(d["kept"]) == 19
    assert_kept_equal(out, torch.load(make("state_dict.pt"), weights_only=True))
    assert listing(tmp_path) == {"o.pt"}


def test_failed_read_back_check_leaves_no_file(make, tmp_path, monkeypatch):
    import ckpttool.filtering as filtering
    monkeypatch.setattr(filtering, "_bits_equal", lambda want, got, dtype: False)
    out = tmp_path / "o.pt"
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", out)
    assert r.exit_code == 1, (r.stdout, r.stderr, r.exception)
    assert re.fullmatch(rf"ckpttool: error: tensor \S+ reads back different from what was written \({re.escape(str(out))}\)\n",
                        r.stderr)
    assert listing(tmp_path) == set()
    # With --force over an old file: the old file stays as it was.
    out.write_bytes(b"old")
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", out, "--force")
    assert r.exit_code == 1
    assert out.read_bytes() == b"old" and listing(tmp_path) == {"o.pt"}


def test_failed_load_check_leaves_no_file(make, tmp_path, monkeypatch):
    import ckpttool.filtering as filtering

    def fail(model, tensors, result, assign):
        raise filtering.CheckFailedError("loading the output gave 1 missing and 1 unexpected keys")

    monkeypatch.setattr(filtering, "_check_load", fail)
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1
    assert r.stderr == "ckpttool: error: loading the output gave 1 missing and 1 unexpected keys\n"
    assert listing(tmp_path) == set()


def test_full_disk_leaves_no_partial_file(make, tmp_path, monkeypatch):
    import ckpttool.filtering as filtering

    def full_disk(path, root, *a, **k):  # filter writes with convert's streaming writer
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filtering, "write_torch_zip", full_disk)
    out = tmp_path / "o.pt"
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", out)
    assert error_line(r) == f"ckpttool: error: cannot write the output: No space left on device ({out})"
    assert listing(tmp_path) == set()


def test_success_leaves_no_temporary_files(make, tmp_path):
    for name in ("a.pt", "b.safetensors", "c.bin", "d.pth"):
        js("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / name)
    assert listing(tmp_path) == {"a.pt", "b.safetensors", "c.bin", "d.pth"}


def test_unknown_extension_needs_to(make, tmp_path):
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / "o.weights")
    assert r.stderr.splitlines() == ["ckpttool: error: cannot tell the output format from 'o.weights'",
                                     "hint: name it .pt/.pth/.bin or .safetensors, or pass --to"]
    assert r.exit_code == 2 and listing(tmp_path) == set()
    d = js("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / "o.weights", "--to", "pt")
    assert d["output_format"] == "torch"
    assert len(torch.load(tmp_path / "o.weights", weights_only=True)) == 19
    d = js("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / "o.data",
           "--to", "safetensors")
    assert d["output_format"] == "safetensors" and len(load_file(tmp_path / "o.data")) == 18  # head tied to embed


def test_dtype_safetensors_cannot_hold_is_an_error_not_a_crash(tmp_path):
    """complex128 has no safetensors dtype: a user error (exit 2, one line naming it), not a KeyError traceback."""
    src = {"spectrum": torch.zeros(3, dtype=torch.complex128), "w": torch.ones(2)}
    torch.save(src, tmp_path / "c.pt")
    out = tmp_path / "o.safetensors"
    r = run("filter", tmp_path / "c.pt", "--target", tmp_path / "c.pt", "-o", out)
    line = error_line(r)
    assert "complex128" in line
    assert listing(tmp_path) == {"c.pt"}
    # The same into a .pt works.
    d = js("filter", tmp_path / "c.pt", "--target", tmp_path / "c.pt", "-o", tmp_path / "o.pt")
    assert len(d["kept"]) == 2
    assert_kept_equal(tmp_path / "o.pt", src)


def test_nothing_kept_writes_nothing(make, tmp_path):
    out = tmp_path / "o.pt"
    r = run("filter", make("state_dict.pt"), "--model", "torchvision.models:resnet18", "-o", out)
    line = error_line(r)
    # fc.weight / fc.bias are in both, with other shapes; the other 17 names resnet18 lacks.
    assert line == ("ckpttool: error: no tensor of the source fits the target (17 names the target lacks, "
                    f"2 shapes that differ); nothing written ({make('state_dict.pt')})")
    assert "hint: check the names with `ckpttool diff SOURCE TARGET --no-values`" in r.stderr
    assert listing(tmp_path) == set()
    # Only a shape mismatch (fc. stripped so that fc.weight meets Linear's weight): still nothing kept.
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "s.pt")
    r = run("filter", tmp_path / "s.pt", "--model", "torch.nn:Linear", "--arg", "in_features=2",
            "--arg", "out_features=2", "-o", out)
    assert error_line(r) == ("ckpttool: error: no tensor of the source fits the target (0 names the target lacks, "
                             f"1 shapes that differ); nothing written ({tmp_path / 's.pt'})")
    assert listing(tmp_path) == {"s.pt"}


def test_output_folder_missing_or_a_directory(make, tmp_path):
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / "no" / "o.pt")
    assert error_line(r) == f"ckpttool: error: output folder does not exist ({tmp_path / 'no' / 'o.pt'})"
    (tmp_path / "d.pt").mkdir()
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "-o", tmp_path / "d.pt")
    assert error_line(r) == f"ckpttool: error: output is a folder (a trailing '/' or an existing directory): give a file name (--max-shard-size SIZE writes a folder of shards) ({tmp_path / 'd.pt'})"


# --- --model SPEC errors: one line, exit 2 ------------------------------------------------------------

def test_model_spec_errors(make, tmp_path):
    src = make("state_dict.pt")
    out = tmp_path / "o.pt"
    r = run("filter", src, "--model", "torchvision.models", "-o", out)
    assert r.stderr.splitlines() == [
        "ckpttool: error: --model 'torchvision.models' is not MODULE:NAME or FILE.py:NAME",
        "hint: e.g. --model torchvision.models:resnet50 or --model nets/mine.py:ClassNet"]
    assert r.exit_code == 2
    missing = tmp_path / "nope.py"
    assert error_line(run("filter", src, "--model", f"{missing}:Net", "-o", out)) == \
        f"ckpttool: error: model file not found ({missing})"
    assert error_line(run("filter", src, "--model", "torchvision.models:resnet5000", "-o", out)) == \
        "ckpttool: error: --model 'torchvision.models:resnet5000': torchvision.models has no resnet5000"
    assert error_line(run("filter", src, "--model", "no_such_pkg_xyz.models:Net", "-o", out)).startswith(
        "ckpttool: error: --model 'no_such_pkg_xyz.models:Net': cannot import no_such_pkg_xyz.models: ")
    nets = write_py(tmp_path, "bad_nets.py",
                    "from torch import nn\n"
                    "def raising(depth=18):\n    raise ValueError(f'unsupported depth {depth}\\nsee docs')\n"
                    "def not_module():\n    return [1, 2]\n")
    assert error_line(run("filter", src, "--model", f"{nets}:raising", "--arg", "depth=7", "-o", out)) == \
        f"ckpttool: error: --model '{nets}:raising' failed to build: ValueError: unsupported depth 7\\nsee docs"
    assert error_line(run("filter", src, "--model", f"{nets}:not_module", "-o", out)) == \
        f"ckpttool: error: --model '{nets}:not_module' made a list, not a torch.nn.Module"
    broken = write_py(tmp_path, "broken_nets.py", "import no_such_dependency_xyz\n")
    assert error_line(run("filter", src, "--model", f"{broken}:Net", "-o", out)) == (
        "ckpttool: error: importing the model file failed: ModuleNotFoundError: No module named "
        f"'no_such_dependency_xyz' ({broken})")
    assert error_line(run("filter", src, "--model", "torchvision.models:resnet18", "--arg", "num_classes", "-o", out)) \
        == "ckpttool: error: --arg 'num_classes' is not NAME=VALUE"
    assert error_line(run("filter", src, "-o", out)) == \
        "ckpttool: error: give the target as --model SPEC or --target PATH (one of them)"
    assert error_line(run("filter", src, "--model", "mypkg:ClassNet", "--target", src, "-o", out)) == \
        "ckpttool: error: give the target as --model SPEC or --target PATH (one of them)"
    assert error_line(run("filter", tmp_path / "missing.pt", "--model", "mypkg:ClassNet", "-o", out)).startswith(
        "ckpttool: error: ")
    assert not out.exists()
    assert not [f for f in listing(tmp_path) if f.endswith((".pt", ".tmp"))]


def test_model_args_are_python_literals(make, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_py(tmp_path, "argnets.py",
             "import mypkg\n"
             "def factory(num_classes, vocab=16, name='x', dims=(1, 2)):\n"
             "    assert name == 'tiny' and dims == (3, 5), (name, dims)\n"
             "    return mypkg.ClassNet(num_classes=num_classes, vocab=vocab)\n")
    d = js("filter", make("state_dict.pt"), "--model", "argnets.py:factory", "--arg", "num_classes=4",
           "--arg", "vocab=16", "--arg", "name=tiny", "--arg", "dims=(3, 5)", "-o", "o.pt")
    assert {x["name"]: x["target_shape"] for x in d["dropped_shape_mismatch"]} == {"fc.weight": [4, 8],
                                                                                   "fc.bias": [4]}
    assert d["output"] == str(tmp_path / "o.pt")


def test_model_built_on_cpu_when_meta_fails(make, tmp_path):
    nets = write_py(tmp_path, "cpu_only.py",
                    "import mypkg\n"
                    "def factory():\n"
                    "    m = mypkg.ClassNet()\n"
                    "    float(m.fc.weight.detach().sum())  # needs data: fails on meta\n"
                    "    return m\n")
    out = tmp_path / "o.pt"
    d = js("filter", make("state_dict.pt"), "--model", f"{nets}:factory", "-o", out)
    assert d["verified"]["load_into_model"]["ok"] is True and len(d["kept"]) == 19


# --- the JSON and the table ----------------------------------------------------------------------------

def test_json_fields(make, tmp_path):
    out = tmp_path / "o.pt"
    r = run("filter", make("state_dict.pt"), "--model", "mypkg:ClassNet", "--arg", "num_classes=3", "-o", out,
            "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)  # nothing else on stdout
    assert set(d) >= {"kept", "dropped_unexpected", "dropped_shape_mismatch", "missing", "output", "verified",
                      "source", "target", "prefix_alignment", "renames", "cast", "output_format"}
    assert d["source"] == {"path": make("state_dict.pt"), "format": "torch_zip", "entry": None}
    assert d["target"] == "mypkg.ClassNet"
    assert d["kept"][0] == {"name": "scale", "shape": [8], "dtype": "float32"}
    assert d["dropped_shape_mismatch"] == [
        {"name": "fc.weight", "source_shape": [10, 8], "target_shape": [3, 8]},
        {"name": "fc.bias", "source_shape": [10], "target_shape": [3]}]
    assert d["missing"] == ["fc.weight", "fc.bias"]
    assert d["dropped_unexpected"] == [] and d["cast"] == [] and d["renames"] == []
    assert d["prefix_alignment"] is None
    assert d["output"] == str(out) and d["output_format"] == "torch"
    assert d["verified"] == {
        "read_back": {"ok": True, "how": "torch.load(weights_only=True)", "tensors": 17, "bytes_compared": 17},
        "load_into_model": {"ok": True, "how": "load_state_dict(strict=False)", "missing_keys": 2,
                            "unexpected_keys": 0}}


def test_table_groups(make, tmp_path):
    torch.manual_seed(7)
    sd = dict(torch.load(make("state_dict.pt"), weights_only=True))
    sd["extra.weight"] = torch.randn(2)
    del sd["stem.bias"]
    torch.save(sd, tmp_path / "s.pt")
    r = run("filter", tmp_path / "s.pt", "--model", "mypkg:ClassNet", "--arg", "num_classes=3",
            "-o", tmp_path / "o.pt")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert re.search(r"^dropped\s+1 not in the target, 2 shape differs$", out, re.M)
    assert re.search(r"^missing\s+3 target keys keep their fresh initialization$", out, re.M)
    assert re.search(r"^prefix alignment\s+none$", out, re.M)
    assert "dropped, not in the target (1): extra.weight" in out
    assert "missing, keep their initialization (3): stem.bias, fc.weight, fc.bias" in out
    assert re.search(r"^fc\.weight\s+\(10, 8\) -> \(3, 8\)$", out, re.M)
    assert out.rstrip("\n").splitlines()[-1].startswith(f"wrote 16 tensors to {tmp_path / 'o.pt'} (torch)")
    assert r.stderr == ""


def test_help_lists_options_and_an_example():
    r = run("filter", "--help")
    assert r.exit_code == 0
    assert "ckpttool filter resnet50.pth --model torchvision.models:resnet50 --arg num_classes=120 -o fit.pt" \
        in r.stdout
    for opt in ("--model", "--arg", "--target", "--target-key", "--key", "--rename", "--to", "--force", "--json",
                "--no-align", "-o"):
        assert opt in r.stdout


def test_max_shard_size_writes_hf_shards_that_load_into_the_model(make, tmp_path):
    """--max-shard-size: a folder of safetensors shards + index (total_size right), each shard read back by
    safetensors' own loader and loaded into the model before the folder is put in place."""
    import json as _json
    from safetensors.torch import load_file
    src = tmp_path / "r18.pt"
    ref = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(ref, src)
    out = tmp_path / "fit"
    d = js("filter", src, "--model", "torchvision.models:resnet18", "--arg", "num_classes=10", "-o", out,
           "--max-shard-size", "10MB")
    assert d["output_format"] == "safetensors_sharded" and d["verified"]["load_into_model"]["ok"] is True
    index = _json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    back = {}
    for s in shards:
        part = load_file(str(out / s))
        assert all(index["weight_map"][k] == s for k in part)
        back.update(part)
    kept = {k["name"] for k in d["kept"]}
    assert set(back) == kept == set(ref) - {"fc.weight", "fc.bias"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in back.values())
    assert all(torch.equal(back[k], ref[k]) for k in kept)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary folder left behind"


def test_max_shard_size_with_to_pt_writes_bin_shards_that_load_into_the_model(tmp_path):
    """--to pt --max-shard-size: pytorch_model-0000N-of-0000M.bin shards + pytorch_model.bin.index.json, each shard
    read back by torch.load(weights_only=True) and loaded into the model before the folder is put in place."""
    import json as _json
    src = tmp_path / "r18.pt"
    ref = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(ref, src)
    out = tmp_path / "fit"
    d = js("filter", src, "--model", "torchvision.models:resnet18", "--arg", "num_classes=10", "-o", out,
           "--to", "pt", "--max-shard-size", "10MB")
    assert d["output_format"] == "torch_sharded" and d["verified"]["load_into_model"]["ok"] is True
    assert d["verified"]["read_back"]["how"] == "torch.load(weights_only=True)"
    index = _json.loads((out / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"pytorch_model-00001-of-{len(shards):05d}.bin"
    back = {}
    for s in shards:
        part = torch.load(out / s, weights_only=True)
        assert all(index["weight_map"][k] == s for k in part)
        back.update(part)
    assert set(back) == set(ref) - {"fc.weight", "fc.bias"}
    assert index["metadata"]["total_size"] == sum(t.untyped_storage().nbytes() for t in back.values())
    assert all(torch.equal(back[k], ref[k]) for k in back)
