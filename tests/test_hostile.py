"""The hostile corpus (tests/hostile.py) against the real loaders and against ckpttool.

Per file of the corpus (each test id names the file):
- the real loader still behaves as the corpus says: a file meant to execute creates its marker,
  one meant not to does not (all loaded in ONE throwaway process; DoS inputs and bombs left out);
- ``ckpttool.scan([path])`` returns dangerous=True for every file the loader executes (and for
  native code), never raises on it, and returns not-dangerous for the benign look-alikes; nothing
  raises anything but a ``CkptError``;
- ``ckpttool scan`` exits 1 on executing files, 0 on benign ones, and never shows a traceback;
- ``ckpttool verify`` never exits 0 on an executing file;
- DoS inputs and bombs: ``ckpttool scan`` in a subprocess ends within 20 s, exit 1, no traceback;
- no ckpttool command run here created any marker.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

import hostile

import ckpttool
from ckpttool.cli import cli
from ckpttool.errors import CkptError

NAMES = hostile.corpus_names()
HEAVY_LIMIT_S = 20


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{name: (path, meta)} of the corpus, built once into a session folder."""
    root = tmp_path_factory.mktemp("hostile")
    entries = hostile.build_corpus(str(root / "corpus"), str(root / "markers"))
    # the look-alike classes (the benign enums) are importable here, as a user's installed library is:
    # scan reads their source (never imports it) to know an enum from a function
    sys.path.append(str(root / "corpus"))
    return {m["name"]: (p, m) for p, m in entries}


@pytest.fixture(scope="session")
def loaded(corpus):
    """What the real loaders did with each light file, all loaded in one fresh process."""
    return hostile.measure_in_one_process(list(corpus.values()))


@pytest.fixture(scope="session")
def heavy_runs(corpus):
    """``ckpttool scan --json`` and ``ckpttool verify`` of each heavy file, in subprocesses, two at a time."""
    heavy = [(p, m) for p, m in corpus.values() if m["heavy"]]

    def run(job):
        path, cmd = job
        t = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-m", "ckpttool", cmd] + (["--json"] if cmd == "scan" else []) + [path],
                               capture_output=True, text=True, timeout=HEAVY_LIMIT_S, errors="replace")
            return r.returncode, time.monotonic() - t, r.stderr
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - t, ""
    jobs = [(p, cmd) for p, _ in heavy for cmd in ("scan", "verify")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, jobs))
    return {(os.path.basename(p), cmd): res for (p, cmd), res in zip(jobs, results)}


def test_corpus_names_match(corpus):
    assert list(corpus) == NAMES


def test_corpus_is_varied(corpus):
    metas = [m for _, m in corpus.values()]
    assert {m["container"] for m in metas} >= {"bare", "zip", "legacy", "tar", "pt2", "dcp", "npy", "npz"}
    assert sum(1 for m in metas if m["executes"]) >= 150
    assert sum(1 for m in metas if m["benign"]) >= 10


# ---- ckpttool: scan (library and CLI), verify ------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_scan_library(corpus, name):
    path, meta = corpus[name]
    if meta["heavy"]:
        pytest.skip("DoS input: scanned in a subprocess (test_heavy_scan_bounded)")
    try:
        result = ckpttool.scan([path])
    except CkptError as e:
        assert not (meta["executes"] or meta["executes"] is None or meta["benign"]), (
            f"{name}: scan raised {type(e).__name__}({e}) on a file {meta['loader']} "
            f"{'executes' if meta['executes'] else 'loads'} ({meta['kind']}: {meta['note']})")
        return
    except Exception as e:  # noqa: BLE001 - anything but a CkptError is a bug
        pytest.fail(f"{name}: scan raised {type(e).__name__}: {e}")
    if meta["executes"] or meta["executes"] is None:
        assert result.dangerous, (f"{name}: {meta['loader']} runs its payload ({meta['kind']}: {meta['note']}) "
                                  f"but scan says not dangerous")
    if meta["benign"]:
        names = [g for f in result.files for g in getattr(f, "dangerous_names", ())]
        assert not result.dangerous, f"{name}: benign ({meta['note']}) called dangerous: {names}"


