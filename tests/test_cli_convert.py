"""`ckpttool convert` as a user runs it: JSON fields, exit codes, the exact error lines, nothing left behind."""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from fulldisk import simulate_full_disk

from clitools import assert_error, files_in, js, run


FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def error_lines(r) -> list:
    return r.stderr.splitlines()


@pytest.fixture(scope="module")
def resnet18_sd(tmp_path_factory):
    import torchvision
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli_convert") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# JSON and the outputs


def test_json_fields_state_dict(make, tmp_path):
    src = make("full_model.pth")
    out = tmp_path / "sd.pt"
    d = js("convert", src, "-o", out)
    assert d["output"] == str(out) and d["format"] == "torch_zip" and d["tensors"] == 19
    assert d["source"]["entry_source"] == "pickled_module"
    assert d["files"] == [str(out)] and d["bytes_written"] == os.path.getsize(out)
    want = torch.load(src, weights_only=False).state_dict()
    got = torch.load(out, weights_only=True)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_json_fields_safetensors_with_key_dtype_metadata(committed, tmp_path):
    from safetensors import safe_open
    src = committed("seed_checkpoint.tar")
    out = tmp_path / "w.safetensors"
    d = js("convert", src, "-o", out, "--key", "model_state_dict", "--dtype", "bf16",
           "--metadata", "author=me", "--metadata", "run=7")
    assert d["output"] == str(out) and d["format"] == "safetensors" and d["tensors"] == 18
    assert d["source"]["entry"] == "model_state_dict" and d["cast_to"] == "bfloat16"
    assert d["tied"] == {"head.weight": "embed.weight"} or d["tied"] == {"embed.weight": "head.weight"}
    want = torch.load(src, weights_only=False)["model_state_dict"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert meta["author"] == "me" and meta["run"] == "7"
        assert len(f.keys()) == 18
        for k in f.keys():
            t = f.get_tensor(k)
            w = want[k].to(torch.bfloat16) if want[k].is_floating_point() else want[k]
            assert t.dtype == w.dtype and torch.equal(t, w), k


def test_json_fields_shards(resnet18_sd, tmp_path):
    out = tmp_path / "hf"
    d = js("convert", resnet18_sd, "-o", out, "--to", "safetensors", "--max-shard-size", "20MB", "--check")
    assert d["output"] == str(out) and d["format"] == "safetensors_sharded" and d["tensors"] == 122
    assert d["checked"]["bytes_compared"] == 122
    names = sorted(os.listdir(out))
    assert names[-1] == "model.safetensors.index.json"
    shards = names[:-1]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) >= 3
    assert sorted(d["files"]) == sorted(str(out / n) for n in names)


def test_json_fields_onnx(resnet18_sd, tmp_path):
    import onnxruntime as ort
    import torchvision
    out = tmp_path / "r18.onnx"
    d = js("convert", resnet18_sd, "-o", out, "--model", "torchvision.models:resnet18", "--input-shape", "1x3x32x32")
    assert d["output"] == str(out) and d["format"] == "onnx" and d["tensors"] > 0
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(resnet18_sd, weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model.eval()(x), atol=1e-4, rtol=1e-3)


def test_onnx_full_pickle_with_trust(make, tmp_path):
    src = make("full_model.pth")
    out = tmp_path / "m.onnx"
    d = js("convert", src, "-o", out, "--trust", "--import-path", FIXTURES, "--input-shape", "1x3x8x8")
    assert d["format"] == "onnx" and os.path.exists(out)
    assert files_in(tmp_path) == {"m.onnx"}


def test_table_output(make, tmp_path):
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "o.pt")
    assert r.exit_code == 0
    assert str(tmp_path / "o.pt") in r.stdout and "19 tensors" in r.stdout


def test_json_is_the_only_thing_on_stdout(make, tmp_path):
    r = run("convert", make("gpu_tagged_legacy.pt"), "-o", tmp_path / "o.safetensors", "--json")
    assert r.exit_code == 0
    json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------
