#!/usr/bin/env python
"""Measure the hostile corpus (tests/hostile.py) against the real loaders, ckpttool and picklescan.

    python fuzz/hostile_report.py /tmp/hostile            # build into /tmp/hostile, measure, print
    python fuzz/hostile_report.py /tmp/hostile --jobs 2 --json /tmp/hostile.json

For every file: its loader (``torch.load(weights_only=False)``, ``pickle.load``, ``np.load``,
``torch.export.load``, ``dcp.load``) runs it in a fresh process (``python -c``, cwd a temporary
folder, 60 s) and whether its marker file appeared is ``executes``; then ``ckpttool scan --json``
(20 s: exit code, seconds, a traceback on stderr or not), ``ckpttool verify`` (exit code) and
``picklescan -p`` (exit code), each a subprocess. Prints one row per file, then the totals: how many
execute, how many of those scan flags (exit 1), misses (exit 0) or errors on (exit 2); verify's exit
0 on executing files; tracebacks; files over 20 s; benign files called dangerous. A file whose
measured ``executes`` differs from its meta is listed too (the corpus has drifted from the loader).

Nothing here runs a payload in this process: loaders run only in the throwaway processes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import hostile  # noqa: E402

SCAN_TIMEOUT = 20
TOOL_TIMEOUT = 60


def _run(argv, timeout):
    """(exit code or None on timeout, seconds, stdout, stderr) of a command run in a temporary folder."""
    env = {k: v for k, v in os.environ.items() if k != "CKPTTOOL_DEBUG"}
    t = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = subprocess.run(argv, cwd=tmp, timeout=timeout, capture_output=True, text=True, env=env,
                               errors="replace")
            return r.returncode, time.monotonic() - t, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return None, time.monotonic() - t, out, err


def _tools(path: str):
    ckpttool = shutil.which("ckpttool")
    base = [ckpttool] if ckpttool else [sys.executable, "-m", "ckpttool"]
    rc, sec, out, err = _run(base + ["scan", "--json", path], SCAN_TIMEOUT)
    scan = {"rc": rc, "seconds": round(sec, 2), "traceback": "Traceback (most recent call last)" in err,
            "error": (err.strip().splitlines() or [""])[-1][:120] if rc not in (0, 1) else None}
    try:
        scan["dangerous"] = json.loads(out).get("dangerous") if rc in (0, 1) else None
    except ValueError:
        scan["dangerous"] = None
    vrc, vsec, _, verr = _run(base + ["verify", path], TOOL_TIMEOUT)
    verify = {"rc": vrc, "seconds": round(vsec, 2), "traceback": "Traceback (most recent call last)" in verr}
    ps = shutil.which("picklescan")
    if ps:
        prc, psec, _, _ = _run([ps, "-p", path], TOOL_TIMEOUT)
    else:
        prc, psec = "n/a", 0.0
    return {"scan": scan, "verify": verify, "picklescan": {"rc": prc, "seconds": round(psec, 2)}}


def _row(entry, args):
    path, meta = entry
    if meta["executes"] is None:
        loaded = {"executes": None, "rc": None, "error": "not run (native code)", "seconds": 0.0}
    else:
        loaded = hostile.measure_one(path, meta, timeout=args.load_timeout)
    row = dict(meta, path=path, measured=loaded)
    row.update(_tools(path))
    return row


def _fmt(rc):
    return "T/O" if rc is None else str(rc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="where to build the corpus (made if missing; existing files overwritten)")
    ap.add_argument("--markers", help="marker folder (default: FOLDER_markers beside it)")
    ap.add_argument("--jobs", type=int, default=2, help="files measured at once (default 2)")
    ap.add_argument("--load-timeout", type=float, default=60.0)
    ap.add_argument("--only", help="substring: measure only files whose name contains it")
    ap.add_argument("--json", help="write every row as JSON here")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    entries = hostile.build_corpus(args.folder, args.markers)
    # the corpus folder's look-alike module (its benign enums) is importable to the tools, as a user's installed
    # library is: scan reads an enum's source to tell it from a function
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(args.folder),
                                                           os.environ.get("PYTHONPATH", "")) if p)
    if args.only:
        entries = [e for e in entries if args.only in e[1]["name"]]
    print(f"built {len(entries)} files in {time.monotonic() - t0:.1f} s under {args.folder}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda e: _row(e, args), entries))

    head = f"{'file':44} {'container':9} {'exec':5} {'scan':4} {'sec':>6} {'tb':2} {'verify':6} {'pscan':5}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        ex = r["measured"]["executes"]
        flag = "" if ex == r["executes"] else f"  [meta says executes={r['executes']}]"
        mark = "BENIGN" if r["benign"] else ("native" if ex is None else ("yes" if ex else "no"))
        print(f"{r['name'][:44]:44} {r['container']:9} {mark:5} {_fmt(r['scan']['rc']):4} {r['scan']['seconds']:6.1f} "
              f"{'TB' if r['scan']['traceback'] or r['verify']['traceback'] else '':2} {_fmt(r['verify']['rc']):6} "
              f"{_fmt(r['picklescan']['rc']):5}  {r['kind']}{flag}")

    executing = [r for r in rows if r["measured"]["executes"]]
    benign = [r for r in rows if r["benign"]]
    native = [r for r in rows if r["executes"] is None]

    def count(rs, key, rc):
        return sum(1 for r in rs if r[key]["rc"] == rc)

    print()
    print(f"files: {len(rows)} ({len(benign)} benign, {len(native)} native code); "
          f"executing under their loader: {len(executing)}")
    print(f"scan on executing files: exit 1 (flagged) {count(executing, 'scan', 1)}, exit 0 (missed) "
          f"{count(executing, 'scan', 0)}, exit 2 {count(executing, 'scan', 2)}, timeout {count(executing, 'scan', None)}, "
          f"other {sum(1 for r in executing if r['scan']['rc'] not in (0, 1, 2, None))}")
    print(f"picklescan on executing files: exit 1 {count(executing, 'picklescan', 1)}, exit 0 "
          f"{count(executing, 'picklescan', 0)}, exit 2 {count(executing, 'picklescan', 2)}, other "
          f"{sum(1 for r in executing if r['picklescan']['rc'] not in (0, 1, 2))}")
    print(f"verify exit 0 (PASS) on executing files: {count(executing, 'verify', 0)}")
    print(f"native-code files: scan exit 1 on {count(native, 'scan', 1)} of {len(native)}")
    tbs = [r["name"] for r in rows if r["scan"]["traceback"] or r["verify"]["traceback"]]
    print(f"tracebacks (scan or verify): {len(tbs)}" + (f"  {', '.join(tbs)}" if tbs else ""))
    slow = [f"{r['name']} ({r['scan']['seconds']:.0f} s)" for r in rows
            if r["scan"]["rc"] is None or r["scan"]["seconds"] > SCAN_TIMEOUT]
    print(f"scan over {SCAN_TIMEOUT} s: {len(slow)}" + (f"  {', '.join(slow)}" if slow else ""))
    bad_benign = [r["name"] for r in benign if r["scan"]["rc"] != 0]
    print(f"benign files called dangerous (exit 1): {sum(1 for r in benign if r['scan']['rc'] == 1)}; "
          f"benign not exit 0: {len(bad_benign)}" + (f"  {', '.join(bad_benign)}" if bad_benign else ""))
    drift = [f"{r['name']} (meta {r['executes']}, measured {r['measured']['executes']})" for r in rows
             if r["executes"] is not None and r["measured"]["executes"] != r["executes"]]
    print(f"meta executes differs from measurement: {len(drift)}" + (f"  {'; '.join(drift)}" if drift else ""))
    print(f"total {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
