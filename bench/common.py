"""What every benchmark here shares: timing a command in its own process, and making inputs in a child.

Inputs are made by the benchmark script itself re-run with ``--make`` in a child process, so the
measuring process never imports torch and its children's peak RSS (wait4) is theirs alone.
"""
from __future__ import annotations

import argparse
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


def measure(cmd, runs, ok=(0,)):
    """Median wall time and peak RSS (MB, this child alone, via wait4) of ``runs`` runs.

    ``ok``: the exit codes that mean the command worked (diff exits 1 when files differ).
    """
    times, rss = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        times.append(time.perf_counter() - t0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in ok:
            raise SystemExit(f"{cmd} failed with {proc.returncode}")
        rss.append(usage.ru_maxrss / 1024)
    return statistics.median(times), max(rss)


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
