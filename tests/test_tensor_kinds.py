"""Every tensor kind torch.save writes is one tensor in every command, and converts exactly or not at all.

For each kind (conj and neg views, the five sparse layouts, strided and jagged nested tensors, per-tensor and
per-channel quantized, meta, a Parameter with attributes of its own), in the zip and the legacy format:
inspect lists one tensor with its form and parts; convert to a torch.save file gives what torch.load gives
for the source (layout, bits, quantizer, subclass and values, compared by torch itself, loaded with
weights_only=True); convert to safetensors refuses in one line naming the tensor, writing nothing; diff of
the source and the converted file is EQUAL, and of the source and a changed copy DIFFERENT.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from ckpttool import convert, diff, inspect
from ckpttool.errors import UsageError


def _complex():
    return torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))


def _param_with_state():
    p = torch.nn.Parameter(torch.arange(4.0))
    p.note = "kept"  # an attribute of the Parameter: torch.save writes _rebuild_parameter_with_state
    return p


def _qc(scale):
    return torch.quantize_per_channel(torch.arange(6.0).reshape(2, 3), torch.tensor([scale, 0.2]),
                                      torch.tensor([1, 2]), 0, torch.qint8)


# kind -> (make(variant) -> tensor, the form inspect shows, its part names); variant 1 is a changed copy
KINDS = {
    "conj": (lambda v: (_complex() * (1 + v)).conj(), "conj view", []),
    "neg": (lambda v: (_complex() * (1 + v)).conj().imag, "neg view", []),
    "sparse_coo": (lambda v: (torch.eye(3) * (1 + v)).to_sparse(), "sparse_coo", ["indices", "values"]),
    "sparse_csr": (lambda v: (torch.eye(3) * (1 + v)).to_sparse_csr(), "sparse_csr",
                   ["crow_indices", "col_indices", "values"]),
    "sparse_csc": (lambda v: (torch.eye(3) * (1 + v)).to_sparse_csc(), "sparse_csc",
                   ["ccol_indices", "row_indices", "values"]),
    "sparse_bsr": (lambda v: (torch.eye(4) * (1 + v)).to_sparse_bsr((2, 2)), "sparse_bsr",
                   ["crow_indices", "col_indices", "values"]),
    "sparse_bsc": (lambda v: (torch.eye(4) * (1 + v)).to_sparse_bsc((2, 2)), "sparse_bsc",
                   ["ccol_indices", "row_indices", "values"]),
    "nested": (lambda v: torch.nested.nested_tensor([torch.ones(2) * (1 + v), torch.ones(3)]), "nested",
               ["buffer", "sizes", "strides", "storage_offsets"]),
    "jagged": (lambda v: torch.nested.nested_tensor([torch.ones(2, 4) * (1 + v), torch.ones(3, 4)],
                                                    layout=torch.jagged), "jagged", None),
    "quantized": (lambda v: torch.quantize_per_tensor(torch.arange(4.0), 0.1 * (1 + v), 3, torch.quint8),
                  "quantized", []),
    "quantized_per_channel": (lambda v: _qc(0.1 * (1 + v)), "quantized", ["data", "scales", "zero_points"]),
    "meta": (lambda v: torch.empty(3, 4 + v, device="meta"), "meta", []),
    "parameter_with_state": (lambda v: _param_with_state(), "parameter with attributes (note)", []),
}


def make(kind: str, variant: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; they are still written and read
        return KINDS[kind][0](variant)


def load(path):
    import torch._dynamo  # noqa: F401 - torch.load of a jagged tensor asks for them
    import torch.nested  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=True)


def same(a, b) -> bool:
    """torch's own view of two loaded tensors: the same type, layout, bits, quantizer and values."""
    if type(a) is not type(b) or a.layout != b.layout or a.dtype != b.dtype or a.shape != b.shape \
            if not a.is_nested else type(a) is not type(b) or a.layout != b.layout or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta
    if a.is_nested:
        return all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind())) and len(a.unbind()) == len(b.unbind())
    if a.is_quantized:
        if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
            return False
        if a.qscheme() == torch.per_tensor_affine:
            return a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
        return torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()) and \
            torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
    if a.layout != torch.strided:
        return torch.equal(a.to_dense(), b.to_dense())
    return a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg() and torch.equal(a, b) and \
        vars(a) == vars(b)


