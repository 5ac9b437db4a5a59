"""``ckpttool.convert``: every source format to every target, checked by loading the outputs with torch,
safetensors and onnxruntime themselves (bit for bit where the bytes are copied)."""
from __future__ import annotations

import collections
import importlib
import json
import os
import re
import sys
import uuid

import pytest
import torch
from fulldisk import simulate_full_disk

from clitools import files_in

from ckpttool.converting import convert  # the module's own function: see test_public_api_*
from ckpttool.errors import CkptError, TrustRequiredError, UsageError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# ---------------------------------------------------------------------------------------------
# helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes (C order): NaNs and -0.0 compare exactly."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def assert_tensor_equal(got: torch.Tensor, want: torch.Tensor, name: str, stride: bool = True) -> None:
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (name, got.shape, want.shape)
    if stride:
        assert got.stride() == want.stride(), (name, got.stride(), want.stride())
        assert got.storage_offset() == want.storage_offset(), name
    assert torch.equal(bits(got), bits(want)), f"{name}: bytes differ"


def sharing(sd) -> list:
    """Groups of names whose tensors share one storage (as torch.load rebuilds them)."""
    groups = collections.defaultdict(list)
    for name, t in sd.items():
        if t.numel():
            groups[t.untyped_storage().data_ptr()].append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def tied_twin(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset() and a.dtype == b.dtype)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def assert_pt_output(out: str, want, ordered: bool = True) -> dict:
    """OUT is a torch zip loadable with weights_only=True, equal to ``want`` key for key, bit for bit."""
    got = torch.load(out, weights_only=True)
    assert isinstance(got, dict)
    if ordered:
        assert list(got) == list(want)
    else:
        assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert_tensor_equal(got[name], t, name)
    assert sharing(got) == sharing(want)
    return got


def read_safetensors(files):
    """Every tensor and the merged metadata of one or more safetensors files, read by safetensors itself."""
    from safetensors import safe_open
    stored, meta, where = {}, {}, {}
    for f in files:
        with safe_open(f, "pt") as h:
            meta.update(h.metadata() or {})
            for k in h.keys():
                assert k not in stored, f"{k} stored twice"
                stored[k] = h.get_tensor(k)
                where[k] = os.path.basename(f)
    return stored, meta, where


def assert_safetensors_output(files, want) -> dict:
    """Each name of ``want`` is stored, or is a tied twin recorded in the metadata; values bit for bit."""
    stored, meta, _ = read_safetensors(files)
    assert set(stored) <= set(want)
    for name, t in want.items():
        if name in stored:
            got = stored[name]
        else:
            twin = meta.get(name)
            assert twin in stored, f"{name} neither stored nor recorded as tied"
            assert tied_twin(want[name], want[twin]), f"{name} dropped but not tied to {twin} in the source"
            got = stored[twin]
        assert_tensor_equal(got, t, name, stride=False)
    # exactly the duplicates are dropped: one stored tensor per group of tied twins
    twins = 0
    names = list(want)
    for i, a in enumerate(names):
        if any(tied_twin(want[a], want[b]) for b in names[:i]):
            twins += 1
    assert len(stored) == len(want) - twins
    return stored


