"""`ckpttool scan PATH...` over folders and many files: each file its own entry, unreadable ones do not stop it.

The dangerous files here name a harmless function (``builtins.print``, ``os.getcwd``) in a REDUCE; scan only
reads them, and the tests check that the marker text never reaches the output (nothing was called).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner

from ckpttool.cli import cli
from ckpttool.errors import FormatError
from ckpttool.scanning import scan

MARKER = "scan-many-marker-never-printed"


def run(*args):
    return CliRunner().invoke(cli, list(args))


def no_crash(r) -> None:
    exc = r.exception
    assert exc is None or isinstance(exc, SystemExit), f"crashed with {type(exc).__name__}: {exc!s:.300}"
    assert "Traceback" not in r.output and MARKER not in r.output


def print_call(protocol: int = 2) -> bytes:
    """A pickle whose REDUCE calls builtins.print(MARKER): dangerous to scan, harmless if it ever ran."""
    arg = MARKER.encode()
    if protocol == 0:
        return b"cbuiltins\nprint\n(V" + arg + b"\ntR."
    return b"\x80\x02cbuiltins\nprint\nX" + len(arg).to_bytes(4, "little") + arg + b"\x85R."


def getcwd_call() -> bytes:
    return b"\x80\x02cos\ngetcwd\n)R."


def save_state_dict(path: str, width: int = 3) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(torch.nn.Linear(width, 2).state_dict(), path)
    return path


def put(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def tree(tmp_path):
    """models/: a safe state_dict, a dangerous pickle, a truncated checkpoint, a nested one, and a text file."""
    root = str(tmp_path / "models")
    safe = save_state_dict(os.path.join(root, "safe.pt"))
    nested = save_state_dict(os.path.join(root, "sub", "deeper", "nested.pth"), width=4)
    broken = put(os.path.join(root, "broken.pt"), open(safe, "rb").read()[:200])  # a download cut short
    evil = put(os.path.join(root, "evil.pkl"), print_call())
    notes = put(os.path.join(root, "notes.txt"), b"trained for 3 epochs\n")
    return {"root": root, "safe": safe, "nested": nested, "broken": broken, "evil": evil, "notes": notes}


# ---------------------------------------------------------------------------------------------
# each file its own entry; the exit code by the rule: 1 dangerous, else 2 unreadable, else 0
# ---------------------------------------------------------------------------------------------

def test_a_folder_reports_each_file_with_its_path_format_and_verdict(tree):
    r = run("scan", tree["root"])
    no_crash(r)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert f"{tree['safe']}  (torch_zip, 1 pickle(s)): safe" in lines
    assert f"{tree['nested']}  (torch_zip, 1 pickle(s)): safe" in lines
    assert f"{tree['evil']}  (pickle, 1 pickle(s)): DANGEROUS" in lines
    broken = [l for l in lines if l.startswith(tree["broken"] + "  ")]
    assert len(broken) == 1 and broken[0].startswith(f"{tree['broken']}  (zip): UNREADABLE: ")
    # the dangerous file's table names the global, and the file is named again above the verdict
    table = lines[lines.index(f"{tree['evil']}  (pickle, 1 pickle(s)): DANGEROUS") + 3]
    assert table.split() == ["dangerous", "builtins.print", "called", "pickle"]
    assert lines[-4:] == [f"dangerous: {tree['evil']}",
                          f"unreadable: {tree['broken']}",
                          f"not scanned (not a checkpoint format): {tree['notes']}",
                          "result: DANGEROUS: 1 of 4 files (1 unreadable)"]
    assert r.stderr == ""  # not a terminal: no progress, and the unreadable file is in its entry


def test_entries_come_in_path_order_files_before_subfolders(tree):
    r = scan([tree["root"]], walk=True, keep_going=True)
    assert [f.path for f in r.files] == [tree["broken"], tree["evil"], tree["safe"], tree["nested"]]
    assert [f.verdict for f in r.files] == ["unreadable", "dangerous", "safe", "safe"]


def test_exit_2_when_unreadable_and_nothing_dangerous(tree):
    os.remove(tree["evil"])
    r = run("scan", tree["root"])
    no_crash(r)
    assert r.exit_code == 2
    assert r.stdout.splitlines()[-1] == "result: UNREADABLE: 1 of 3 files (no dangerous globals in the 2 others)"
    assert r.stderr == ""


def test_exit_0_when_every_file_is_clean(tree):
    os.remove(tree["evil"])
    os.remove(tree["broken"])
    r = run("scan", tree["root"])
    no_crash(r)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[-1] == "result: no dangerous globals in 2 files"


def test_exit_1_when_dangerous_and_nothing_unreadable(tree):
    os.remove(tree["broken"])
    r = run("scan", tree["root"])
    no_crash(r)
    assert r.exit_code == 1
    assert r.stdout.splitlines()[-1] == "result: DANGEROUS: 1 of 3 files"


def test_dangerous_wins_over_unreadable_whatever_the_order(tree, tmp_path):
    """Unreadable files before and after the dangerous one: still exit 1, every file reported."""
    after = put(os.path.join(tree["root"], "zz_garbage.ckpt"), b"\x00" * 64)
    r = scan([tree["broken"], tree["root"], after], walk=True, keep_going=True)
    assert r.exit_code == 1 and r.dangerous
    assert r.counts() == {"files": 7, "dangerous": 1, "unreadable": 4, "needs_code": 0, "safe": 2}
    assert [f.verdict for f in r.files] == ["unreadable", "unreadable", "dangerous", "safe", "unreadable", "safe",
                                            "unreadable"]


def test_several_paths_files_and_folders_mixed(tree, tmp_path):
    lone = save_state_dict(str(tmp_path / "lone.pt"))
    getcwd_file = put(str(tmp_path / "cwd.pkl"), getcwd_call())
    r = run("scan", lone, tree["root"], getcwd_file)
    no_crash(r)
    assert r.exit_code == 1
    assert r.stdout.splitlines()[-1] == "result: DANGEROUS: 2 of 6 files (1 unreadable)"
    assert f"dangerous: {tree['evil']}, {getcwd_file}" in r.stdout.splitlines()


# ---------------------------------------------------------------------------------------------
# an unreadable file does not stop the scan
# ---------------------------------------------------------------------------------------------

def test_one_unreadable_file_does_not_stop_the_scan(tree):
    """broken.pt sorts first: every file after it is still scanned, and its error is one line in its entry."""
    r = scan([tree["root"]], walk=True, keep_going=True)
    broken = r.files[0]
    assert broken.path == tree["broken"] and broken.verdict == "unreadable"
    assert broken.error and "\n" not in broken.error and "Traceback" not in broken.error
    assert broken.globals == () and broken.pickles == 0
    assert len(r.files) == 4 and r.files[1].dangerous_names == ("builtins.print",)


def test_without_keep_going_the_first_unreadable_file_raises(tree):
    with pytest.raises(FormatError) as info:
        scan([tree["root"]], walk=True)
    assert info.value.path == tree["broken"]


@pytest.mark.parametrize("name,data", [
    pytest.param("empty.pt", b"", id="empty"),
    pytest.param("garbage.bin", bytes(range(256)) * 4, id="garbage"),
    pytest.param("cut.pkl", print_call()[:12], id="pickle-cut-before-its-call"),
])
def test_each_kind_of_unreadable_file_is_an_entry(name, data, tree):
    bad = put(os.path.join(tree["root"], "sub", name), data)
    r = scan([tree["root"]], walk=True, keep_going=True)
    entry = next(f for f in r.files if f.path == bad)
    assert entry.verdict == "unreadable" and entry.error
    assert r.exit_code == 1 and len(r.files) == 5


def test_a_folder_that_cannot_be_listed_is_an_entry(tree, monkeypatch):
    """As a folder without read permission (simulated: the tests may run as root, whom permissions do not stop)."""
    locked = os.path.join(tree["root"], "locked")
    save_state_dict(os.path.join(locked, "inside.pt"))
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    r = scan([tree["root"]], walk=True, keep_going=True)
    entry = next(f for f in r.files if f.path == locked)
    assert (entry.verdict, entry.error) == ("unreadable", "cannot list the folder: Permission denied")
    assert len(r.files) == 5 and r.exit_code == 1


def test_a_missing_path_among_several_is_an_entry(tree, tmp_path):
    gone = str(tmp_path / "gone.pt")
    r = run("scan", tree["safe"], gone, "--json")
    no_crash(r)
    assert r.exit_code == 2 and r.stderr == ""
    d = json.loads(r.stdout)
    assert [(f["path"], f["verdict"], f["error"]) for f in d["files"]] == [
        (tree["safe"], "safe", None), (gone, "unreadable", "no such file or directory")]


def test_one_file_named_alone_that_cannot_be_read_is_the_commands_error(tree):
    """Nothing else to report: the one-line error every command gives, nothing on stdout."""
    r = run("scan", tree["broken"])
    no_crash(r)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("ckpttool: error: ") and r.stderr.rstrip().endswith(f"({tree['broken']})")
    assert len(r.stderr.splitlines()) <= 2


def test_a_folder_holding_one_unreadable_file_reports_it_in_its_entry(tmp_path):
    folder = tmp_path / "one"
    bad = put(str(folder / "cut.pt"), b"PK\x03\x04" + b"\x00" * 40)
    r = run("scan", str(folder))
    no_crash(r)
    assert r.exit_code == 2
    assert r.stdout.splitlines()[0].startswith(f"{bad}  (zip): UNREADABLE: ")
    assert r.stdout.splitlines()[-1] == "result: UNREADABLE"


def test_a_folder_with_no_checkpoint_is_an_error(tmp_path):
    put(str(tmp_path / "docs" / "README.md"), b"# notes\n")
    r = run("scan", str(tmp_path / "docs"))
    no_crash(r)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"ckpttool: error: no checkpoint file in this folder ({tmp_path / 'docs'})\n"


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------

def test_json_has_one_object_per_file(tree):
    r = run("scan", tree["root"], "--json")
    no_crash(r)
    assert r.exit_code == 1
    d = json.loads(r.stdout)  # the only thing on stdout
    assert d["dangerous"] is True
    assert d["counts"] == {"files": 4, "dangerous": 1, "unreadable": 1, "needs_code": 0, "safe": 2}
    files = {f["path"]: f for f in d["files"]}
    assert list(files) == [tree["broken"], tree["evil"], tree["safe"], tree["nested"]]
    for f in d["files"]:
        assert {"path", "format", "verdict", "error", "globals", "dangerous"} <= set(f)
    assert (files[tree["evil"]]["verdict"], files[tree["evil"]]["format"]) == ("dangerous", "pickle")
    assert files[tree["evil"]]["dangerous"] == ["builtins.print"] == files[tree["evil"]]["globals"]
    assert files[tree["evil"]]["error"] is None
    assert (files[tree["safe"]]["verdict"], files[tree["safe"]]["format"]) == ("safe", "torch_zip")
    assert "torch._utils._rebuild_tensor_v2" in files[tree["safe"]]["globals"]
    broken = files[tree["broken"]]
    assert (broken["verdict"], broken["format"], broken["globals"], broken["dangerous"]) == \
        ("unreadable", "zip", [], [])
    assert isinstance(broken["error"], str) and broken["error"] and "\n" not in broken["error"]
    assert d["skipped"] == [{"path": tree["notes"], "reason": "not a checkpoint format"}]


# ---------------------------------------------------------------------------------------------
# which files a folder's walk scans
# ---------------------------------------------------------------------------------------------

def test_files_of_other_names_are_scanned_when_a_loader_reads_their_bytes(tmp_path):
    root = tmp_path / "odd"
    p2 = put(str(root / "weights"), print_call(2))         # protocol 2: its header
    p0 = put(str(root / "state"), print_call(0))           # protocol 0: no header, a pickle all the same
    zipped = put(str(root / "model.data"), open(save_state_dict(str(tmp_path / "x.pt")), "rb").read())
    text = put(str(root / "cheatsheet"), b"cat notes\nfoo\nbar\n")  # starts like GLOBAL, names no module
    raw = put(str(root / "blob.raw"), bytes(range(256)) * 8)
    r = scan([str(root)], walk=True, keep_going=True)
    assert {f.path: f.verdict for f in r.files} == {zipped: "safe", p0: "dangerous", p2: "dangerous"}
    assert dict(r.skipped) == {raw: "not a checkpoint format", text: "not a checkpoint format"}


def test_checkpoint_names_are_always_scanned_except_an_onnx_models_data(tmp_path):
    """A .bin beside an .onnx model that is no checkpoint is its external data; elsewhere it is unreadable."""
    raw = bytes(range(256)) * 8
    with_onnx = tmp_path / "onnx"
    put(str(with_onnx / "model.onnx"), b"\x08\x07\x12\x07pytorch")  # only its name matters to the walk
    data = put(str(with_onnx / "weights.bin"), raw)
    alone = put(str(tmp_path / "plain" / "weights.bin"), raw)
    r = scan([str(with_onnx), str(alone)], walk=True, keep_going=True)
    assert [(f.path, f.verdict) for f in r.files] == [(str(with_onnx / "model.onnx"), "safe"), (alone, "unreadable")]
    assert r.skipped == ((data, "external data of an .onnx model"),)


def test_dcp_folder_is_one_entry_and_its_neighbours_are_scanned(tmp_path):
    import torch.distributed.checkpoint as dcp
    root = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.zeros(3), "step": 7}, checkpoint_id=str(root / "step_7"))
    planted = put(str(root / "step_7" / "extra.pkl"), getcwd_call())
    r = scan([str(root)], walk=True, keep_going=True)
    assert [(f.path, f.format, f.verdict) for f in r.files] == [
        (str(root / "step_7"), "dcp", "safe"), (planted, "pickle", "dangerous")]
    assert not any(p.endswith((".distcp", ".metadata")) for p, _ in r.skipped)


def test_hf_folders_get_each_shard_scanned(make):
    r = scan([make("sharded_bin"), make("sharded_safetensors")], walk=True, keep_going=True)
    assert [(os.path.basename(f.path), f.format, f.pickles, f.verdict) for f in r.files] == [
        ("pytorch_model-00001-of-00002.bin", "torch_zip", 1, "safe"),
        ("pytorch_model-00002-of-00002.bin", "torch_zip", 1, "safe"),
        ("model-00001-of-00002.safetensors", "safetensors", 0, "safe"),
        ("model-00002-of-00002.safetensors", "safetensors", 0, "safe")]
    assert sorted(os.path.basename(p) for p, _ in r.skipped) == ["model.safetensors.index.json",
                                                                  "pytorch_model.bin.index.json"]
    assert r.exit_code == 0


def test_a_dangerous_shard_is_named_by_its_path(make, tmp_path):
    folder = str(tmp_path / "hf")
    shutil.copytree(make("sharded_bin"), folder)
    shard = os.path.join(folder, "pytorch_model-00002-of-00002.bin")
    put(shard, print_call())
    r = run("scan", folder)
    no_crash(r)
    assert r.exit_code == 1
    assert f"dangerous: {shard}" in r.stdout.splitlines()
    assert r.stdout.splitlines()[-1] == "result: DANGEROUS: 1 of 2 files"


# ---------------------------------------------------------------------------------------------
# symbolic links
# ---------------------------------------------------------------------------------------------

def test_symlinked_folders_are_not_followed(tree, tmp_path):
    outside = tmp_path / "outside"
    put(str(outside / "elsewhere.pkl"), getcwd_call())
    os.symlink(str(outside), os.path.join(tree["root"], "sub", "link_out"))
    os.symlink("..", os.path.join(tree["root"], "sub", "loop"))  # a loop: models/sub/loop -> models/
    r = scan([tree["root"]], walk=True, keep_going=True)
    assert [f.path for f in r.files] == [tree["broken"], tree["evil"], tree["safe"], tree["nested"]]
    assert (os.path.join(tree["root"], "sub", "link_out"), "symbolic link to a folder, not followed") in r.skipped
    assert (os.path.join(tree["root"], "sub", "loop"), "symbolic link to a folder, not followed") in r.skipped


def test_symlinked_files_are_scanned_and_a_named_folder_link_is_walked(tree, tmp_path):
    outside = put(str(tmp_path / "outside" / "elsewhere.pkl"), getcwd_call())
    link = os.path.join(tree["root"], "linked.pkl")
    os.symlink(outside, link)
    os.symlink(os.path.join(tree["root"], "nowhere.pt"), os.path.join(tree["root"], "dangling.pt"))
    os.symlink(tree["root"], str(tmp_path / "models_link"))
    r = scan([str(tmp_path / "models_link")], walk=True, keep_going=True)
    verdicts = {os.path.basename(f.path): f.verdict for f in r.files}
    assert verdicts["linked.pkl"] == "dangerous" and verdicts["dangling.pt"] == "unreadable"
    assert len(r.files) == 6


def test_help_says_what_is_walked_and_that_folder_links_are_not_followed():
    r = run("scan", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    assert "Symbolic links to folders are not followed" in text
    assert "ckpttool scan models/ --json" in text
    assert "Exit 1 when anything is dangerous, else 2 when anything is unreadable, else 0." in text


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------

def test_progress_counts_every_file(tree):
    calls = []
    scan([tree["root"]], walk=True, keep_going=True, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_nothing_on_stderr_when_it_is_not_a_terminal(tree):
    r = run("scan", tree["root"], "--json")
    assert r.stderr == ""
    r = run("scan", tree["root"])
    assert r.stderr == ""
