"""torch.distributed.checkpoint folders, written by torch's own dcp.save, read by ckpttool in every command."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision

from clitools import run

import ckpttool
from ckpttool.errors import CkptError, FormatError
from ckpttool.tree import find_state_dict


def dcp_save(state, folder) -> str:
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process save warns that no process group exists
        dcp.save(state, checkpoint_id=str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A resnet18 after one SGD step, saved by dcp.save as {"model", "optim", "epoch"} and by torch.save."""
    d = tmp_path_factory.mktemp("dcp_resnet")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    folder = dcp_save({"model": m.state_dict(), "epoch": 5, "note": "run-1"}, d / "ck")
    plain = str(d / "plain.pt")
    torch.save(m.state_dict(), plain)
    return folder, plain, m.state_dict()


def test_reads_every_tensor_and_value_bit_for_bit(resnet):
    folder, _, ref = resnet
    ckpt = ckpttool.open(folder)
    assert ckpt.format == "dcp"
    assert ckpt.root["epoch"] == 5 and ckpt.root["note"] == "run-1"
    sd = find_state_dict(ckpt)
    assert sd.entry == "model" and list(sd.tensors) == list(ref)
    for name, t in sd.tensors.items():
        x = t.to_torch()
        assert x.dtype == ref[name].dtype and torch.equal(x, ref[name]), name


