"""Every reader against what torch / safetensors / onnx themselves load from the same file.

For each fixture: the same names in the same order, shapes, dtypes, strides, storage
offsets, devices (the location tags), the same storage sharing, and bit-identical bytes.
"""
from __future__ import annotations

import os

import pytest
import torch

import ckpttool
from ckpttool.tree import find_state_dict


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def torch_load_with_locations(path, weights_only=True):
    """torch.load on the CPU, recording each storage's location tag as the file has it."""
    locs = {}

    def ml(storage, location):
        locs[storage.data_ptr()] = location
        return storage
    obj = torch.load(path, map_location=ml, weights_only=weights_only)
    return obj, locs


def assert_same_state_dict(ours, theirs, locs=None):
    """ours: name -> TensorRef; theirs: name -> torch.Tensor."""
    assert list(ours) == list(theirs)
    for name, ref in ours.items():
        t = theirs[name]
        assert ref.shape == tuple(t.shape), name
        assert ref.dtype == str(t.dtype).replace("torch.", ""), name
        assert ref.stride == tuple(t.stride()), name
        assert ref.storage_offset == t.storage_offset(), name
        assert ref.nbytes == t.numel() * t.element_size(), name
        if locs is not None:
            assert ref.device == locs[t.untyped_storage().data_ptr()], name
        assert ref.read_bytes() == _bytes(t), f"{name}: bytes differ"
        mine = ref.to_torch()
        assert mine.dtype == t.dtype and mine.shape == t.shape
    # storage sharing: same partition of names
    def groups(pairs, key):
        g = {}
        for n, x in pairs:
            if x.numel() if isinstance(x, torch.Tensor) else x.numel:  # empty tensors have no storage address
                g.setdefault(key(x), []).append(n)
        return sorted(sorted(v) for v in g.values())
    assert groups(ours.items(), id_of_storage) == groups(theirs.items(), lambda t: t.untyped_storage().data_ptr())


def id_of_storage(ref):
    return id(ref.storage)


@pytest.mark.parametrize("name", ["state_dict.pt", "all_dtypes.pt", "legacy_all_dtypes.pt", "renamed_archive.bin"])
def test_flat_state_dicts_match_torch_load(make, name):
    path = make(name)
    ckpt = ckpttool.open(path)
    sd = find_state_dict(ckpt)
    assert sd.entry is None and sd.source == "state_dict"
    theirs, locs = torch_load_with_locations(path)
    assert_same_state_dict(sd.tensors, theirs, locs)


def test_formats_are_detected_by_content(make):
    assert ckpttool.detect(make("state_dict.pt")) == "torch_zip"
    assert ckpttool.detect(make("renamed_archive.bin")) == "torch_zip"
    assert ckpttool.detect(make("legacy.pt")) == "torch_legacy"
    assert ckpttool.detect(make("torchscript.pt")) == "torchscript"
    assert ckpttool.detect(make("model.safetensors")) == "safetensors"
    assert ckpttool.detect(make("onnx_external")) == "onnx"
    assert ckpttool.detect(os.path.dirname(make("onnx_external"))) == "onnx"  # a folder with one model


def test_renamed_archive_folder_is_found(make):
    ckpt = ckpttool.open(make("renamed_archive.bin"))
    assert ckpt.metadata["archive_folder"] == "my_weights_v2"



def _open_fds_on(path) -> int:
    real = os.path.realpath(path)
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}") == real
        except OSError:
            pass
    return fds


def _shape_of(ckpt):
    sd = find_state_dict(ckpt)
    return (ckpt.format, ckpt.path, ckpt.file_size, {k: v for k, v in ckpt.metadata.items()},
            ckpt.globals, sd.entry, sd.source,
            [(n, t.shape, t.dtype, t.stride, t.storage_offset, t.device, t.storage.key, t.storage.nbytes,
              t.read_bytes()) for n, t in sd.tensors.items()])


