"""The everyday manners of the command line (issue 17): -q, colour, --debug anywhere, a folder as OUT,
--dtype as torch spells it, convert's names (wrapper prefixes, --rename), remap's progress."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ckpttool import cli as cli_module
from ckpttool.converting import convert
from ckpttool.errors import UsageError
from ckpttool.remapping import remap

from clitools import assert_error, files_in, run


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, a)
    torch.save({"w": torch.ones(3) * 2, "b": torch.zeros(2)}, b)
    return a, b


def test_quiet_prints_only_the_verdict_line(pair):
    a, b = pair
    r = run("diff", a, b, "-q")
    assert (r.exit_code, r.stdout) == (1, "result: DIFFERENT\n")
    r = run("diff", a, a, "--quiet")
    assert (r.exit_code, r.stdout) == (0, "result: EQUAL\n")
    r = run("scan", a, "-q")
    assert (r.exit_code, r.stdout.splitlines()[-1:]) == (0, r.stdout.splitlines()[-1:])
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith("result: ")


def test_quiet_commands_without_a_verdict_print_nothing(pair, tmp_path):
    a, _ = pair
    r = run("inspect", a, "-q")
    assert (r.exit_code, r.stdout) == (0, "")
    r = run("convert", a, "-o", tmp_path / "a.safetensors", "-q")
    assert (r.exit_code, r.stdout) == (0, "")
    assert (tmp_path / "a.safetensors").exists()
    r = run("inspect", tmp_path / "nope.pt", "-q")  # errors still say what is wrong
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: no such file")


def test_json_wins_over_quiet(pair):
    a, b = pair
    r = run("diff", a, b, "-q", "--json")
    assert r.exit_code == 1 and r.stdout.lstrip().startswith("{")


def test_verdict_in_colour_only_on_a_terminal_without_no_color(monkeypatch):
    text = "table\nresult: FAIL: load on cpu"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    coloured = cli_module._coloured(text)
    assert coloured.startswith("table\nresult: \x1b[31m\x1b[1mFAIL\x1b[0m: load on cpu")
    assert cli_module._coloured("result: PASS").endswith("\x1b[32m\x1b[1mPASS\x1b[0m")
    assert cli_module._coloured("table row FAIL") == "table row FAIL"  # only the verdict line
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli_module._coloured(text) == text
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert cli_module._coloured(text) == text


def test_no_colour_into_a_pipe(pair):
    a, b = pair
    p = subprocess.run([sys.executable, "-m", "ckpttool", "diff", str(a), str(b)], capture_output=True, text=True)
    assert p.returncode == 1 and "\x1b[" not in p.stdout and p.stdout.endswith("result: DIFFERENT\n")


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    for args in (["--debug", "inspect", str(missing)], ["inspect", str(missing), "--debug"]):
        p = subprocess.run([sys.executable, "-m", "ckpttool", *args], capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" in p.stderr and "FileAccessError" in p.stderr, args
    p = subprocess.run([sys.executable, "-m", "ckpttool", "inspect", str(missing)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert cli_module._hoist_debug(["diff", "a", "--debug", "--", "--debug"]) == ["--debug", "diff", "a", "--",
                                                                                 "--debug"]


@pytest.mark.parametrize("out", ["out_dir/", "existing"])
def test_a_folder_as_output_of_one_file_is_an_error(pair, tmp_path, monkeypatch, out):
    a, _ = pair
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    before = files_in(tmp_path)
    r = run("convert", a, "-o", out, "--to", "safetensors")
    assert_error(r, f"ckpttool: error: output is a folder (a trailing '/' or an existing directory): give a file "
                    f"name (--max-shard-size SIZE writes a folder of shards) ({out})")
    assert files_in(tmp_path) == before
    r = run("convert", a, "-o", "shards/", "--to", "safetensors", "--max-shard-size", "1KB")
    assert r.exit_code == 0 and os.path.isfile(tmp_path / "shards" / "model.safetensors.index.json")


@pytest.mark.parametrize("spelling", ["float16", "torch.float16", "fp16", "half", "FP16"])
def test_dtype_as_torch_spells_it(pair, tmp_path, spelling):
    a, _ = pair
    r = run("convert", a, "-o", tmp_path / "h.pt", "--dtype", spelling)
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "h.pt", weights_only=True)["w"].dtype == torch.float16


def test_unknown_dtype_is_one_line_naming_the_choices(pair, tmp_path):
    a, _ = pair
    r = run("convert", a, "-o", tmp_path / "h.pt", "--dtype", "int8")
    assert_error(r, "ckpttool: error: --dtype 'int8': use float16 (fp16, half), bfloat16 (bf16), float32 (fp32, "
                    "float) or float64 (fp64, double)")
    assert files_in(tmp_path) == {"a.pt", "b.pt"}


def _resnet(tmp_path):
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize("wrap", ["ddp", "compiled", "both"])
def test_convert_strips_a_wrapper_prefix_and_the_model_loads_strictly(tmp_path, wrap):
    from safetensors.torch import load_file
    m = _resnet(tmp_path)
    prefix = {"ddp": "module.", "compiled": "_orig_mod.", "both": "_orig_mod.module."}[wrap]
    sd = {prefix + k: v for k, v in m.state_dict().items()}
    src = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3}, src)
    r = convert(str(src), str(tmp_path / "m.safetensors"))
    assert dict(r.renamed)["prefix"] == prefix and dict(r.renamed)["renamed"] == f"{len(sd)} of {len(sd)}"
    loaded = load_file(tmp_path / "m.safetensors")
    fresh = _resnet(tmp_path)
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in m.state_dict().items())
    kept = convert(str(src), str(tmp_path / "kept.safetensors"), align=False)
    assert kept.renamed == () and sorted(load_file(tmp_path / "kept.safetensors")) == sorted(sd)


def test_convert_rename_rules_apply_to_names_and_module_versions(tmp_path):
    m = _resnet(tmp_path)
    src = tmp_path / "m.pt"
    torch.save(torch.nn.DataParallel(m).state_dict(), src)
    r = run("convert", src, "-o", tmp_path / "o.pt", "--rename", r"^fc\.=head.")
    assert r.exit_code == 0, r.output
    assert "names    stripped 'module.' from every key; --rename ^fc\\.=head.: 122 of 122 keys renamed" in r.stdout
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert "head.weight" in got and "fc.weight" not in got and "conv1.weight" in got
    assert "head" in got._metadata and "fc" not in got._metadata and "module" not in got._metadata
    assert got._metadata["bn1"] == m.state_dict()._metadata["bn1"]


def test_convert_rename_that_merges_keys_writes_nothing(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"a.weight": torch.ones(1), "b.weight": torch.ones(1)}, src)
    with pytest.raises(UsageError, match="keys 'a.weight' and 'b.weight' both become 'x.weight'"):
        convert(str(src), str(tmp_path / "o.pt"), renames=[r"^[ab]\.=x."])
    r = run("convert", src, "-o", tmp_path / "o.pt", "--rename", "(")
    assert_error(r, "ckpttool: error: --rename '(' is not REGEX=REPL")
    assert files_in(tmp_path) == {"m.pt"}


def test_remap_reports_progress_to_the_end(make, tmp_path):
    src = make("gpu_tagged.pt")
    calls = []
    remap(src, str(tmp_path / "o.pt"), ["cuda=cpu"], progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (os.path.getsize(src), os.path.getsize(src))
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


NO_TORCH = ("import sys\n"
            "for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'onnxscript'):\n"
            "    sys.modules[m] = None  # import fails, as where the package is not installed\n"
            "from ckpttool.cli import main\n"
            "main()\n")


def _without_torch(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_the_core_commands_run_without_torch_installed(pair, tmp_path):
    """pip install ckpttool is the light core (click, tabulate, numpy, safetensors): inspect, diff, convert to
    .pt and safetensors, remap and scan never import torch."""
    a, b = pair
    for args, code in ((["inspect", a], 0), (["diff", a, b], 1), (["convert", a, "-o", tmp_path / "o.safetensors"], 0),
                       (["convert", a, "-o", tmp_path / "o.pt"], 0),
                       (["remap", a, "-o", tmp_path / "r.pt", "--map", "cpu=cuda"], 0), (["scan", a], 0)):
        p = _without_torch(*args)
        assert p.returncode == code and p.stderr == "", (args, p.stderr[-2000:])
    assert torch.equal(torch.load(tmp_path / "o.pt", weights_only=True)["w"], torch.ones(3))


@pytest.mark.parametrize("args,line", [
    (["inspect", "A", "--stats"], "ckpttool: error: inspect --stats needs torch, which is not installed here: pip "
                                  "install 'ckpttool[torch]' (inspect without --stats does not)"),
    (["filter", "A", "-m", "torchvision.models:resnet18", "-o", "OUT"],
     "ckpttool: error: filter needs torch, which is not installed here: pip install 'ckpttool[torch]'"),
])
def test_a_command_that_needs_an_extra_says_which_in_one_line(pair, tmp_path, args, line):
    a, _ = pair
    args = [str(a) if x == "A" else str(tmp_path / "o.pt") if x == "OUT" else x for x in args]
    p = _without_torch(*args)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [line]
    assert not (tmp_path / "o.pt").exists()


def test_the_core_install_requires_no_torch():
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    core = {line.split(">")[0].split("=")[0].strip() for line in cfg["options"]["install_requires"].split("\n")
            if line.strip()}
    assert core == {"numpy", "click", "tabulate", "safetensors"}
    extras = cfg["options.extras_require"]
    for extra in ("torch", "onnx", "all", "test"):
        assert "torch>=2.4" in extras[extra]
    assert "onnxscript" in extras["onnx"] and "onnxruntime" in extras["onnx"]


def test_shell_completion_as_the_readme_documents_it():
    env = dict(os.environ, _CKPTTOOL_COMPLETE="bash_complete", COMP_WORDS="ckpttool ins", COMP_CWORD="1")
    p = subprocess.run([sys.executable, "-c", "from ckpttool.cli import main; main()"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["plain,inspect"]
    env.update(COMP_WORDS="ckpttool convert x --no-al", COMP_CWORD="3")
    p = subprocess.run([sys.executable, "-c", "from ckpttool.cli import main; main()"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["plain,--no-align"]
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert 'eval "$(_CKPTTOOL_COMPLETE=bash_source ckpttool)"' in readme


def test_verify_without_torch_is_no_pass(pair):
    """PASS claims a plain torch.load works here: where torch is not installed, it cannot."""
    a, _ = pair
    p = _without_torch("verify", a)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == "result: FAIL: torch.load"
    assert "torch is not installed here, so a plain torch.load cannot read it: pip install 'ckpttool[torch]'" \
        in " ".join(p.stdout.split())


def test_verify_reports_progress_through_its_round_trips(tmp_path):
    from ckpttool.verifying import verify
    path = tmp_path / "m.pt"
    torch.save({f"w{i}": torch.randn(1000) for i in range(5)}, path)
    calls = []
    r = verify(str(path), progress=lambda done, total: calls.append((done, total)))
    assert r.ok and calls and calls[-1][0] == calls[-1][1] == 2 * 5 * 4000
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_remap_to_a_device_torch_cannot_restore_is_refused(pair, tmp_path):
    a, _ = pair
    r = run("remap", a, "-o", tmp_path / "r.pt", "--map", "cpu=cudaa")
    assert_error(r, "ckpttool: error: --map 'cpu=cudaa': torch.load restores no device 'cudaa'; DST is one of cpu, "
                    "cuda[:N], mps, meta, xpu[:N], hpu[:N], mtia[:N], npu[:N]")
    assert not (tmp_path / "r.pt").exists()


def test_verify_says_what_trust_and_a_lone_cpu_proved(tmp_path):
    """--trust passes on weights_only=False: the proven line says so, not torch.load(weights_only=True); a forward
    pass on the CPU alone compared nothing: "forward pass runs"; --against without inputs: outputs not proven."""
    import torchvision
    m = torchvision.models.resnet18(weights=None, num_classes=4)
    full = tmp_path / "full.pth"
    torch.save(m, full)
    r = run("verify", full, "--trust", "--input-shape", "1x3x32x32")
    assert r.exit_code == 0, r.output
    proven = next(ln for ln in r.stdout.splitlines() if ln.startswith("proven: "))
    assert "torch.load(weights_only=False, allowed by --trust)" in proven and "forward pass runs (cpu)" in proven
    assert "computes the same (cpu)" not in proven
    sd = tmp_path / "sd.safetensors"
    assert run("convert", full, "-o", sd).exit_code == 0
    r = run("verify", sd, "--against", full, "--trust")
    not_proven = next(ln for ln in r.stdout.splitlines() if ln.startswith("not proven: "))
    assert "matches original" in not_proven
