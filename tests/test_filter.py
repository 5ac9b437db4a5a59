"""The filter library: ckpttool.filtering (filter_state_dict, load_into, filter_checkpoint),
ckpttool.modelspec (--model SPEC --arg k=v) and ckpttool.writing / formats.write (safe outputs)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import ckpttool
from ckpttool import records
from ckpttool.align import Alignment, Rename
from ckpttool.errors import CheckFailedError, FileAccessError, KeyNotFoundError, UsageError
from ckpttool.filtering import filter_checkpoint, filter_state_dict, load_into
from ckpttool.formats.write import output_format
from ckpttool.modelspec import build_model, parse_args, resolve
from ckpttool.records import FilterResult, KeptTensor, ShapeDrop
from ckpttool.writing import atomic_output, check_output

from mypkg import ClassNet  # fixtures/mypkg, on sys.path through conftest


# --- helpers ---------------------------------------------------------------------------------------

def listing(folder) -> set:
    return set(os.listdir(folder))


def write_py(folder, name, text) -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A seeded resnet18 state_dict saved with torch.save: (path, state_dict)."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("r18") / "resnet18.pt"
    torch.save(sd, path)
    return str(path), sd


@pytest.fixture(scope="module")
def r18_dp(tmp_path_factory):
    """The same network saved through DataParallel (every key under module.)."""
    torch.manual_seed(1)
    sd = nn.DataParallel(torchvision.models.resnet18(weights=None)).state_dict()
    path = tmp_path_factory.mktemp("r18dp") / "dp.pt"
    torch.save(sd, path)
    return str(path), sd


def meta_resnet18(**kw):
    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None, **kw)


# --- filter_state_dict -----------------------------------------------------------------------------

def test_filter_state_dict_new_head(r18):
    path, sd = r18
    r = filter_state_dict(path, meta_resnet18(num_classes=120))
    assert isinstance(r, FilterResult)
    assert r.source == path and r.source_format == "torch_zip" and r.source_entry is None
    assert r.target == "torchvision.models.resnet.ResNet"
    assert r.dropped_shape_mismatch == (
        ShapeDrop("fc.weight", "fc.weight", (1000, 512), (120, 512)),
        ShapeDrop("fc.bias", "fc.bias", (1000,), (120,)))
    assert r.missing == ("fc.weight", "fc.bias")
    assert r.dropped_unexpected == ()
    assert [k.name for k in r.kept] == [n for n in sd if not n.startswith("fc.")]
    assert len(r.kept) == len(sd) - 2
    k = r.kept[0]
    assert k == KeptTensor("conv1.weight", "conv1.weight", (64, 3, 7, 7), "float32", "float32")
    nbt = next(k for k in r.kept if k.name == "bn1.num_batches_tracked")
    assert nbt.shape == () and nbt.dtype == "int64"
    assert r.cast == ()
    assert r.prefix_alignment == Alignment()
    assert r.output is None and r.verified is None and r.exit_code == 0
    d = r.to_dict()
    assert d["dropped_shape_mismatch"] == [
        {"name": "fc.weight", "source_shape": [1000, 512], "target_shape": [120, 512]},
        {"name": "fc.bias", "source_shape": [1000], "target_shape": [120]}]
    assert d["missing"] == ["fc.weight", "fc.bias"]
    assert d["prefix_alignment"] is None


def test_filter_state_dict_is_in_the_public_api():
    assert ckpttool.filter_state_dict is filter_state_dict
    assert ckpttool.load_into is load_into
    assert "filter_state_dict" in ckpttool.__all__ and "load_into" in ckpttool.__all__


def test_filter_state_dict_output_order_is_the_targets(tmp_path):
    sd = {"b.weight": torch.zeros(2), "a.weight": torch.zeros(3)}
    torch.save(sd, tmp_path / "s.pt")
    tgt = {"a.weight": torch.zeros(3), "c.weight": torch.zeros(1), "b.weight": torch.zeros(2)}
    r = filter_state_dict(str(tmp_path / "s.pt"), tgt)
    assert [k.name for k in r.kept] == ["a.weight", "b.weight"]
    assert r.missing == ("c.weight",)
    assert r.target == "state_dict"


def test_filter_state_dict_data_parallel_source(r18_dp):
    path, sd = r18_dp
    r = filter_state_dict(path, meta_resnet18())
    assert r.prefix_alignment == Alignment("module.", "")
    assert len(r.kept) == len(sd) and r.missing == () and r.dropped_unexpected == ()
    assert r.kept[0].name == "conv1.weight" and r.kept[0].source_name == "module.conv1.weight"
    assert r.to_dict()["prefix_alignment"] == {"a": "module.", "b": ""}


def test_filter_state_dict_no_align(r18_dp):
    path, sd = r18_dp
    r = filter_state_dict(path, meta_resnet18(), align=False)
    assert r.kept == ()
    assert r.dropped_unexpected == tuple(sd)
    assert len(r.missing) == len(sd)


def test_filter_state_dict_target_with_a_wrapper_prefix(r18):
    """A plain source into a DataParallel-wrapped model: kept under the target's names."""
    path, sd = r18
    model = nn.DataParallel(meta_resnet18())
    r = filter_state_dict(path, model)
    assert r.prefix_alignment == Alignment("", "module.")
    assert r.kept[0].name == "module.conv1.weight" and r.kept[0].source_name == "conv1.weight"
    assert len(r.kept) == len(sd)


