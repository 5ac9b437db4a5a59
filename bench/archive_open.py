"""Opening a 20,000-tensor torch.save archive (20,006 records): formats.archive.Archive, which reads the directory
and checks every local header and data descriptor, against the zip reader it replaced (torch_zip._ZipFile, the
directory only, taken from the last commit that had it) and against zipfile.ZipFile.

    python bench/archive_open.py [PATH] [--rounds N]

Times are the best of N interleaved rounds, each opening the file, listing its names and closing it.
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time
import zipfile
from typing import Dict, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ckpttool.formats.archive import Archive  # noqa: E402

_OLD = "ckpttool/formats/torch_zip.py"


def old_zipfile_class():
    """``_ZipFile`` as the last commit that had it wrote it (None where git or that commit is not here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        revs = subprocess.run(["git", "-C", root, "log", "--format=%H", "--", _OLD], capture_output=True, text=True,
                              check=True).stdout.split()
        for rev in revs:
            src = subprocess.run(["git", "-C", root, "show", f"{rev}:{_OLD}"], capture_output=True, text=True,
                                 check=True).stdout
            if "class _ZipFile(" in src:
                break
        else:
            return None, None
    except (OSError, subprocess.CalledProcessError):
        return None, None
    start = src.index("_CENTRAL = struct.Struct(")
    stop = src.index("def open_zip(")
    ns = {"os": os, "struct": struct, "zipfile": zipfile, "Dict": Dict, "Optional": Optional, "Tuple": Tuple,
          "__name__": "old_torch_zip"}
    exec(compile("from __future__ import annotations\n" + src[start:stop], f"{rev[:10]}:{_OLD}", "exec"), ns)
    return ns["_ZipFile"], rev[:10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default="/tmp/ckpttool_bench_20k.pt")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    if not os.path.exists(args.path):
        import torch
        torch.save({f"t{i}": torch.zeros(1) for i in range(20000)}, args.path)

    def ours():
        with Archive.open(args.path) as a:
            return len(a.names())

    def stdlib():
        with zipfile.ZipFile(args.path) as z:
            return len(z.namelist())

    old, rev = old_zipfile_class()

    def replaced():
        z = old(args.path)
        n = len(z.names())
        z.close()
        return n

    runs = {"Archive.open (all local headers checked)": ours, "zipfile.ZipFile": stdlib}
    if old is not None:
        runs[f"_ZipFile of {rev} (directory only)"] = replaced
    counts = {name: fn() for name, fn in runs.items()}
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    mine = best["Archive.open (all local headers checked)"]
    print(f"{args.path}: {next(iter(counts.values()))} records, best of {args.rounds} interleaved rounds")
    for name, t in best.items():
        print(f"  {name:45s} {t * 1e3:7.2f} ms   Archive.open / this = {mine / t:.2f}")


if __name__ == "__main__":
    main()
