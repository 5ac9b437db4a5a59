"""Every performance target of ckpttool, measured beside the naive way and the floor in one run.

    python bench/run.py [--size 2GB] [--tensors 256] [--runs 3] [--many 20000] [--only inspect,diff]

Makes its inputs in a temporary folder (a --size torch zip checkpoint of --tensors float32
tensors, its safetensors and sharded copies, a differing copy, and a --many-tensor .pt), then
times each operation as separate processes (median of --runs, files in page cache, peak RSS of
that process alone via wait4) and prints: operation, ours, naive, floor, ratios, and the target.
The floors: `python -c "import torch"`, copying the file with fdatasync, `cmp`; each is run again
beside each operation, its runs interleaved with ours, and the ratio taken against that. Every
run writes new files (the last run's outputs are removed first) and starts after a `sync`; ckpttool runs from its bytecode, as installed by pip (this checkout is
an editable install: compiled for the run, removed after). Not part of the tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COPY, compiled_package, measure, measure_together, rss_limit  # noqa: E402  (same folder)

PY = sys.executable
NAIVE = {
    "inspect": "import sys, torch; sd = torch.load(sys.argv[1], mmap=True, weights_only=True); "
               "[(k, tuple(v.shape), v.dtype) for k, v in sd.items()]",
    "inspect_st": "import sys; from safetensors import safe_open; f = safe_open(sys.argv[1], 'pt'); "
                  "[(k, f.get_slice(k).get_shape()) for k in f.keys()]",
    "to_st": "import sys, torch; from safetensors.torch import save_file; "
             "save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])",
    "to_pt": "import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])",
    "remap": "import sys, torch; torch.save(torch.load(sys.argv[1], weights_only=True, map_location='cpu'), sys.argv[2])",
    "stats": "import sys, torch; sd = torch.load(sys.argv[1], mmap=True, weights_only=True)\n"
             "for k, v in sd.items():\n"
             "    x = v.float(); ok = torch.isfinite(x); y = x if bool(ok.all()) else x[ok]\n"
             "    (y.min().item(), y.max().item(), y.mean().item(), y.std().item(), int(torch.isnan(x).sum()), "
             "int(torch.isinf(x).sum()))",
    "diff": "import sys, torch; a = torch.load(sys.argv[1], weights_only=True); b = torch.load(sys.argv[2], "
            "weights_only=True); all(torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k]) for k in a)",
}


def make(folder: str, size: int, n: int, many: int) -> None:
    """The inputs, made in a child process (the measuring process never imports torch)."""
    import torch
    from safetensors.torch import save_file
    per = max(1, size // n // 4)
    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}
    torch.save(sd, os.path.join(folder, "a.pt"))
    save_file(sd, os.path.join(folder, "a.safetensors"))
    sd[f"layer{n - 1}.weight"][per // 2] += 1e-3
    torch.save(sd, os.path.join(folder, "b.pt"))
    torch.save({f"block{i}.weight": torch.zeros(4) for i in range(many)}, os.path.join(folder, "many.pt"))


def parse_size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    t = text.strip().upper()
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GB", help="checkpoint size (default 2GB)")
    ap.add_argument("--tensors", type=int, default=256)
    ap.add_argument("--many", type=int, default=20000, help="tensors of the many-tensor .pt")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated operation prefixes to run")
    ap.add_argument("--make", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        make(a.make[0], int(a.make[1]), int(a.make[2]), int(a.make[3]))
        return
    only = [o for o in a.only.split(",") if o]
    with tempfile.TemporaryDirectory() as d, compiled_package():
        subprocess.run([PY, __file__, "--make", d, str(parse_size(a.size)), str(a.tensors), str(a.many)], check=True)
        f = {n: os.path.join(d, n) for n in ("a.pt", "b.pt", "a.safetensors", "many.pt")}
        shard_dir = os.path.join(d, "shards")
        subprocess.run([PY, "-m", "ckpttool", "convert", f["a.pt"], "-o", shard_dir, "--to", "safetensors",
                        "--max-shard-size", str(max(parse_size(a.size) // 4, 1 << 20))], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.copyfile(f["a.pt"], os.path.join(d, "a2.pt"))
        out = os.path.join(d, "out")
        size_mib = os.path.getsize(f["a.pt"]) >> 20
        print(f"checkpoint: {size_mib} MiB, {a.tensors} tensors; many-tensor file: {a.many} tensors; "
              f"median of {a.runs} runs")
        floors = {"import torch": measure([PY, "-c", "import torch"], a.runs),
                  "copy+fdatasync": measure([PY, "-c", COPY, f["a.pt"], out + ".copy"], a.runs),
                  "cmp": measure(["cmp", f["a.pt"], os.path.join(d, "a2.pt")], a.runs)}
        for k, (t, m) in floors.items():
            print(f"floor {k}: {t:.3f} s, {m:.0f} MB")
        ck = [PY, "-m", "ckpttool"]
        ops = [  # (name, ours, naive, floor, target ratio, target RSS)
            ("--help", ck + ["--help"], None, "import torch", 0.05, "40 MB"),
            ("--version", ck + ["--version"], None, "import torch", 0.05, "40 MB"),
            ("inspect .pt", ck + ["inspect", f["a.pt"], "--json"], [PY, "-c", NAIVE["inspect"], f["a.pt"]],
             "import torch", 0.1, "80 MB"),
            ("inspect --stats .pt", ck + ["inspect", f["a.pt"], "--stats", "--json"],
             [PY, "-c", NAIVE["stats"], f["a.pt"]], "naive", 1.0, "700 MB + largest tensor"),  # import torch: ~650 MB
            ("inspect .safetensors", ck + ["inspect", f["a.safetensors"], "--json"],
             [PY, "-c", NAIVE["inspect_st"], f["a.safetensors"]], "import torch", 0.1, "80 MB"),
            ("inspect sharded", ck + ["inspect", shard_dir, "--json"], None, "import torch", 0.1, "80 MB"),
            (f"inspect {a.many}-tensor .pt", ck + ["inspect", f["many.pt"], "--json"],
             [PY, "-c", NAIVE["inspect"], f["many.pt"]], "import torch", 0.25, "150 MB"),
            ("convert .pt -> .safetensors", ck + ["convert", f["a.pt"], "-o", out + ".safetensors", "--force"],
             [PY, "-c", NAIVE["to_st"], f["a.pt"], out + ".n.safetensors"], "copy+fdatasync", 1.3,
             "200 MB + largest tensor"),
            ("convert .safetensors -> .pt", ck + ["convert", f["a.safetensors"], "-o", out + ".pt", "--force"],
             [PY, "-c", NAIVE["to_pt"], f["a.safetensors"], out + ".n.pt"], "copy+fdatasync", 1.3,
             "200 MB + largest tensor"),
            ("remap", ck + ["remap", f["a.pt"], "-o", out + ".r.pt", "--map", "cpu=cuda", "--force"],
             [PY, "-c", NAIVE["remap"], f["a.pt"], out + ".nr.pt"], "copy+fdatasync", 1.3, "200 MB"),
            ("diff equal files", ck + ["diff", f["a.pt"], os.path.join(d, "a2.pt"), "--json"],
             [PY, "-c", NAIVE["diff"], f["a.pt"], os.path.join(d, "a2.pt")], "cmp", 2.0,
             "200 MB + 2 x largest tensor"),
            ("diff different files", ck + ["diff", f["a.pt"], f["b.pt"], "--json"],
             [PY, "-c", NAIVE["diff"], f["a.pt"], f["b.pt"]], None, None, "200 MB + 2 x largest tensor"),
            ("verify (no model)", ck + ["verify", f["a.pt"], "--json"], None, "copy+fdatasync", 3.0,
             "300 MB + largest tensor"),
        ]
        floor_cmds = {"import torch": [PY, "-c", "import torch"],
                      "copy+fdatasync": [PY, "-c", COPY, f["a.pt"], out + ".copy"],
                      "cmp": ["cmp", f["a.pt"], os.path.join(d, "a2.pt")]}
        def clear_outputs() -> None:  # every run writes new files: none pays to free the last run's output
            for n in os.listdir(d):
                if n.startswith("out"):
                    p = os.path.join(d, n)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)

        largest_mb = parse_size(a.size) / a.tensors / 2 ** 20  # the tensors are of equal size

        rows = []
        for name, ours_cmd, naive_cmd, floor, target, target_rss in ops:
            if only and not any(name.startswith(o) for o in only):
                continue
            if floor == "naive":  # the target is the naive way itself: its runs interleaved with ours
                ours, fl = measure_together([ours_cmd, naive_cmd], a.runs, ok=(0, 1), prepare=clear_outputs)
            elif floor:  # the floor again, its runs interleaved with ours: the same disk and machine state
                ours, fl = measure_together([ours_cmd, floor_cmds[floor]], a.runs, ok=(0, 1), prepare=clear_outputs)
            else:
                ours, fl = measure(ours_cmd, a.runs, ok=(0, 1), prepare=clear_outputs), None
            naive = fl if floor == "naive" else (measure(naive_cmd, a.runs, prepare=clear_outputs) if naive_cmd
                                                 else None)
            clear_outputs()
            vs_floor = ours[0] / fl[0] if fl else None
            target_text = f"<= {target} x {floor}" if target else "<= 0.5 x naive"
            time_met = (vs_floor <= target) if (target and vs_floor is not None) else \
                (naive is not None and ours[0] <= 0.5 * naive[0])
            rss_met = ours[1] <= rss_limit(target_rss, largest_mb)
            met = ("met" if time_met and rss_met else "NOT met: " + " and ".join(
                w for w, ok in (("time", time_met), ("RSS", rss_met)) if not ok))
            rows.append((name, ours, naive, fl, vs_floor, target_text, target_rss, met))
        print(f"\n{'operation':30} {'ours s':>7} {'ours MB':>8} {'naive s':>8} {'naive MB':>9} "
              f"{'ours/naive':>10} {'floor s':>8} {'ours/floor':>10}  target (time; RSS)")
        for name, ours, naive, fl, vs_floor, target_text, target_rss, met in rows:
            nv = f"{naive[0]:8.2f} {naive[1]:9.0f} {ours[0] / naive[0]:10.2f}" if naive else f"{'-':>8} {'-':>9} {'-':>10}"
            vf = f"{fl[0]:8.2f} {vs_floor:10.3f}" if vs_floor is not None else f"{'-':>8} {'-':>10}"
            print(f"{name:30} {ours[0]:7.2f} {ours[1]:8.0f} {nv} {vf}  {target_text}; {target_rss} ({met})")


if __name__ == "__main__":
    main()
