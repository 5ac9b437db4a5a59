"""A checkpoint larger than this machine's memory: inspect, diff, remap and convert it, with peak RSS.

    python bench/scale.py [--gib 30] [--tensor-mib 512] [--folder /tmp]

Writes a --gib torch zip checkpoint into a temporary folder under --folder with ckpttool's own
streaming writer (torch.save would need every tensor in memory), then runs, one after another,
`ckpttool inspect`, `ckpttool diff A A` (values), `ckpttool remap --map cpu=cuda` and `ckpttool
convert -> .safetensors` on it, printing wall time and peak RSS of each, and deletes everything.
Needs about 2 x --gib of free disk. Not part of the tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure  # noqa: E402  (same folder)


def write_big(path: str, gib: int, tensor_mib: int) -> int:
    """A valid torch.save zip of ``gib`` GiB of float32 tensors, streamed (a few MiB in memory)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ckpttool.formats.torch_writer import StorageOut, TensorOut, write_torch_zip
    n = max(1, (gib << 10) // tensor_mib)
    nbytes = tensor_mib << 20
    block = bytes(range(256)) * (1 << 14)  # 4 MiB of a byte pattern (valid float32 bit patterns)

    def chunks():
        for _ in range(nbytes // len(block)):
            yield block

    root = {}
    for i in range(n):
        s = StorageOut(str(i), "float32", nbytes, chunks)
        root[f"layer{i}.weight"] = TensorOut(s, (nbytes // 4,), (1,))
    write_torch_zip(path, root)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=30)
    ap.add_argument("--tensor-mib", type=int, default=512)
    ap.add_argument("--folder", default=tempfile.gettempdir())
    a = ap.parse_args()
    py = sys.executable
    d = tempfile.mkdtemp(prefix="ckpttool-scale-", dir=a.folder)
    try:
        src = os.path.join(d, "big.pt")
        t0 = time.perf_counter()
        n = write_big(src, a.gib, a.tensor_mib)
        print(f"made {os.path.getsize(src) / 2**30:.1f} GiB ({n} tensors of {a.tensor_mib} MiB) in "
              f"{time.perf_counter() - t0:.0f} s; machine memory "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
        ck = [py, "-m", "ckpttool"]
        steps = [("inspect", ck + ["inspect", src, "--json"], None),
                 ("diff (values, equal)", ck + ["diff", src, src, "--json"], None),
                 ("remap --map cpu=cuda", ck + ["remap", src, "-o", os.path.join(d, "remapped.pt"), "--map", "cpu=cuda"],
                  os.path.join(d, "remapped.pt")),
                 ("convert -> .safetensors", ck + ["convert", src, "-o", os.path.join(d, "big.safetensors")],
                  os.path.join(d, "big.safetensors"))]
        for label, cmd, out in steps:
            t, rss = measure(cmd, 1, ok=(0, 1))
            print(f"{label:24} {t:7.1f} s  peak RSS {rss:6.0f} MB")
            if out and os.path.exists(out):
                os.unlink(out)  # keep the disk footprint at two copies at most
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
