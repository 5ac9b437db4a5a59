"""Does `ckpttool inspect` cost the same on a 1 MiB and a 1 GiB checkpoint?

    python bench/inspect_size.py [--big-mib 1024] [--tensors 256] [--runs 5]

Makes, in a temporary folder, a small and a big checkpoint with the same number of
tensors (torch zip, legacy and safetensors), then times in the same run, as
separate processes (median of --runs, files in page cache):
  - `ckpttool inspect FILE --json`          (ours)
  - `torch.load(FILE, mmap=True)` + listing  (the naive way)
  - `python -c "import torch"`              (the floor every torch-based tool pays)
and prints each time, its peak RSS, and the ratios big/small and ours/naive.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure  # noqa: E402  (same folder)


def make(folder, mib, n):
    import torch
    from safetensors.torch import save_file
    per = max(1, (mib << 20) // n // 4)
    sd = {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(n)}
    paths = {}
    for fmt in ("zip", "legacy", "safetensors"):
        p = os.path.join(folder, f"{mib}mib.{fmt}")
        if fmt == "safetensors":
            save_file(sd, p)
        else:
            torch.save(sd, p, _use_new_zipfile_serialization=fmt == "zip")
        paths[fmt] = p
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--make", nargs=3, metavar=("DIR", "MIB", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # in a child, so that this process never imports torch (ru_maxrss survives fork+exec)
        make(a.make[0], int(a.make[1]), int(a.make[2]))
        return
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        for mib in (1, a.big_mib):
            subprocess.run([py, __file__, "--make", d, str(mib), str(a.tensors)], check=True)
        names = ("zip", "legacy", "safetensors")
        small = {f: os.path.join(d, f"1mib.{f}") for f in names}
        big = {f: os.path.join(d, f"{a.big_mib}mib.{f}") for f in names}
        floor = measure([py, "-c", "import torch"], a.runs)
        print(f"floor: python -c 'import torch': {floor[0]:.3f} s, {floor[1]:.0f} MB")
        print(f"{'format':12} {'size':>8} {'ours s':>8} {'ours MB':>8} {'naive s':>8} {'naive MB':>9} "
              f"{'ours/naive':>10} {'ours/import torch':>17}")
        ours_by = {}
        for label, paths in (("1 MiB", small), (f"{a.big_mib} MiB", big)):
            for fmt, p in paths.items():
                ours = measure([py, "-m", "ckpttool", "inspect", p, "--json"], a.runs)
                if fmt == "safetensors":
                    code = f"from safetensors import safe_open\nwith safe_open({p!r}, 'pt') as f: [f.get_slice(k).get_shape() for k in f.keys()]"
                else:
                    code = f"import torch\nsd = torch.load({p!r}, mmap={fmt == 'zip'}, weights_only=True)\n[(k, v.shape) for k, v in sd.items()]"
                naive = measure([py, "-c", code], a.runs)
                ours_by[(label, fmt)] = ours[0]
                print(f"{fmt:12} {label:>8} {ours[0]:8.3f} {ours[1]:8.0f} {naive[0]:8.3f} {naive[1]:9.0f} "
                      f"{ours[0] / naive[0]:10.2f} {ours[0] / floor[0]:17.2f}")
        for fmt in small:
            print(f"{fmt}: big/small inspect time = {ours_by[(f'{a.big_mib} MiB', fmt)] / ours_by[('1 MiB', fmt)]:.2f}")


if __name__ == "__main__":
    main()
