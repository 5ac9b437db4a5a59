"""`ckpttool scan` as a user and a CI job run it: exit codes, the table, JSON, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from payloads import PAYLOADS, call, dct, glob, make_ctx, markers_in, pk, sglob, u, zip_with_pickle
from payloads import flag_record as _flag_record

from ckpttool.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def no_crash(r) -> None:
    exc = r.exception
    assert exc is None or isinstance(exc, SystemExit), f"crashed with {type(exc).__name__}: {exc!s:.300}"
    assert "Traceback" not in r.output


def write(tmp_path, name: str, data: bytes) -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def evil(tmp_path):
    ctx = make_ctx(tmp_path)
    return write(tmp_path, "evil.pkl", PAYLOADS["os.system"][0](ctx))


@pytest.fixture
def mixed(tmp_path):
    """One global of each verdict: os.system and mypkg.make called, mypkg.Thing instantiated, OrderedDict safe."""
    data = pk(dct(a=call(glob("os", "system"), u("true")), b=glob("mypkg", "Thing") + b")\x81" + b"}b",
                  c=call(glob("collections", "OrderedDict")), d=call(glob("mypkg", "make"))))
    return write(tmp_path, "mixed.pkl", data)


# ---------------------------------------------------------------------------------------------
# exit codes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["state_dict.pt", "legacy.pt", "full_model.pth", "torchscript.pt",
                                  "model.safetensors", "gpu_tagged_legacy.pt", "seed_checkpoint.tar", "sharded_bin"])
def test_clean_files_exit_0(name, make):
    r = run("scan", make(name))
    no_crash(r)
    assert r.exit_code == 0, r.output
    # a folder is walked: each shard is a file of its own, counted on the verdict line
    verdict = "result: no dangerous globals in 2 files" if name == "sharded_bin" else "result: no dangerous globals"
    assert r.stdout.rstrip().endswith(verdict)


def test_dangerous_file_exits_1(evil, tmp_path):
    r = run("scan", evil)
    no_crash(r)
    assert r.exit_code == 1
    assert r.stdout.rstrip().endswith("result: DANGEROUS")
    assert markers_in(tmp_path) == []


def test_missing_file_exits_2_with_one_line(tmp_path):
    path = str(tmp_path / "nope.pt")
    r = run("scan", path)
    no_crash(r)
    assert r.exit_code == 2
    assert r.stderr == f"ckpttool: error: no such file or directory ({path})\n"
    assert r.stdout == ""


def test_no_path_is_a_usage_error():
    r = run("scan")
    assert r.exit_code == 2 and "Missing argument" in r.stderr


@pytest.mark.parametrize("data", [
    pytest.param(b"\x80\x02R.", id="reduce-on-empty-stack"),
    pytest.param(b"\x80\x02\xff.", id="unknown-opcode"),
    pytest.param(b"\x80\x02X\x10\x00\x00\x00ab", id="truncated"),
])
def test_malformed_pickle_exits_2(data, tmp_path):
    path = write(tmp_path, "bad.pkl", data)
    r = run("scan", path)
    no_crash(r)
    assert r.exit_code == 2
    assert r.stderr.startswith("ckpttool: error: malformed pickle")
    assert r.stderr.rstrip().endswith(f"({path})")
    assert len(r.stderr.strip().splitlines()) <= 2


def test_malformed_zip_record_exits_2(tmp_path, make):
    path = zip_with_pickle(make("state_dict.pt"), os.path.join(str(tmp_path), "t.pt"), pk(dct(a=u("x" * 40)))[:-9])
    r = run("scan", path)
    no_crash(r)
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: ")


def _set_record_header(path: str, **header) -> str:
    """data.pkl's zip header fields changed (see test_scan._flag_record, which does the work)."""
    _flag_record(path, "/data.pkl", **header)
    return path


@pytest.mark.parametrize("header", [pytest.param({"method": 99}, id="unknown-compression-method"),
                                    pytest.param({"bad_utf8_name": True}, id="name-not-utf8")])
