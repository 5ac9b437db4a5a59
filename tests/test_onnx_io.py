"""ONNX in and out: the graph's inputs and outputs read, shown and used.

verify of an .onnx takes its input shapes from the graph (or --input NAME:SHAPE), so --against always
compares something; inspect shows the graph's inputs, outputs, opset and producer; convert --to onnx
uses torch.onnx.export(dynamo=True), the TorchScript-based exporter only with --legacy-exporter; what
an export or a comparison lacks is said at once, in one error line.
"""
from __future__ import annotations

import os
import textwrap
import warnings

import pytest
import torch

from clitools import assert_error, files_in, js, run
from ckpttool.converting import convert
from ckpttool.errors import CkptError

CLASSNET = "mypkg:ClassNet"  # fixtures/ is on sys.path (conftest)
SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"  # what torch.export leaves in the graph


def check(d: dict, name: str, device=None) -> dict:
    found = [c for c in d["checks"] if c["name"] == name and c["device"] == device]
    assert len(found) == 1, [(c["name"], c["device"]) for c in d["checks"]]
    return found[0]


def row(stdout: str, label: str) -> str:
    """The value of a ``label   value`` row of a plain table."""
    found = [ln.split(None, len(label.split()))[-1] for ln in stdout.splitlines()
             if ln.split()[:len(label.split())] == label.split()]
    assert len(found) == 1, (label, stdout)
    return found[0]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """ClassNet with weights of seed 0 and 1 (state_dicts and full pickles), and seed 0 exported three ways."""
    from mypkg import ClassNet
    d = tmp_path_factory.mktemp("onnx_io")
    p = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = ClassNet().eval()
        p[f"sd{seed}"] = str(d / f"sd{seed}.pt")
        torch.save(model.state_dict(), p[f"sd{seed}"])
        p[f"full{seed}"] = str(d / f"full{seed}.pth")
        torch.save(model, p[f"full{seed}"])
    for name, extra in (("static", ["--input", "image:1x3x8x8"]),
                        ("dyn", ["--input-shape", "1x3x8x8", "--dynamic-batch"]),
                        ("legacy", ["--input-shape", "1x3x8x8", "--legacy-exporter"])):
        p[name] = str(d / f"{name}.onnx")
        r = run("convert", p["sd0"], "-o", p[name], "--model", CLASSNET, *extra)
        assert r.exit_code == 0, (r.output, r.exception)
    return p


# ---------------------------------------------------------------------------------------------
# verify: the graph's shapes, so --against compares something


def test_verify_onnx_against_a_different_network_fails_from_the_graph_shapes(nets):
    r = run("verify", nets["static"], "--against", nets["full1"], "--trust")
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stdout.splitlines()[-1] == "result: FAIL: matches original on cpu (output0)"
    d = js("verify", nets["static"], "--against", nets["full1"], "--trust", code=1)
    m = check(d, "matches original", "cpu")
    assert m["status"] == "fail" and m["culprit"] == "output0" and m["max_abs"] > 1e-2
    assert m["detail"].endswith("(inputs image 1x3x8x8)")


def test_verify_onnx_against_the_same_network_passes(nets):
    r = run("verify", nets["static"], "--against", nets["full0"], "--trust")
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.splitlines()[-1] == "result: PASS"
    proven = next(ln for ln in r.stdout.splitlines() if ln.startswith("proven: "))
    assert "matches original (cpu)" in proven.split("; ")
    d = js("verify", nets["static"], "--against", nets["full0"], "--trust")
    m = check(d, "matches original", "cpu")
    assert m["status"] == "pass" and m["max_abs"] < 1e-4


def test_verify_onnx_against_a_state_dict_with_its_model(nets):
    d = js("verify", nets["legacy"], "--against", nets["sd1"], "--model", CLASSNET, code=1)
    assert check(d, "matches original", "cpu")["status"] == "fail"
    d = js("verify", nets["legacy"], "--against", nets["sd0"], "--model", CLASSNET)
    assert check(d, "matches original", "cpu")["detail"].endswith("(inputs input0 1x3x8x8)")


def test_verify_onnx_alone_runs_on_the_graph_shapes(nets):
    d = js("verify", nets["static"])
    c = check(d, "computes the same", "cpu")
    assert c["status"] == "pass" and c["detail"].endswith("on seeded inputs image 1x3x8x8")


def test_open_dimensions_need_input_named_in_one_line(nets):
    assert_error(run("verify", nets["dyn"], "--against", nets["full0"], "--trust"),
                 f"ckpttool: error: comparing outputs with {nets['full0']} needs: --input x:SHAPE (the ONNX graph of "
                 f"{nets['dyn']} leaves dimensions open: x batchx3x8x8) ({nets['dyn']})")