# errors: exit 2, one line, nothing written


def test_output_is_the_source(make, tmp_path):
    src = make("legacy.pt")
    r = run("convert", src, "-o", src, "--force")
    assert_error(r, f"ckpttool: error: output is one of the inputs; refusing to write over it ({src})")
    link = tmp_path / "link.pt"
    os.symlink(src, link)
    r = run("convert", src, "-o", link, "--force")
    assert_error(r, f"ckpttool: error: output is one of the inputs; refusing to write over it ({link})")
    assert os.path.islink(link)


def test_existing_output_needs_force(make, tmp_path):
    out = tmp_path / "o.pt"
    out.write_bytes(b"old")
    r = run("convert", make("legacy.pt"), "-o", out)
    assert_error(r, f"ckpttool: error: output exists ({out})", "pass --force to replace it")
    assert out.read_bytes() == b"old"
    r = run("convert", make("legacy.pt"), "-o", out, "--force")
    assert r.exit_code == 0
    assert len(torch.load(out, weights_only=True)) == 19


def test_unknown_extension(make, tmp_path):
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "o.xyz")
    assert_error(r, "ckpttool: error: cannot tell the output format from 'o.xyz'",
                 "name it .pt/.pth/.bin, .safetensors or .onnx, or pass --to")
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("args, line", [
    (["-o", "o.pt", "--metadata", "a=b"], "ckpttool: error: --metadata is only for safetensors output"),
    (["-o", "o.dcp", "--to", "dcp", "--max-shard-size", "5GB"],
     "ckpttool: error: --max-shard-size is for safetensors and state_dict (.bin shards) output"),
    (["-o", "o.safetensors", "--metadata", "ab"], "ckpttool: error: --metadata 'ab' is not KEY=VALUE"),
])
def test_options_for_safetensors_only(make, tmp_path, args, line):
    args = [tmp_path / a if a.startswith("o.") else a for a in args]
    r = run("convert", make("legacy.pt"), *args)
    assert_error(r, line)
    assert files_in(tmp_path) == set()


def test_bad_dtype_is_a_usage_error(make, tmp_path):
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "o.pt", "--dtype", "int8")
    assert r.exit_code == 2 and "int8" in r.stderr
    assert files_in(tmp_path) == set()


def test_missing_source(tmp_path):
    r = run("convert", tmp_path / "nope.pt", "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: ") and "Traceback" not in r.stderr
    assert files_in(tmp_path) == set()


def test_onnx_without_input_shape(resnet18_sd, tmp_path):
    r = run("convert", resnet18_sd, "-o", tmp_path / "m.onnx", "--model", "torchvision.models:resnet18")
    assert_error(r, "ckpttool: error: ONNX export needs the model's input shapes (--input NAME:1x3x224x224 or "
                    f"--input-shape 1x3x224x224, one per input) ({resnet18_sd})")
    assert files_in(tmp_path) == set()


def test_onnx_full_pickle_without_trust(make, tmp_path):
    src = make("full_model.pth")
    r = run("convert", src, "-o", tmp_path / "m.onnx", "--input-shape", "1x3x8x8")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    first, hint = error_lines(r)
    assert first.startswith("ckpttool: error: exporting this file runs its code: it would import mypkg.Block, "
                            "mypkg.ClassNet")
    assert first.endswith(f"({src})")
    assert hint.startswith("hint: ") and "--trust" in hint
    assert files_in(tmp_path) == set()


def test_onnx_torchscript_without_trust(make, tmp_path):
    r = run("convert", make("torchscript.pt"), "-o", tmp_path / "m.onnx", "--input-shape", "1x3x8x8")
    assert r.exit_code == 2 and "ClassNet" in error_lines(r)[0] and "--trust" in r.stderr
    assert files_in(tmp_path) == set()