def test_zip_record_zipfile_cannot_read_exits_2(header, tmp_path, make):
    """zipfile raises RuntimeError / NotImplementedError / UnicodeDecodeError on these: still a one-line error."""
    path = write(tmp_path, "odd.pt", open(make("state_dict.pt"), "rb").read())
    _set_record_header(path, **header)
    r = run("scan", path)
    no_crash(r)
    assert r.exit_code == 2
    assert r.stderr.startswith("ckpttool: error: ")


def test_unknown_format_exits_2(tmp_path):
    path = write(tmp_path, "notes.txt", b"hello, not a checkpoint\n")
    r = run("scan", path)
    no_crash(r)
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: ")


# ---------------------------------------------------------------------------------------------
# several paths
# ---------------------------------------------------------------------------------------------

def test_several_paths_dangerous_if_any(evil, make):
    good = make("state_dict.pt")
    r = run("scan", good, evil, make("model.safetensors"))
    no_crash(r)
    assert r.exit_code == 1
    out = r.stdout
    assert out.index(good) < out.index(evil) < out.index(make("model.safetensors"))
    assert f"{evil}  (pickle, 1 pickle(s)): DANGEROUS" in out
    assert f"{good}  (torch_zip, 1 pickle(s)): safe" in out


def test_several_clean_paths_exit_0(make):
    r = run("scan", make("state_dict.pt"), make("legacy.pt"), make("model.safetensors"), "--json")
    no_crash(r)
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["dangerous"] is False and len(d["files"]) == 3


def test_a_missing_path_among_several_exits_2(evil, tmp_path, make):
    gone = str(tmp_path / "gone.pt")
    r = run("scan", make("state_dict.pt"), gone)
    no_crash(r)
    # the scan goes on past it: the missing one is an entry of its own, the exit code says it
    assert r.exit_code == 2 and r.stderr == ""
    assert f"{gone}  (?): UNREADABLE: no such file or directory\n" in r.stdout
    assert r.stdout.splitlines()[-1] == "result: UNREADABLE: 1 of 2 files (no dangerous globals in the 1 other)"


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------

def test_json_schema(evil, make):
    full = make("full_model.pth")
    r = run("scan", evil, full, "--json")
    no_crash(r)
    assert r.exit_code == 1
    d = json.loads(r.stdout)  # the only thing on stdout
    assert set(d) >= {"dangerous", "files"}
    assert d["dangerous"] is True
    a, b = d["files"]
    for f in (a, b):
        assert set(f) >= {"path", "dangerous", "globals"}
        assert isinstance(f["dangerous"], list) and isinstance(f["globals"], list)
        assert all(isinstance(n, str) for n in f["dangerous"] + f["globals"])
        assert set(f["dangerous"]) <= set(f["globals"])
    assert a["path"] == evil and a["dangerous"] == ["os.system"] and a["globals"] == ["os.system"]
    assert b["path"] == full and b["dangerous"] == []
    assert {"mypkg.ClassNet", "torch._utils._rebuild_tensor_v2"} <= set(b["globals"])
    assert "mypkg.ClassNet" in b.get("needs_code", ["mypkg.ClassNet"])
    detail = {x["name"]: x for x in a.get("details", [])}
    if detail:
        assert detail["os.system"]["verdict"] == "dangerous" and detail["os.system"]["note"] == "runs a shell command"


def test_json_clean_exit_0(make):
    r = run("scan", make("state_dict.pt"), "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d == {"dangerous": False, "files": d["files"], "skipped": [],
                 "counts": {"files": 1, "dangerous": 0, "unreadable": 0, "needs_code": 0, "safe": 1}}
    assert d["files"][0]["dangerous"] == [] and d["files"][0]["verdict"] == "safe" and d["files"][0]["error"] is None