def assert_shards_output(folder: str, want, max_bytes: int) -> None:
    listing = sorted(os.listdir(folder))
    assert "model.safetensors.index.json" in listing
    shards = [f for f in listing if f != "model.safetensors.index.json"]
    assert len(shards) >= 2, listing
    counts = set()
    for i, f in enumerate(shards):
        m = SHARD_NAME.match(f)
        assert m, f
        assert int(m.group(1)) == i + 1
        counts.add(int(m.group(2)))
    assert counts == {len(shards)}
    stored = assert_safetensors_output([os.path.join(folder, f) for f in shards], want)
    _, _, where = read_safetensors([os.path.join(folder, f) for f in shards])
    with open(os.path.join(folder, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in stored.values())
    assert index["weight_map"] == where  # complete, and each entry names the shard that holds it
    per_shard = collections.defaultdict(list)
    for k, f in where.items():
        per_shard[f].append(nbytes(stored[k]))
    for f, sizes in per_shard.items():
        assert sum(sizes) <= max_bytes or len(sizes) == 1, (f, sizes, max_bytes)


# ---------------------------------------------------------------------------------------------
# sources: (path, key, expected state_dict, key order known, ONNX recipe)


Source = collections.namedtuple("Source", "path key want ordered onnx")


def _classnet_ref(want):
    from mypkg import ClassNet
    model = ClassNet()
    report = model.load_state_dict(want, strict=False)
    assert not report.unexpected_keys and set(report.missing_keys) <= {"head.weight"}
    return model.eval()


def _resnet_ref(want):
    import torchvision
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(want)
    return model.eval()


CLASSNET_SPEC = dict(model="mypkg:ClassNet", input_shape=(1, 3, 8, 8))
TRUST_CLASSNET = dict(trust=True, import_path=(FIXTURES,), input_shape=(1, 3, 8, 8))


def _build_source(name: str, make, folder: str) -> Source:
    import torchvision
    from safetensors.torch import load_file
    if name == "resnet18_zip":
        torch.manual_seed(0)
        path = os.path.join(folder, "resnet18.pt")
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
        want = torch.load(path, weights_only=True)
        return Source(path, None, want, True, dict(model="torchvision.models:resnet18", input_shape=(1, 3, 32, 32),
                                                    ref=lambda: _resnet_ref(want)))
    if name == "legacy":
        path = make("legacy.pt")
        want = torch.load(path, weights_only=True)["state_dict"]
        return Source(path, None, want, True, dict(CLASSNET_SPEC, ref=lambda: _classnet_ref(want)))
    if name in ("ckpt_dict", "ckpt_dict_key"):
        path = os.path.join(folder, "train_ckpt.pt")
        if not os.path.exists(path):
            from mypkg import ClassNet
            torch.manual_seed(3)
            model = ClassNet()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            model(torch.randn(2, 3, 8, 8)).sum().backward()
            opt.step()
            torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                        "epoch": 4}, path)
        want = torch.load(path, weights_only=True)["model_state_dict"]
        key = "model_state_dict" if name == "ckpt_dict_key" else None
        return Source(path, key, want, True, dict(CLASSNET_SPEC, ref=lambda: _classnet_ref(want)))
    if name in ("full_model_classnet", "legacy_full_model"):
        path = make("full_model.pth" if name == "full_model_classnet" else "legacy_full_model.pt")
        model = torch.load(path, weights_only=False).eval()
        return Source(path, None, model.state_dict(), True, dict(TRUST_CLASSNET, ref=lambda: model))
    if name == "full_model_torchvision":
        torch.manual_seed(1)
        model = torchvision.models.resnet18(weights=None).eval()
        path = os.path.join(folder, "resnet18_full.pth")
        torch.save(model, path)
        return Source(path, None, model.state_dict(), True,
                      dict(trust=True, input_shape=(1, 3, 32, 32), ref=lambda: model))
    if name == "torchscript":
        path = make("torchscript.pt")
        model = torch.jit.load(path)
        return Source(path, None, model.state_dict(), True,  # only the TorchScript-based exporter takes it
                      dict(trust=True, legacy_exporter=True, input_shape=(1, 3, 8, 8), ref=lambda: model))
    if name == "safetensors":
        path = make("model.safetensors")
        want = load_file(path)
        return Source(path, None, want, False, dict(CLASSNET_SPEC, ref=lambda: _classnet_ref(want)))
    if name == "sharded_safetensors":
        path = make("sharded_safetensors")
        want = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                want.update(load_file(os.path.join(path, f)))
        return Source(path, None, want, False, dict(CLASSNET_SPEC, ref=lambda: _classnet_ref(want)))
    if name in ("gpu_tagged_zip", "gpu_tagged_legacy"):
        path = make("gpu_tagged.pt" if name == "gpu_tagged_zip" else "gpu_tagged_legacy.pt")
        want = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
        return Source(path, None, want, True, dict(CLASSNET_SPEC, ref=lambda: _classnet_ref(want)))
    raise KeyError(name)


SOURCES = ["resnet18_zip", "legacy", "ckpt_dict", "ckpt_dict_key", "full_model_classnet", "legacy_full_model",
           "full_model_torchvision", "torchscript", "safetensors", "sharded_safetensors", "gpu_tagged_zip",
           "gpu_tagged_legacy"]


@pytest.fixture(scope="session")
def source_of(make, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("convert_sources"))
    made = {}

    def get(name: str) -> Source:
        if name not in made:
            made[name] = _build_source(name, make, folder)
        return made[name]
    return get


# ---------------------------------------------------------------------------------------------
# every source x every target


@pytest.mark.parametrize("name", SOURCES)
def test_to_torch_state_dict(source_of, tmp_path, name):
    src = source_of(name)
    out = tmp_path / "out.pt"
    r = convert(src.path, str(out), key=src.key)
    assert r.output == str(out) and r.format == "torch_zip" and r.tensors == len(src.want)
    assert r.files == (str(out),) and r.bytes_written == os.path.getsize(out)
    assert r.checked["ok"]
    assert_pt_output(str(out), src.want, src.ordered)
    assert files_in(tmp_path) == {"out.pt"}


@pytest.mark.parametrize("name", SOURCES)
def test_to_safetensors(source_of, tmp_path, name):
    src = source_of(name)
    out = tmp_path / "out.safetensors"
    r = convert(src.path, str(out), key=src.key)
    assert r.format == "safetensors" and r.output == str(out)
    stored = assert_safetensors_output([str(out)], src.want)
    assert r.tensors == len(stored)
    assert dict(r.tied) == {k: v for k, v in read_safetensors([str(out)])[1].items() if k in src.want}
    assert files_in(tmp_path) == {"out.safetensors"}