def test_filter_state_dict_target_mapping_of_tensors_and_tensor_refs(r18, tmp_path):
    path, sd = r18
    target = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    target["fc.weight"] = torch.empty(10, 512, device="meta")
    target["fc.bias"] = torch.empty(10, device="meta")
    target["not_a_tensor"] = 3  # ignored
    r = filter_state_dict(path, target)
    assert [d.name for d in r.dropped_shape_mismatch] == ["fc.weight", "fc.bias"]
    assert r.missing == ("fc.weight", "fc.bias")
    # The tensors of an opened checkpoint (TensorRefs) work as a target too.
    refs = ckpttool.find_state_dict(ckpttool.open(path)).tensors
    r2 = filter_state_dict(path, refs)
    assert len(r2.kept) == len(sd) and r2.missing == ()


def test_filter_state_dict_target_path_and_target_key(committed, make):
    # seed_checkpoint.tar: its state_dict is entry model_state_dict.
    r = filter_state_dict(make("state_dict.pt"), committed("seed_checkpoint.tar"))
    assert r.target == committed("seed_checkpoint.tar")
    assert len(r.kept) == 19 and r.missing == ()
    r = filter_state_dict(make("state_dict.pt"), committed("seed_checkpoint.tar"), target_key="model_state_dict")
    assert len(r.kept) == 19
    with pytest.raises(KeyNotFoundError):
        filter_state_dict(make("state_dict.pt"), committed("seed_checkpoint.tar"), target_key="nope")
    # a safetensors target that lacks head.weight: head.weight is dropped as unexpected.
    r = filter_state_dict(make("state_dict.pt"), committed("model.safetensors"))
    assert r.dropped_unexpected == ("head.weight",)
    assert len(r.kept) == 18 and r.missing == ()


def test_filter_state_dict_source_key(committed):
    r = filter_state_dict(committed("seed_checkpoint.tar"), ClassNet(), key="model_state_dict")
    assert r.source_entry == "model_state_dict"
    assert len(r.kept) == 19
    # The pickled full model in the same file: read from its bytes, no code run.
    r = filter_state_dict(committed("seed_checkpoint.tar"), ClassNet(), key="model")
    assert r.source_entry == "model" and len(r.kept) == 19
    with pytest.raises(KeyNotFoundError):
        filter_state_dict(committed("seed_checkpoint.tar"), ClassNet(), key="no_such_entry")


def test_filter_state_dict_accepts_an_open_checkpoint(make):
    ckpt = ckpttool.open(make("state_dict.pt"))
    r = filter_state_dict(ckpt, ClassNet())
    assert len(r.kept) == 19


def test_filter_state_dict_renames(tmp_path):
    sd = {"encoder.layer1.weight": torch.zeros(2), "encoder.layer2.weight": torch.zeros(3), "fc.weight": torch.zeros(4)}
    torch.save(sd, tmp_path / "s.pt")
    target = {"backbone.stage1.weight": torch.zeros(2), "backbone.stage2.weight": torch.zeros(3),
              "head.weight": torch.zeros(4)}
    rules = [r"^encoder\.=backbone.", Rename.parse(r"^backbone\.layer(\d)=backbone.stage\1"), r"^fc\.=head."]
    r = filter_state_dict(str(tmp_path / "s.pt"), target, renames=rules)
    assert [(k.source_name, k.name) for k in r.kept] == [
        ("encoder.layer1.weight", "backbone.stage1.weight"), ("encoder.layer2.weight", "backbone.stage2.weight"),
        ("fc.weight", "head.weight")]
    assert r.renames == (r"^encoder\.=backbone.", r"^backbone\.layer(\d)=backbone.stage\1", r"^fc\.=head.")
    assert r.to_dict()["kept"][0] == {"name": "backbone.stage1.weight", "shape": [2], "dtype": "float32",
                                      "source_name": "encoder.layer1.weight"}