def test_json_error_prints_nothing_on_stdout(tmp_path):
    r = run("scan", str(tmp_path / "nope.pt"), "--json")
    assert r.exit_code == 2 and r.stdout == ""


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def test_table_lists_dangerous_first_with_the_deny_note(mixed):
    r = run("scan", mixed)
    no_crash(r)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0] == f"{mixed}  (pickle, 1 pickle(s)): DANGEROUS"
    rows = [l for l in lines if l.split(" ")[0] in ("dangerous", "needs", "safe")]
    kinds = [("needs code" if l.startswith("needs code") else l.split()[0]) for l in rows]
    assert kinds == ["dangerous", "dangerous", "needs code", "safe"], rows
    system = next(l for l in rows if " os.system " in l)
    assert "runs a shell command" in system and "called" in system
    assert any(" mypkg.make " in l for l in rows[:2])
    assert "instantiated" in rows[2] and "mypkg.Thing" in rows[2]
    assert "add_safe_globals" not in r.stdout  # never a line that would allow a dangerous file


def test_table_of_a_full_model_prints_the_add_safe_globals_line(make):
    r = run("scan", make("full_model.pth"))
    assert r.exit_code == 0
    assert "needs code to load" in r.stdout.splitlines()[0]
    line = next(l for l in r.stdout.splitlines() if "add_safe_globals" in l)
    assert line.startswith("to read it with torch.load(weights_only=True): from ")
    assert "; torch.serialization.add_safe_globals([" in line
    assert "from mypkg import Block, ClassNet" in line


def test_table_of_a_file_without_pickles(make):
    r = run("scan", make("model.safetensors"))
    assert r.exit_code == 0
    assert "(no globals: nothing to import)" in r.stdout


@pytest.mark.parametrize("name,note", [("builtins.eval", "evaluates Python code"),
                                       ("runpy.run_path", "runs a Python file"),
                                       ("subprocess.Popen", "starts a process"),
                                       ("pickle.loads(nested)", "unpickles more (unrestricted)")])
def test_table_names_what_the_worst_do(name, note, tmp_path):
    ctx = make_ctx(tmp_path)
    r = run("scan", write(tmp_path, "p.pkl", PAYLOADS[name][0](ctx)))
    assert r.exit_code == 1 and note in r.stdout


def test_table_escapes_control_characters_in_names(tmp_path):
    esc = "\x1b]0;owned\x07\x1b[2J"
    path = write(tmp_path, "esc.pkl", pk(call(sglob("evil" + esc, "run" + esc), u("x")), 4))
    r = run("scan", path)
    no_crash(r)
    assert r.exit_code == 1
    bad = sorted({hex(ord(ch)) for ch in r.output if ord(ch) < 0x20 and ch != "\n"})
    assert not bad, f"control characters {bad} reach the terminal"


def test_dcp_payload_folder_exits_1(tmp_path):
    import shutil
    import warnings
    import torch
    import torch.distributed.checkpoint as dcp
    folder = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.zeros(3)}, checkpoint_id=str(folder))
    ctx = make_ctx(tmp_path)
    (folder / ".metadata").write_bytes(PAYLOADS["subprocess.Popen"][0](ctx))
    r = run("scan", str(folder), "--json")
    no_crash(r)
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert "subprocess.Popen" in d["files"][0]["dangerous"]
    assert markers_in(tmp_path) == []
    shutil.rmtree(folder)


def test_help_has_an_example():
    r = run("scan", "--help")
    assert r.exit_code == 0 and "ckpttool scan" in r.stdout and "--json" in r.stdout


def test_console_script_exit_codes(evil, make, tmp_path):
    """The real entry point, in a subprocess: no traceback, codes as documented."""
    cmd = [sys.executable, "-m", "ckpttool", "scan"]
    ok = subprocess.run(cmd + [make("state_dict.pt")], capture_output=True, text=True, timeout=120)
    bad = subprocess.run(cmd + [evil, "--json"], capture_output=True, text=True, timeout=120)
    gone = subprocess.run(cmd + [str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120)
    assert (ok.returncode, bad.returncode, gone.returncode) == (0, 1, 2), (ok.stderr, bad.stderr, gone.stderr)
    assert json.loads(bad.stdout)["dangerous"] is True
    assert "Traceback" not in ok.stderr + bad.stderr + gone.stderr
    assert markers_in(tmp_path) == []