def test_every_missing_requirement_at_once(nets):
    assert_error(run("verify", nets["dyn"], "--against", nets["full0"]),
                 f"ckpttool: error: comparing outputs with {nets['full0']} needs: --input x:SHAPE (the ONNX graph of "
                 f"{nets['dyn']} leaves dimensions open: x batchx3x8x8); to run {nets['full0']}: the file's model "
                 f"runs only with --trust (or pass --model SPEC) ({nets['dyn']})")


@pytest.mark.parametrize("how", [["--input", "x:2x3x8x8"], ["--input-shape", "2x3x8x8"]])
def test_named_or_ordered_input_fills_open_dimensions(nets, how):
    d = js("verify", nets["dyn"], "--against", nets["full0"], "--trust", *how)
    assert d["ok"] is True
    assert check(d, "matches original", "cpu")["detail"].endswith("(inputs x 2x3x8x8)")
    assert check(d, "computes the same", "cpu")["detail"].startswith("reference: 1 output(s) 2x10 via onnxruntime")


def test_input_name_the_graph_does_not_take(nets):
    assert_error(run("verify", nets["static"], "--input", "img:1x3x8x8"),
                 f"ckpttool: error: the ONNX graph of {nets['static']} takes inputs image, not img ({nets['static']})")


@pytest.mark.parametrize("args, message", [
    (["--input", "1x3x8x8"], "--input '1x3x8x8' is not like NAME:1x3x224x224"),
    (["--input", "x:1xAx8"], "--input 'x:1xAx8' is not like NAME:1x3x224x224"),
    (["--input", "x:1x3", "--input", "x:1x4"], "--input 'x' is given twice"),
    (["--input", "x:1x3", "--input-shape", "1x3"], "--input NAME:SHAPE and --input-shape do not mix: name every "
                                                   "input, or give every shape in order"),
])
def test_bad_input_options(nets, args, message):
    assert_error(run("verify", nets["static"], *args), f"ckpttool: error: {message}")


@pytest.fixture
def hand_built(tmp_path):
    """A graph of two inputs whose shapes it leaves partly open: a float32 (2, n) and an int64 of unknown size."""
    from onnx import TensorProto, helper, save
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, "n"])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [None])
    ya = helper.make_tensor_value_info("ya", TensorProto.FLOAT, [2, "n"])
    yb = helper.make_tensor_value_info("yb", TensorProto.INT64, [None])
    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["ya"]), helper.make_node("Identity", ["b"], ["yb"])],
                              "g", [a, b], [ya, yb])
    model = helper.make_model(graph, producer_name="handmade", producer_version="1.0",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "two.onnx")
    save(model, path)
    return path


def test_hand_built_graph_inputs_shown_and_asked_for(hand_built):
    r = run("inspect", hand_built)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("inputs "))
    assert [ln.split(None, 1)[-1] if ln.startswith(("inputs", "outputs")) else ln.strip() for ln in lines[i:i + 5]] \
        == ["a: float32 (2, n)", "b: int64 (?,)", "ya: float32 (2, n)", "yb: int64 (?,)", "producer    handmade 1.0"]
    assert lines[i + 2].startswith("outputs ")
    meta = js("inspect", hand_built)["metadata"]
    assert meta["inputs"] == [{"name": "a", "dtype": "float32", "shape": [2, "n"]},
                              {"name": "b", "dtype": "int64", "shape": [None]}]
    assert meta["producer"] == "handmade 1.0" and meta["opsets"] == {"ai.onnx": 17}
    d = js("verify", hand_built)
    assert check(d, "computes the same")["detail"] == (f"not run: it needs --input a:SHAPE, --input b:SHAPE (the ONNX "
                                                       f"graph of {hand_built} leaves dimensions open: a 2xn, b ?)")
    d = js("verify", hand_built, "--input", "b:5", "--input", "a:2x3")  # any order: matched by name
    c = check(d, "computes the same", "cpu")
    assert c["status"] == "pass" and c["detail"] == ("reference: 2 output(s) 2x3, 5 via onnxruntime, on seeded "
                                                     "inputs a 2x3, b 5")
    assert_error(run("verify", hand_built, "--input", "a:2x3"),
                 f"ckpttool: error: it needs --input b:SHAPE (the ONNX graph of {hand_built} leaves dimensions "
                 f"open: b ?) ({hand_built})")


# ---------------------------------------------------------------------------------------------
# inspect


