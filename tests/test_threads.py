"""The library called from several threads at once (issue 18): each call's result is its own.

Scratch buffers are per thread (records, numbers, diffing): two diffs in two threads used to share one
module-level pair of buffers and fail with "too many values to unpack" or compare the wrong bytes."""
from __future__ import annotations

import threading

import torch

import ckpttool

THREADS = 6


def _files(tmp_path):
    made = []
    for i in range(THREADS):
        g = torch.Generator().manual_seed(i)
        a = {f"layer{j}.weight": torch.randn(64, 256, generator=g) for j in range(8)}
        b = {k: v.clone() for k, v in a.items()}
        if i % 2:  # every other pair differs in one element of one tensor
            b[f"layer{i % 8}.weight"][3, 7] += 1.0
        pa, pb = tmp_path / f"a{i}.pt", tmp_path / f"b{i}.pt"
        torch.save(a, pa)
        torch.save(b, pb)
        made.append((str(pa), str(pb), i % 2 == 1))
    return made


def _run_all(jobs):
    errors, results = [], [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(k, job):
        try:
            start.wait()
            results[k] = job()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k, job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_diff_inspect_and_convert_from_several_threads_at_once(tmp_path):
    files = _files(tmp_path)
    for _ in range(3):  # several rounds: the threads interleave differently each time
        jobs = []
        for i, (a, b, differs) in enumerate(files):
            jobs.append(lambda a=a, b=b: ckpttool.diff(a, b))
            jobs.append(lambda a=a: ckpttool.inspect(a, stats=True))
            out = str(tmp_path / f"out{i}_{_}.safetensors")
            jobs.append(lambda a=a, out=out: ckpttool.convert(a, out, check=True))
        results = _run_all(jobs)
        for i, (a, b, differs) in enumerate(files):
            d, info, conv = results[3 * i:3 * i + 3]
            assert d.equal is (not differs), (i, d.value_mismatch)
            if differs:
                assert [x.name for x in d.value_mismatch] == [f"layer{i % 8}.weight"]
                assert d.value_mismatch[0].mismatched == 1
            want = torch.load(a, weights_only=True)
            stats = {t.name: t.stats for t in info.tensors}
            for name, t in want.items():
                assert abs(stats[name]["max"] - t.max().item()) == 0 and abs(stats[name]["min"] - t.min().item()) == 0
            from safetensors.torch import load_file
            got = load_file(conv.output)
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