@pytest.mark.parametrize("name", SOURCES)
def test_to_sharded_safetensors(source_of, tmp_path, name):
    src = source_of(name)
    total = sum(nbytes(t) for t in src.want.values())
    max_bytes = total // 3
    out = tmp_path / "hf"
    r = convert(src.path, str(out), to="safetensors", key=src.key, max_shard_size=str(max_bytes))
    assert r.format == "safetensors_sharded" and r.output == str(out)
    assert sorted(r.files) == sorted(str(out / f) for f in os.listdir(out))
    assert_shards_output(str(out), src.want, max_bytes)
    assert files_in(tmp_path) == {"hf"}


@pytest.mark.parametrize("name", SOURCES)
def test_to_onnx(source_of, tmp_path, name):
    import onnxruntime as ort
    src = source_of(name)
    recipe = dict(src.onnx)
    shape = recipe.pop("input_shape")
    ref = recipe.pop("ref")()
    out = tmp_path / "model.onnx"
    r = convert(src.path, str(out), key=src.key, input_shapes=["x".join(map(str, shape))], **recipe)
    assert r.format == "onnx" and r.output == str(out) and r.checked["ok"]
    import onnx
    onnx.checker.check_model(str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(42))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = ref(x)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=1e-3)
    assert files_in(tmp_path) == {"model.onnx"}