def save(tmp_path, name, obj, fmt):
    path = str(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


# every kind in both formats, except a nested tensor in the legacy format, which torch cannot read (below)
CASES = [(k, f) for k in sorted(KINDS) for f in ("zip", "legacy") if (k, f) != ("nested", "legacy")]


@pytest.mark.parametrize("kind,fmt", CASES)
def test_inspect_shows_one_tensor_with_its_form(kind, tmp_path, fmt):
    path = save(tmp_path, "a.pt", {"t": make(kind), "plain": torch.ones(2)}, fmt)
    r = inspect(path)
    assert [t.name for t in r.tensors] == ["t", "plain"]  # not split into its parts
    t = r.tensors[0]
    form, parts = KINDS[kind][1], KINDS[kind][2]
    assert t.form.startswith(form), t.form
    if parts is not None:
        assert [p[0] for p in t.parts] == parts
    else:
        assert {"values", "offsets"} <= {p[0].rsplit("/", 1)[-1] for p in t.parts}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_inspect_counts_values_and_shape_as_torch_does(kind, tmp_path):
    """numel as torch's numel() (a nested tensor: its elements, not its row count); the shape as torch prints
    it, a jagged tensor's ragged dim as "j" where torch prints j1."""
    path = save(tmp_path, "a.pt", {"t": make(kind)}, "zip")
    x = load(path)["t"]
    r = inspect(path)
    assert r.tensors[0].numel == x.numel() and r.total_params == x.numel()
    if kind == "jagged":
        assert r.tensors[0].shape == tuple("j" if not isinstance(d, int) else d for d in x.shape)
        assert r.tensors[0].shape[1] == "j" and r.tensors[0].shape[0] == x.shape[0]
    elif kind != "nested":  # a strided nested tensor has no size() torch will give: its rows are listed
        assert r.tensors[0].shape == tuple(x.shape)


def test_a_parameter_with_attributes_and_a_plain_tensor_differ_in_form_not_values(tmp_path):
    a = save(tmp_path, "a.pt", {"t": _param_with_state()}, "zip")
    b = save(tmp_path, "b.pt", {"t": torch.arange(4.0)}, "zip")
    r = diff(a, b)
    assert not r.equal and r.exit_code == 1 and not r.value_mismatch and r.exact == 1
    [d] = r.form_mismatch
    assert (d.form_a, d.form_b, d.status) == ("parameter with attributes (note)", "dense", "exact")
    other = _param_with_state()
    other.note = "changed"
    c = save(tmp_path, "c.pt", {"t": other}, "zip")
    r = diff(a, c)
    assert not r.equal and r.form_mismatch[0].form_b.endswith("(other attribute values)")
    assert diff(a, a).equal


def test_dense_lists_every_entry_without_a_dense_form_at_once(tmp_path):
    m = QuantModel().eval()
    import torch.ao.quantization as q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.qconfig = q.get_default_qconfig("fbgemm")
        q.prepare(m, inplace=True)
        m(torch.randn(1, 3, 8, 8))
        q.convert(m, inplace=True)
    src = save(tmp_path, "q.pt", m.state_dict(), "zip")
    with pytest.raises(UsageError) as e:
        convert(src, str(tmp_path / "q.safetensors"), dense=True)
    msg = str(e.value)
    assert "\n" not in msg and "have no dense form" in msg
    assert "fc._packed_params.dtype (value torch.qint8: a state_dict value that is not a tensor)" in msg
    assert "fc._packed_params._packed_params (packed: a quantized module's packed (weight, bias)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]


def test_safetensors_refusal_offers_dense_only_where_it_works(tmp_path):
    src = save(tmp_path, "a.pt", {"j": make("jagged")}, "zip")
    with pytest.raises(UsageError) as e:
        convert(src, str(tmp_path / "a.safetensors"))
    assert "--dense writes" not in str(e.value) and "--dense cannot: no dense form for j (its rows differ in length)" \
        in str(e.value)
    src = save(tmp_path, "b.pt", {"j": make("jagged"), "s": make("sparse_coo")}, "zip")
    with pytest.raises(UsageError) as e:
        convert(src, str(tmp_path / "b.safetensors"))
    assert "--dense writes" not in str(e.value) and "--dense cannot: no dense form for j (" in str(e.value)
    src = save(tmp_path, "c.pt", {"q": make("quantized"), "s": make("sparse_coo")}, "zip")
    with pytest.raises(UsageError) as e:  # every one has a dense form: --dense is offered
        convert(src, str(tmp_path / "c.safetensors"))
    assert "or --dense writes the plain tensor torch gives" in str(e.value) and "cannot" not in str(e.value)


def test_quantizer_parameters_are_shown(tmp_path):
    path = save(tmp_path, "a.pt", {"t": make("quantized"), "c": make("quantized_per_channel")}, "zip")
    forms = {t.name: t.form for t in inspect(path).tensors}
    assert forms == {"t": "quantized per_tensor_affine scale=0.1 zero_point=3",
                     "c": "quantized per_channel_affine axis=0"}


def test_legacy_nested_tensor_torch_cannot_read_is_refused(tmp_path):
    """torch's legacy loader reads storages after the pickle; a nested tensor's rebuild reads its sizes during
    it, so torch.load of the file fails (or reads garbage). ckpttool says so rather than show it."""
    from ckpttool.errors import FormatError
    src = save(tmp_path, "a.pt", {"t": make("nested")}, "legacy")
    # torch reads the sizes from memory not yet filled: in a fresh process (no freed copy of the saved sizes
    # to find there) it fails, or gives another tensor
    import subprocess
    import sys
    code = ("import sys, torch\ntry:\n    t = torch.load(sys.argv[1], weights_only=True)['t']\n"
            "    same = [x.tolist() for x in t.unbind()] == [[1.0, 1.0], [1.0, 1.0, 1.0]]\n"
            "except Exception:\n    same = False\nprint('same' if same else 'not read')")
    r = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "not read", r.stdout + r.stderr[-1000:]
    with pytest.raises(FormatError, match="cannot read a nested tensor from a legacy-format file"):
        inspect(src)


@pytest.mark.parametrize("kind,fmt", CASES)
def test_convert_to_pt_is_what_torch_loads(kind, tmp_path, fmt):
    src = save(tmp_path, "a.pt", {"t": make(kind), "plain": torch.ones(2)}, fmt)
    out = str(tmp_path / "out.pt")
    r = convert(src, out, check=True)
    assert r.tensors == 2
    got, want = load(out), load(src)
    assert list(got) == ["t", "plain"]
    assert same(got["t"], want["t"]), (got["t"], want["t"])
    assert torch.equal(got["plain"], want["plain"])
    assert diff(src, out).equal


@pytest.mark.parametrize("kind", sorted(k for k in KINDS if k not in ("parameter_with_state",)))
def test_safetensors_refuses_in_one_line_naming_the_tensor(kind, tmp_path):
    src = save(tmp_path, "a.pt", {"t": make(kind), "plain": torch.ones(2)}, "zip")
    with pytest.raises(UsageError) as e:
        convert(src, str(tmp_path / "out.safetensors"))
    msg = str(e.value)
    assert "\n" not in msg and "t (" in msg and "a .pt output (-o NAME.pt) holds them exactly" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


@pytest.mark.parametrize("kind", sorted(k for k in KINDS if k not in ("parameter_with_state",)))
def test_diff_sees_a_changed_tensor_of_each_kind(kind, tmp_path):
    a = save(tmp_path, "a.pt", {"t": make(kind)}, "zip")
    b = save(tmp_path, "b.pt", {"t": make(kind, 1)}, "zip")
    r = diff(a, b)
    assert not r.equal and r.exit_code == 1
    assert diff(a, a).equal


def test_conj_view_and_its_materialised_copy_are_equal_as_torch_loads_them(tmp_path):
    x = _complex()
    a = save(tmp_path, "a.pt", {"t": x.conj()}, "zip")
    b = save(tmp_path, "b.pt", {"t": x.conj().resolve_conj()}, "zip")
    assert torch.equal(load(a)["t"], load(b)["t"])  # torch: the same values
    r = diff(a, b)
    assert r.equal and r.exact == 1
    c = save(tmp_path, "c.pt", {"t": x}, "zip")  # the un-conjugated values: what the conj view's bytes hold
    assert not diff(a, c).equal


def test_a_sparse_tensor_and_its_dense_twin_are_not_called_equal(tmp_path):
    a = save(tmp_path, "a.pt", {"t": torch.eye(3).to_sparse()}, "zip")
    b = save(tmp_path, "b.pt", {"t": torch.eye(3)}, "zip")
    r = diff(a, b)
    assert not r.equal and "sparse_coo" in r.not_compared[0].note


class QuantModel(torch.nn.Module):
    def __init__(self):
        import torch.ao.quantization as q
        super().__init__()
        self.quant, self.dequant = q.QuantStub(), q.DeQuantStub()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.dequant(self.fc(self.conv(self.quant(x)).mean((2, 3))))


def _quantized_model():
    import torch.ao.quantization as q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        m = QuantModel().eval()
        m.qconfig = q.get_default_qconfig("fbgemm")
        p = q.prepare(m)
        p(torch.randn(2, 3, 8, 8))
        return q.convert(p)


def _same_entry(a, b) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_entry(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same(a, b)
    return a == b


@pytest.mark.parametrize("how", ["model", "state_dict"])
def test_a_quantized_models_state_dict_is_torchs_own(how, tmp_path):
    """torch.ao quantized conv/linear name their state_dict() entries by code of their own (a conv's weight,
    bias, scale and zero_point from its tuple state; a Linear's scale and zero_point; its packed params' dtype
    and (weight, bias) tuple). ckpttool names them the same (before: 2 of 10, exit 0); convert to .pt gives
    what model.state_dict() gives, and a fresh quantized model loads it strictly and computes the same."""
    m = _quantized_model()
    want = m.state_dict()
    assert len(want) == 10
    path = str(tmp_path / "q.pt")
    torch.save(m if how == "model" else want, path)
    r = inspect(path)
    assert [t.name for t in r.tensors] == list(want)
    forms = {t.name: t.form for t in r.tensors}
    assert forms["conv.weight"].startswith("quantized") and forms["fc._packed_params._packed_params"].startswith(
        "packed") and forms["fc._packed_params.dtype"] == "value torch.qint8"
    out = str(tmp_path / "o.pt")
    convert(path, out, check=True)
    got = load(out)
    assert list(got) == list(want) and all(_same_entry(want[k], got[k]) for k in want)
    fresh = _quantized_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_state_dict(got)  # strict
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(fresh(x), m(x))
    assert diff(path, out).equal
    with pytest.raises(UsageError, match="fc._packed_params._packed_params \\(packed\\)"):
        convert(path, str(tmp_path / "o.safetensors"))


def test_a_quantized_module_of_unknown_rules_is_refused_not_shrunk(tmp_path):
    """A quantized module whose state_dict() rules ckpttool does not know (an embedding's packed weight): convert
    and diff refuse and inspect says INCOMPLETE, rather than a smaller state_dict passing for the whole."""
    import torch.ao.nn.quantized as nnq
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = nnq.Embedding(10, 4)
    m = torch.nn.Sequential(emb)
    path = str(tmp_path / "e.pt")
    torch.save(m, path)
    r = inspect(path)
    assert any(n.startswith("INCOMPLETE: module 0") for n in r.notes), r.notes
    with pytest.raises(UsageError, match="packed parameters"):
        convert(path, str(tmp_path / "o.pt"))
    with pytest.raises(UsageError, match="packed parameters"):
        diff(path, path)


# which state_dict: the one the writing library's own loader takes

_ULTRALYTICS_LIKE = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from ultralytics.nn.tasks import DetectionModel
torch.manual_seed(0)
model, ema = DetectionModel(), DetectionModel()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(1, 3)).sum().backward(); opt.step()
torch.save({"epoch": 3, "best_fitness": None, "model": None if sys.argv[3] == "none" else model, "ema": ema,
            "updates": 30, "optimizer": opt.state_dict(), "train_args": {"imgsz": 640}}, sys.argv[1])
"""


@pytest.mark.parametrize("model", ["none", "module"])
def test_ultralytics_checkpoint_takes_the_ema_as_ultralytics_does(model, tmp_path):
    """An ultralytics training checkpoint (here from a stand-in ultralytics.nn.tasks.DetectionModel): its loader
    takes ckpt['ema'] or ckpt['model']; before, a None model gave every tensor of the file (optimizer state too)."""
    import subprocess
    import sys
    pkg = tmp_path / "pkgs" / "ultralytics" / "nn"
    pkg.mkdir(parents=True)
    (tmp_path / "pkgs" / "ultralytics" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text("import torch\nclass DetectionModel(torch.nn.Module):\n"
                                  "    def __init__(self):\n        super().__init__()\n"
                                  "        self.conv = torch.nn.Linear(3, 4)\n        self.head = torch.nn.Linear(4, 2)\n"
                                  "        self.register_buffer('stride', torch.tensor([8.0, 16.0]))\n"
                                  "    def forward(self, x):\n        return self.head(self.conv(x))\n")
    path = str(tmp_path / "last.pt")
    r = subprocess.run([sys.executable, "-c", _ULTRALYTICS_LIKE, path, str(tmp_path / "pkgs"), model],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = inspect(path)
    assert got.entry == "ema"
    assert [t.name for t in got.tensors] == ["stride", "conv.weight", "conv.bias", "head.weight", "head.bias"]  # as state_dict()
    if model == "module":
        assert any("state_dict candidates: model (5 tensors), ema (5 tensors); took ema" in n for n in got.notes)


def test_timm_checkpoint_takes_the_ema_as_timm_does(tmp_path):
    """A timm checkpoint (it has 'arch'): timm's loaders default to use_ema=True; another file with both keys
    keeps the first usual key and says which the EMA is."""
    path = str(tmp_path / "timm.pth.tar")
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {"w": torch.ones(2)},
                "state_dict_ema": {"w": torch.zeros(2)}}, path)
    got = inspect(path)
    assert got.entry == "state_dict_ema"
    note = next(n for n in got.notes if n.startswith("state_dict candidates"))
    assert "state_dict (1 tensor)" in note and "use_ema=True" in note and "--key" in note
    assert inspect(path, key="state_dict").entry == "state_dict"
    other = str(tmp_path / "other.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "state_dict_ema": {"w": torch.zeros(2)}}, other)
    got = inspect(other)
    assert got.entry == "state_dict" and any("would take state_dict_ema" in n for n in got.notes)


_OBJECT_SUBCLASS = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from fakeao import Int8Tensor
torch.save({"w": Int8Tensor(torch.arange(4, dtype=torch.int8), torch.tensor([0.5])), "b": torch.zeros(2)}, sys.argv[1])
"""


def test_a_tensor_subclass_pickled_as_an_object_is_one_tensor(tmp_path):
    """A tensor type that pickles itself as an object (its own __reduce__, as some quantization libraries'
    do): one tensor in the state_dict, its inner tensors its parts, written back to .pt as it was built (before:
    split into w/arg0 and w/arg1, and safetensors got them as two plain tensors)."""
    import subprocess
    import sys
    (tmp_path / "pk" / "fakeao").mkdir(parents=True)
    (tmp_path / "pk" / "fakeao" / "__init__.py").write_text(
        "class Int8Tensor:\n    def __init__(self, qdata, scale):\n        self.qdata, self.scale = qdata, scale\n"
        "    def __reduce__(self):\n        return (Int8Tensor, (self.qdata, self.scale))\n")
    src = str(tmp_path / "a.pt")
    r = subprocess.run([sys.executable, "-c", _OBJECT_SUBCLASS, src, str(tmp_path / "pk")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = inspect(src)
    assert [(t.name, t.form) for t in got.tensors] == [("w", "subclass fakeao.Int8Tensor"), ("b", "dense")]
    assert [p[0] for p in got.tensors[0].parts] == ["arg0", "arg1"]
    with pytest.raises(UsageError, match="w \\(subclass fakeao.Int8Tensor\\)"):
        convert(src, str(tmp_path / "a.safetensors"))
    # rebuilt by calling fakeao.Int8Tensor, a global torch's weights_only loader does not admit: convert will not
    # write a call scan calls dangerous (its output must not run more than weights_only=True allows)
    with pytest.raises(UsageError, match="cannot be written back: it holds a call of fakeao.Int8Tensor"):
        convert(src, str(tmp_path / "o.pt"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a.pt"]
    assert diff(src, src).equal


def test_convert_never_writes_a_dangerous_global_it_read(tmp_path):
    """A tensor subclass record whose rebuild function is os.system (a file made to look like one): ckpttool
    reads it inertly, and convert refuses rather than copy the call into its output."""
    import zipfile
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
    inner = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00K\x02\x85K\x01\x85\x89"
             b"ccollections\nOrderedDict\n)RtR")
    data = (b"\x80\x02}X\x01\x00\x00\x00wctorch._tensor\n_rebuild_from_type_v2\n(cos\nsystem\n"
            b"cmypkg\nMyTensor\n(" + inner + b"t}tRs.")
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", data)
        z.writestr("evil/data/0", b"\0" * 8)
        z.writestr("evil/version", "3\n")
        z.writestr("evil/byteorder", "little")
    t = inspect(str(path)).tensors[0]
    assert t.name == "w" and t.form.startswith("subclass mypkg.MyTensor")
    with pytest.raises(UsageError, match="os.system, which scan calls dangerous"):
        convert(str(path), str(tmp_path / "o.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


_DTENSOR = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh
mesh = init_device_mesh("cpu", (1,))
if sys.argv[2] == "save":
    torch.save({"d": distribute_tensor(torch.arange(6.0).reshape(2, 3), mesh, [Shard(0)]), "p": torch.ones(2)},
               sys.argv[1])
else:
    a, b = (torch.load(p, weights_only=False) for p in sys.argv[1].split(","))
    assert type(b["d"]).__name__ == "DTensor" and b["d"].placements == a["d"].placements
    assert torch.equal(a["d"].to_local(), b["d"].to_local()) and torch.equal(a["p"], b["p"])
    print("same")
dist.destroy_process_group()
"""


def test_dtensor_is_one_tensor_and_converts_exactly(tmp_path):
    """A DTensor (torch.distributed.tensor, one CPU process): one tensor whose part is its local shard."""
    import random
    import subprocess
    import sys
    src, out = str(tmp_path / "d.pt"), str(tmp_path / "o.pt")
    port = str(random.randint(20000, 40000))
    r = subprocess.run([sys.executable, "-c", _DTENSOR, src, "save", port], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    t = inspect(src).tensors[0]
    assert t.name == "d" and t.form == "subclass torch.distributed.tensor.DTensor" and t.shape == (2, 3)
    assert t.parts[0][:3] == ("_local_tensor", "float32", (2, 3))
    convert(src, out, check=True)
    r = subprocess.run([sys.executable, "-c", _DTENSOR, f"{src},{out}", "load", str(int(port) + 1)],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "same", r.stderr[-2000:]


def test_filter_carries_a_conj_view_by_its_values_and_refuses_what_it_cannot_carry(tmp_path):
    """filter writes with torch: a conj view's values as torch loads them (before: its un-conjugated bytes);
    a sparse tensor or a subclass is refused naming its form, never written as its parts or as plain data."""
    from ckpttool.filtering import filter_checkpoint
    x = _complex()
    src = save(tmp_path, "s.pt", {"b": torch.ones(3), "c": x.conj()}, "zip")
    tgt = save(tmp_path, "t.pt", {"b": torch.zeros(3), "c": torch.zeros(3, dtype=torch.complex64)}, "zip")
    out = str(tmp_path / "o.pt")
    filter_checkpoint(src, out, target=tgt)
    assert torch.equal(load(out)["c"], load(src)["c"])
    for kind in ("sparse_coo", "quantized"):
        bad = save(tmp_path, f"{kind}.pt", {"b": torch.ones(3), "c": make(kind)}, "zip")
        tgt_k = save(tmp_path, f"t_{kind}.pt", {"b": torch.zeros(3), "c": torch.zeros(make(kind).shape)}, "zip")
        with pytest.raises(UsageError, match=f"c is a {kind}"):
            filter_checkpoint(bad, str(tmp_path / "x.pt"), target=tgt_k)


DENSE_KINDS = ["conj", "neg", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "quantized",
               "quantized_per_channel"]


def torch_dense(x):
    """What --dense promises: the dense tensor torch gives for it."""
    if x.layout != torch.strided:
        return x.to_dense()
    if x.is_quantized:
        return x.dequantize()
    return x.resolve_conj().resolve_neg()


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_dense_writes_what_torch_gives_and_says_so(kind, tmp_path):
    from safetensors.torch import load_file
    src = save(tmp_path, "a.pt", {"t": make(kind), "plain": torch.ones(2)}, "zip")
    out = str(tmp_path / "a.safetensors")
    r = convert(src, out, dense=True, check=True)
    assert [n for n, _ in r.densified] == ["t"] and r.densified[0][1].startswith(KINDS[kind][1])
    got, want = load_file(out)["t"], torch_dense(load(src)["t"])
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(load_file(out)["plain"], torch.ones(2))


@pytest.mark.parametrize("kind", ["nested", "jagged", "meta"])
def test_dense_refuses_what_has_no_dense_form(kind, tmp_path):
    src = save(tmp_path, "a.pt", {"t": make(kind)}, "zip")
    with pytest.raises(UsageError, match=r"--dense: 1 tensor\(s\) have no dense form: t \("):
        convert(src, str(tmp_path / "a.safetensors"), dense=True)
    with pytest.raises(UsageError, match="--dense is for safetensors"):
        convert(src, str(tmp_path / "a.pt"), dense=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_module_versions_table_is_the_installed_torchs():
    """The _metadata versions ckpttool gives a pickled module's state_dict come from its own table: it must be
    every torch.nn / torch.ao.nn module class whose _version is not 1, with that version."""
    import importlib
    import inspect as pyinspect
    import pkgutil
    from ckpttool.tree import MODULE_VERSIONS
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pkg in ("torch.nn.modules", "torch.ao.nn"):
            for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
                try:
                    mod = importlib.import_module(info.name)
                except Exception:  # noqa: BLE001 - optional backends
                    continue
                for cls in vars(mod).values():
                    if pyinspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == mod.__name__ \
                            and getattr(cls, "_version", 1) != 1:
                        found[f"{cls.__module__}.{cls.__qualname__}"] = cls._version
    assert found == MODULE_VERSIONS


def test_converted_state_dict_keeps_module_versions(tmp_path):
    """torch.save(model.state_dict()) carries _metadata (each module's version); the converted file keeps it."""
    import torchvision
    m = torchvision.models.resnet18(weights=None)
    src, out = str(tmp_path / "a.pt"), str(tmp_path / "o.pt")
    torch.save(m.state_dict(), src)
    convert(src, out)
    assert load(out)._metadata == load(src)._metadata
    full = str(tmp_path / "full.pt")
    torch.save(m, full)
    convert(full, str(tmp_path / "f.pt"))
    assert load(str(tmp_path / "f.pt"))._metadata == m.state_dict()._metadata  # made from the module classes


# an attacker review of the writer: a rebuild copied from a file must never carry what scan calls dangerous

_EVIL_REBUILDS = r'''
import sys, io, enum, argparse, functools, collections, torch, torch._tensor as tt, torch._utils as tu
class R:
    def __init__(self, f, a): self.f, self.a = f, a
    def __reduce__(self): return (self.f, self.a)
def sub(t, state):
    st = t.untyped_storage()
    class S:
        def __reduce__(self):
            return (tt._rebuild_from_type_v2, (tu._rebuild_tensor_v2, torch.Tensor,
                    (torch.storage.TypedStorage(wrap_storage=st, dtype=t.dtype, _internal=True), 0, tuple(t.shape),
                     t.stride(), False, collections.OrderedDict()), state))
    return S()
marker = sys.argv[2]
t = torch.ones(2)
cases = {
    "func": R(tt._rebuild_from_type_v2, (io.FileIO, torch.Tensor, (marker, "w", torch.ones(1, dtype=torch.int64)), {})),
    "enum_api": sub(t, {"e": R(enum.IntEnum, ("X", "A B"))}),
    "state_attr": sub(t, (lambda ns: (setattr(ns, "items", io.FileIO), ns)[1])(argparse.Namespace())),
    "state_partial": sub(t, (lambda ns: (setattr(ns, "items", functools.partial(io.FileIO, marker, "w")), ns)[1])(
        argparse.Namespace())),
}
torch.save({"w": cases[sys.argv[3]]}, sys.argv[1])
'''


@pytest.mark.parametrize("case", ["func", "enum_api", "state_attr", "state_partial"])
def test_convert_refuses_a_rebuild_that_would_run_code(case, tmp_path):
    import subprocess
    import sys
    from ckpttool import scan
    src, marker = str(tmp_path / "src.pt"), str(tmp_path / "MARKER")
    r = subprocess.run([sys.executable, "-c", _EVIL_REBUILDS, src, marker, case], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert scan([src]).dangerous  # scan sees it in the source (the partial one too: its target runs on load)
    with pytest.raises(UsageError, match="scan calls dangerous"):
        convert(src, str(tmp_path / "o.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


def test_shared_and_deep_rebuild_arguments_are_bounded(tmp_path):
    """x = (x, x) forty deep (exponential if walked as a tree) converts, diffs and stays small; a list nested
    400 deep is refused in one line, not a RecursionError."""
    import subprocess
    import sys
    code = r'''
import sys, collections, torch, torch._tensor as tt, torch._utils as tu
t = torch.ones(2); st = t.untyped_storage()
x = ()
for _ in range(int(sys.argv[2])):
    x = (x, x) if sys.argv[3] == "dag" else [x]
class S:
    def __reduce__(self):
        return (tt._rebuild_from_type_v2, (tu._rebuild_tensor_v2, torch.Tensor,
                (torch.storage.TypedStorage(wrap_storage=st, dtype=t.dtype, _internal=True), 0, (2,), (1,), False,
                 collections.OrderedDict()), {"x": x}))
torch.save({"w": S()}, sys.argv[1])
'''
    dag, deep = str(tmp_path / "dag.pt"), str(tmp_path / "deep.pt")
    for path, n, kind in ((dag, "40", "dag"), (deep, "400", "deep")):
        r = subprocess.run([sys.executable, "-c", code, path, n, kind], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    out = str(tmp_path / "o.pt")
    convert(dag, out, check=True)
    assert (tmp_path / "o.pt").stat().st_size < 100_000
    assert diff(dag, out).equal
    got = load(out)["w"]
    x = got.x if hasattr(got, "x") else None
    assert x is None or x[0] is x[1]  # still shared
    with pytest.raises(UsageError, match="nested more than"):
        convert(deep, str(tmp_path / "d.pt"))


def test_a_quantized_state_dict_diffs_equal_to_itself(tmp_path):
    """A new user's finding: a channels-last per-channel quantized weight (its data a strided view) and a dtype
    entry made a quantized model's state_dict DIFFERENT from itself."""
    m = _quantized_model()
    path = str(tmp_path / "q.pt")
    torch.save(m.state_dict(), path)
    r = diff(path, path)
    assert r.equal and r.exit_code == 0, (r.not_compared, r.value_mismatch)
    other = _quantized_model()
    with torch.no_grad():
        other.fc.set_weight_bias(torch.quantize_per_tensor(torch.ones(2, 4), 0.1, 0, torch.qint8), None)
    p2 = str(tmp_path / "q2.pt")
    torch.save(other.state_dict(), p2)
    assert not diff(path, p2).equal


# ---- a new user's second look (issue 16): what was still silently different, refused wrongly or confusing


def test_stats_of_a_neg_view_are_of_the_values_torch_gives(tmp_path):
    from ckpttool.summary import tensor_stats
    from ckpttool.tree import open_state_dict
    x = torch.tensor([-3.0, 0.5, 2.0, 4.0])
    for fmt in ("zip", "legacy"):
        path = save(tmp_path, f"n_{fmt}.pt", {"t": torch._neg_view(x)}, fmt)
        s = tensor_stats(open_state_dict(path)[1].tensors["t"])
        want = load(path)["t"].resolve_neg()
        assert (s["min"], s["max"]) == (want.min().item(), want.max().item())
        assert s["mean"] == pytest.approx(want.mean().item()) and s["std"] == pytest.approx(want.std().item())


def _quantized_linear_state_dict():
    import torch.ao.quantization as q
    m = torch.nn.Sequential(q.QuantStub(), torch.nn.Linear(4, 4), q.DeQuantStub())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.qconfig = q.get_default_qconfig("fbgemm")
        q.prepare(m, inplace=True)
        m(torch.randn(2, 4))
        q.convert(m, inplace=True)
    return m.state_dict()


def test_diff_sees_a_packed_weights_quantizer_change(tmp_path):
    """torch.ao packed (weight, bias): the weight's per-channel scales are compared too (they were not)."""
    sd = _quantized_linear_state_dict()
    a = save(tmp_path, "a.pt", sd, "zip")
    w, b = sd["1._packed_params._packed_params"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w2 = torch._make_per_channel_quantized_tensor(w.int_repr(), w.q_per_channel_scales() * 2,
                                                      w.q_per_channel_zero_points(), w.q_per_channel_axis())
    other = dict(sd)
    other["1._packed_params._packed_params"] = (w2, b)
    c = save(tmp_path, "c.pt", other, "zip")
    assert not torch.equal(load(a)["1._packed_params._packed_params"][0].dequantize(),
                           load(c)["1._packed_params._packed_params"][0].dequantize())
    r = diff(a, c)
    assert not r.equal and [d.name for d in r.value_mismatch] == ["1._packed_params._packed_params"]
    d = r.value_mismatch[0]
    assert "scales 4/4 differ" in d.note and d.max_abs is None and d.numel == 0  # no made-up value counts
    assert diff(a, a).equal and diff(a, a).exact == len(sd)


def test_a_quantized_state_dicts_counts_are_its_values(tmp_path):
    sd = _quantized_linear_state_dict()
    path = save(tmp_path, "q.pt", sd, "zip")
    r = inspect(path)
    by = {t.name: t for t in r.tensors}
    assert by["1._packed_params.dtype"].numel == 0
    assert by["1._packed_params._packed_params"].numel == 16 + 4  # the weight's values and the bias's
    real = [v for v in sd.values() if isinstance(v, torch.Tensor)]
    w, b = sd["1._packed_params._packed_params"]
    assert r.total_params == sum(t.numel() for t in real) + w.numel() + b.numel()
    assert r.bytes_by_dtype["float32"] >= b.numel() * 4 and r.bytes_by_dtype["qint8"] == w.numel()
    from ckpttool.render import inspect_text
    assert "tensors     5 (+1 state_dict entry that is no tensor)" in inspect_text(r)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_sub_byte_quantized_tensors_read_as_torch_reads_them(tmp_path, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(torch.randn(4, 6), torch.rand(4) + 0.1, torch.zeros(4), 0, torch.quint4x2)
        p = torch.quantize_per_tensor(torch.randn(5, 3), 0.1, 0, torch.quint2x4)
    src = save(tmp_path, "a.pt", {"q": q, "p": p}, fmt)
    r = inspect(src)
    by = {t.name: t for t in r.tensors}
    assert by["q"].shape == (4, 6) and by["q"].numel == 24 and by["p"].numel == 15
    out = str(tmp_path / "o.pt")
    convert(src, out)
    got, want = load(out), load(src)
    for k in ("q", "p"):
        assert same(got[k], want[k]), k
    assert diff(src, out).equal


@pytest.mark.parametrize("kind", ["quantized_per_channel", "sparse_coo", "parameter_with_state", "jagged"])
def test_pt_shards_hold_every_kind(kind, tmp_path):
    import json
    src = save(tmp_path, "a.pt", {"t": make(kind), "plain": torch.ones(300)}, "zip")
    out = tmp_path / "shards"
    convert(src, str(out), to="pt", max_shard_size="1KB")
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(load(str(out / f)))
    assert set(got) == {"t", "plain"} and same(got["t"], load(src)["t"])


def test_safetensors_dtype_refusal_names_every_tensor_in_one_line(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c32 = torch.zeros(3, dtype=torch.complex32)
    src = save(tmp_path, "a.pt", {"c32": c32, "ok": torch.ones(2)}, "zip")
    with pytest.raises(UsageError) as e:
        convert(src, str(tmp_path / "a.safetensors"))
    assert str(e.value) == ("safetensors cannot hold complex32 tensors (the installed safetensors does not write "
                            f"and read them back): complex32: c32; a .pt output (-o NAME.pt) holds them ({src})") \
        and e.value.hint is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_to_that_contradicts_the_outputs_name_is_refused(tmp_path):
    src = save(tmp_path, "a.pt", {"t": make("conj")}, "zip")
    with pytest.raises(UsageError, match="--to state_dict writes state_dict, but 'x.safetensors' is named for "
                                         "safetensors"):
        convert(src, str(tmp_path / "x.safetensors"), to="state_dict")
    convert(src, str(tmp_path / "x.bin"), to="state_dict")  # .bin names any bytes
    assert same(load(str(tmp_path / "x.bin"))["t"], load(src)["t"])


def test_a_plain_tensor_with_attributes_is_said_and_compared_by_value(tmp_path):
    t = torch.arange(3.0)
    t.extra = "kept"
    a = save(tmp_path, "a.pt", {"t": t}, "zip")
    b = save(tmp_path, "b.pt", {"t": torch.arange(3.0)}, "zip")
    assert inspect(a).tensors[0].form == "tensor with attributes (extra)"
    r = diff(a, b)
    assert not r.equal and r.form_mismatch[0].status == "exact" and not r.not_compared
    out = str(tmp_path / "o.pt")
    convert(a, out)
    assert torch.load(out, weights_only=False)["t"].extra == "kept"


def test_diff_says_which_state_dict_it_took_where_there_were_several(tmp_path):
    sd = {"w": torch.ones(2)}
    path = str(tmp_path / "timm.pt")
    torch.save({"state_dict": sd, "state_dict_ema": {"w": torch.zeros(2)}, "arch": "resnet18"}, path)
    r = diff(path, path)
    assert r.notes and r.notes[0].startswith("A: took state_dict_ema of state_dict, state_dict_ema (a timm "
                                             "checkpoint") and r.notes[0].endswith("--key-a chooses another")
    plain = str(tmp_path / "p.pt")
    torch.save(sd, plain)
    assert diff(plain, plain).notes == ()


def test_expanded_views_are_gathered_in_blocks_or_refused_in_one_line(tmp_path):
    """An expand()ed tensor (stride 0) many times larger than its storage: diff and convert gather it a block
    of rows at a time (equal to torch's own values), and one whose single row is too large to gather is a
    one-line error, never a MemoryError."""
    import ckpttool
    from ckpttool.checkpoint import TensorRef
    from ckpttool.comparing import pieces
    from ckpttool.errors import FormatError
    base = torch.arange(6, dtype=torch.float32)
    x = base.reshape(1, 1, 6).expand(5, 4, 6)
    torch.save({"x": x}, tmp_path / "e.pt")
    t = ckpttool.open(str(tmp_path / "e.pt")).root["x"]
    want = x.contiguous().view(torch.uint8).numpy().tobytes()
    assert b"".join(t.iter_chunks(24)) == want  # a block of one row at a time
    assert b"".join(pieces(t, 7)) == want and all(len(p) == 28 for p in list(pieces(t, 7))[:-1])
    assert ckpttool.convert(str(tmp_path / "e.pt"), str(tmp_path / "e.safetensors")).tensors == 1
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "e.safetensors"))["x"], x)
    huge = TensorRef(shape=(1 << 31, 1 << 31), dtype="float32", stride=(0, 0), storage=t.storage)
    with pytest.raises(FormatError, match="too large to gather"):
        next(huge.iter_chunks())