@pytest.mark.parametrize("name, first_dim", [("static", 1), ("dyn", "batch")])
def test_inspect_onnx_shows_inputs_outputs_opset_producer(nets, name, first_dim):
    import onnx
    model = onnx.load(nets[name], load_external_data=False)
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"]
    in_name = "image" if name == "static" else "x"
    r = run("inspect", nets[name])
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"opset ai.onnx {opset}" in row(r.stdout, "format")
    assert row(r.stdout, "inputs") == f"{in_name}: float32 ({first_dim}, 3, 8, 8)"
    assert row(r.stdout, "outputs") == f"output0: float32 ({first_dim}, 10)"
    assert row(r.stdout, "producer") == f"{model.producer_name} {model.producer_version}"
    meta = js("inspect", nets[name])["metadata"]
    assert meta["inputs"] == [{"name": in_name, "dtype": "float32", "shape": [first_dim, 3, 8, 8]}]
    assert meta["outputs"] == [{"name": "output0", "dtype": "float32", "shape": [first_dim, 10]}]


# ---------------------------------------------------------------------------------------------
# convert --to onnx


def test_convert_uses_torch_export_by_default_and_the_flag_the_old_one(nets):
    import onnx
    dynamo, legacy = onnx.load(nets["dyn"]), onnx.load(nets["legacy"])
    # torch.export's graph signature is in the dynamo exporter's graph; the TorchScript exporter writes none
    assert SIGNATURE_KEY in {p.key for p in dynamo.graph.metadata_props}
    assert SIGNATURE_KEY not in {p.key for p in legacy.graph.metadata_props}
    # inputs: forward's own parameter name vs the TorchScript exporter's input0
    assert [i.name for i in dynamo.graph.input] == ["x"] and [i.name for i in legacy.graph.input] == ["input0"]


def test_convert_json_and_text_say_the_exporter(nets, tmp_path):
    out = tmp_path / "m.onnx"
    d = js("convert", nets["sd0"], "-o", out, "--model", CLASSNET, "--input", "image:1x3x8x8")
    assert d["details"]["exporter"] == "dynamo" and d["details"]["input_names"] == ["image"]
    assert d["details"]["inputs"] == [[1, 3, 8, 8]] and d["details"]["output_names"] == ["output0"]
    r = run("convert", nets["sd0"], "-o", tmp_path / "l.onnx", "--model", CLASSNET, "--input-shape", "1x3x8x8",
            "--legacy-exporter")
    assert r.exit_code == 0, (r.output, r.exception)
    assert row(r.stdout, "exporter") == "torchscript (legacy)"
    assert row(r.stdout, "inputs") == "input0 1x3x8x8"
    assert row(r.stdout, "outputs") == "output0 1x10"
    assert row(r.stdout, "tolerance") == "atol 0.0001, rtol 0.001"
    assert row(r.stdout, "dynamic batch") == "no"
    assert not any(c in r.stdout for c in "[]{}\""), r.stdout  # values as text, not JSON or Python


def test_convert_named_inputs_name_the_graph(nets, tmp_path):
    import onnx
    import onnxruntime as ort
    out = str(tmp_path / "named.onnx")
    r = run("convert", nets["full0"], "-o", out, "--trust", "--input", "pixels:2x3x8x8", "--dynamic-batch")
    assert r.exit_code == 0, (r.output, r.exception)
    assert row(r.stdout, "inputs") == "pixels 2x3x8x8"
    assert [i.name for i in onnx.load(out).graph.input] == ["pixels"]
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    (got,) = sess.run(None, {"pixels": x.numpy()})
    with torch.no_grad():
        want = torch.load(nets["full0"], weights_only=False).eval()(x)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=1e-3)


def test_convert_every_missing_requirement_at_once(nets, tmp_path):
    assert_error(run("convert", nets["sd0"], "-o", tmp_path / "m.onnx"),
                 "ckpttool: error: ONNX export needs the model's input shapes (--input NAME:1x3x224x224 or "
                 "--input-shape 1x3x224x224, one per input); a model to run this state_dict (--model SPEC, with "
                 f"--arg k=v) ({nets['sd0']})")
    assert_error(run("convert", nets["sd0"], "-o", tmp_path / "m.onnx", "--model", CLASSNET, "--input-shape",
                     "1x3x8x8", "--opset", "17"),
                 "ckpttool: error: ONNX export needs --legacy-exporter for --opset 17 (torch.onnx.export(dynamo=True) "
                 f"writes opset 18 or later) ({nets['sd0']})")
    assert files_in(tmp_path) == set()


