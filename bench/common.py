"""What every benchmark here shares: timing a command in its own process, and making inputs in a child.

Inputs are made by the benchmark script itself re-run with ``--make`` in a child process, so the
measuring process never imports torch and its children's peak RSS (wait4) is theirs alone.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time


# the floor for writing a file: copy it in 16 MiB blocks and fdatasync (run as python -c COPY SRC DST)
COPY = """
import os, sys
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    while True:
        b = src.read(1 << 24)
        if not b:
            break
        dst.write(b)
    dst.flush(); os.fdatasync(dst.fileno())
"""


def _run_once(cmd, ok, prepare=None):
    if prepare:
        prepare()
    os.sync()  # every run starts with no dirty pages of an earlier run still to write back
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code not in ok:
        raise SystemExit(f"{cmd} failed with {code}")
    return elapsed, usage.ru_maxrss / 1024


def measure(cmd, runs, ok=(0,), prepare=None):
    """Median wall time and peak RSS (MB, this child alone, via wait4) of ``runs`` runs.

    ``ok``: the exit codes that mean the command worked (diff exits 1 when files differ).
    ``prepare()`` runs before each run, untimed (e.g. removing the last run's output, so that every
    run writes a new file rather than paying to free the old one).
    """
    results = [_run_once(cmd, ok, prepare) for _ in range(runs)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def measure_together(cmds, runs, ok=(0,), prepare=None):
    """``measure`` for several commands, their runs interleaved (a, b, a, b...): a disk or a machine that
    slows down for a while slows every command alike, so their ratio holds. One (time, RSS) per command."""
    results = [[] for _ in cmds]
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            results[i].append(_run_once(cmd, ok, prepare))
    return [(statistics.median(r[0] for r in rs), max(r[1] for r in rs)) for rs in results]


@contextlib.contextmanager
def compiled_package():
    """Give this checkout's ckpttool its bytecode for the block, as a pip install would (an editable install
    under PYTHONDONTWRITEBYTECODE has none, and would compile every module on every run); torch is installed
    compiled. Written into ckpttool's own __pycache__ folders (git ignores them), removed afterwards."""
    import compileall
    import shutil
    import ckpttool
    root = os.path.dirname(ckpttool.__file__)
    before = {p for p, _, _ in os.walk(root) if os.path.basename(p) == "__pycache__"}
    compileall.compile_dir(root, quiet=1)
    try:
        yield
    finally:
        for p, _, _ in list(os.walk(root)):
            if os.path.basename(p) == "__pycache__" and p not in before:
                shutil.rmtree(p, ignore_errors=True)


def rss_limit(text: str, largest_mb: float) -> float:
    """``"200 MB + 2 x largest tensor"`` -> MB."""
    base, _, rest = text.partition("+")
    limit = float(base.split()[0])
    if rest:
        k = rest.split("x")[0].strip() if "x" in rest else "1"
        limit += float(k) * largest_mb
    return limit


def sized_parser(doc: str, tensor_mib: int, tensors: int, runs: int = 1) -> argparse.ArgumentParser:
    """--tensor-mib, --tensors, --runs, and the hidden --make PATH MIB N of the checkpoint benchmarks."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--tensor-mib", type=int, default=tensor_mib)
    ap.add_argument("--tensors", type=int, default=tensors)
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--make", nargs=3, metavar=("PATH", "MIB", "N"), help=argparse.SUPPRESS)
    return ap


def make_in_child(script: str, path: str, mib: int, n: int) -> None:
    """Run ``script --make PATH MIB N`` in a fresh interpreter (which imports torch, not us)."""
    subprocess.run([sys.executable, script, "--make", path, str(mib), str(n)], check=True)