@pytest.mark.parametrize("name", ["state_dict.pt", "renamed_archive.bin", "torchscript.pt", "sharded_bin"])
def test_open_reads_what_detect_then_open_reads(make, name):
    """open() reads a zip with the directory detection already parsed: the same checkpoint as
    naming the format, and no file left open either way."""
    path = make(name)
    before = _open_fds_on(path)
    detected = _shape_of(ckpttool.open(path))
    named = _shape_of(ckpttool.open(path, ckpttool.detect(path)))
    assert detected == named
    if os.path.exists("/proc/self/fd"):
        assert _open_fds_on(path) == before


def test_zip_that_is_not_a_checkpoint_is_refused_and_closed(tmp_path):
    import zipfile
    p = tmp_path / "notes.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("notes.txt", "hello")
    for call in (ckpttool.detect, ckpttool.open):
        with pytest.raises(ckpttool.FormatError, match="no data.pkl"):
            call(str(p))
    if os.path.exists("/proc/self/fd"):
        assert _open_fds_on(p) == 0

def test_every_zip_dtype_is_read(make):
    sd = find_state_dict(ckpttool.open(make("all_dtypes.pt"))).tensors
    dtypes = {t.dtype for t in sd.values()}
    for expected in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                     "float8_e5m2fnuz", "float8_e8m0fnu", "complex64",
                     "complex128", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool"):
        assert expected in dtypes


@pytest.mark.parametrize("name", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_gpu_tagged_files_keep_their_location_tags(committed, name):
    path = committed(name)
    with pytest.raises(RuntimeError, match="CUDA"):  # what plain torch.load does on a CPU-only machine
        if torch.cuda.is_available():
            raise RuntimeError("CUDA present: the refusal cannot be shown here")
        torch.load(path, weights_only=True)
    ckpt = ckpttool.open(path)
    sd = find_state_dict(ckpt)
    assert sd.entry == "model_state_dict"
    theirs, locs = torch_load_with_locations(path)
    assert set(locs.values()) == {"cuda:0", "cuda:1"}
    assert_same_state_dict(sd.tensors, theirs["model_state_dict"], locs)
    assert sd.tensors["fc.weight"].device == "cuda:1"
    assert sd.tensors["stem.weight"].device == "cuda:0"


@pytest.mark.parametrize("name", ["full_model.pth", "legacy_full_model.pt"])
def test_pickled_full_model_state_dict_matches_the_real_class(make, name):
    path = make(name)
    ckpt = ckpttool.open(path)
    sd = find_state_dict(ckpt)
    assert sd.source == "pickled_module" and sd.module_class == "mypkg.ClassNet"
    model = torch.load(path, weights_only=False)
    theirs = model.state_dict()
    assert "cache" not in sd.tensors  # the non-persistent buffer
    assert sd.tensors["head.weight"].storage is sd.tensors["embed.weight"].storage  # tied
    assert_same_state_dict(sd.tensors, theirs)
    assert sd.tensors["stem.weight"].is_parameter and not sd.tensors["scale"].is_parameter


def test_the_reader_never_imports_the_pickled_class(make, monkeypatch):
    import sys
    path = make("full_model.pth")
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)  # restored after: the fixture makers pickle it
    find_state_dict(ckpttool.open(path))
    assert "mypkg" not in sys.modules


def test_seed_checkpoint_picks_model_state_dict_and_reads_the_rest(committed):
    path = committed("seed_checkpoint.tar")
    ckpt = ckpttool.open(path)
    sd = find_state_dict(ckpt)
    assert sd.entry == "model_state_dict"
    theirs = torch.load(path, weights_only=False)
    assert_same_state_dict(sd.tensors, theirs["model_state_dict"])
    assert ckpt.root["epoch"] == 7 and ckpt.root["loss"] == 0.25
    # the pickled module under "model" has the same state_dict as the real one
    via_model = find_state_dict(ckpt, key="model")
    assert via_model.source == "pickled_module"
    assert_same_state_dict(via_model.tensors, theirs["model"].state_dict())
    # optimizer state: momentum buffers are tensors at their paths
    opt = find_state_dict(ckpt, key="optimizer_state_dict")
    want = {f"state/{i}/momentum_buffer": s["momentum_buffer"]
            for i, s in theirs["optimizer_state_dict"]["state"].items()}
    got = {k: v for k, v in opt.tensors.items() if k.endswith("momentum_buffer")}
    assert list(got) == list(want)
    for k in want:
        assert got[k].read_bytes() == _bytes(want[k])


