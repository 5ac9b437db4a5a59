"""Does `ckpttool diff` keep its memory flat when the checkpoint is many times its largest tensor?

    python bench/diff_memory.py [--tensor-mib 64] [--tensors 16] [--runs 3]

Makes, in a temporary folder, a torch zip checkpoint A of --tensors float32 tensors of
--tensor-mib each, an exact copy A2, and B (A with one element of the last tensor changed by
1e-3), then times, as separate processes (median of --runs, files in page cache):
  - `ckpttool diff A A2`, `ckpttool diff A B`          (ours: tensor by tensor from the files)
  - torch.load both + torch.equal / torch.allclose     (the naive way)
  - `cmp A A2`                                         (the floor for equal files)
  - `python -c "import torch"`                         (what any process that compares values pays)
and prints wall time, peak RSS (MB, of that process alone), and the ratios ours/naive and
ours RSS / largest tensor. Not part of the tests.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_in_child, measure, sized_parser  # noqa: E402  (same folder)

NAIVE = """
import sys, torch
a = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
b = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k]) for k in a)
"""


def make(folder: str, mib: int, n: int) -> None:
    import torch
    per = (mib << 20) // 4
    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}
    torch.save(sd, os.path.join(folder, "a.pt"))
    sd[f"layer{n - 1}.weight"][per // 2] += 1e-3
    torch.save(sd, os.path.join(folder, "b.pt"))


def main() -> None:
    a = sized_parser(__doc__, 64, 16, runs=3).parse_args()
    if a.make:  # in a child: this process never imports torch
        make(a.make[0], int(a.make[1]), int(a.make[2]))
        return
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        make_in_child(__file__, d, a.tensor_mib, a.tensors)
        pa, pb, pa2 = (os.path.join(d, n) for n in ("a.pt", "b.pt", "a2.pt"))
        shutil.copyfile(pa, pa2)
        size = os.path.getsize(pa) >> 20
        print(f"checkpoint: {size} MiB, {a.tensors} tensors of {a.tensor_mib} MiB "
              f"(file / largest tensor = {size / a.tensor_mib:.0f}x)")
        floor = measure(["cmp", pa, pa2], a.runs)
        torch_floor = measure([py, "-c", "import torch"], a.runs)
        print(f"floor: cmp A A2: {floor[0]:.2f} s, {floor[1]:.0f} MB; python -c 'import torch': "
              f"{torch_floor[0]:.2f} s, {torch_floor[1]:.0f} MB")
        print(f"{'case':14} {'ours s':>7} {'ours MB':>8} {'naive s':>8} {'naive MB':>9} {'time ratio':>10} "
              f"{'RSS ratio':>9} {'(ours MB - torch MB) / tensor MB':>32}")
        for label, other, code in (("equal files", pa2, 0), ("one value off", pb, 1)):
            cmd = [py, "-m", "ckpttool", "diff", pa, other, "--json"]
            ours = measure(cmd, a.runs, ok=(code,))
            naive = measure([py, "-c", NAIVE, pa, other], a.runs)
            print(f"{label:14} {ours[0]:7.2f} {ours[1]:8.0f} {naive[0]:8.2f} {naive[1]:9.0f} "
                  f"{ours[0] / naive[0]:10.2f} {ours[1] / naive[1]:9.2f} "
                  f"{max(ours[1] - torch_floor[1], 0) / a.tensor_mib:32.2f}")
        print(f"equal files: ours / cmp = {measure([py, '-m', 'ckpttool', 'diff', pa, pa2], 1)[0] / floor[0]:.2f}")


if __name__ == "__main__":
    main()
