"""Do `ckpttool convert` and `ckpttool remap` stream, with memory near one chunk whatever the file's size?

    python bench/convert_memory.py [--tensor-mib 128] [--tensors 16] [--runs 1]

Makes, in a temporary folder, a torch zip checkpoint of --tensors float32 tensors of
--tensor-mib each, then times, as separate processes (median of --runs, files in page cache):
  - `ckpttool convert A -o B.safetensors`, `ckpttool convert B.safetensors -o C.pt`,
    `ckpttool convert A -o E --to dcp`, `ckpttool remap A -o D.pt --map cpu=cuda`   (ours)
  - torch.load + safetensors save_file; load_file + torch.save; torch.load + dcp.save (the naive way)
  - copying the file with fdatasync                                   (the floor)
and prints wall time, peak RSS (MB, that process alone), and the ratios. Not part of the tests.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COPY, make_in_child, measure, sized_parser  # noqa: E402  (same folder)

NAIVE_TO_ST = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], map_location="cpu", weights_only=True), sys.argv[2])
"""
NAIVE_TO_PT = """
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""

NAIVE_TO_DCP = """
import sys, warnings, torch, torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")
dcp.save(torch.load(sys.argv[1], map_location="cpu", weights_only=True), checkpoint_id=sys.argv[2])
"""


def make(path: str, mib: int, n: int) -> None:
    import torch
    per = (mib << 20) // 4
    torch.save({f"layer{i}.weight": torch.full((per,), float(i)) for i in range(n)}, path)


def main() -> None:
    a = sized_parser(__doc__, 128, 16).parse_args()
    if a.make:  # in a child: this process never imports torch
        make(a.make[0], int(a.make[1]), int(a.make[2]))
        return
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "a.pt")
        make_in_child(__file__, src, a.tensor_mib, a.tensors)
        st, pt, rm, dc = (os.path.join(d, n) for n in ("b.safetensors", "c.pt", "d.pt", "e_dcp"))
        size = os.path.getsize(src) >> 20
        print(f"checkpoint: {size} MiB, {a.tensors} tensors of {a.tensor_mib} MiB")
        floor = measure([py, "-c", COPY, src, os.path.join(d, "copy")], a.runs)
        print(f"floor: copy with fdatasync: {floor[0]:.2f} s, {floor[1]:.0f} MB")
        print(f"{'operation':22} {'ours s':>7} {'ours MB':>8} {'naive s':>8} {'naive MB':>9} {'ours/naive':>10} "
              f"{'ours/copy':>9}")
        cases = [
            (".pt -> .safetensors", [py, "-m", "ckpttool", "convert", src, "-o", st, "--force"],
             [py, "-c", NAIVE_TO_ST, src, st + ".naive"]),
            (".safetensors -> .pt", [py, "-m", "ckpttool", "convert", st, "-o", pt, "--force"],
             [py, "-c", NAIVE_TO_PT, st, pt + ".naive"]),
            (".pt -> dcp", [py, "-m", "ckpttool", "convert", src, "-o", dc, "--to", "dcp", "--force"],
             [py, "-c", NAIVE_TO_DCP, src, dc + ".naive"]),
            ("remap cpu=cuda", [py, "-m", "ckpttool", "remap", src, "-o", rm, "--map", "cpu=cuda", "--force"], None),
        ]
        for label, ours_cmd, naive_cmd in cases:
            ours = measure(ours_cmd, a.runs)
            if naive_cmd:
                naive = measure(naive_cmd, a.runs)
                print(f"{label:22} {ours[0]:7.2f} {ours[1]:8.0f} {naive[0]:8.2f} {naive[1]:9.0f} "
                      f"{ours[0] / naive[0]:10.2f} {ours[0] / floor[0]:9.2f}")
            else:
                print(f"{label:22} {ours[0]:7.2f} {ours[1]:8.0f} {'-':>8} {'-':>9} {'-':>10} {ours[0] / floor[0]:9.2f}")


if __name__ == "__main__":
    main()
