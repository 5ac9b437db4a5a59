"""`ckpttool diff` as a user runs it: exit codes, JSON, the human report, options and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clitools import run



def _no_constants(name):
    raise ValueError(f"JSON holds {name}, which is not JSON")


def js(*args, code=0):
    r = run(*args, "--json")
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert r.stderr == ""
    return json.loads(r.stdout, parse_constant=_no_constants)  # one strict JSON object, nothing else


def save(tmp_path, name, obj, **kw) -> str:
    p = str(tmp_path / name)
    if name.endswith(".safetensors"):
        save_file(obj, p)
    else:
        torch.save(obj, p, **kw)
    return p


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def assert_one_error_line(r, path=None):
    """Exit 2, nothing on stdout, one `ckpttool: error:` line (plus at most a hint), no traceback."""
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and lines[0].startswith("ckpttool: error: ")
    assert sum(1 for l in lines if l.startswith("ckpttool: error:")) == 1
    assert all(l.startswith("hint: ") for l in lines[1:]), lines
    assert len(lines) <= 2
    assert "Traceback" not in r.stderr and "Traceback" not in r.output
    if path is not None:
        assert lines[0].endswith(f" ({path})"), lines[0]
    return lines[0]


# ---------------------------------------------------------------- equal files

def test_equal_files_exit_0_with_the_json_schema(tmp_path, make):
    a = make("state_dict.pt")
    legacy = make("legacy.pt")
    n = len(torch.load(a, weights_only=True))
    d = js("diff", a, legacy)
    assert set(d) >= {"equal", "only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "value_mismatch",
                      "prefix_alignment"}
    assert d["equal"] is True and d["exact_equal"] == n
    for k in ("only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "value_mismatch", "value_close"):
        assert d[k] == [], k
    assert d["prefix_alignment"] is None
    assert d["a"] == {"path": a, "format": "torch_zip", "entry": None, "tensors": n}
    assert d["b"] == {"path": legacy, "format": "torch_legacy", "entry": "state_dict", "tensors": n}
    assert d["values_compared"] is True


def test_equal_across_formats_and_the_human_report(tmp_path):
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    sd = m.state_dict()
    pt = save(tmp_path, "r.pt", sd)
    st = save(tmp_path, "r.safetensors", {k: v.contiguous() for k, v in sd.items()})
    ts = str(tmp_path / "r_script.pt")
    torch.jit.save(torch.jit.script(m), ts)
    for other in (st, ts):
        r = run("diff", pt, other)
        assert r.exit_code == 0, r.output
        assert r.stderr == ""
        lines = r.stdout.splitlines()
        assert lines[-1] == "result: EQUAL"
        assert f"{len(sd)} exact, 0 within tolerance, 0 different" in r.stdout
        assert f"{len(sd)} common, 0 only in A, 0 only in B" in r.stdout
        assert "prefix alignment  none" in r.stdout


# ---------------------------------------------------------------- differences

@pytest.fixture
def differing(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(6, 5)
    w2 = w.clone()
    w2[4, 4] += 0.5
    w2[0, 1] -= 0.125
    a = {"w": w, "only_a": torch.ones(2), "shape": torch.zeros(2, 3), "dtype": torch.arange(4.0), "same": w.sum(0)}
    b = {"w": w2, "only_b": torch.ones(2), "shape": torch.zeros(3, 2), "dtype": torch.arange(4.0).double(),
         "same": w.sum(0).clone()}
    return save(tmp_path, "a.pt", a), save(tmp_path, "b.safetensors", b), a, b


def test_differences_exit_1_and_json(differing):
    pa, pb, a, b = differing
    d = js("diff", pa, pb, code=1)
    assert d["equal"] is False
    assert d["only_in_a"] == ["only_a"] and d["only_in_b"] == ["only_b"]
    assert d["shape_mismatch"] == [{"name": "shape", "shape_a": [2, 3], "shape_b": [3, 2], "dtype": "float32"}]
    (dt,) = d["dtype_mismatch"]
    assert (dt["name"], dt["dtype_a"], dt["dtype_b"], dt["status"]) == ("dtype", "float32", "float64", "exact")
    (vm,) = d["value_mismatch"]
    diff = (a["w"].double() - b["w"].double()).abs()
    assert vm["name"] == "w" and vm["shape"] == [6, 5] and vm["dtype"] == "float32"
    assert vm["max_abs"] == diff.max().item() == pytest.approx(0.5, rel=1e-6)
    assert vm["max_rel"] == pytest.approx((diff / b["w"].double().abs()).max().item(), rel=1e-12)
    assert vm["mismatched"] == 2 and vm["numel"] == 30
    assert (vm["atol"], vm["rtol"]) == (1e-5, 1.3e-6)
    assert d["exact_equal"] == 2  # "same", and "dtype" (numerically exact)
    assert d["a"]["format"] == "torch_zip" and d["b"]["format"] == "safetensors"


def test_differences_human_report(differing):
    pa, pb, a, b = differing
    r = run("diff", pa, pb)
    assert r.exit_code == 1 and r.stderr == ""
    out = r.stdout
    assert out.splitlines()[-1] == "result: DIFFERENT"
    assert "only in A (1): only_a" in out and "only in B (1): only_b" in out
    assert "shape mismatch (1):" in out and "dtype mismatch (1):" in out
    shape_line = next(l for l in out.splitlines() if l.startswith("shape ") and "(1):" not in l)
    assert shape_line.split() == ["shape", "(2,", "3)", "(3,", "2)"]
    w_line = next(l for l in out.splitlines() if l.startswith("w "))
    diff = (a["w"].double() - b["w"].double()).abs()
    rel = (diff / b["w"].double().abs()).max().item()
    change = ((a["w"].double() - b["w"].double()).norm() / b["w"].double().norm()).item()
    assert w_line.split() == ["w", "(6,", "5)", "float32", "differs", f"{change:.3g}", f"{diff.max().item():.3g}",
                              f"{rel:.3g}", "2/30"]


def test_nan_and_inf_differences_stay_valid_json(tmp_path):
    pa = save(tmp_path, "a.pt", {"x": torch.tensor([1.0, float("nan"), 2.0]), "y": torch.tensor([0.0, 1.0])})
    pb = save(tmp_path, "b.pt", {"x": torch.tensor([1.0, 5.0, 2.0]), "y": torch.tensor([0.0, 1.0])})
    d = js("diff", pa, pb, code=1)  # parse_constant refuses NaN / Infinity tokens
    (vm,) = d["value_mismatch"]
    assert vm["name"] == "x" and vm["mismatched"] == 1
    assert vm["max_abs"] in ("inf", "nan")
    same_nan = save(tmp_path, "c.pt", {"x": torch.tensor([1.0, float("nan"), 2.0]), "y": torch.tensor([0.0, 1.0])})
    d = js("diff", pa, same_nan)
    assert d["equal"] is True and d["exact_equal"] == 2


def test_tolerance_options(tmp_path):
    torch.manual_seed(2)
    a = torch.rand(50) + 1.0
    pa = save(tmp_path, "a.pt", {"x": a, "n": torch.arange(5)})
    pb = save(tmp_path, "b.pt", {"x": a + 1e-3, "n": torch.arange(5)})
    d = js("diff", pa, pb, code=1)
    assert [v["name"] for v in d["value_mismatch"]] == ["x"] and d["value_mismatch"][0]["mismatched"] == 50
    d = js("diff", pa, pb, "--atol", "0.01")
    assert d["equal"] is True and [v["name"] for v in d["value_close"]] == ["x"]
    assert d["value_close"][0]["atol"] == 0.01 and d["atol"] == 0.01 and d["rtol"] is None
    d = js("diff", pa, pb, "--rtol", "1e-2")
    assert d["equal"] is True and d["value_close"][0]["rtol"] == 0.01
    # 1e-7 on float32 is within the defaults: equal, exit 0, listed as close
    pc = save(tmp_path, "c.pt", {"x": a + 1e-7, "n": torch.arange(5)})
    d = js("diff", pa, pc)
    assert d["equal"] is True and d["value_close"][0]["mismatched"] == 0
    r = run("diff", pa, pb, "--atol", "0.01")
    assert r.exit_code == 0 and "atol=0.01, rtol=dtype default" in r.stdout and "1 within tolerance" in r.stdout


def test_integers_ignore_tolerance_options(tmp_path):
    pa = save(tmp_path, "a.pt", {"steps": torch.tensor([7, 100], dtype=torch.int64)})
    pb = save(tmp_path, "b.pt", {"steps": torch.tensor([8, 100], dtype=torch.int64)})
    d = js("diff", pa, pb, "--atol", "10", "--rtol", "1", code=1)
    (vm,) = d["value_mismatch"]
    assert (vm["name"], vm["mismatched"], vm["max_abs"], vm["atol"], vm["rtol"]) == ("steps", 1, 1.0, 0.0, 0.0)


# ---------------------------------------------------------------- prefix alignment

def test_dataparallel_alignment_reported(tmp_path):
    m = small_net()
    plain = save(tmp_path, "plain.pt", m.state_dict())
    ddp = save(tmp_path, "ddp.tar", {"model_state_dict": nn.DataParallel(m).state_dict(), "epoch": 2})
    n = len(m.state_dict())
    d = js("diff", ddp, plain)
    assert d["prefix_alignment"] == {"a": "module.", "b": ""}
    assert d["equal"] is True and d["exact_equal"] == n and d["a"]["entry"] == "model_state_dict"
    d = js("diff", plain, ddp)
    assert d["prefix_alignment"] == {"a": "", "b": "module."}
    r = run("diff", ddp, plain)
    assert r.exit_code == 0
    assert "prefix alignment  stripped 'module.' from every key of A" in r.stdout
    assert "state_dict: model_state_dict" in r.stdout
    # --no-align: nothing meets
    d = js("diff", ddp, plain, "--no-align", code=1)
    assert d["prefix_alignment"] is None
    assert d["only_in_a"] == ["module." + k for k in m.state_dict()]
    assert d["only_in_b"] == list(m.state_dict())
    assert d["exact_equal"] == 0


def test_compiled_and_wrapped_prefixes(tmp_path):
    sd = small_net().state_dict()
    pa = save(tmp_path, "a.pt", {"_orig_mod.module." + k: v for k, v in sd.items()})
    pb = save(tmp_path, "b.pt", {"module._orig_mod." + k: v for k, v in sd.items()})
    d = js("diff", pa, pb)
    assert d["prefix_alignment"] == {"a": "_orig_mod.module.", "b": "module._orig_mod."}
    r = run("diff", pa, pb)
    assert ("stripped '_orig_mod.module.' from every key of A; stripped 'module._orig_mod.' from every key of B"
            in r.stdout)


def test_partial_prefix_is_not_stripped(tmp_path):
    sd = small_net().state_dict()
    first = next(iter(sd))
    mixed = {("module." + k if k == first else k): v for k, v in sd.items()}
    d = js("diff", save(tmp_path, "mixed.pt", mixed), save(tmp_path, "plain.pt", sd), code=1)
    assert d["prefix_alignment"] is None
    assert d["only_in_a"] == ["module." + first] and d["only_in_b"] == [first]
    assert d["exact_equal"] == len(sd) - 1


# ---------------------------------------------------------------- entries, --no-values, GPU files

def test_key_a_key_b(committed, make):
    seed = committed("seed_checkpoint.tar")
    d = js("diff", seed, seed, "--key-a", "model_state_dict", "--key-b", "model")
    n = len(torch.load(seed, weights_only=False)["model_state_dict"])
    assert d["equal"] is True and d["exact_equal"] == n
    assert (d["a"]["entry"], d["b"]["entry"]) == ("model_state_dict", "model")
    d = js("diff", make("full_model.pth"), make("state_dict.pt"))  # a pickled model vs its state_dict
    assert d["equal"] is True and d["exact_equal"] == n


def test_unknown_key_is_an_error(committed):
    seed = committed("seed_checkpoint.tar")
    r = run("diff", seed, seed, "--key-b", "weights")
    line = assert_one_error_line(r, seed)
    assert line == ("ckpttool: error: no entry 'weights' under the top level; entries there: model, model_state_dict, "
                    f"optimizer_state_dict, scheduler, epoch, loss ({seed})")


def test_no_values_reads_metadata_only(tmp_path):
    torch.manual_seed(4)
    sd = {"a": torch.randn(16, 16), "b": torch.randn(16)}
    good = save(tmp_path, "good.safetensors", sd)
    data = bytearray(open(good, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\x7f" * (len(data) - header)  # same layout, other values
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(bytes(data))
    d = js("diff", good, bad, "--no-values")
    assert d["equal"] is True and d["values_compared"] is False and d["exact_equal"] == 0
    r = run("diff", good, bad, "--no-values")
    assert r.exit_code == 0
    assert "values            not compared (--no-values)" in r.stdout
    assert r.stdout.splitlines()[-1] == "result: EQUAL (names, shapes and dtypes only)"
    d = js("diff", good, bad, code=1)
    assert sorted(v["name"] for v in d["value_mismatch"]) == ["a", "b"]


def test_no_values_still_reports_metadata_differences(tmp_path):
    pa = save(tmp_path, "a.pt", {"x": torch.zeros(3), "y": torch.zeros(2), "z": torch.zeros(1)})
    pb = save(tmp_path, "b.pt", {"x": torch.zeros(4), "y": torch.zeros(2).half(), "w": torch.zeros(1)})
    d = js("diff", pa, pb, "--no-values", code=1)
    assert d["only_in_a"] == ["z"] and d["only_in_b"] == ["w"]
    assert [s["name"] for s in d["shape_mismatch"]] == ["x"]
    assert d["dtype_mismatch"] == [{"name": "y", "shape": [2], "dtype_a": "float32", "dtype_b": "float16"}]


def test_gpu_tagged_files_compare_on_cpu(committed, make, tmp_path):
    cpu = make("state_dict.pt")
    for name in ("gpu_tagged.pt", "gpu_tagged_legacy.pt"):
        d = js("diff", committed(name), cpu)
        assert d["equal"] is True and d["exact_equal"] == 19 and d["a"]["entry"] == "model_state_dict"
    sd = torch.load(cpu, weights_only=True)
    sd["fc.weight"] = sd["fc.weight"] * 2
    d = js("diff", committed("gpu_tagged.pt"), save(tmp_path, "x2.pt", sd), code=1)
    (vm,) = d["value_mismatch"]
    ref = torch.load(committed("gpu_tagged.pt"), map_location="cpu", weights_only=True)["model_state_dict"]["fc.weight"]
    assert vm["name"] == "fc.weight" and vm["max_abs"] == ref.double().abs().max().item()
    assert vm["max_rel"] == 0.5


# ---------------------------------------------------------------- errors

def test_missing_file(tmp_path, make):
    p = str(tmp_path / "nope.pt")
    r = run("diff", make("state_dict.pt"), p)
    assert_one_error_line(r, p)
    assert r.stderr == f"ckpttool: error: no such file or directory ({p})\n"
    r = run("diff", p, make("state_dict.pt"), "--json")
    assert_one_error_line(r, p)


def test_random_bytes(tmp_path, make):
    p = str(tmp_path / "junk.pt")
    open(p, "wb").write(os.urandom(256) + b"\x00\n\r junk")
    assert_one_error_line(run("diff", p, make("state_dict.pt")), p)
    assert_one_error_line(run("diff", make("state_dict.pt"), p, "--json"), p)


def test_directory(tmp_path, make):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_one_error_line(run("diff", make("state_dict.pt"), empty), str(empty))


def test_truncated_file(tmp_path, make):
    src = open(make("state_dict.pt"), "rb").read()
    p = str(tmp_path / "cut.pt")
    open(p, "wb").write(src[: len(src) // 2])
    assert_one_error_line(run("diff", p, make("state_dict.pt")), p)


@pytest.mark.parametrize("opt,value", [("--atol", "-1"), ("--rtol", "-0.5"), ("--atol", "nan"), ("--rtol", "inf")])
def test_bad_tolerance(make, opt, value):
    p = make("state_dict.pt")
    r = run("diff", p, p, opt, value, "--json")
    line = assert_one_error_line(r)
    assert line.startswith(f"ckpttool: error: {opt} must be a finite number >= 0")


def test_not_a_number_tolerance_is_a_usage_error(make):
    p = make("state_dict.pt")
    r = run("diff", p, p, "--atol", "abc")
    assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.stderr


def test_help_has_examples():
    r = run("diff", "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.stdout and "ckpttool diff" in r.stdout
    for opt in ("--key-a", "--key-b", "--no-values", "--atol", "--rtol", "--no-align", "--json"):
        assert opt in r.stdout


def test_real_process_streams_and_exit_code(tmp_path, make):
    pa = make("state_dict.pt")
    sd = torch.load(pa, weights_only=True)
    sd["fc.bias"] = sd["fc.bias"] + 1
    pb = save(tmp_path, "b.pt", sd)
    out = subprocess.run([sys.executable, "-m", "ckpttool", "diff", pa, pb, "--json"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == ""
    d = json.loads(out.stdout)
    expected = (sd["fc.bias"].double() - torch.load(pa, weights_only=True)["fc.bias"].double()).abs().max().item()
    assert [v["name"] for v in d["value_mismatch"]] == ["fc.bias"] and d["value_mismatch"][0]["max_abs"] == expected
    out = subprocess.run([sys.executable, "-m", "ckpttool", "diff", pa, str(tmp_path / "gone.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"ckpttool: error: no such file or directory ({tmp_path / 'gone.pt'})\n"


def test_rename_lines_up_a_names_with_b(tmp_path):
    """--rename rewrites A's names before matching (GGUF's blk.N. against transformers' model.layers.N.):
    the pairs meet and their values are compared; the rules are said in the report and the JSON."""
    torch.manual_seed(0)
    w = {f"blk.{i}.attn_q.weight": torch.randn(4, 4) for i in range(2)}
    save_file(w, str(tmp_path / "a.safetensors"))
    hf = {f"model.layers.{i}.self_attn.q_proj.weight": w[f"blk.{i}.attn_q.weight"].clone() for i in range(2)}
    hf["model.layers.1.self_attn.q_proj.weight"][0, 0] += 1
    save_file(hf, str(tmp_path / "b.safetensors"))
    plain = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert json.loads(plain.stdout)["only_in_a"] == list(w)
    args = ("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
            "--rename", r"^blk[.](\d+)[.]=model.layers.\1.", "--rename", r"attn_q=self_attn.q_proj")
    r = run(*args, "--json")
    assert r.exit_code == 1, r.output
    d = json.loads(r.stdout)
    assert d["renames"] == [r"^blk[.](\d+)[.]=model.layers.\1.", "attn_q=self_attn.q_proj"]
    assert d["only_in_a"] == [] and d["only_in_b"] == [] and d["exact_equal"] == 1
    assert [m["name"] for m in d["value_mismatch"]] == ["blk.1.attn_q.weight"]
    text = run(*args).stdout.splitlines()
    assert text[3] == r"renames           A's names: ^blk[.](\d+)[.]=model.layers.\1.; attn_q=self_attn.q_proj"
