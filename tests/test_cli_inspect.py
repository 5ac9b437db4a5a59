"""`ckpttool inspect` as a user runs it: tables, JSON, options, exit codes, and no torch import."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from ckpttool.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def js(*args):
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_json_fields_per_design(committed):
    d = js("inspect", committed("seed_checkpoint.tar"))
    assert d["format"] == "torch_zip"
    assert d["entry"] == "model_state_dict"
    sd = torch.load(committed("seed_checkpoint.tar"), weights_only=False)["model_state_dict"]
    assert [t["name"] for t in d["tensors"]] == list(sd)
    first = d["tensors"][0]
    assert set(first) >= {"name", "shape", "dtype", "device", "nbytes"}
    by_name = {t["name"]: t for t in d["tensors"]}
    assert by_name["stem.weight"]["shape"] == [8, 3, 3, 3] and by_name["stem.weight"]["dtype"] == "float32"
    assert by_name["blocks.0.bn.num_batches_tracked"]["dtype"] == "int64"
    assert d["total_params"] == sum(t.numel() for t in sd.values())
    assert d["total_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert d["other_entries"]["epoch"] == "7"
    assert d["other_entries"]["optimizer_state_dict"] == "SGD optimizer state: 11 params in 1 group, lr=0.1"
    model = torch.load(committed("seed_checkpoint.tar"), weights_only=False)["model"]
    assert d["pickled_classes"] == sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()})
    assert ["embed.weight", "head.weight"] in d["shared_storages"]


def test_table_shows_summary_and_tensors(committed):
    r = run("inspect", committed("seed_checkpoint.tar"))
    assert r.exit_code == 0
    out = r.stdout
    assert "state_dict  model_state_dict" in out
    assert "epoch: 7" in out
    assert "holds pickled class mypkg.ClassNet; its state_dict is readable here, running it needs its code and --trust" in out
    assert "embed.weight = head.weight" in out
    line = next(l for l in out.splitlines() if l.startswith("stem.weight "))
    assert line.split() == ["stem.weight", "(8,", "3,", "3,", "3)", "float32", "cpu", "864", "B"]


def test_json_is_the_only_thing_on_stdout(committed):
    r = run("inspect", committed("gpu_tagged_legacy.pt"), "--json")
    json.loads(r.stdout)  # raises if anything else is there


def test_gpu_tagged_devices_are_reported(committed):
    d = js("inspect", committed("gpu_tagged.pt"))
    assert d["devices"] == {"cuda:0": 17, "cuda:1": 2}
    assert {t["name"]: t["device"] for t in d["tensors"]}["fc.bias"] == "cuda:1"


def test_filter_and_sort(committed):
    d = js("inspect", committed("seed_checkpoint.tar"), "--filter", r"^blocks\.0\.", "--sort", "size")
    names = [t["name"] for t in d["tensors"]]
    assert names and all(n.startswith("blocks.0.") for n in names)
    sizes = [t["nbytes"] for t in d["tensors"]]
    assert sizes == sorted(sizes, reverse=True)
    d = js("inspect", committed("seed_checkpoint.tar"), "--sort", "name")
    names = [t["name"] for t in d["tensors"]]
    assert names == sorted(names)


def test_depth_folds_into_a_module_tree(committed):
    d = js("inspect", committed("seed_checkpoint.tar"), "--depth", "1")
    tree = {row["module"]: row for row in d["tree"]}
    assert tree["blocks"]["tensors"] == 12
    assert tree["fc"]["values"] == 8 * 10 + 10 and "parameters" not in tree["fc"]  # a state_dict: not said
    assert tree["(top)"]["tensors"] == 1  # the 'scale' buffer
    r = run("inspect", committed("seed_checkpoint.tar"), "--depth", "2")
    assert "blocks.0" in r.stdout and "blocks.1" in r.stdout


def test_parameters_and_buffers_apart_where_the_file_says(tmp_path):
    """A pickled module says which tensors are parameters (``_parameters``) and which buffers: counted apart,
    as ``model.parameters()`` counts; a state_dict does not say, and the column is "values"."""
    import torch
    import torchvision
    m = torchvision.models.resnet18(weights=None)
    torch.save(m, tmp_path / "full.pt")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    params = sum(p.numel() for p in m.parameters())
    buffers = sum(b.numel() for b in m.buffers())
    d = js("inspect", str(tmp_path / "full.pt"), "--depth", "1")
    assert (d["parameters"], d["buffers"], d["total_values"]) == (params, buffers, params + buffers)
    assert d["total_params"] == params  # the file says which are parameters: model.parameters()'s count
    tree = {row["module"]: row for row in d["tree"]}
    assert tree["bn1"] == {"module": "bn1", "tensors": 5, "values": 64 * 4 + 1, "parameters": 128, "buffers": 129}
    r = run("inspect", str(tmp_path / "full.pt"))
    assert f"tensors     122, {params + buffers:,} values ({params:,} in parameters, {buffers:,} in buffers)" \
        in r.stdout
    d = js("inspect", str(tmp_path / "sd.pt"), "--depth", "1")
    assert (d["parameters"], d["buffers"], d["total_values"]) == (None, None, params + buffers)
    r = run("inspect", str(tmp_path / "sd.pt"), "--depth", "1")
    assert r.stdout.splitlines()[8].split() == ["module", "tensors", "values"]


def test_stats_match_torch(make):
    path = make("state_dict.pt")
    d = js("inspect", path, "--stats")
    sd = torch.load(path, weights_only=True)
    for t in d["tensors"]:
        ref = sd[t["name"]].double()
        s = t["stats"]
        assert s["min"] == pytest.approx(ref.min().item())
        assert s["max"] == pytest.approx(ref.max().item())
        # float32 values measured in float32 arithmetic, as torch's own std() of the tensor: ~1e-7 relative
        tight = sd[t["name"]].dtype == torch.float64 or not sd[t["name"]].is_floating_point()
        assert s["mean"] == pytest.approx(ref.mean().item(), rel=1e-12 if tight else 1e-6, abs=1e-12 if tight else 1e-7)
        if ref.numel() > 1:
            assert s["std"] == pytest.approx(ref.std().item(), rel=1e-9 if tight else 1e-6)
            assert s["std"] == pytest.approx(sd[t["name"]].std().item(), rel=1e-6)
        assert s["nan"] == 0 and s["inf"] == 0


def test_stats_count_nan_and_inf_across_chunks(tmp_path):
    from ckpttool import open as ck_open, find_state_dict, tensor_stats
    t = torch.randn(10000)
    t[5] = float("nan")
    t[9000] = float("inf")
    t[9001] = float("-inf")
    p = tmp_path / "x.pt"
    torch.save({"w": t}, p)
    ref = find_state_dict(ck_open(str(p))).tensors["w"]
    s = tensor_stats(ref, chunk_bytes=4096)  # force many chunks
    finite = t[torch.isfinite(t)].double()
    assert (s["nan"], s["inf"]) == (1, 2)
    assert s["mean"] == pytest.approx(finite.mean().item(), abs=1e-7)  # float32 arithmetic, as torch's std()
    assert s["std"] == pytest.approx(finite.std().item(), rel=1e-6)
    assert s["min"] == finite.min().item() and s["max"] == finite.max().item()
    d = t.double()  # float64 values: measured in float64
    torch.save({"w": d}, p)
    s = tensor_stats(find_state_dict(ck_open(str(p))).tensors["w"], chunk_bytes=4096)
    assert (s["nan"], s["inf"]) == (1, 2)
    assert s["mean"] == pytest.approx(finite.mean().item(), abs=1e-12)
    assert s["std"] == pytest.approx(finite.std().item(), rel=1e-9)


def test_key_option_and_unknown_key(committed):
    d = js("inspect", committed("seed_checkpoint.tar"), "--key", "model")
    assert d["entry"] == "model" and d["entry_source"] == "pickled_module"
    r = run("inspect", committed("seed_checkpoint.tar"), "--key", "weights")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        "ckpttool: error: no entry 'weights' under the top level; entries there: model, model_state_dict, "
        f"optimizer_state_dict, scheduler, epoch, loss ({committed('seed_checkpoint.tar')})"]
    assert r.stdout == ""


def test_bad_filter_regex_is_a_usage_error(committed):
    r = run("inspect", committed("model.safetensors"), "--filter", "(")
    assert r.exit_code == 2
    assert r.stderr.startswith("ckpttool: error: --filter is not a valid regular expression")


def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.pt")
    r = run("inspect", p)
    assert r.exit_code == 2
    assert r.stderr == f"ckpttool: error: no such file or directory ({p})\n"


def test_safetensors_metadata_and_formats(committed, make):
    d = js("inspect", committed("model.safetensors"))
    assert d["format"] == "safetensors" and d["metadata"]["metadata"]["source"] == "ckpttool fixtures"
    assert js("inspect", make("sharded_safetensors"))["format"] == "safetensors_sharded"
    assert js("inspect", make("legacy.pt"))["entry"] == "state_dict"
    assert js("inspect", make("torchscript.pt"))["entry_source"] == "script_module"
    assert js("inspect", make("onnx_external"))["format"] == "onnx"


def test_version_and_help():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("ckpttool ")
    r = run("inspect", "--help")
    assert r.exit_code == 0 and "Examples:" in r.stdout and "ckpttool inspect" in r.stdout


def _modules_after(code: str):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("fixture", ["seed_checkpoint.tar", "model.safetensors", "gpu_tagged_legacy.pt"])
def test_inspect_does_not_import_torch(committed, fixture):
    path = committed(fixture)
    mods = _modules_after(
        "import sys, io, contextlib\n"
        "from ckpttool.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['inspect', %r, '--json'])\n"
        "    except SystemExit as e: assert e.code == 0, e.code\n"
        "print(' '.join(sys.modules))\n" % path)
    assert "ckpttool.summary" in mods  # the command really ran
    assert "torch" not in mods and "onnx" not in mods and "numpy" not in mods


def test_import_and_help_do_not_import_torch():
    mods = _modules_after("import sys, ckpttool\nprint(' '.join(sys.modules))")
    assert "torch" not in mods and "click" not in mods
    out = subprocess.run([sys.executable, "-m", "ckpttool", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout
    mods = _modules_after(
        "import sys\nfrom ckpttool.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
        "print(' '.join(sys.modules))")
    assert "torch" not in mods


def test_console_script_runs(committed):
    exe = os.path.join(os.path.dirname(sys.executable), "ckpttool")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "ckpttool"]
    out = subprocess.run(cmd + ["inspect", committed("gpu_tagged.pt")], capture_output=True, text=True)
    assert out.returncode == 0 and "cuda:1" in out.stdout


def test_console_script_output_is_whole_when_it_skips_teardown(tmp_path):
    """The console script leaves with os._exit after flushing: JSON far larger than a pipe's buffer
    arrives whole, and a text table ends with its last row."""
    p = tmp_path / "many.pt"
    torch.save({f"block{i}.weight": torch.zeros(i % 5 + 1) for i in range(3000)}, p)
    out = subprocess.run([sys.executable, "-m", "ckpttool", "inspect", str(p), "--json"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) > 1 << 18
    d = json.loads(out.stdout)
    assert [t["name"] for t in d["tensors"]] == [f"block{i}.weight" for i in range(3000)]
    text = subprocess.run([sys.executable, "-m", "ckpttool", "inspect", str(p)], capture_output=True, text=True)
    assert text.returncode == 0 and text.stdout.rstrip().splitlines()[-1].split()[0] == "block2999.weight"


def test_debug_shows_the_traceback(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    r = CliRunner().invoke(cli, ["--debug", "inspect", str(p)])
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "FormatError"