def test_convert_code_carrying_files_list_what_else_they_need(make, tmp_path):
    r = run("convert", make("torchscript.pt"), "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2 and r.stdout == ""
    first = r.stderr.splitlines()[0]
    assert first.startswith("ckpttool: error: exporting runs the TorchScript code this archive carries (")
    assert first.endswith("; it also needs the model's input shapes (--input NAME:1x3x224x224 or --input-shape "
                          "1x3x224x224, one per input); --legacy-exporter (a TorchScript archive is exported only by "
                          f"the TorchScript-based exporter) ({make('torchscript.pt')})")
    assert r.stderr.splitlines()[1].startswith("hint: if you trust the file, pass --trust")
    assert files_in(tmp_path) == set()
    r = run("convert", make("torchscript.pt"), "-o", tmp_path / "m.onnx", "--trust", "--legacy-exporter",
            "--input-shape", "1x3x8x8")
    assert r.exit_code == 0, (r.output, r.exception)


def test_convert_without_onnxscript_says_so_with_the_rest(nets, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert_error(run("convert", nets["sd0"], "-o", tmp_path / "m.onnx", "--model", CLASSNET),
                 "ckpttool: error: ONNX export needs the model's input shapes (--input NAME:1x3x224x224 or "
                 "--input-shape 1x3x224x224, one per input); the package(s) onnxscript (pip install "
                 f"'ckpttool[onnx]') ({nets['sd0']})")


UNTRACEABLE = textwrap.dedent("""
    import torch
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            if y.sum() > -1e9:  # a branch on data: torch.export refuses, tracing records one side
                return y
            return -y
""")


def test_exporter_failure_names_the_legacy_flag_and_its_warnings_pass_through(tmp_path):
    (tmp_path / "branchy.py").write_text(UNTRACEABLE)
    spec = f"{tmp_path / 'branchy.py'}:Branchy"
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "sd.pt")
    sd = {f"fc.{k}": v for k, v in torch.load(tmp_path / "sd.pt", weights_only=True).items()}
    torch.save(sd, tmp_path / "sd.pt")
    r = run("convert", tmp_path / "sd.pt", "-o", tmp_path / "m.onnx", "--model", spec, "--input-shape", "2x4")
    assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("ckpttool: error:", "hint:"))]
    assert lines[0].startswith("ckpttool: error: torch.onnx.export(dynamo=True) failed: TorchExportError: Failed to "
                               "export the model with torch.export.")
    assert "\x1b" not in lines[0]
    assert lines[1] == "hint: --legacy-exporter uses the TorchScript-based exporter, which traces instead of " \
                       "torch.export"
    assert files_in(tmp_path) == {"branchy.py", "sd.pt"}
    # the old exporter traces it; its own warning about the branch is the user's to see, its deprecation is not
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = convert(str(tmp_path / "sd.pt"), str(tmp_path / "m.onnx"), model=spec, input_shapes=["2x4"],
                      legacy_exporter=True)
    assert res.details["exporter"] == "torchscript (legacy)"
    messages = [str(w.message) for w in seen]
    assert any("Converting a tensor to a Python boolean might cause the trace to be incorrect" in m
               for m in messages), messages
    assert not any("legacy TorchScript-based ONNX export" in m for m in messages), messages


def test_dynamo_opset_is_what_was_asked(nets, tmp_path):
    import onnx
    out = str(tmp_path / "m18.onnx")
    r = convert(nets["sd0"], out, model=CLASSNET, input_shapes=["1x3x8x8"], opset=18)
    assert r.details["opset"] == 18 and r.details["exporter"] == "dynamo"
    assert {o.domain or "ai.onnx": o.version for o in onnx.load(out).opset_import}["ai.onnx"] == 18


def test_library_refusal_is_a_ckpt_error(nets, tmp_path):
    with pytest.raises(CkptError) as e:
        convert(nets["sd0"], str(tmp_path / "m.onnx"), model=CLASSNET)
    assert e.value.exit_code == 2 and "input shapes" in str(e.value)
    assert not os.listdir(tmp_path)


def test_a_huge_declared_input_is_not_made_up(tmp_path):
    """The graph's word is the file's: an input it declares as 1e14 values is asked for, not allocated."""
    from onnx import TensorProto, helper, save
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [100000, 100000, 10000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [100000, 100000, 10000])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "huge.onnx")
    save(model, path)
    d = js("verify", path)
    assert check(d, "computes the same")["detail"] == (
        f"not run: it needs --input x:SHAPE (the ONNX graph of {path} leaves dimensions open: "
        f"x 100000x100000x10000, too large to make up)")
    r = run("verify", path, "--input", "x:2x2x2")  # asked for: the user's shape, run (and refused by onnxruntime)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("ckpttool: error: onnxruntime cannot run the model on inputs of shape 2x2x2: ")
