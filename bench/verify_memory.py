"""Does `ckpttool verify` (round trips, no model) keep memory near the largest tensor?

    python bench/verify_memory.py [--tensor-mib 64] [--tensors 16] [--runs 1]

Makes, in a temporary folder, a torch zip checkpoint of --tensors float32 tensors of
--tensor-mib each, then times, as separate processes (files in page cache):
  - `ckpttool verify A`                 (ours: CRC, zip + safetensors round trips, and a GPU round trip
                                         where there is a GPU; without one, torch is not imported)
  - torch.load, torch.save + safetensors save_file, load both back, torch.equal each (the naive way)
  - `python -c "import torch"`          (the floor any process that handles tensors pays)
and prints wall time and peak RSS (MB, that process alone) of each, and ours against issue 7's
target of 300 MB + the largest tensor. Not part of the tests.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_in_child, measure, rss_limit, sized_parser  # noqa: E402  (same folder)

NAIVE = """
import os, sys, tempfile, torch
from safetensors.torch import save_file, load_file
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
d = tempfile.mkdtemp(dir=os.path.dirname(sys.argv[1]))
torch.save(sd, os.path.join(d, "a.pt")); save_file(sd, os.path.join(d, "a.safetensors"))
for back in (torch.load(os.path.join(d, "a.pt"), weights_only=True), load_file(os.path.join(d, "a.safetensors"))):
    assert all(torch.equal(sd[k], back[k]) for k in sd)
"""


def make(path: str, mib: int, n: int) -> None:
    import torch
    per = (mib << 20) // 4
    g = torch.Generator().manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}, path)


def main() -> None:
    a = sized_parser(__doc__, 64, 16).parse_args()
    if a.make:  # in a child: this process never imports torch
        make(a.make[0], int(a.make[1]), int(a.make[2]))
        return
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "a.pt")
        make_in_child(__file__, src, a.tensor_mib, a.tensors)
        print(f"checkpoint: {os.path.getsize(src) >> 20} MiB, {a.tensors} tensors of {a.tensor_mib} MiB")
        floor = measure([py, "-c", "import torch"], a.runs)
        ours = measure([py, "-m", "ckpttool", "verify", src, "--json"], a.runs)
        naive = measure([py, "-c", NAIVE, src], a.runs)
        print(f"floor: import torch {floor[0]:.2f} s, {floor[1]:.0f} MB")
        limit = rss_limit("300 MB + largest tensor", a.tensor_mib * 1.048576)  # MiB of tensor in MB
        print(f"ours:  {ours[0]:.2f} s, {ours[1]:.0f} MB  (target 300 MB + largest tensor = {limit:.0f} MB: "
              f"{'met' if ours[1] <= limit else 'NOT met'})")
        print(f"naive: {naive[0]:.2f} s, {naive[1]:.0f} MB  (ours/naive time {ours[0] / naive[0]:.2f}, "
              f"RSS {ours[1] / naive[1]:.2f})")


if __name__ == "__main__":
    main()