@pytest.mark.parametrize("name", NAMES)
def test_scan_cli(corpus, name):
    path, meta = corpus[name]
    if meta["heavy"]:
        pytest.skip("DoS input: scanned in a subprocess (test_heavy_scan_bounded)")
    r = CliRunner().invoke(cli, ["scan", "--json", path])
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"{name}: traceback: {type(r.exception).__name__}: {r.exception}")
    if meta["executes"] or meta["executes"] is None:
        assert r.exit_code == 1, (f"{name}: exit {r.exit_code} on a file {meta['loader']} executes "
                                  f"({meta['kind']}: {meta['note']}): {r.output.strip()[-200:]}")
    elif meta["benign"]:
        assert r.exit_code == 0, f"{name}: exit {r.exit_code} on a benign file ({meta['note']}): {r.output.strip()[-200:]}"
    else:
        assert r.exit_code in (0, 1, 2)


@pytest.mark.parametrize("name", NAMES)
def test_verify_cli(corpus, name):
    path, meta = corpus[name]
    if meta["heavy"]:
        pytest.skip("DoS input: verified in a subprocess (test_heavy_verify_bounded)")
    r = CliRunner().invoke(cli, ["verify", path])
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"{name}: traceback: {type(r.exception).__name__}: {r.exception}")
    if meta["executes"] or meta["executes"] is None:
        assert r.exit_code != 0, f"{name}: verify PASSES a file {meta['loader']} executes ({meta['kind']}: {meta['note']})"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("dos_")])
def test_heavy_scan_bounded(corpus, heavy_runs, name):
    path, meta = corpus[name]
    assert meta["heavy"]
    rc, seconds, err = heavy_runs[(name, "scan")]
    assert rc is not None, f"{name}: scan still running after {HEAVY_LIMIT_S} s ({meta['note']})"
    assert "Traceback (most recent call last)" not in err, f"{name}: traceback: {err.strip().splitlines()[-1]}"
    assert rc == 1, f"{name}: exit {rc} ({meta['note']}): {err.strip()[-200:]}"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("dos_")])
def test_heavy_verify_bounded(corpus, heavy_runs, name):
    path, meta = corpus[name]
    rc, seconds, err = heavy_runs[(name, "verify")]
    assert rc is not None, f"{name}: verify still running after {HEAVY_LIMIT_S} s ({meta['note']})"
    assert "Traceback (most recent call last)" not in err, f"{name}: traceback: {err.strip().splitlines()[-1]}"
    assert rc != 0, f"{name}: verify PASSES a file the loader executes ({meta['note']})"


def test_no_command_ran_a_payload(corpus):
    # Runs after the scan and verify tests and before the loaders run: any marker now is ckpttool's doing.
    markers = {m["marker"] for _, m in corpus.values() if m["marker"]}
    made = sorted(os.path.basename(x) for x in markers if os.path.exists(x))
    assert not made, f"markers created while ckpttool read the corpus: {made}"


# ---- the real loaders: the corpus stays honest as torch changes ---------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_loader_behaves_as_recorded(corpus, loaded, name):
    path, meta = corpus[name]
    if meta["heavy"] or meta["executes"] is None:
        pytest.skip("heavy or native: measured by fuzz/hostile_report.py, not here")
    got = loaded[name]
    if meta["executes"]:
        assert got["executes"], (f"{name}: {meta['loader']} no longer runs the payload ({meta['kind']}: "
                                 f"{meta['note']}); it raised {got['error']}")
    else:
        assert not got["executes"], f"{name}: {meta['loader']} now creates the marker ({meta['kind']}: {meta['note']})"