def test_onnx_state_dict_that_does_not_fit_the_model(make, tmp_path):
    src = make("legacy.pt")
    r = run("convert", src, "-o", tmp_path / "m.onnx", "--model", "torchvision.models:resnet18",
            "--input-shape", "1x3x32x32")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert error_lines(r)[0].startswith("ckpttool: error: the state_dict does not fit --model "
                                        "torchvision.models:resnet18: ")
    assert files_in(tmp_path) == set()


def test_onnx_input_shape_the_model_cannot_take(make, tmp_path):
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "m.onnx", "--model", "mypkg:ClassNet",
            "--input-shape", "1x5x8x8")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert len(error_lines(r)) in (1, 2) and error_lines(r)[0].startswith("ckpttool: error: ")
    assert files_in(tmp_path) == set()


def test_bad_input_shape(make, tmp_path):
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "m.onnx", "--model", "mypkg:ClassNet",
            "--input-shape", "1xAx8")
    assert_error(r, "ckpttool: error: --input-shape '1xAx8' is not like 1x3x224x224")


def test_dtype_safetensors_cannot_hold(make, tmp_path):
    r = run("convert", make("all_dtypes.pt"), "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert error_lines(r)[0].startswith("ckpttool: error: safetensors cannot hold ")
    assert files_in(tmp_path) == set()


def test_complex128_to_safetensors_refused(tmp_path):
    src = tmp_path / "c.pt"
    torch.save({"z": torch.complex(torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))}, src)
    r = run("convert", src, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2, r.output
    assert error_lines(r)[0].startswith("ckpttool: error: safetensors cannot hold complex128")
    assert files_in(tmp_path) == {"c.pt"}


# ---------------------------------------------------------------------------------------------
# a full disk and --check


@pytest.fixture
def full_disk(monkeypatch):
    """The disk under the output has 3000 bytes left: the zip and safetensors writers' writes fail."""
    opened = simulate_full_disk(monkeypatch)
    yield
    for f in opened:
        f._f.close()


@pytest.mark.parametrize("args", [["o.pt"], ["o.safetensors"], ["hf", "--to", "safetensors", "--max-shard-size", "2KB"]])
def test_full_disk(make, tmp_path, full_disk, args):
    out = tmp_path / args[0]
    r = run("convert", make("legacy.pt"), "-o", out, *args[1:])
    assert_error(r, f"ckpttool: error: cannot write the output: No space left on device ({out})")
    assert files_in(tmp_path) == set()


def test_exception_mid_write_leaves_nothing(monkeypatch, make, tmp_path):
    tw = importlib.import_module("ckpttool.formats.torch_writer")
    real = tw.AlignedZip.add

    def add(self, name, chunks, size):
        if name.endswith("data/3"):
            raise RuntimeError("boom")
        return real(self, name, chunks, size)
    monkeypatch.setattr(tw.AlignedZip, "add", add)
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "o.pt")
    assert r.exit_code != 0 and isinstance(r.exception, RuntimeError)
    assert files_in(tmp_path) == set()


def test_check_flag(make, tmp_path):
    d = js("convert", make("gpu_tagged.pt"), "-o", tmp_path / "o.pt", "--check")
    assert d["checked"]["ok"] and d["checked"]["bytes_compared"] == d["tensors"] == 19


def test_check_failure_exits_1_and_writes_nothing(monkeypatch, make, tmp_path):
    cv = importlib.import_module("ckpttool.converting")
    real = cv._span_chunks

    def corrupt(source, start, size, elem):
        gen = real(source, start, size, elem)

        def chunks():
            for chunk in gen():
                yield bytes([chunk[0] ^ 0x01]) + chunk[1:] if chunk else chunk
        return chunks
    monkeypatch.setattr(cv, "_span_chunks", corrupt)
    r = run("convert", make("legacy.pt"), "-o", tmp_path / "o.pt", "--check")
    assert r.exit_code == 1
    assert error_lines(r)[0].startswith("ckpttool: error: tensor ") and "bytes differ" in r.stderr
    assert files_in(tmp_path) == set()
