"""SIGTERM (a cancelled CI job, ``timeout``, ``docker stop``) or Ctrl-C while a command writes.

Python's default for SIGTERM kills the process where it stands, so a command's temporary file or
folder beside OUT (or verify's folder under TMPDIR) would stay. Here each command is stopped while
its output is written (at the first fsync, just before the rename that would put it in place) and
must leave the folders as they were, print no traceback and die by the signal, as a shell expects.
A signal that arrives during the rename itself waits until the output is in place, and a second
signal during the cleanup is ignored.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

# Runs the console entry point with functions held up (argv[1]: "module:name,..."): the first call of
# each says READY on stderr and sleeps HOLD_SECONDS, so the test's signal lands while it is held.
HELD = """
import importlib, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job ignores it)
def held(real):
    calls = []
    def f(*a, **k):
        if not calls:
            calls.append(1)
            sys.stderr.write("READY\\n"); sys.stderr.flush()
            time.sleep(float(os.environ.get("HOLD_SECONDS", "60")))
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
AT_FSYNC = "os:fsync"  # every output is fsynced before it is renamed into place


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    p = d / "model.pt"
    torch.save({"a.weight": torch.randn(64, 64), "a.bias": torch.randn(64), "b": torch.arange(1000)}, p)
    return p


def held_run(at, args, tmpdir, signals=(signal.SIGTERM,), hold_seconds=60):
    """Run ``ckpttool ARGS`` with ``at`` held; send ``signals[i]`` at the i-th READY."""
    env = dict(os.environ, TMPDIR=str(tmpdir), HOLD_SECONDS=str(hold_seconds))
    p = subprocess.Popen([sys.executable, "-c", HELD, at, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    for sig in signals:
        line = p.stderr.readline()
        assert line == "READY\n", line + p.stderr.read()
        p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def assert_died_by(code, err, sig):
    assert code == -sig, (code, err)  # killed by the signal itself: $? is 128 + sig, and a shell loop stops
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "Aborted!", err


@pytest.mark.parametrize("at,make_args", [
    (AT_FSYNC, lambda s, o: ["convert", s, "-o", o / "model.safetensors"]),
    (AT_FSYNC, lambda s, o: ["convert", s, "-o", o / "model.pt", "--to", "pt"]),
    (AT_FSYNC, lambda s, o: ["convert", s, "-o", o / "shards", "--max-shard-size", "10KB"]),
    (AT_FSYNC, lambda s, o: ["remap", s, "-o", o / "cpu.pt", "--map", "cpu=cuda"]),
    (AT_FSYNC, lambda s, o: ["filter", s, "--target", s, "-o", o / "kept.pt"]),
    (AT_FSYNC, lambda s, o: ["convert", s, "-o", o / "dcp", "--to", "dcp"]),  # torch's dcp.save, then ours
    # verify writes its round-trip files in a folder under TMPDIR: stopped while comparing one back
    ("ckpttool.verifying:_compare_back", lambda s, o: ["verify", s]),
], ids=["convert-safetensors", "convert-pt", "convert-shards", "remap", "filter", "convert-dcp", "verify"])
def test_sigterm_leaves_nothing(src, tmp_path, at, make_args):
    out_dir, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmpdir.mkdir()
    before = sorted(os.listdir(src.parent))
    code, out, err = held_run(at, make_args(src, out_dir), tmpdir)
    assert_died_by(code, err, signal.SIGTERM)
    assert out == ""
    assert os.listdir(out_dir) == [] and os.listdir(tmpdir) == []  # hidden temporaries included
    assert sorted(os.listdir(src.parent)) == before


def test_ctrl_c_leaves_nothing(src, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = held_run(AT_FSYNC, ["convert", src, "-o", out_dir / "model.safetensors"], tmp_path,
                              signals=(signal.SIGINT,))
    assert_died_by(code, err, signal.SIGINT)
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("out_name,extra", [("shards", ["--max-shard-size", "10KB"]), ("m.safetensors", [])])
def test_signal_during_the_rename_waits_for_the_output(src, tmp_path, out_name, extra):
    """--force over an existing output, signalled while the new one is renamed into place: the new output
    is whole and in place, the old one gone (no ``.old-PID`` copy), nothing temporary left."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / out_name
    subprocess.run([sys.executable, "-m", "ckpttool", "convert", str(src), "-o", str(out), *extra], check=True,
                   capture_output=True)
    old = sorted(os.listdir(out)) if out.is_dir() else None
    (out / "stale.txt" if out.is_dir() else out).write_bytes(b"the old output")
    code, _, err = held_run("os:rename,os:replace", ["convert", src, "-o", out, "--force", *extra], tmp_path,
                            hold_seconds=2)
    assert_died_by(code, err, signal.SIGTERM)
    assert os.listdir(out_dir) == [out_name]
    if old is not None:
        assert sorted(os.listdir(out)) == old  # the new shards, without the old folder's stale file
    r = subprocess.run([sys.executable, "-m", "ckpttool", "diff", str(src), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_second_signal_during_cleanup_is_ignored(src, tmp_path):
    """Ctrl-C pressed again while the first signal's cleanup removes the temporary folder: it still goes."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = held_run("os:fsync,shutil:rmtree", ["convert", src, "-o", out_dir / "shards",
                                                       "--max-shard-size", "10KB"], tmp_path,
                            signals=(signal.SIGTERM, signal.SIGINT), hold_seconds=2)
    assert_died_by(code, err, signal.SIGTERM)
    assert os.listdir(out_dir) == []


def test_library_main_raises_exit_code(src, tmp_path):
    """main(argv) from other code: the signal becomes SystemExit(128 + signal), the process lives on."""
    code = ("import os, signal, sys, threading\n"
            "import ckpttool.writing as w\n"
            "real = w.atomic_output\n"
            "def hit(out):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(out)\n"
            "w.atomic_output = hit\n"
            "import ckpttool.converting as c\n"
            "c.atomic_output = hit\n"
            "from ckpttool.cli import main\n"
            "try:\n    main(['convert', sys.argv[1], '-o', sys.argv[2]])\nexcept SystemExit as e:\n"
            "    print('CODE', e.code)\n")
    out = tmp_path / "o.safetensors"
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"CODE {128 + signal.SIGTERM}", p.stdout + p.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["in"]


def test_closed_stdout_is_not_an_error(src, tmp_path):
    """`ckpttool convert ... >&-`: the output is written and the exit is clean (stdout is None in Python)."""
    out = tmp_path / "o.safetensors"
    p = subprocess.run(["bash", "-c", f'"{sys.executable}" -m ckpttool convert "{src}" -o "{out}" >&-'],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert out.exists()


def test_profiler_output_is_written(src, tmp_path):
    """Under cProfile (or coverage) the console script keeps the interpreter's exit, where they write."""
    prof = tmp_path / "p.out"
    p = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "ckpttool", "inspect", str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert prof.stat().st_size > 1000


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


def test_held_signal_does_not_outlive_its_block():
    """A signal held in an uninterrupted() block that then fails is spent with it, not raised by the next."""
    from ckpttool import writing
    with pytest.raises(OSError):
        with writing.uninterrupted():
            assert writing.hold_signal(signal.SIGTERM) is True
            raise OSError("disk full")
    with writing.uninterrupted():  # nothing pending: no KeyboardInterrupt here
        pass
    assert writing.hold_signal(signal.SIGTERM) is False  # outside a block: the handler raises it itself
    with pytest.raises(KeyboardInterrupt):
        with writing.uninterrupted():
            with writing.uninterrupted():
                writing.hold_signal(signal.SIGTERM)
            # still inside the outer block: held until it ends
