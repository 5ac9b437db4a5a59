"""SIGTERM (a cancelled CI job, ``timeout``, ``docker stop``) while a command writes: nothing is left behind.

Python's default for SIGTERM kills the process where it stands, so a command's temporary file or
folder beside OUT (or verify's folder under TMPDIR) would stay. Each command here is stopped at the
last moment, in the rename that puts its finished output in place, and must leave the folders as
they were, exit 143 and print no traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

# Runs the console entry point with one function held up (argv[1], "module:name"): it says READY on
# stderr and sleeps, so the test's SIGTERM lands while the temporary output exists. Held at os.rename /
# os.replace, the output is finished and not yet in place.
HELD = """
import importlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job ignores it)
def held(real):
    def f(*a, **k):
        sys.stderr.write("READY\\n"); sys.stderr.flush()
        time.sleep(60)
        return real(*a, **k)
    return f
for spec in sys.argv[1].split(","):
    mod, name = spec.split(":")
    m = importlib.import_module(mod)
    setattr(m, name, held(getattr(m, name)))
sys.argv = ["ckpttool"] + sys.argv[2:]
from ckpttool.cli import main
main()
"""
AT_RENAME = "os:rename,os:replace"


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    p = d / "model.pt"
    torch.save({"a.weight": torch.randn(64, 64), "a.bias": torch.randn(64), "b": torch.arange(1000)}, p)
    return p


def held_run(at, args, tmpdir, sig=signal.SIGTERM):
    env = dict(os.environ, TMPDIR=str(tmpdir))
    p = subprocess.Popen([sys.executable, "-c", HELD, at, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    first = p.stderr.readline()
    assert first == "READY\n", first + p.stderr.read()
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


@pytest.mark.parametrize("at,make_args", [
    (AT_RENAME, lambda s, o: ["convert", s, "-o", o / "model.safetensors"]),
    (AT_RENAME, lambda s, o: ["convert", s, "-o", o / "model.pt", "--to", "pt"]),
    (AT_RENAME, lambda s, o: ["convert", s, "-o", o / "shards", "--max-shard-size", "10KB"]),
    (AT_RENAME, lambda s, o: ["remap", s, "-o", o / "cpu.pt", "--map", "cpu=cuda"]),
    (AT_RENAME, lambda s, o: ["filter", s, "--target", s, "-o", o / "kept.pt"]),
    (AT_RENAME, lambda s, o: ["convert", s, "-o", o / "dcp", "--to", "dcp"]),  # torch's dcp.save, then ours
    # verify writes its round-trip files in a folder under TMPDIR: stopped while comparing one back
    ("ckpttool.verifying:_compare_back", lambda s, o: ["verify", s]),
], ids=["convert-safetensors", "convert-pt", "convert-shards", "remap", "filter", "convert-dcp", "verify"])
def test_sigterm_leaves_nothing(src, tmp_path, at, make_args):
    out_dir, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmpdir.mkdir()
    before = sorted(os.listdir(src.parent))
    code, out, err = held_run(at, make_args(src, out_dir), tmpdir)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "Aborted!", err
    assert out == ""
    assert os.listdir(out_dir) == [] and os.listdir(tmpdir) == []  # hidden temporaries included
    assert sorted(os.listdir(src.parent)) == before


def test_ctrl_c_exits_130_and_leaves_nothing(src, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = held_run(AT_RENAME, ["convert", src, "-o", out_dir / "model.safetensors"], tmp_path,
                              sig=signal.SIGINT)
    assert code == 128 + signal.SIGINT, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "Aborted!", err
    assert os.listdir(out_dir) == []


def test_sigterm_handler_of_the_caller_is_kept(src, tmp_path):
    """Embedded in a process that handles SIGTERM itself, main() leaves that handler alone."""
    code = ("import signal, sys\n"
            "mine = lambda *a: None\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "from ckpttool.cli import main\n"
            "try:\n    main(['inspect', sys.argv[1]])\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert signal.getsignal(signal.SIGTERM) is mine\n"
            "print('RC', rc)\n")
    p = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "RC 0"


def test_main_restores_default_signal_handlers(src):
    """Called in-process (a wrapper script, a test), main() leaves SIGTERM and SIGINT as it found them."""
    from ckpttool.cli import main
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as e:
            main(["inspect", str(src), "--json"])
        assert e.value.code == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
