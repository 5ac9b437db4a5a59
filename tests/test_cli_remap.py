"""`ckpttool remap` as a user runs it: JSON fields, exit codes, the exact error lines, nothing left behind."""
from __future__ import annotations

import json
import os

import pytest
import torch
from fulldisk import simulate_full_disk

from clitools import assert_error, files_in, js, run

import ckpttool
from ckpttool.tree import all_tensors


def devices(path) -> set:
    return {t.device for _, t in all_tensors(ckpttool.open(str(path)).root)}


@pytest.mark.parametrize("fixture, fmt", [("gpu_tagged.pt", "torch_zip"), ("gpu_tagged_legacy.pt", "torch_legacy")])
def test_json_fields(make, tmp_path, fixture, fmt):
    src = make(fixture)
    out = tmp_path / "cpu.pt"
    d = js("remap", src, "-o", out, "--map", "cuda=cpu")
    assert d["output"] == str(out) and d["format"] == fmt and d["tensors"] == 19
    assert d["mapped"] == {"cuda:0 -> cpu": 17, "cuda:1 -> cpu": 2}
    assert d["unchanged"] == {}
    got = torch.load(out, weights_only=True)  # plain load on this machine
    want = torch.load(src, map_location="cpu", weights_only=True)
    for k, v in want["model_state_dict"].items():
        assert got["model_state_dict"][k].device.type == "cpu" and torch.equal(got["model_state_dict"][k], v), k


def test_rule_order_on_the_command_line(make, tmp_path):
    d = js("remap", make("gpu_tagged.pt"), "-o", tmp_path / "o.pt", "--map", "cuda:1=cuda:0", "--map", "cuda=cpu")
    assert d["mapped"] == {"cuda:0 -> cpu": 17, "cuda:1 -> cuda:0": 2}
    assert devices(tmp_path / "o.pt") == {"cpu", "cuda:0"}


def test_a_map_that_moves_nothing_is_an_error_naming_the_devices(make, tmp_path):
    src = make("gpu_tagged.pt")
    r = run("remap", src, "-o", tmp_path / "o.pt", "--map", "cuda:0=cpu", "--map", "mps=cpu")
    assert r.exit_code == 0  # cuda:0 is there: work to do
    r = run("remap", src, "-o", tmp_path / "t.pt", "--map", "mps=cpu")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"ckpttool: error: --map mps=cpu moves no tensor: the file's tensors are on cuda:0 (17 tensors), "
        f"cuda:1 (2 tensors) ({src})",
        "hint: --map SRC=DST with SRC one of those devices (cuda matches every cuda:N)"]
    assert not (tmp_path / "t.pt").exists()


def test_table_output(make, tmp_path):
    r = run("remap", make("gpu_tagged.pt"), "-o", tmp_path / "o.pt", "--map", "cuda=cpu", "--check")
    assert r.exit_code == 0
    assert "cuda:0 -> cpu: 17 storages" in r.stdout and "every byte" in r.stdout


def test_check(make, tmp_path):
    d = js("remap", make("gpu_tagged_legacy.pt"), "-o", tmp_path / "o.pt", "--map", "cuda=cpu", "--check")
    assert d["checked"]["ok"] and d["checked"]["bytes_compared"] == 19


def test_torchscript_keeps_its_format(make, tmp_path):
    d = js("remap", make("torchscript.pt"), "-o", tmp_path / "g.pt", "--map", "cpu=cuda:0")
    assert d["format"] == "torchscript" and d["tensors"] == 19
    assert devices(tmp_path / "g.pt") == {"cuda:0"}
    d = js("remap", tmp_path / "g.pt", "-o", tmp_path / "c.pt", "--map", "cuda=cpu")
    m = torch.jit.load(str(tmp_path / "c.pt"))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(m(x), torch.jit.load(make("torchscript.pt"))(x))


# ---------------------------------------------------------------------------------------------
# errors