def test_inspect_diff_convert_verify_scan_filter(resnet, tmp_path):
    folder, plain, ref = resnet
    r = run("inspect", folder, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == "dcp" and d["entry"] == "model" and len(d["tensors"]) == len(ref)

    r = run("diff", folder, plain, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["equal"] is True, r.output

    for out in (tmp_path / "o.pt", tmp_path / "o.safetensors"):
        r = run("convert", folder, "-o", out, "--check")
        assert r.exit_code == 0, r.output
        back = torch.load(out, weights_only=True) if out.suffix == ".pt" else \
            __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out))
        assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)

    r = run("verify", folder, "--model", "torchvision.models:resnet18", "--input-shape", "1x3x32x32", "--json")
    assert r.exit_code == 0, r.output
    checks = {(c["name"], c["device"]): c["status"] for c in json.loads(r.stdout)["checks"]}
    assert checks[("loads into model", "cpu")] == "pass" and checks[("integrity", None)] == "skip"

    r = run("scan", folder, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["dangerous"] is False, r.output

    r = run("filter", folder, "--model", "torchvision.models:resnet18", "--arg", "num_classes=10",
            "-o", tmp_path / "fit.pt", "--json")
    assert r.exit_code == 0, r.output
    assert {d["name"] for d in json.loads(r.stdout)["dropped_shape_mismatch"]} == {"fc.weight", "fc.bias"}


TWO_RANKS = textwrap.dedent("""
    import os, sys, warnings, torch, torch.distributed as dist, torch.multiprocessing as mp, torchvision
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor, Shard, Replicate

    def run(rank, world, out, port):
        warnings.simplefilter("ignore")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None, num_classes=7)  # fc: 7 rows over 2 ranks, uneven
        for block in (model.layer1, model.layer2, model.layer3, model.layer4):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # FSDP2: every parameter a DTensor split along dim 0
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
        extra = {"cols": torch.randn(5, 7), "half_cols": torch.randn(3, 9).half(), "b": torch.arange(5.0),
                 "step": torch.tensor(3)}
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "cols": distribute_tensor(extra["cols"], mesh, [Shard(1)]),  # tensor-parallel style: split columns
              "half_cols": distribute_tensor(extra["half_cols"], mesh, [Shard(1)]),
              "b": distribute_tensor(extra["b"], mesh, [Replicate()]), "step": extra["step"]}
        assert sd["model"]["fc.weight"].placements == (Shard(0),)
        dcp.save(sd, checkpoint_id=out)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, out + ".model.pt")
            torch.save(extra, out + ".extra.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A resnet18 sharded by FSDP2 over two gloo ranks (plus column-split DTensors), saved by dcp.save."""
    d = tmp_path_factory.mktemp("dcp_two_ranks")
    script = d / "two.py"
    script.write_text(TWO_RANKS)
    out = str(d / "sharded")
    port = str(29500 + os.getpid() % 500)
    r = subprocess.run([sys.executable, str(script), out, port], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, torch.load(out + ".model.pt", weights_only=True), torch.load(out + ".extra.pt", weights_only=True)


def test_fsdp2_model_sharded_across_two_ranks_is_reassembled(two_ranks):
    """Every parameter of an FSDP2 model split across two ranks reads back equal to the unsharded state_dict."""
    out, model, extra = two_ranks
    assert sorted(n for n in os.listdir(out) if n.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ckpt = ckpttool.open(out)
    sd = find_state_dict(ckpt)
    assert sd.entry == "model" and set(sd.tensors) == set(model)  # DCP keeps its own order
    for name, ref in model.items():
        t = sd.tensors[name]
        assert tuple(t.shape) == tuple(ref.shape) and torch.equal(t.to_torch(), ref), name
    assert len(ckpt.root["optim"]["state"]) == len([k for k in model if "running" not in k and "num_batches" not in k])
    d = ckpttool.diff(out, out + ".model.pt")
    assert d.equal and d.exact == len(model)
    r = run("verify", out, "--model", "torchvision.models:resnet18", "--arg", "num_classes=7",
            "--input-shape", "1x3x32x32", "--json")
    assert r.exit_code == 0, r.output


def test_tensors_split_along_columns_are_reassembled(two_ranks, tmp_path):
    """DTensors split along dim 1 (tensor-parallel style) and a replicated one read back whole; they convert to
    safetensors and back and verify."""
    out, _, extra = two_ranks
    ckpt = ckpttool.open(out)
    for name, ref in extra.items():
        t = ckpt.root[name]
        assert tuple(t.shape) == tuple(ref.shape) and torch.equal(t.to_torch(), ref), name
    st = str(tmp_path / "sharded.safetensors")
    r = run("convert", out, "--key", "model", "-o", st, "--check")
    assert r.exit_code == 0, r.output
    torch.save({k: ckpt.root[k].to_torch() for k in extra}, tmp_path / "x.pt")
    assert ckpttool.diff(str(tmp_path / "x.pt"), out + ".extra.pt").equal
    r = run("convert", st, "-o", tmp_path / "back.pt", "--check")
    assert r.exit_code == 0, r.output
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    model = torch.load(out + ".model.pt", weights_only=True)
    assert set(back) == set(model) and all(torch.equal(back[k], model[k]) for k in model)
    v = run("verify", out, "--json")
    assert v.exit_code == 0, v.output
    statuses = {(c["name"], c["device"]): c["status"] for c in json.loads(v.stdout)["checks"]}
    assert statuses[("format round trip", "torch_zip")] == "pass" and ("device round trip", "cpu") not in statuses


def test_metadata_naming_a_foreign_class_is_refused_and_not_run(tmp_path, resnet):
    """Only DCP's own metadata classes may appear in .metadata; anything else is an error, never imported."""
    folder, _, _ = resnet
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in os.listdir(folder):
        if n.endswith(".distcp"):
            os.link(os.path.join(folder, n), bad / n)
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    (bad / ".metadata").write_bytes(pickle.dumps(Evil(), protocol=2))
    r = run("inspect", bad)
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: ") and "Traceback" not in r.output
    assert not marker.exists()
    with pytest.raises(FormatError):
        ckpttool.open(str(bad))


def test_missing_data_file_is_one_error_line(tmp_path, resnet):
    folder, _, _ = resnet
    bad = tmp_path / "nodata"
    bad.mkdir()
    (bad / ".metadata").write_bytes(open(os.path.join(folder, ".metadata"), "rb").read())
    r = run("inspect", bad)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr
    with pytest.raises(CkptError):
        ckpttool.open(str(bad))


def test_truncated_data_file_is_an_error(tmp_path, resnet):
    folder, _, _ = resnet
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / ".metadata").write_bytes(open(os.path.join(folder, ".metadata"), "rb").read())
    for n in os.listdir(folder):
        if n.endswith(".distcp"):
            data = open(os.path.join(folder, n), "rb").read()
            (bad / n).write_bytes(data[: len(data) // 2])
    r = run("inspect", bad)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_convert_to_dcp_is_read_back_by_torch_and_round_trips(resnet, tmp_path):
    """--to dcp is written by torch's own dcp.save: dcp.load reads it into a model; DCP -> sharded
    safetensors -> .pt gives the same tensors back."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    folder, plain, ref = resnet
    out = tmp_path / "as_dcp"
    r = run("convert", plain, "-o", out, "--to", "dcp", "--check", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == "dcp" and d["tensors"] == len(ref) and d["checked"]["bytes_compared"] == len(ref)
    model = torchvision.models.resnet18(weights=None)
    sd = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(out))
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # existing output folder: refused without --force, replaced with it
    assert run("convert", plain, "-o", out, "--to", "dcp").exit_code == 2
    assert run("convert", plain, "-o", out, "--to", "dcp", "--force").exit_code == 0
    # DCP -> sharded safetensors -> .pt
    shards = tmp_path / "shards"
    assert run("convert", out, "-o", shards, "--to", "safetensors", "--max-shard-size", "10MB").exit_code == 0
    back = {}
    for n in os.listdir(shards):
        if n.endswith(".safetensors"):
            back.update(load_file(str(shards / n)))
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    assert run("convert", shards, "-o", tmp_path / "back.pt").exit_code == 0
    again = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    assert ckpttool.diff(str(out), plain).equal


@pytest.mark.parametrize("field,value", [("offset", None), ("length", "12"), ("offset", 1.5), ("fqn", ["w"])])
def test_metadata_fields_of_the_wrong_type_are_format_errors(tmp_path, field, value):
    """.metadata is the file's to choose: a field of an unexpected type is a malformed file (exit 2), not a crash."""
    folder = dcp_save({"w": torch.arange(12.0).reshape(4, 3), "epoch": 5}, tmp_path / "ck")
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        meta = pickle.load(f)  # our own file, written by dcp.save just above
    key = next(k for k in meta.storage_data if k.fqn == "w")
    if field == "fqn":
        object.__setattr__(key, "fqn", value)
    else:
        object.__setattr__(meta.storage_data[key], field, value)
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(CkptError):
        ckpttool.open(folder)
    r = run("inspect", folder)
    assert r.exit_code == 2 and "Traceback" not in r.output and r.stderr.startswith("ckpttool: error: ")


def _tiles_of(full: torch.Tensor, cuts):
    """Cut ``full`` into a grid at ``cuts`` (per dim, inner edges) and assemble it back with dcp._Tiles."""
    import itertools
    from ckpttool.formats.dcp import _Tiles
    from ckpttool.records import BufferSpan
    edges = [[0, *c, n] for c, n in zip(cuts, full.shape)]
    parts = []
    for cell in itertools.product(*[range(len(e) - 1) for e in edges]):
        offsets = tuple(edges[d][i] for d, i in enumerate(cell))
        sizes = tuple(edges[d][i + 1] - edges[d][i] for d, i in enumerate(cell))
        block = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].contiguous()
        raw = b"\0" * 8 + block.numpy().tobytes()  # the chunk's bytes start 8 bytes into its source
        parts.append((offsets, sizes, BufferSpan(raw), 8))
    return _Tiles(tuple(full.shape), full.element_size(), parts, "x")


@pytest.mark.parametrize("shape,cuts", [
    ((10,), [[3, 7]]), ((6, 4), [[2], []]), ((6, 4), [[], [1, 3]]), ((5, 7), [[2], [3]]),
    ((4, 3, 5), [[1], [2], [2, 4]]), ((3, 4, 2, 6), [[], [2], [], [1, 5]]), ((2, 3, 4), [[1], [], []])])
def test_tiles_assemble_any_grid_of_chunks(shape, cuts):
    """Chunks cut along any dimensions assemble into the tensor's C-order bytes, whole and in every sub-range."""
    torch.manual_seed(1)
    full = torch.randn(shape, dtype=torch.float64)
    tiles = _tiles_of(full, cuts)
    want = full.numpy().tobytes()
    assert tiles.size == len(want) and tiles.read() == want
    n = len(want)
    for start, size in [(0, 1), (3, 17), (8, 8), (n - 5, 5), (n // 2, n // 3), (1, n - 2)]:
        assert tiles.read(start, size) == want[start:start + size], (start, size)
        buf = bytearray(size)
        tiles.readinto(start, buf)
        assert bytes(buf) == want[start:start + size]
    with pytest.raises(FormatError):
        tiles.read(n - 2, 3)


def test_chunks_that_overlap_or_leave_a_gap_are_refused(two_ranks, tmp_path):
    """A .metadata whose chunks of one tensor overlap (and so leave columns uncovered) is a FormatError, exit 2."""
    import dataclasses
    import shutil
    out, _, _ = two_ranks
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    path = bad / ".metadata"
    with open(path, "rb") as f:
        meta = pickle.load(f)  # written by dcp.save in the fixture
    chunks = meta.state_dict_metadata["cols"].chunks
    second = chunks[1]
    moved = dataclasses.replace(second, offsets=torch.Size([0, second.offsets[1] - 1]))
    chunks[1] = moved
    key = next(k for k in meta.storage_data if k.fqn == "cols" and tuple(k.offset) == tuple(second.offsets))
    meta.storage_data[dataclasses.replace(key, offset=moved.offsets)] = meta.storage_data.pop(key)
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(FormatError, match="overlap"):
        ckpttool.open(str(bad))
    r = run("inspect", bad)
    assert r.exit_code == 2 and "overlap" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("boxes,message", [
    ([((0, 0), (2, 4)), ((2, 0), (3, 4))], "do not cover"),          # rows 5..5 missing
    ([((0, 0), (6, 2)), ((0, 1), (6, 3))], "overlap"),               # column 1 twice
    ([((0, 0), (3, 4)), ((3, 0), (3, 2)), ((3, 2), (3, 2))], None),  # an exact three-piece tiling
])
def test_tiling_check(boxes, message):
    from ckpttool.formats.dcp import _check_tiling
    if message is None:
        _check_tiling("w", (6, 4), boxes, "m")
    else:
        with pytest.raises(FormatError, match=message):
            _check_tiling("w", (6, 4), boxes, "m")


def test_convert_to_dcp_past_the_single_file_size_writes_a_file_per_tensor(resnet, tmp_path, monkeypatch):
    """Above DCP_SINGLE_FILE bytes, --to dcp writes one .distcp per tensor (DCP's own layout, so memory holds one
    tensor at a time); torch's dcp.load reads it, --dtype casts on the way."""
    import torch.distributed.checkpoint as dcp
    import ckpttool.converting as converting
    _, plain, ref = resnet
    monkeypatch.setattr(converting, "DCP_SINGLE_FILE", 1 << 20)
    out = tmp_path / "per_tensor"
    r = ckpttool.convert(plain, str(out), to="dcp", dtype="fp16", check=True)
    assert r.format == "dcp" and r.checked["bytes_compared"] == len(ref)
    assert len([n for n in os.listdir(out) if n.endswith(".distcp")]) == len(ref)
    sd = {k: torch.empty_like(v, dtype=torch.float16 if v.is_floating_point() else v.dtype) for k, v in ref.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(out))
    for k, v in ref.items():
        want = v.half() if v.is_floating_point() else v
        assert sd[k].dtype == want.dtype and torch.equal(sd[k], want), k


def test_tiles_with_a_strided_chunk():
    """A chunk saved as a transposed view (torch.save keeps its strides) is gathered into C order."""
    from ckpttool.formats.dcp import _Gathered, _Tiles
    from ckpttool.records import BufferSpan, StorageRef, TensorRef
    full = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    left = full[:, :3].contiguous()
    right_t = full[:, 3:].t().contiguous()  # stored (3, 4); the chunk is its (4, 3) transpose
    storage = StorageRef(key="0", dtype="int32", device="cpu", nbytes=48,
                         source=BufferSpan(right_t.numpy().tobytes()))
    right = TensorRef(shape=(4, 3), dtype="int32", stride=(1, 4), storage=storage)
    assert not right.is_contiguous
    tiles = _Tiles((4, 6), 4, [((0, 0), (4, 3), BufferSpan(left.numpy().tobytes()), 0),
                               ((0, 3), (4, 3), _Gathered(right), 0)], "x")
    assert tiles.read() == full.numpy().tobytes()
    assert tiles.read(13, 50) == full.numpy().tobytes()[13:63]


def test_metadata_dtype_that_disagrees_with_the_chunks_is_refused(tmp_path):
    folder = dcp_save({"w": torch.arange(12.0).reshape(4, 3)}, tmp_path / "ck")
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        meta = pickle.load(f)  # our own file, written by dcp.save just above
    object.__setattr__(meta.state_dict_metadata["w"].properties, "dtype", torch.int8)
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(FormatError, match="says int8 but its chunks hold float32"):
        ckpttool.open(folder)


@pytest.mark.parametrize("failure,message", [
    (FormatError("record archive/data/3 is corrupt", "src.pt"), "record archive/data/3 is corrupt"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "cannot write the output: torch.distributed.checkpoint.save failed: RuntimeError"),
])
def test_convert_to_dcp_failing_midway_is_one_error_line_and_writes_nothing(resnet, tmp_path, monkeypatch,
                                                                            failure, message):
    """dcp.save wraps whatever fails while it writes (a corrupt source tensor, a full disk, which torch.save reports
    as a RuntimeError) in a CheckpointException: the user gets the one-line error, exit 2, no folder left."""
    from ckpttool.records import TensorRef
    _, plain, _ = resnet
    calls = []
    real = TensorRef.to_torch

    def flaky(self):
        calls.append(1)
        if len(calls) == 5:
            raise failure
        return real(self)
    monkeypatch.setattr(TensorRef, "to_torch", flaky)
    r = run("convert", plain, "-o", tmp_path / "out", "--to", "dcp")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
    assert os.listdir(tmp_path) == []