def test_onnx_from_ckpttool_own_safetensors_output(make, tmp_path):
    """The tie convert recorded in the header (head.weight = embed.weight) is the model's own tie: it fits."""
    import onnxruntime as ort
    path = make("full_model.pth")
    convert(path, str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "m.onnx")
    convert(str(tmp_path / "m.safetensors"), out, model="mypkg:ClassNet", input_shapes=["1x3x8x8"])
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))[:1]
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = torch.load(path, weights_only=False).eval()(x)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_file_written_with_another_pickle_protocol(tmp_path, protocol):
    """torch.save(..., _use_new_zipfile_serialization=False, pickle_protocol=4) is a legacy torch file too."""
    sd = collections.OrderedDict((f"w{i}", torch.randn(3, 4, generator=torch.Generator().manual_seed(i)))
                                 for i in range(3))
    src = tmp_path / "legacy_p.pt"
    torch.save(sd, src, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    convert(str(src), str(tmp_path / "out.pt"), check=True)
    assert_pt_output(str(tmp_path / "out.pt"), torch.load(src, weights_only=False))


# ---------------------------------------------------------------------------------------------
# the entry of a checkpoint dict


def test_checkpoint_dict_reports_the_entry_and_ignores_the_optimizer(source_of, tmp_path):
    src = source_of("ckpt_dict")
    r = convert(src.path, str(tmp_path / "w.pt"))
    assert r.entry == "model_state_dict"
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    assert list(got) == list(src.want)  # nothing of optimizer_state_dict, no epoch
    r = convert(src.path, str(tmp_path / "w.safetensors"))
    stored, _, _ = read_safetensors([str(tmp_path / "w.safetensors")])
    assert set(stored) <= set(src.want)


def test_nested_key_picks_that_entry(tmp_path):
    a = {"w": torch.arange(4.0)}
    b = {"w": torch.arange(4.0) * 10}
    torch.save({"model_state_dict": a, "ema": {"state_dict": b}, "epoch": 1}, tmp_path / "c.pt")
    convert(str(tmp_path / "c.pt"), str(tmp_path / "ema.pt"), key="ema/state_dict")
    assert torch.equal(torch.load(tmp_path / "ema.pt", weights_only=True)["w"], b["w"])
    convert(str(tmp_path / "c.pt"), str(tmp_path / "main.pt"))
    assert torch.equal(torch.load(tmp_path / "main.pt", weights_only=True)["w"], a["w"])


def test_missing_key_is_an_error(source_of, tmp_path):
    src = source_of("ckpt_dict")
    with pytest.raises(CkptError) as e:
        convert(src.path, str(tmp_path / "w.pt"), key="nope")
    assert e.value.exit_code == 2 and "nope" in str(e.value)
    assert files_in(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# custom classes: ties, non-persistent buffers, BatchNorm counters


def test_full_model_tied_weights_stay_tied(make, tmp_path):
    from mypkg import ClassNet
    from safetensors.torch import load_model
    path = make("full_model.pth")
    model = torch.load(path, weights_only=False)
    assert model.head.weight is model.embed.weight

    convert(path, str(tmp_path / "sd.pt"))
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert sd["head.weight"].untyped_storage().data_ptr() == sd["embed.weight"].untyped_storage().data_ptr()
    fresh = ClassNet()
    fresh.load_state_dict(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    r = convert(path, str(tmp_path / "m.safetensors"))
    assert len(r.tied) == 1 and set(r.tied[0]) == {"head.weight", "embed.weight"}
    stored, meta, _ = read_safetensors([str(tmp_path / "m.safetensors")])
    dropped, kept = r.tied[0]
    assert dropped not in stored and meta[dropped] == kept
    fresh = ClassNet()
    missing, unexpected = load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    assert fresh.head.weight is fresh.embed.weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


NP_MODULE = '''
import torch
from torch import nn


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scratch", torch.full((3,), 7.0), persistent=False)
        self.register_buffer("kept", torch.arange(3.0))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("mask", torch.ones(3), persistent=False)
        self.register_buffer("unset", None)
        self.plist = nn.ParameterList([nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(3))])
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.lstm = nn.LSTM(3, 2)

    def forward(self, x):
        return self.bn(self.inner.lin(x)) * self.mask
'''


@pytest.fixture
def pickled_custom_model(tmp_path, monkeypatch):
    """torch.save(model) of a class in a throwaway module, which is then made unimportable."""
    import importlib
    modname = f"ckpt_np_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{modname}.py").write_text(NP_MODULE)
    monkeypatch.syspath_prepend(str(code_dir))
    mod = importlib.import_module(modname)
    torch.manual_seed(5)
    model = mod.Net()
    model.train()
    for _ in range(3):
        model(torch.randn(4, 4))
    path = tmp_path / "net.pth"
    torch.save(model, path)
    sys.modules.pop(modname)
    sys.path.remove(str(code_dir))
    os.remove(code_dir / f"{modname}.py")
    return str(path), model, modname


def test_full_model_non_persistent_buffers_excluded(pickled_custom_model, tmp_path):
    path, model, modname = pickled_custom_model
    want = model.state_dict()
    assert "mask" not in want and "inner.scratch" not in want and "inner.kept" in want
    convert(path, str(tmp_path / "sd.pt"))
    assert modname not in sys.modules  # its code never ran
    assert_pt_output(str(tmp_path / "sd.pt"), want)
    convert(path, str(tmp_path / "sd.safetensors"))
    assert_safetensors_output([str(tmp_path / "sd.safetensors")], want)


def test_batchnorm_counter_exact_and_not_cast(pickled_custom_model, tmp_path):
    path, model, _ = pickled_custom_model
    want = model.state_dict()
    assert want["bn.num_batches_tracked"].dtype == torch.int64 and int(want["bn.num_batches_tracked"]) == 3
    for ext in (".pt", ".safetensors"):
        out = str(tmp_path / f"half{ext}")
        r = convert(path, out, dtype="fp16")
        assert r.cast_to == "float16"
        if ext == ".pt":
            got = torch.load(out, weights_only=True)
        else:
            from safetensors.torch import load_file
            got = load_file(out)
        assert got["bn.num_batches_tracked"].dtype == torch.int64
        assert int(got["bn.num_batches_tracked"]) == 3
        for k, v in want.items():
            if v.is_floating_point():
                assert got[k].dtype == torch.float16, k
                assert torch.equal(bits(got[k]), bits(v.half())), k


# ---------------------------------------------------------------------------------------------
# dtypes


def _make_fixtures():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_ckpt_make_fixtures", os.path.join(FIXTURES, "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _all_dtypes():
    return _make_fixtures().all_dtypes_state_dict()


@pytest.mark.parametrize("fixture", ["all_dtypes.pt", "legacy_all_dtypes.pt", "all_dtypes.safetensors"])
def test_all_dtypes_to_pt_bit_exact(make, tmp_path, fixture):
    path = make(fixture)
    if fixture.endswith(".safetensors"):
        from safetensors.torch import load_file
        want, ordered = load_file(path), False
    else:
        want, ordered = torch.load(path, weights_only=True), True
    r = convert(path, str(tmp_path / "out.pt"), check=True)
    assert r.checked["bytes_compared"] == len(want)
    got = assert_pt_output(str(tmp_path / "out.pt"), want, ordered)
    if "f32_t" in got:  # the views still view f32
        ptr = got["f32"].untyped_storage().data_ptr()
        assert got["f32_t"].untyped_storage().data_ptr() == ptr
        assert got["f32_slice"].untyped_storage().data_ptr() == ptr


def _safetensors_holds(dtype: torch.dtype, tmp_path) -> bool:
    """Whether the installed safetensors.torch writes ``dtype`` and reads it back from a file (``load_file``,
    ``safe_open``: what users and transformers call; its bytes-only ``load`` lags behind for float8_e8m0fnu)."""
    from safetensors.torch import load_file, save_file
    probe = str(tmp_path / "probe.safetensors")
    try:
        save_file({"t": torch.zeros(2, dtype=torch.float32).to(dtype)}, probe)
        ok = load_file(probe)["t"].dtype == dtype
    except Exception:
        ok = False
    if os.path.exists(probe):
        os.remove(probe)
    return ok


@pytest.mark.parametrize("name", sorted(_all_dtypes()))
def test_each_dtype_to_safetensors_or_a_clear_refusal(tmp_path, name):
    from safetensors.torch import load_file
    t = _all_dtypes()[name]
    src = tmp_path / "one.pt"
    torch.save({name: t}, src)
    out = tmp_path / "one.safetensors"
    if _safetensors_holds(t.dtype, tmp_path):
        convert(str(src), str(out), check=True)
        got = load_file(str(out))
        assert list(got) == [name]
        assert_tensor_equal(got[name], t, name, stride=False)
    else:
        with pytest.raises(UsageError) as e:
            convert(str(src), str(out))
        assert str(t.dtype).replace("torch.", "") in str(e.value)
        assert files_in(tmp_path) == {"one.pt"}


DTYPE_CASES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _mixed_state_dict():
    torch.manual_seed(2)
    base = torch.randn(4, 6, dtype=torch.float64)
    sd = collections.OrderedDict([
        ("f64", base), ("f32", base.float()), ("f16", base.half()), ("bf16", base.bfloat16()),
        ("i64", torch.arange(6)), ("i32", torch.arange(6, dtype=torch.int32)), ("i8", torch.arange(-3, 3).to(torch.int8)),
        ("u8", torch.arange(6, dtype=torch.uint8)), ("bool", base > 0), ("c64", torch.complex(base.float(), base.float())),
    ])
    sd["f32_t"] = sd["f32"].t()
    return sd


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", sorted(DTYPE_CASES))
def test_dtype_casts_floating_tensors_only(tmp_path, dtype, ext):
    from safetensors.torch import load_file
    sd = _mixed_state_dict()
    torch.save(sd, tmp_path / "mixed.pt")
    out = str(tmp_path / f"cast{ext}")
    r = convert(str(tmp_path / "mixed.pt"), out, dtype=dtype, check=True)
    target = DTYPE_CASES[dtype]
    assert r.cast_to == str(target).replace("torch.", "")
    got = torch.load(out, weights_only=True) if ext == ".pt" else load_file(out)
    for k, v in sd.items():
        want = v.to(target) if v.is_floating_point() else v
        assert_tensor_equal(got[k], want.contiguous() if ext == ".safetensors" else want, k, stride=ext == ".pt")
    if ext == ".pt":  # the cast storage is still shared by the view
        assert got["f32_t"].untyped_storage().data_ptr() == got["f32"].untyped_storage().data_ptr()


def test_unknown_dtype_refused(source_of, tmp_path):
    with pytest.raises(UsageError):
        convert(source_of("legacy").path, str(tmp_path / "o.pt"), dtype="int8")
    assert files_in(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# views and non-contiguous tensors


def _views():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    own = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).t()
    return collections.OrderedDict([("x", base), ("t", base.t()), ("every_other", base[:, ::2]),
                                    ("rows", base[1:3]), ("col", base[:, 4]), ("alias", base), ("own_t", own)])


def test_views_to_pt_keep_values_strides_and_sharing(tmp_path):
    sd = _views()
    torch.save(sd, tmp_path / "views.pt")
    want = torch.load(tmp_path / "views.pt", weights_only=True)  # what torch.save itself shares
    convert(str(tmp_path / "views.pt"), str(tmp_path / "out.pt"), check=True)
    got = assert_pt_output(str(tmp_path / "out.pt"), want)
    assert sharing(got) == [["alias", "col", "every_other", "rows", "t", "x"]]


def test_views_to_safetensors_values_equal(tmp_path):
    from safetensors.torch import load_file
    sd = _views()
    torch.save(sd, tmp_path / "views.pt")
    r = convert(str(tmp_path / "views.pt"), str(tmp_path / "out.safetensors"), check=True)
    assert len(r.tied) == 1 and set(r.tied[0]) == {"alias", "x"}  # only the exact twin; views are stored
    assert_safetensors_output([str(tmp_path / "out.safetensors")], sd)
    got = load_file(str(tmp_path / "out.safetensors"))
    for k in ("t", "every_other", "rows", "col", "own_t"):
        assert torch.equal(got[k], sd[k]), k


# ---------------------------------------------------------------------------------------------
# metadata and shards


def test_metadata_goes_into_the_header(source_of, tmp_path):
    from safetensors import safe_open
    out = str(tmp_path / "m.safetensors")
    convert(source_of("ckpt_dict").path, out, metadata=["author=me", "license=mit", "eq=a=b"])
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["author"] == "me" and meta["license"] == "mit" and meta["eq"] == "a=b"
    assert meta["format"] == "pt"
    convert(source_of("ckpt_dict").path, str(tmp_path / "d.safetensors"), metadata={"k": "v"})
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert f.metadata()["k"] == "v"


def test_resnet18_shards_like_hf(source_of, tmp_path):
    src = source_of("resnet18_zip")
    out = tmp_path / "r18"
    r = convert(src.path, str(out), to="safetensors", max_shard_size="10MB", check=True)
    assert_shards_output(str(out), src.want, 10 ** 7)
    total = sum(nbytes(t) for t in src.want.values())
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) >= -(-total // 10 ** 7)
    assert r.tensors == len(src.want)


def test_one_tensor_bigger_than_the_shard_size_gets_its_own_shard(tmp_path):
    sd = {"small": torch.zeros(10), "big": torch.zeros(1000), "tail": torch.zeros(10)}
    torch.save(sd, tmp_path / "s.pt")
    convert(str(tmp_path / "s.pt"), str(tmp_path / "hf"), to="safetensors", max_shard_size="1KB")
    assert_shards_output(str(tmp_path / "hf"), sd, 1000)


def test_sharded_output_replaces_a_folder_only_with_force(source_of, tmp_path):
    src = source_of("legacy")
    out = tmp_path / "hf"
    convert(src.path, str(out), to="safetensors", max_shard_size="3KB")
    with pytest.raises(UsageError):
        convert(src.path, str(out), to="safetensors", max_shard_size="3KB")
    convert(src.path, str(out), to="safetensors", max_shard_size="4KB", force=True)
    assert_shards_output(str(out), src.want, 4000)
    assert files_in(tmp_path) == {"hf"}


# ---------------------------------------------------------------------------------------------
# refusals and safety


def test_refuses_to_write_over_its_input(source_of, tmp_path):
    src = source_of("legacy")
    before = open(src.path, "rb").read()
    with pytest.raises(UsageError, match="one of the inputs"):
        convert(src.path, src.path, force=True)
    link = tmp_path / "link.pt"
    os.symlink(src.path, link)
    with pytest.raises(UsageError, match="one of the inputs"):
        convert(src.path, str(link), force=True)
    hard = tmp_path / "hard.pt"
    os.link(src.path, hard)
    with pytest.raises(UsageError, match="one of the inputs"):
        convert(src.path, str(hard), force=True)
    assert open(src.path, "rb").read() == before


def test_refuses_existing_output_without_force(source_of, tmp_path):
    src = source_of("legacy")
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="output exists"):
        convert(src.path, str(out))
    assert out.read_bytes() == b"old"
    convert(src.path, str(out), force=True)
    assert_pt_output(str(out), src.want)
    assert files_in(tmp_path) == {"o.pt"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(out="o.xyz"), "cannot tell the output format"),
    (dict(out="o.pt", metadata=["a=b"]), "--metadata is only for safetensors"),
    (dict(out="o_dcp", to="dcp", max_shard_size="1MB"), "--max-shard-size is for safetensors and state_dict"),
    (dict(out="o.safetensors", metadata=["novalue"]), "is not KEY=VALUE"),
    (dict(out="o.safetensors", max_shard_size="lots"), "is not a size"),
    (dict(out="o.onnx", model="torchvision.models:resnet18"), "input shape"),
    (dict(out="o.safetensors", input_shapes=["1x3"]), "only for --to onnx"),
])
def test_usage_errors_leave_nothing(source_of, tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    out = str(tmp_path / kwargs.pop("out"))
    with pytest.raises(UsageError, match=match):
        convert(source_of("resnet18_zip").path, out, **kwargs)
    assert files_in(tmp_path) == set()


def test_to_overrides_the_extension(source_of, tmp_path):
    from safetensors.torch import load_file
    src = source_of("legacy")
    convert(src.path, str(tmp_path / "weights.bin"), to="safetensors")
    got = load_file(str(tmp_path / "weights.bin"))
    assert set(got) <= set(src.want)
    convert(src.path, str(tmp_path / "weights.data"), to="pt")
    assert_pt_output(str(tmp_path / "weights.data"), src.want)


def test_onnx_full_pickle_without_trust_names_the_classes(source_of, tmp_path):
    src = source_of("full_model_classnet")
    with pytest.raises(TrustRequiredError) as e:
        convert(src.path, str(tmp_path / "m.onnx"), input_shapes=["1x3x8x8"])
    assert e.value.exit_code == 2
    assert "mypkg.ClassNet" in str(e.value) and "mypkg.Block" in str(e.value)
    assert "--trust" in e.value.hint
    assert files_in(tmp_path) == set()


def test_onnx_state_dict_without_model_refused(source_of, tmp_path):
    with pytest.raises(UsageError, match="--model"):
        convert(source_of("legacy").path, str(tmp_path / "m.onnx"), input_shapes=["1x3x8x8"])
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("source, spec", [("resnet18_zip", "mypkg:ClassNet"),
                                          ("legacy", "torchvision.models:resnet18")])
def test_onnx_state_dict_that_does_not_fit_the_model(source_of, tmp_path, source, spec):
    with pytest.raises(UsageError, match=r"does not fit --model"):
        convert(source_of(source).path, str(tmp_path / "m.onnx"), model=spec,
                         input_shapes=["1x3x32x32"])
    assert files_in(tmp_path) == set()


def test_onnx_shape_mismatch_with_fitting_head(source_of, tmp_path):
    with pytest.raises(UsageError, match="fc.weight"):
        convert(source_of("resnet18_zip").path, str(tmp_path / "m.onnx"),
                         model="torchvision.models:resnet18", model_args=["num_classes=10"],
                         input_shapes=["1x3x32x32"])
    assert files_in(tmp_path) == set()


def test_onnx_input_shape_the_model_cannot_take_is_a_usage_error(source_of, tmp_path):
    with pytest.raises(CkptError) as e:
        convert(source_of("legacy").path, str(tmp_path / "m.onnx"), model="mypkg:ClassNet",
                         input_shapes=["1x5x8x8"])
    assert e.value.exit_code == 2
    assert files_in(tmp_path) == set()


def test_onnx_dynamic_batch_and_opset(source_of, tmp_path):
    import onnx
    import onnxruntime as ort
    src = source_of("full_model_classnet")
    out = str(tmp_path / "m.onnx")
    r = convert(src.path, out, trust=True, import_path=[FIXTURES], input_shapes=["1x3x8x8"],
                         dynamic_batch=True, opset=17, legacy_exporter=True)  # opset 17: the legacy exporter's
    assert r.details["opset"] == 17
    assert {i.domain or "ai.onnx": i.version for i in onnx.load(out).opset_import}["ai.onnx"] == 17
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    model = torch.load(src.path, weights_only=False).eval()
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# failures leave nothing behind


def _boom_after_some_bytes(real):
    def writer(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise RuntimeError("boom")
    return writer


@pytest.mark.parametrize("target", ["pt", "safetensors", "shards"])
def test_failure_mid_write_leaves_no_file_and_keeps_the_old_output(monkeypatch, source_of, tmp_path, target):
    cv = importlib.import_module("ckpttool.converting")
    src = source_of("legacy")
    monkeypatch.setattr(cv, "write_torch_zip", _boom_after_some_bytes(cv.write_torch_zip))
    monkeypatch.setattr(cv, "write_safetensors", _boom_after_some_bytes(cv.write_safetensors))
    sw = importlib.import_module("ckpttool.formats.safetensors_writer")  # shards are written by write_shards
    monkeypatch.setattr(sw, "write_safetensors", _boom_after_some_bytes(sw.write_safetensors))
    kwargs = {"pt": dict(out="o.pt"), "safetensors": dict(out="o.safetensors"),
              "shards": dict(out="hf", to="safetensors", max_shard_size="2KB")}[target]
    out = tmp_path / kwargs.pop("out")
    with pytest.raises(RuntimeError, match="boom"):
        convert(src.path, str(out), **kwargs)
    assert files_in(tmp_path) == set()
    # an existing output survives a failed --force
    if target == "shards":
        out.mkdir()
        (out / "keep.txt").write_text("old")
    else:
        out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        convert(src.path, str(out), force=True, **kwargs)
    assert files_in(tmp_path) == {out.name}
    if target == "shards":
        assert files_in(out) == {"keep.txt"}
    else:
        assert out.read_bytes() == b"old"


def full_disk(monkeypatch, room: int = 3000) -> list:
    """Make the writers' files (the zip writer's and the safetensors writer's) run out of space."""
    return simulate_full_disk(monkeypatch, room=room)


@pytest.mark.parametrize("target", ["pt", "safetensors", "shards"])
def test_full_disk_is_a_clean_error(monkeypatch, source_of, tmp_path, target):
    from ckpttool.errors import FileAccessError
    src = source_of("legacy")
    kwargs = {"pt": dict(out="o.pt"), "safetensors": dict(out="o.safetensors"),
              "shards": dict(out="hf", to="safetensors", max_shard_size="2KB")}[target]
    out = tmp_path / kwargs.pop("out")
    opened = full_disk(monkeypatch)
    try:
        with pytest.raises(FileAccessError, match="No space left on device") as e:
            convert(src.path, str(out), **kwargs)
    finally:
        for f in opened:
            f._f.close()
    assert e.value.exit_code == 2
    assert files_in(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# --check


def test_check_compares_every_byte(source_of, tmp_path):
    src = source_of("gpu_tagged_legacy")
    r = convert(src.path, str(tmp_path / "o.pt"), check=True)
    assert r.checked["bytes_compared"] == len(src.want)
    r = convert(src.path, str(tmp_path / "o.safetensors"), check=True)
    # every name is compared, the tied twin stored once included (it reads back from the header)
    assert r.checked["bytes_compared"] == len(src.want) == r.tensors + len(r.tied)


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_check_catches_corrupted_bytes(monkeypatch, source_of, tmp_path, ext):
    cv = importlib.import_module("ckpttool.converting")
    from ckpttool.errors import CheckFailedError
    real = cv._span_chunks

    def corrupt(source, start, size, elem):
        gen = real(source, start, size, elem)

        def chunks():
            for chunk in gen():
                yield bytes([chunk[0] ^ 0xFF]) + chunk[1:] if chunk else chunk
        return chunks
    monkeypatch.setattr(cv, "_span_chunks", corrupt)
    with pytest.raises(CheckFailedError, match="bytes differ"):
        convert(source_of("legacy").path, str(tmp_path / f"o{ext}"), check=True)
    assert files_in(tmp_path) == set()


def test_streams_the_source_file_without_torch_load(monkeypatch, source_of, tmp_path):
    """No tensor of the source goes through torch.load (which would need the whole file, or run code)."""
    src = source_of("full_model_classnet")

    def refuse(*a, **k):
        raise AssertionError("torch.load called")
    monkeypatch.setattr(torch, "load", refuse)
    convert(src.path, str(tmp_path / "o.pt"), check=True)
    convert(src.path, str(tmp_path / "o.safetensors"), check=True)
    monkeypatch.undo()
    assert_pt_output(str(tmp_path / "o.pt"), src.want)


# ---------------------------------------------------------------------------------------------
# the public API


def test_public_api_convert_is_callable_after_the_cli_ran(make, tmp_path):
    """``ckpttool.convert(...)`` must stay the function even once the CLI (or anyone) imported ckpttool.convert."""
    import subprocess
    src = make("legacy.pt")
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckpttool.cli import cli\n"
        "r = CliRunner().invoke(cli, ['convert', sys.argv[1], '-o', sys.argv[2]])\n"
        "assert r.exit_code == 0, r.output\n"
        "import ckpttool\n"
        "res = ckpttool.convert(sys.argv[1], sys.argv[3])\n"
        "assert isinstance(res, ckpttool.ConvertResult)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "a.pt"), str(tmp_path / "b.pt")],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert_pt_output(str(tmp_path / "b.pt"), torch.load(src, weights_only=True)["state_dict"])


def test_bin_shards_like_hf_load_with_torch_and_keep_ties(tmp_path):
    """--to pt --max-shard-size: pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json (total_size: the
    storage bytes in the shards); each shard loads with torch.load(weights_only=True); tensors that share a
    storage stay in one shard and stay tied; the folder reads back as one checkpoint."""
    torch.manual_seed(0)
    emb = torch.randn(100, 8)
    sd = {"emb.weight": emb, "a": torch.randn(300), "b": torch.randn(300), "head.weight": emb,
          "half": torch.randn(40, 8)[::2], "c": torch.randn(200)}
    torch.save(sd, tmp_path / "s.pt")
    out = tmp_path / "bins"
    r = convert(str(tmp_path / "s.pt"), str(out), to="pt", max_shard_size="2KB", check=True)
    assert r.format == "torch_sharded"
    listing = sorted(os.listdir(out))
    shards = [f for f in listing if f.endswith(".bin")]
    assert listing == shards + ["pytorch_model.bin.index.json"] and len(shards) >= 3
    assert shards == [f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin" for i in range(1, len(shards) + 1)]
    with open(out / "pytorch_model.bin.index.json") as f:
        index = json.load(f)
    loaded, storages = {}, {}
    for name in shards:
        part = torch.load(out / name, weights_only=True)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(part)
        loaded.update(part)
        for t in part.values():
            storages[(name, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    assert index["metadata"]["total_size"] == sum(storages.values())
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert loaded["emb.weight"].data_ptr() == loaded["head.weight"].data_ptr()  # still tied
    assert r.checked["bytes_compared"] == len(sd)
    from ckpttool import diff, open as open_checkpoint
    assert open_checkpoint(str(out)).format == "torch_sharded" and diff(str(out), str(tmp_path / "s.pt")).equal


@pytest.mark.parametrize("out,to,kind", [("hf", None, "safetensors"), ("m.bin", None, "torch"),
                                         ("m.safetensors", None, "safetensors"), ("hf", "pt", "torch")])
def test_shard_format_from_to_then_extension_then_safetensors(tmp_path, out, to, kind):
    """--max-shard-size: the shards' format is --to's, else OUT's extension's, else (a bare folder name) HF's
    safetensors; convert and filter agree."""
    torch.save({"a": torch.zeros(300), "b": torch.ones(300)}, tmp_path / "s.pt")
    r = convert(str(tmp_path / "s.pt"), str(tmp_path / out), to=to, max_shard_size="1KB")
    index = "pytorch_model.bin.index.json" if kind == "torch" else "model.safetensors.index.json"
    assert r.format == f"{kind}_sharded" and os.path.isfile(tmp_path / out / index)
    from ckpttool.filtering import filter_checkpoint
    f = filter_checkpoint(str(tmp_path / "s.pt"), str(tmp_path / ("f_" + out)), target=str(tmp_path / "s.pt"),
                          to=to, max_shard_size="1KB")
    assert f.output_format == f"{kind}_sharded" and os.path.isfile(tmp_path / ("f_" + out) / index)