def test_filter_state_dict_rename_merging_keys_is_an_error(tmp_path):
    torch.save({"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}, tmp_path / "s.pt")
    with pytest.raises(UsageError, match="both map to 'c.weight'"):
        filter_state_dict(str(tmp_path / "s.pt"), {"c.weight": torch.zeros(2)}, renames=[r"^[ab]\.=c."])


class _Old(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)


class _New(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)


def test_rename_rules_apply_after_the_wrapper_prefix_is_stripped(tmp_path):
    """A DataParallel checkpoint of a network whose modules were since renamed.

    The rules are written against the aligned names (as --rename's help says: "after prefix
    alignment"), so module. must be stripped even though no name meets before the rules run.
    """
    torch.manual_seed(0)
    sd = nn.DataParallel(_Old()).state_dict()
    torch.save(sd, tmp_path / "dp.pt")
    r = filter_state_dict(str(tmp_path / "dp.pt"), _New(), renames=[r"^encoder\.=backbone.", r"^fc\.=classifier."])
    assert [(k.source_name, k.name) for k in r.kept] == [
        ("module.encoder.weight", "backbone.weight"), ("module.encoder.bias", "backbone.bias"),
        ("module.fc.weight", "classifier.weight"), ("module.fc.bias", "classifier.bias")]
    assert r.dropped_unexpected == () and r.missing == ()


def test_filter_state_dict_dtype_cast(tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    torch.save({k: v.half() for k, v in m.state_dict().items()}, tmp_path / "h.pt")
    r = filter_state_dict(str(tmp_path / "h.pt"), nn.Linear(4, 3))
    assert [(k.name, k.source_dtype, k.dtype) for k in r.cast] == [("weight", "float16", "float32"),
                                                                   ("bias", "float16", "float32")]
    assert r.to_dict()["cast"] == [{"name": "weight", "from": "float16", "to": "float32"},
                                   {"name": "bias", "from": "float16", "to": "float32"}]
    assert r.to_dict()["kept"][0]["cast_from"] == "float16"


def test_filter_state_dict_bad_targets(make):
    with pytest.raises(UsageError, match="cannot use a int as a filter target"):
        filter_state_dict(make("state_dict.pt"), 42)
    with pytest.raises(UsageError, match="has no tensors"):
        filter_state_dict(make("state_dict.pt"), nn.ReLU())
    with pytest.raises(FileAccessError):
        filter_state_dict(make("state_dict.pt"), "/nonexistent/target.pt")


FORMATS = ["state_dict.pt", "seed_checkpoint.tar", "legacy.pt", "legacy_full_model.pt", "gpu_tagged.pt",
           "gpu_tagged_legacy.pt", "full_model.pth", "torchscript.pt", "model.safetensors", "sharded_safetensors",
           "sharded_bin"]


@pytest.mark.parametrize("name", FORMATS)
def test_filter_state_dict_reads_no_tensor_data(name, make, committed, monkeypatch):
    path = committed(name) if name in ("gpu_tagged.pt", "gpu_tagged_legacy.pt") else make(name)
    target = make("model.safetensors")

    def no_reads(self, *a, **k):
        raise AssertionError(f"tensor data read from {self.path}")

    monkeypatch.setattr(records.FileSpan, "read", no_reads)
    r = filter_state_dict(path, ClassNet(num_classes=3))
    assert {d.name for d in r.dropped_shape_mismatch} == {"fc.weight", "fc.bias"}
    assert len(r.kept) >= 16
    r = filter_state_dict(path, target)  # a checkpoint as target: no data read from it either
    assert len(r.kept) >= 16


# --- load_into -------------------------------------------------------------------------------------

def test_load_into_a_real_model(r18):
    path, sd = r18
    torch.manual_seed(5)
    model = torchvision.models.resnet18(weights=None, num_classes=120)
    fc_before = model.fc.weight.detach().clone()
    r = load_into(model, path)
    assert r.missing == ("fc.weight", "fc.bias")
    assert r.verified == {"load_into_model": {"ok": True, "how": "load_state_dict(strict=False)",
                                              "missing_keys": 2, "unexpected_keys": 0}}
    got = model.state_dict()
    for k in r.kept:
        assert torch.equal(got[k.name], sd[k.source_name]), k.name
    assert torch.equal(model.fc.weight, fc_before)  # keeps its fresh initialization


def test_load_into_from_data_parallel_checkpoint(r18_dp):
    path, sd = r18_dp
    model = torchvision.models.resnet18(weights=None)
    r = load_into(model, path)
    assert r.prefix_alignment == Alignment("module.", "")
    assert r.missing == ()
    for name, t in model.state_dict().items():
        assert torch.equal(t, sd["module." + name]), name


def test_load_into_a_data_parallel_model(r18):
    path, sd = r18
    model = nn.DataParallel(torchvision.models.resnet18(weights=None))
    r = load_into(model, path)
    assert r.prefix_alignment == Alignment("", "module.")
    assert torch.equal(model.module.conv1.weight, sd["conv1.weight"])


def test_load_into_a_meta_model(r18):
    path, sd = r18
    model = meta_resnet18(num_classes=120)
    r = load_into(model, path)
    assert r.missing == ("fc.weight", "fc.bias")
    assert model.conv1.weight.device.type == "cpu"
    assert isinstance(model.conv1.weight, nn.Parameter) and model.conv1.weight.requires_grad
    assert model.fc.weight.device.type == "meta"  # not provided: left for the user to initialize
    got = model.state_dict()
    for k in r.kept:
        assert got[k.name].device.type == "cpu"
        assert torch.equal(got[k.name], sd[k.name]), k.name


def test_load_into_explicit_device(r18):
    path, sd = r18
    model = meta_resnet18()
    load_into(model, path, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


def test_load_into_casts_to_the_models_dtype(tmp_path):
    torch.manual_seed(0)
    src = nn.Linear(8, 4).half()
    torch.save(src.state_dict(), tmp_path / "h.pt")
    model = nn.Linear(8, 4)
    r = load_into(model, str(tmp_path / "h.pt"))
    assert {k.name for k in r.cast} == {"weight", "bias"}
    assert model.weight.dtype == torch.float32
    assert torch.equal(model.weight, src.weight.float())


def test_load_into_with_key_and_renames(committed, tmp_path):
    sd = torch.load(committed("seed_checkpoint.tar"), weights_only=False)["model_state_dict"]
    model = ClassNet()
    r = load_into(model, committed("seed_checkpoint.tar"), key="model_state_dict")
    assert r.source_entry == "model_state_dict" and len(r.kept) == 19
    assert torch.equal(model.stem.weight, sd["stem.weight"])
    torch.save({k.replace("stem.", "first."): v for k, v in sd.items()}, tmp_path / "renamed.pt")
    model = ClassNet()
    r = load_into(model, str(tmp_path / "renamed.pt"), renames=[r"^first\.=stem."])
    assert r.missing == () and torch.equal(model.stem.bias, sd["stem.bias"])


def test_load_into_keeps_tied_weights_tied(make):
    sd = torch.load(make("state_dict.pt"), weights_only=True)
    model = ClassNet()
    load_into(model, make("state_dict.pt"))
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, sd["embed.weight"])


def test_load_into_a_meta_model_keeps_tied_weights_tied(make):
    """ClassNet ties head.weight to embed.weight; loading into its meta-device build must keep them one Parameter."""
    sd = torch.load(make("state_dict.pt"), weights_only=True)
    with torch.device("meta"):
        model = ClassNet()
    assert model.head.weight is model.embed.weight
    load_into(model, make("state_dict.pt"))
    assert torch.equal(model.embed.weight, sd["embed.weight"])
    assert torch.equal(model.head.weight, sd["head.weight"])
    # One Parameter, as in a CPU-built ClassNet (11 parameters), not two that merely share bytes.
    n_params = len(list(model.parameters()))
    assert n_params == 11, f"{n_params} parameters after load_into: head.weight and embed.weight were untied"
    assert id(model.head.weight) == id(model.embed.weight), "head.weight is no longer tied to embed.weight"


def test_load_into_reports_check_failure_as_check_failed(make, monkeypatch):
    # A module whose load_state_dict reports an unexpected key: the report and the load disagree.
    model = ClassNet()
    real = model.load_state_dict

    def lying(sd, strict=True, assign=False):
        out = real(sd, strict=strict, assign=assign)
        return type(out)(out.missing_keys, ["ghost"])

    monkeypatch.setattr(model, "load_state_dict", lying)
    with pytest.raises(CheckFailedError) as e:
        load_into(model, make("state_dict.pt"))
    assert e.value.exit_code == 1


# --- filter_checkpoint (the library behind `ckpttool filter`) ---------------------------------------

def test_filter_checkpoint_writes_and_verifies(r18, tmp_path):
    path, sd = r18
    out = tmp_path / "fit.pt"
    r = filter_checkpoint(path, str(out), model="torchvision.models:resnet18", model_args=["num_classes=10"])
    assert r.output == str(out) and r.output_format == "torch"
    assert r.verified["read_back"] == {"ok": True, "how": "torch.load(weights_only=True)", "tensors": len(sd) - 2,
                                       "bytes_compared": len(sd) - 2}
    assert r.verified["load_into_model"]["ok"] is True
    assert r.verified["load_into_model"]["missing_keys"] == 2
    got = torch.load(out, weights_only=True)
    assert list(got) == [k for k in sd if not k.startswith("fc.")]
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    assert listing(tmp_path) == {"fit.pt"}


def test_filter_checkpoint_to_safetensors_with_target(r18, tmp_path):
    path, sd = r18
    target = tmp_path / "target.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=7).state_dict(), target)
    out = tmp_path / "fit.safetensors"
    r = filter_checkpoint(path, str(out), target=str(target))
    assert r.output_format == "safetensors"
    assert set(r.verified) == {"read_back"}
    assert r.verified["read_back"]["how"] == "safetensors.torch.load_file"
    got = load_file(out)
    assert len(got) == len(sd) - 2
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k


def test_filter_checkpoint_needs_exactly_one_target(r18, tmp_path):
    path, _ = r18
    with pytest.raises(UsageError, match="give the target as --model SPEC or --target PATH"):
        filter_checkpoint(path, str(tmp_path / "o.pt"))
    with pytest.raises(UsageError, match="give the target as --model SPEC or --target PATH"):
        filter_checkpoint(path, str(tmp_path / "o.pt"), model="torchvision.models:resnet18", target=path)
    assert listing(tmp_path) == set()


def test_filter_checkpoint_nothing_kept_writes_nothing(make, tmp_path):
    with pytest.raises(UsageError) as e:
        filter_checkpoint(make("state_dict.pt"), str(tmp_path / "o.pt"), model="torchvision.models:resnet18")
    assert "no tensor of the source fits the target" in str(e.value) and "nothing written" in str(e.value)
    assert listing(tmp_path) == set()


def test_filter_checkpoint_failing_check_leaves_nothing(r18, tmp_path, monkeypatch):
    path, _ = r18
    import ckpttool.filtering as filtering
    monkeypatch.setattr(filtering, "_bits_equal", lambda want, got, dtype: False)
    with pytest.raises(CheckFailedError, match="reads back different from what was written"):
        filter_checkpoint(path, str(tmp_path / "o.pt"), target=path)
    assert listing(tmp_path) == set()


# --- modelspec ---------------------------------------------------------------------------------------

def test_parse_args_literals_and_strings():
    assert parse_args(["num_classes=120", "weights=None", "act=relu", "k=(5, 5)", "flag=True", "lr=1e-3",
                       "n=-2", "names=['a', 'b']", "d={'x': 1}", "s='quoted'", "empty=", "expr=1+x",
                       "eq='a=b'", " spaced =7"]) == {
        "num_classes": 120, "weights": None, "act": "relu", "k": (5, 5), "flag": True, "lr": 1e-3, "n": -2,
        "names": ["a", "b"], "d": {"x": 1}, "s": "quoted", "empty": "", "expr": "1+x", "eq": "a=b", "spaced": 7}
    assert parse_args([]) == {}
    assert parse_args(["a=1", "a=2"]) == {"a": 2}


@pytest.mark.parametrize("item", ["num_classes", "=3", "1x=3", "a-b=3", "a.b=1"])
def test_parse_args_errors(item):
    with pytest.raises(UsageError) as e:
        parse_args([item])
    assert str(e.value) == f"--arg {item!r} is not NAME=VALUE"


def test_resolve_module_and_file(tmp_path):
    assert resolve("torchvision.models:resnet18") is torchvision.models.resnet18
    assert resolve("mypkg:ClassNet") is ClassNet
    f = write_py(tmp_path, "nets.py", "import torch.nn as nn\nclass Net(nn.Linear):\n    pass\n")
    assert resolve(f + ":Net").__name__ == "Net"


@pytest.mark.parametrize("spec", ["torchvision.models", "torchvision.models:", ":resnet18", ""])
def test_resolve_bad_spec_forms(spec):
    with pytest.raises(UsageError) as e:
        resolve(spec)
    assert str(e.value) == f"--model {spec!r} is not MODULE:NAME or FILE.py:NAME"
    assert e.value.hint == "e.g. --model torchvision.models:resnet50 or --model nets/mine.py:ClassNet"


def test_resolve_errors(tmp_path):
    with pytest.raises(UsageError, match=r"cannot import no_such_module_xyz"):
        resolve("no_such_module_xyz:Net")
    with pytest.raises(UsageError) as e:
        resolve("torchvision.models:no_such_net")
    assert str(e.value) == "--model 'torchvision.models:no_such_net': torchvision.models has no no_such_net"
    with pytest.raises(UsageError, match="is not a class or function"):
        resolve("torchvision:__version__")
    missing = str(tmp_path / "missing.py")
    with pytest.raises(FileAccessError) as e:
        resolve(missing + ":Net")
    assert str(e.value) == f"model file not found ({missing})"
    bad = write_py(tmp_path, "broken.py", "raise RuntimeError('no GPU here')\n")
    with pytest.raises(UsageError) as e:
        resolve(bad + ":Net")
    assert str(e.value) == f"importing the model file failed: RuntimeError: no GPU here ({bad})"


def test_model_file_imports_its_neighbours_and_restores_sys_path(tmp_path):
    write_py(tmp_path, "blocks_helper_xyz.py", "import torch.nn as nn\ndef block():\n    return nn.Linear(3, 3)\n")
    f = write_py(tmp_path, "netfile.py", "import torch.nn as nn\nfrom blocks_helper_xyz import block\n"
                                         "def factory():\n    return nn.Sequential(block())\n")
    before = list(sys.path)
    model, dev = build_model(f + ":factory")
    assert isinstance(model, nn.Sequential) and model[0].weight.shape == (3, 3)
    assert sys.path == before
    sys.modules.pop("blocks_helper_xyz", None)


def test_build_model_on_meta():
    model, dev = build_model("torchvision.models:resnet18", ["num_classes=10"])
    assert dev == "meta"
    assert model.fc.weight.shape == (10, 512)
    assert all(p.device.type == "meta" for p in model.parameters())
    model, dev = build_model("torchvision.models:resnet18", device="cpu")
    assert dev == "cpu" and model.conv1.weight.device.type == "cpu"


def test_build_model_falls_back_to_cpu(tmp_path):
    f = write_py(tmp_path, "needs_data.py",
                 "import torch, torch.nn as nn\n"
                 "def factory(n=4):\n"
                 "    m = nn.Linear(n, n)\n"
                 "    float(m.weight.detach().sum())  # reads a value: impossible on meta\n"
                 "    return m\n")
    model, dev = build_model(f + ":factory", ["n=6"])
    assert dev == "cpu" and model.weight.shape == (6, 6) and model.weight.device.type == "cpu"


def test_build_model_errors(tmp_path):
    f = write_py(tmp_path, "factories.py",
                 "import torch.nn as nn\n"
                 "def raising(**kw):\n    raise ValueError('depth must be 18 or 50')\n"
                 "def not_a_module():\n    return {'weight': 1}\n")
    with pytest.raises(UsageError) as e:
        build_model(f + ":raising")
    assert str(e.value) == f"--model {f + ':raising'!r} failed to build: ValueError: depth must be 18 or 50"
    with pytest.raises(UsageError) as e:
        build_model(f + ":not_a_module")
    assert str(e.value) == f"--model {f + ':not_a_module'!r} made a dict, not a torch.nn.Module"
    with pytest.raises(UsageError, match="failed to build: TypeError"):
        build_model("torchvision.models:resnet18", ["no_such_kwarg=1"])


# --- writing: check_output, atomic_output, output_format -------------------------

def test_check_output_basics(tmp_path, monkeypatch):
    out = tmp_path / "o.pt"
    assert check_output(str(out), []) == str(out)
    monkeypatch.chdir(tmp_path)
    assert check_output("o.pt", []) == str(out)
    assert check_output("./sub/../o.pt", []) == str(out)
    with pytest.raises(UsageError, match="output is a folder"):
        check_output(str(tmp_path), [])
    with pytest.raises(FileAccessError) as e:
        check_output(str(tmp_path / "nope" / "o.pt"), [])
    assert str(e.value) == f"output folder does not exist ({tmp_path / 'nope' / 'o.pt'})"
    out.write_bytes(b"old")
    with pytest.raises(UsageError) as e:
        check_output(str(out), [])
    assert str(e.value) == f"output exists ({out})" and e.value.hint == "pass --force to replace it"
    assert check_output(str(out), [], force=True) == str(out)


def test_check_output_refuses_every_spelling_of_an_input(tmp_path):
    src = tmp_path / "x" / "src.pt"
    src.parent.mkdir()
    src.write_bytes(b"source bytes")
    (tmp_path / "link.pt").symlink_to(src)
    os.link(src, tmp_path / "hard.pt")
    spellings = [str(src), str(tmp_path / "x" / ".." / "x" / "src.pt"), str(tmp_path / "link.pt"),
                 str(tmp_path / "hard.pt")]
    for out in spellings:
        for inp in spellings:
            with pytest.raises(UsageError, match="output is one of the inputs; refusing to write over it"):
                check_output(out, [inp], force=True)
    assert src.read_bytes() == b"source bytes"


def test_atomic_output_success_and_failure(tmp_path):
    out = tmp_path / "o.bin"
    with atomic_output(str(out)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(out)
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert not out.exists()
    assert out.read_bytes() == b"new" and listing(tmp_path) == {"o.bin"}
    with pytest.raises(RuntimeError):
        with atomic_output(str(out)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")
    assert out.read_bytes() == b"new" and listing(tmp_path) == {"o.bin"}
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(str(tmp_path / "p.bin")) as tmp:
            raise KeyboardInterrupt
    assert listing(tmp_path) == {"o.bin"}


@pytest.mark.parametrize("path, to, fmt", [
    ("o.pt", None, "torch"), ("o.pth", None, "torch"), ("o.bin", None, "torch"), ("o.ckpt", None, "torch"),
    ("o.tar", None, "torch"), ("O.PT", None, "torch"), ("o.safetensors", None, "safetensors"),
    ("o.weights", "pt", "torch"), ("o", "state_dict", "torch"), ("o.data", "safetensors", "safetensors"),
    ("o.bin", "safetensors", "safetensors"),
])
def test_output_format(path, to, fmt):
    assert output_format(path, to) == fmt


def test_output_format_errors():
    with pytest.raises(UsageError) as e:
        output_format("/a/b/out.weights")
    assert str(e.value) == "cannot tell the output format from 'out.weights'"
    assert e.value.hint == "name it .pt/.pth/.bin or .safetensors, or pass --to"
    with pytest.raises(UsageError, match="unknown output format 'onnx'"):
        output_format("o.pt", "onnx")
    with pytest.raises(UsageError, match="--to safetensors writes safetensors, but 'o.pt' is named for state_dict"):
        output_format("o.pt", "safetensors")  # a safetensors file named .pt misleads whoever loads it


# --- filter writes with convert's streaming writers (issue 18) ----------------------------------------

def _by_hand(src, target):
    """The recipe done by hand with torch: each target name the source has with the target's shape, cast to the
    target's dtype."""
    return {n: src[n].to(t.dtype) for n, t in target.items() if n in src and src[n].shape == t.shape}


def _read(out, fmt):
    """OUT by torch's / safetensors' own loader (a folder of shards: every shard); a tie safetensors stores once
    given back from the header, as load_model does."""
    from safetensors import safe_open
    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith((".bin", ".safetensors"))) \
        if os.path.isdir(out) else [str(out)]
    got = {}
    for f in files:
        if fmt == "torch":
            part = torch.load(f, weights_only=True)
            assert type(part) is dict  # a plain dict of plain tensors, as torch.save(dict) wrote it
            got.update(part)
        else:
            got.update(load_file(f))
            with safe_open(f, "pt") as h:
                for name, kept in (h.metadata() or {}).items():
                    if name != "format" and name not in got and kept in got:
                        got[name] = got[kept]
    return got


def _assert_same(got, want, ordered=True):
    assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want))
    for name, w in want.items():
        g = got[name]
        assert type(g) is torch.Tensor and not g.requires_grad and g.device.type == "cpu", name
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name  # every bit


def _source_sd(name, path):
    if name == "legacy.pt":
        return torch.load(path, weights_only=True)["state_dict"]
    if name == "gpu_tagged.pt":
        return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    if name == "seed_checkpoint.tar":  # it pickles the model too (a committed fixture of our own)
        return torch.load(path, weights_only=False)["model_state_dict"]
    if name == "model.safetensors":
        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("out_name, fmt", [("o.pt", "torch"), ("o.safetensors", "safetensors")])
@pytest.mark.parametrize("name", ["state_dict.pt", "legacy.pt", "model.safetensors", "gpu_tagged.pt",
                                  "seed_checkpoint.tar"])
def test_filter_output_is_torchs_own_load_filtered_by_hand(name, out_name, fmt, make, committed, tmp_path):
    path = committed(name) if name in ("gpu_tagged.pt", "seed_checkpoint.tar") else make(name)
    src = _source_sd(name, path)
    target = ClassNet(num_classes=3).state_dict()
    out = tmp_path / out_name
    r = filter_checkpoint(path, str(out), model="mypkg:ClassNet", model_args=["num_classes=3"])
    want = _by_hand(src, target)
    assert [k.name for k in r.kept] == list(want)
    _assert_same(_read(out, fmt), want, ordered=fmt == "torch")
    if "head.weight" in want:  # tied in the source (seed_checkpoint.tar) or by the model: tied in the output
        if fmt == "torch":
            got = torch.load(out, weights_only=True)
            assert got["head.weight"].untyped_storage().data_ptr() == got["embed.weight"].untyped_storage().data_ptr()
        else:
            from safetensors import safe_open
            with safe_open(str(out), "pt") as h:
                assert "head.weight" not in h.keys() and h.metadata()["head.weight"] == "embed.weight"
    assert listing(tmp_path) == {out_name}


@pytest.mark.parametrize("out_name", ["o.pt", "o.safetensors"])
def test_filter_casts_a_float64_source_to_the_float32_target_as_it_streams(out_name, tmp_path):
    torch.manual_seed(0)
    src = {k: v.double() if v.is_floating_point() else v for k, v in ClassNet().state_dict().items()}
    torch.save(src, tmp_path / "f64.pt")
    out = tmp_path / out_name
    r = filter_checkpoint(str(tmp_path / "f64.pt"), str(out), model="mypkg:ClassNet")
    want = _by_hand(src, ClassNet().state_dict())
    assert {k.name for k in r.cast} == {n for n, v in src.items() if v.is_floating_point()}
    got = _read(out, "torch" if out_name.endswith(".pt") else "safetensors")
    _assert_same(got, want, ordered=out_name.endswith(".pt"))
    assert got["stem.weight"].dtype == torch.float32 and got["blocks.0.bn.num_batches_tracked"].dtype == torch.int64


def test_filter_gives_each_tied_name_the_dtype_its_target_says(tmp_path):
    """Two names over one source storage, two dtypes in the target: each gets its own (one storage was cast
    once, for both, before); names of one dtype stay tied."""
    w = torch.randn(4, 4)
    torch.save({"e": w, "h": w, "g": w}, tmp_path / "s.pt")
    torch.save({"e": torch.zeros(4, 4, dtype=torch.float64), "h": torch.zeros(4, 4, dtype=torch.float16),
                "g": torch.zeros(4, 4, dtype=torch.float64)}, tmp_path / "t.pt")
    want = {"e": w.double(), "h": w.half(), "g": w.double()}
    for out_name, fmt in (("o.pt", "torch"), ("o.safetensors", "safetensors")):
        filter_checkpoint(str(tmp_path / "s.pt"), str(tmp_path / out_name), target=str(tmp_path / "t.pt"))
        got = _read(tmp_path / out_name, fmt)
        _assert_same(got, want, ordered=fmt == "torch")
        assert got["e"].untyped_storage().data_ptr() == got["g"].untyped_storage().data_ptr()


@pytest.mark.parametrize("to, fmt", [("pt", "torch"), ("safetensors", "safetensors")])
def test_filter_sharded_output_is_torchs_own_load_filtered_by_hand(to, fmt, committed, tmp_path):
    path = committed("seed_checkpoint.tar")
    src = _source_sd("seed_checkpoint.tar", path)
    out = tmp_path / "fit"
    r = filter_checkpoint(path, str(out), model="mypkg:ClassNet", model_args=["num_classes=3"], to=to,
                          max_shard_size="1KB")
    assert r.output_format == f"{fmt}_sharded"
    assert len([f for f in os.listdir(out) if not f.endswith(".json")]) > 1
    _assert_same(_read(out, fmt), _by_hand(src, ClassNet(num_classes=3).state_dict()), ordered=False)
    if fmt == "safetensors":  # the tie stored once, as convert writes it, not twice
        import json
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert "head.weight" not in index["weight_map"] and "embed.weight" in index["weight_map"]


def test_filter_streams_the_kept_tensors_never_materializing_them(make, tmp_path, monkeypatch):
    """The kept tensors go from the source file to the output a chunk at a time: never a torch tensor of
    the whole state_dict (TensorRef.to_torch), never torch.save or safetensors' save_file."""
    import safetensors.torch
    path = make("state_dict.pt")
    src = torch.load(path, weights_only=True)

    def refused(*a, **k):
        raise AssertionError("filter materialized what it should stream")

    monkeypatch.setattr(records.TensorRef, "to_torch", refused)
    monkeypatch.setattr(torch, "save", refused)
    monkeypatch.setattr(safetensors.torch, "save_file", refused)
    for out_name, fmt in (("o.pt", "torch"), ("o.safetensors", "safetensors")):
        seen = []
        filter_checkpoint(path, str(tmp_path / out_name), target=path, progress=lambda done, total:
                          seen.append((done, total)))
        _assert_same(_read(tmp_path / out_name, fmt), src, ordered=fmt == "torch")
        done = [d for d, _ in seen]  # bytes written so far, of the bytes to write
        assert done == sorted(done) and seen[-1][0] == seen[-1][1] == sum(v.nbytes for v in src.values()) \
            - src["head.weight"].nbytes  # the tie (head.weight is embed.weight) is written once
    # --complete: only the filled tensors (the model's fresh ones, which have no file) are in memory
    r = filter_checkpoint(path, str(tmp_path / "full.pt"), model="mypkg:ClassNet", model_args=["num_classes=3"],
                          complete=True)
    assert r.filled == ("fc.weight", "fc.bias")
    got = _read(tmp_path / "full.pt", "torch")
    torch.manual_seed(0)
    fresh = ClassNet(num_classes=3)
    assert torch.equal(got["fc.weight"], fresh.fc.weight) and torch.equal(got["stem.weight"], src["stem.weight"])


def test_filter_keeps_views_of_a_kept_storage_and_drops_the_bytes_of_dropped_ones(tmp_path):
    """A storage a kept tensor covers is written once, its views over it (as torch.save and convert write it);
    a storage only partly kept gives each kept view just its bytes: nothing dropped is in the output."""
    base = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    secret = torch.full((1000,), 7.0)
    shared = torch.cat([torch.arange(6, dtype=torch.float32), secret])
    torch.save({"whole": base, "top": base[:5], "t": base.t(), "part": shared[:6], "dropped": shared[6:]},
               tmp_path / "s.pt")
    torch.save({"whole": torch.zeros(10, 6), "top": torch.zeros(5, 6), "t": torch.zeros(6, 10),
                "part": torch.zeros(6)}, tmp_path / "t.pt")
    out = tmp_path / "o.pt"
    r = filter_checkpoint(str(tmp_path / "s.pt"), str(out), target=str(tmp_path / "t.pt"))
    assert r.dropped_unexpected == ("dropped",)
    got = torch.load(out, weights_only=True)
    _assert_same(got, {"whole": base, "top": base[:5], "t": base.t(), "part": shared[:6]})
    assert got["top"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr() \
        == got["t"].untyped_storage().data_ptr()
    assert got["part"].untyped_storage().nbytes() == 6 * 4
    assert os.path.getsize(out) < 4000  # the 4000 bytes of the dropped tensor are not in it


def test_filter_read_back_catches_a_byte_the_writer_got_wrong(make, tmp_path, monkeypatch):
    """The check compares every byte of the written file with the source's: one flipped byte in a storage
    record fails it, and nothing is left."""
    import zipfile
    import ckpttool.filtering as filtering
    real = filtering.write_torch_zip

    def flipping(path, root, *a, **k):
        real(path, root, *a, **k)
        with zipfile.ZipFile(path) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data/3"))
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        with open(path, "r+b") as f:
            f.seek(start + 2)
            b = f.read(1)
            f.seek(start + 2)
            f.write(bytes([b[0] ^ 0x40]))

    monkeypatch.setattr(filtering, "write_torch_zip", flipping)
    with pytest.raises(CheckFailedError, match=r"tensor \S+ reads back different from what was written"):
        filter_checkpoint(make("state_dict.pt"), str(tmp_path / "o.pt"), target=make("state_dict.pt"))
    assert listing(tmp_path) == set()