def test_safetensors_refused(make, tmp_path):
    src = make("model.safetensors")
    r = run("remap", src, "-o", tmp_path / "o.safetensors", "--map", "cuda=cpu")
    assert_error(r, "ckpttool: error: remap rewrites torch.save and TorchScript files; this is safetensors, "
                    f"which carries no device tags ({src})")
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("bad", ["cuda->cpu", "cuda", "=cpu", "cuda:one=cpu"])
def test_bad_map(make, tmp_path, bad):
    r = run("remap", make("gpu_tagged.pt"), "-o", tmp_path / "o.pt", "--map", bad)
    assert_error(r, f"ckpttool: error: --map {bad!r} is not SRC=DST with devices like cpu, cuda, cuda:1, mps")
    assert files_in(tmp_path) == set()


def test_map_is_required(make, tmp_path):
    r = run("remap", make("gpu_tagged.pt"), "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and "--map" in r.stderr
    assert files_in(tmp_path) == set()


def test_output_is_the_input(make, tmp_path):
    src = make("gpu_tagged.pt")
    r = run("remap", src, "-o", src, "--map", "cuda=cpu", "--force")
    assert_error(r, f"ckpttool: error: output is one of the inputs; refusing to write over it ({src})")
    link = tmp_path / "l.pt"
    os.symlink(src, link)
    r = run("remap", src, "-o", link, "--map", "cuda=cpu", "--force")
    assert_error(r, f"ckpttool: error: output is one of the inputs; refusing to write over it ({link})")
    assert devices(src) == {"cuda:0", "cuda:1"}


def test_existing_output_needs_force(make, tmp_path):
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")
    r = run("remap", make("gpu_tagged.pt"), "-o", out, "--map", "cuda=cpu")
    assert_error(r, f"ckpttool: error: output exists ({out})", "pass --force to replace it")
    assert out.read_bytes() == b"old"
    assert run("remap", make("gpu_tagged.pt"), "-o", out, "--map", "cuda=cpu", "--force").exit_code == 0
    assert devices(out) == {"cpu"}


def test_missing_input(tmp_path):
    r = run("remap", tmp_path / "nope.pt", "-o", tmp_path / "o.pt", "--map", "cuda=cpu")
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: ") and "Traceback" not in r.stderr
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("fixture", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_full_disk(monkeypatch, make, tmp_path, fixture):
    """The disk under OUT has 3000 bytes left: exit 2, the one line, no OUT and no temporary file."""
    opened = simulate_full_disk(monkeypatch, ["ckpttool.remapping"])
    out = tmp_path / "o.pt"
    try:
        r = run("remap", make(fixture), "-o", out, "--map", "cuda=cpu")
    finally:
        for f in opened:
            f._f.close()
    assert_error(r, f"ckpttool: error: cannot write the output: No space left on device ({out})")
    assert files_in(tmp_path) == set()


def _gpu_bin_shards(folder):
    """An HF folder of torch.save shards tagged cuda:1 (one zip, one legacy) + pytorch_model.bin.index.json."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"))
    from make_fixtures import location_tags
    folder.mkdir()
    torch.manual_seed(0)
    parts = {"pytorch_model-00001-of-00002.bin": {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)},
             "pytorch_model-00002-of-00002.bin": {"b.weight": torch.randn(5, 3)}}
    with location_tags(lambda storage: "cuda:1"):
        torch.save(parts["pytorch_model-00001-of-00002.bin"], folder / "pytorch_model-00001-of-00002.bin")
        torch.save(parts["pytorch_model-00002-of-00002.bin"], folder / "pytorch_model-00002-of-00002.bin",
                   _use_new_zipfile_serialization=False)
    index = {"metadata": {"total_size": 120}, "weight_map": {k: f for f, sd in parts.items() for k in sd}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return parts, index


def test_hf_bin_shards_are_remapped_shard_by_shard(tmp_path):
    """An HF folder of GPU-tagged torch.save shards (one zip, one legacy) + pytorch_model.bin.index.json: OUT is a
    folder with every shard remapped (each loads with a plain torch.load here), the index copied, and --force
    needed to replace it. Sharded safetensors carry no tags and are refused."""
    src = tmp_path / "hf"
    parts, index = _gpu_bin_shards(src)
    assert devices(src) == {"cuda:1"}
    out = tmp_path / "cpu"
    d = js("remap", src, "-o", out, "--map", "cuda=cpu", "--check")
    assert d["format"] == "torch_sharded" and d["mapped"] == {"cuda:1 -> cpu": 3} and d["tensors"] == 3
    assert d["checked"]["bytes_compared"] == 3
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    assert json.loads((out / "pytorch_model.bin.index.json").read_text()) == index
    for name, sd in parts.items():
        got = torch.load(out / name, weights_only=True)  # no map_location: this machine has no GPU
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert devices(out) == {"cpu"}
    r = run("remap", src, "-o", out, "--map", "cuda=cpu")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert run("remap", src, "-o", out, "--map", "cuda=cuda:0", "--force").exit_code == 0
    assert devices(out) == {"cuda:0"}
    st = tmp_path / "st"
    assert run("convert", tmp_path / "cpu", "-o", st, "--to", "safetensors", "--max-shard-size", "100B").exit_code == 0
    r = run("remap", st, "-o", tmp_path / "x", "--map", "cuda=cpu")
    assert r.exit_code == 2 and "safetensors_sharded" in r.stderr and not (tmp_path / "x").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary folder left behind"


def test_hf_bin_shards_with_a_truncated_shard_write_nothing(tmp_path):
    """One shard cut short: a one-line error naming it, exit 2, no OUT folder and no temporary folder left."""
    src = tmp_path / "hf"
    _gpu_bin_shards(src)
    shard = src / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-40])
    r = run("remap", src, "-o", tmp_path / "cpu", "--map", "cuda=cpu")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert "pytorch_model-00002-of-00002.bin" in r.stderr
    assert files_in(tmp_path) == {"hf"}


def test_hf_folder_keeps_its_other_files_and_prefers_the_bin_index(tmp_path):
    """Remapping an HF model folder gives a whole model folder: config/tokenizer files are copied (and listed), and a
    folder holding both a safetensors and a .bin index is remapped through the .bin one."""
    src = tmp_path / "hf"
    parts, index = _gpu_bin_shards(src)
    (src / "config.json").write_text('{"model_type": "x"}')
    (src / "tokenizer.json").write_text("{}")
    st = tmp_path / "st"
    assert run("convert", src / "pytorch_model.bin.index.json", "-o", st, "--to", "safetensors",
               "--max-shard-size", "100B").exit_code == 0
    for n in os.listdir(st):
        os.link(st / n, src / n)
    d = js("remap", src, "-o", tmp_path / "cpu", "--map", "cuda=cpu")
    assert d["format"] == "torch_sharded" and d["mapped"] == {"cuda:1 -> cpu": 3}
    assert "config.json" in d["copied"] and "model.safetensors.index.json" in d["copied"]
    assert sorted(os.listdir(tmp_path / "cpu")) == sorted(os.listdir(src))
    assert (tmp_path / "cpu" / "config.json").read_text() == '{"model_type": "x"}'
    assert devices(tmp_path / "cpu" / "pytorch_model.bin.index.json") == {"cpu"}


def test_hf_index_naming_a_shard_outside_out_is_refused_and_the_input_untouched(tmp_path):
    """An index may name a shard as '../hf/x.bin' (inside its own folder once resolved); remap would write that name
    beside OUT, over the input: it is refused, nothing written, the shard unchanged."""
    src = tmp_path / "hf"
    _gpu_bin_shards(src)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: "../hf/" + v for k, v in index["weight_map"].items()}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    before = {n: (src / n).read_bytes() for n in os.listdir(src)}
    assert devices(src) == {"cuda:1"}  # the index is readable as it is
    r = run("remap", src, "-o", tmp_path / "out", "--map", "cuda=cpu")
    assert r.exit_code == 2 and "would leave OUT" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {n: (src / n).read_bytes() for n in os.listdir(src)} == before
    assert files_in(tmp_path) == {"hf"}
