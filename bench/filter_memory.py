"""Does `ckpttool filter` stream, with memory near one chunk whatever the checkpoint's size?

    python bench/filter_memory.py [--tensor-mib 64] [--tensors 16] [--runs 1]

Makes, in a temporary folder, a torch zip checkpoint of --tensors float32 tensors of --tensor-mib
each plus a classifier head, and a target of the same names and shapes (saved as meta tensors: names,
shapes and dtypes, no bytes) whose head has another shape and which lacks one source tensor: the
fine-tuning case. Then runs, as separate processes (median of --runs, files in page cache; each pair's
runs interleaved, so a slow spell slows both alike):
  - `ckpttool filter SRC --target TGT -o OUT` to .pt, to .safetensors, and into a float16 target
    (each kept tensor cast as it streams)                                              (ours)
  - torch.load + a dict comprehension over the target's names and shapes + torch.save
    (or safetensors' save_file)                                                        (the naive way)
  - copying the file with fdatasync                                                    (the floor)
and prints wall time, peak RSS (MB, that process alone) and the ratios ours/naive. Ours also reads
the output back and compares every byte; the naive way checks nothing. `import torch` alone is
about 500 MB of RSS, in both. Not part of the tests.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COPY, compiled_package, make_in_child, measure, measure_together, sized_parser  # noqa: E402

# the everyday recipe: keep what the target has with the same shape, in the target's dtype
NAIVE = """
import sys, torch
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
target = torch.load(sys.argv[2], map_location="meta", weights_only=True)
kept = {k: v.to(target[k].dtype) for k, v in sd.items() if k in target and v.shape == target[k].shape}
if sys.argv[3].endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(kept, sys.argv[3])
else:
    torch.save(kept, sys.argv[3])
"""


def make(path: str, mib: int, n: int) -> None:
    import torch
    per = (mib << 20) // 4
    sd = {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(n)}
    sd["head.weight"] = torch.randn(1000, 512)
    sd["head.bias"] = torch.randn(1000)
    torch.save(sd, path)
    for suffix, dtype in (("", torch.float32), (".fp16", torch.float16)):
        target = {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in sd.items() if k != "layer0.weight"}
        target["head.weight"] = torch.empty(10, 512, dtype=dtype, device="meta")
        target["head.bias"] = torch.empty(10, dtype=dtype, device="meta")
        torch.save(target, path + ".target" + suffix)


def main() -> None:
    a = sized_parser(__doc__, 64, 16).parse_args()
    if a.make:  # in a child: this process never imports torch
        make(a.make[0], int(a.make[1]), int(a.make[2]))
        return
    py = sys.executable
    with tempfile.TemporaryDirectory() as d, compiled_package():
        src = os.path.join(d, "a.pt")
        make_in_child(__file__, src, a.tensor_mib, a.tensors)
        tgt, tgt16 = src + ".target", src + ".target.fp16"
        outputs = [os.path.join(d, n) for n in ("o.pt", "o.safetensors", "o16.pt", "n.pt", "n.safetensors", "n16.pt")]

        def clean() -> None:  # every run writes a new file
            for p in outputs:
                if os.path.exists(p):
                    os.unlink(p)

        print(f"checkpoint: {os.path.getsize(src) >> 20} MiB, {a.tensors} tensors of {a.tensor_mib} MiB + a head; "
              f"the target drops one tensor and changes the head")
        floor = measure([py, "-c", COPY, src, os.path.join(d, "copy")], a.runs)
        os.unlink(os.path.join(d, "copy"))
        print(f"floor: copy with fdatasync: {floor[0]:.2f} s, {floor[1]:.0f} MB")
        print(f"{'operation':24} {'ours s':>7} {'ours MB':>8} {'naive s':>8} {'naive MB':>9} {'MB ours/naive':>14} "
              f"{'s ours/naive':>13}")
        cases = [("filter -> .pt", tgt, outputs[0], outputs[3]),
                 ("filter -> .safetensors", tgt, outputs[1], outputs[4]),
                 ("filter -> .pt, cast fp16", tgt16, outputs[2], outputs[5])]
        for label, target, ours_out, naive_out in cases:
            ours, naive = measure_together(
                [[py, "-m", "ckpttool", "filter", src, "--target", target, "-o", ours_out, "--force", "-q"],
                 [py, "-c", NAIVE, src, target, naive_out]], a.runs, prepare=clean)
            print(f"{label:24} {ours[0]:7.2f} {ours[1]:8.0f} {naive[0]:8.2f} {naive[1]:9.0f} "
                  f"{ours[1] / naive[1]:14.2f} {ours[0] / naive[0]:13.2f}")


if __name__ == "__main__":
    main()