def test_legacy_checkpoint_dict(make):
    path = make("legacy.pt")
    ckpt = ckpttool.open(path)
    assert ckpt.format == "torch_legacy"
    sd = find_state_dict(ckpt)
    assert sd.entry == "state_dict" and ckpt.root["epoch"] == 3
    theirs, locs = torch_load_with_locations(path)
    assert_same_state_dict(sd.tensors, theirs["state_dict"], locs)


def test_torchscript_state_dict_matches_jit_load(make):
    path = make("torchscript.pt")
    ckpt = ckpttool.open(path)
    assert ckpt.format == "torchscript"
    sd = find_state_dict(ckpt)
    assert sd.source == "script_module"
    theirs = torch.jit.load(path, map_location="cpu").state_dict()
    assert_same_state_dict(sd.tensors, theirs)


def test_safetensors_matches_safe_open(make):
    from safetensors import safe_open
    path = make("model.safetensors")
    ckpt = ckpttool.open(path)
    with safe_open(path, "pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert ckpt.metadata["metadata"] == meta == {"format": "pt", "source": "ckpttool fixtures"}
    ours = find_state_dict(ckpt).tensors
    assert sorted(ours) == sorted(theirs)
    assert_same_state_dict(ours, {k: theirs[k] for k in ours})


def test_safetensors_every_dtype(make):
    from safetensors.torch import load_file
    path = make("all_dtypes.safetensors")
    ours = find_state_dict(ckpttool.open(path)).tensors
    theirs = load_file(path)
    assert_same_state_dict(ours, {k: theirs[k] for k in ours})
    assert {"float8_e4m3fn", "float8_e5m2", "bfloat16", "uint64", "bool", "complex64"} <= {t.dtype for t in ours.values()}


@pytest.mark.parametrize("folder,fmt", [("sharded_safetensors", "safetensors_sharded"), ("sharded_bin", "torch_sharded")])
def test_sharded_folders(make, folder, fmt):
    from safetensors.torch import load_file
    path = make(folder)
    ckpt = ckpttool.open(path)  # the folder itself
    assert ckpt.format == fmt and len(ckpt.metadata["shards"]) == 2
    theirs = {}
    for shard in ckpt.metadata["shards"]:
        full = os.path.join(path, shard)
        theirs.update(load_file(full) if shard.endswith(".safetensors") else torch.load(full, weights_only=True))
    ours = find_state_dict(ckpt).tensors
    assert sorted(ours) == sorted(theirs)
    for k, ref in ours.items():
        assert ref.shape == tuple(theirs[k].shape) and ref.read_bytes() == _bytes(theirs[k])
    # the index file names the same checkpoint
    index = [f for f in os.listdir(path) if f.endswith(".index.json")][0]
    assert list(find_state_dict(ckpttool.open(os.path.join(path, index))).tensors) == list(ours)


def test_onnx_external_data(make):
    import onnx
    from onnx import numpy_helper
    path = make("onnx_external")
    ckpt = ckpttool.open(path)
    assert ckpt.format == "onnx" and ckpt.metadata["external_data"] == ["model.onnx.data"]
    model = onnx.load(path)  # loads external data
    ours = find_state_dict(ckpt).tensors
    assert list(ours) == [i.name for i in model.graph.initializer]
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        ref = ours[init.name]
        assert ref.shape == arr.shape
        assert ref.dtype == str(arr.dtype)
        assert ref.read_bytes() == arr.tobytes()
    assert {r.dtype for r in ours.values()} == {"float32", "int64", "float16", "bool", "int8", "float64"}


def test_opening_reads_no_tensor_bytes(make, monkeypatch):
    """open() and find_state_dict() never read tensor data: every data read goes through FileSpan.read."""
    from ckpttool import records
    calls = []
    monkeypatch.setattr(records.FileSpan, "read", lambda self, *a, **k: calls.append(self) or b"")
    for name in ("state_dict.pt", "legacy.pt", "torchscript.pt", "model.safetensors", "sharded_safetensors"):
        find_state_dict(ckpttool.open(make(name)))
    assert calls == []


def test_key_selects_nested_entries_and_names_what_exists(committed):
    ckpt = ckpttool.open(committed("seed_checkpoint.tar"))
    sd = find_state_dict(ckpt, key="optimizer_state_dict/state/0")
    assert list(sd.tensors) == ["momentum_buffer"]
    with pytest.raises(ckpttool.KeyNotFoundError, match="no entry 'nope' under the top level; entries there: model,"):
        find_state_dict(ckpt, key="nope")


def test_state_dict_discovery_order(tmp_path):
    t = torch.zeros(2)
    cases = [
        ({"a.w": t}, None),
        ({"state_dict": {"model.w": t}, "epoch": 1}, "state_dict"),
        ({"model_state_dict": {"w": t}, "model": {"w": t}}, "model_state_dict"),
        ({"model": {"w": t}, "state_dict_ema": {"w": t}}, "model"),
        ({"module": {"w": t}, "hparams": {"lr": 1}}, "module"),
        ({"state_dict_ema": {"w": t}, "epoch": 3}, "state_dict_ema"),
    ]
    for i, (obj, entry) in enumerate(cases):
        p = tmp_path / f"c{i}.pt"
        torch.save(obj, p)
        assert find_state_dict(ckpttool.open(str(p))).entry == entry, obj.keys()


def test_no_state_dict_lists_every_tensor_by_path(tmp_path):
    p = tmp_path / "opt.pt"
    torch.save({"optim": {"state": {0: {"exp_avg": torch.ones(3)}}}, "step": 5}, p)
    sd = find_state_dict(ckpttool.open(str(p)))
    assert sd.source == "all_tensors" and list(sd.tensors) == ["optim/state/0/exp_avg"]


def test_bare_pickle_file_is_read_safely(tmp_path):
    import pickle
    p = tmp_path / "hparams.pkl"
    p.write_bytes(pickle.dumps({"lr": 0.1, "layers": [1, 2]}))
    ckpt = ckpttool.open(str(p))
    assert ckpt.format == "pickle" and ckpt.root == {"lr": 0.1, "layers": [1, 2]}


def test_quantized_and_parameter_and_meta_tensors(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 10, torch.quint8)
    p = tmp_path / "mixed.pt"
    torch.save({"q": q, "param": torch.nn.Parameter(torch.ones(3)), "meta": torch.empty(2, 5, device="meta")}, p)
    tensors = dict(ckpttool.open(str(p)).root)
    assert tensors["q"].dtype == "quint8" and tensors["q"].kind == "quantized" and tensors["q"].shape == (4, 4)
    assert tensors["q"].read_bytes() == q.int_repr().numpy().tobytes()
    assert tensors["param"].is_parameter and tensors["param"].requires_grad
    assert tensors["meta"].device == "meta" and tensors["meta"].shape == (2, 5) and not tensors["meta"].has_data


def test_numpy_scalars_become_numbers_without_numpy(tmp_path):
    import numpy as np
    p = tmp_path / "np.pt"
    torch.save({"w": torch.ones(1), "best_acc": np.float64(0.75), "step": np.int64(1200), "ok": np.bool_(True)}, p)
    root = ckpttool.open(str(p)).root
    assert (root["best_acc"], root["step"], root["ok"]) == (0.75, 1200, True)
    assert type(root["step"]) is int
