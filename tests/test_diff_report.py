"""`ckpttool diff` as a report a person reads (issue 17): the relative change ||A-B||/||B|| per tensor, tables
ordered by it (--sort), --filter, --top/--all, the per-module table of --depth with its bars, the JSON."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ckpttool.diffing import diff
from ckpttool.render import change_bar, diff_text

from clitools import run

TRAINED = ["layer4.0.conv1.weight", "layer4.0.conv2.weight", "layer4.0.downsample.0.weight",
           "layer4.1.conv1.weight", "layer4.1.conv2.weight", "fc.weight"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """torch's own relative change, in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).norm() / b.norm()).item()


def table(out: str, title: str) -> list:
    """The rows (split on whitespace) of the table whose title line starts with ``title``."""
    lines = out.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(title))
    assert set(lines[i + 2]) <= {"-", " "}, lines[i + 2]  # header, then its rule
    rows = []
    for line in lines[i + 3:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def title(out: str, start: str) -> str:
    return next(l for l in out.splitlines() if l.startswith(start))


def names(out: str) -> list:
    return [row[0] for row in table(out, "values not bit-equal")]


def _resnet_pair(tmp_path, realistic: bool):
    """A resnet18 (weights=None) and a 'fine-tuned' copy: layer4's conv weights and fc.weight moved by 1% to 6%
    (each by another amount). ``realistic``: the base has running statistics (as a pretrained one has), the copy
    has them drifted by ~0.1% and every num_batches_tracked counter 500 steps on, as train() mode leaves them."""
    import torchvision
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None).state_dict()
    g = torch.Generator().manual_seed(1)
    if realistic:
        for k, v in base.items():
            if k.endswith("running_mean"):
                base[k] = 0.1 * torch.randn(v.shape, generator=g)
            elif k.endswith("running_var"):
                base[k] = 1 + torch.rand(v.shape, generator=g)
            elif k.endswith("num_batches_tracked"):
                base[k] = torch.tensor(1000)
    ft = {k: v.clone() for k, v in base.items()}
    for i, k in enumerate(TRAINED):
        ft[k] = base[k] + 0.01 * (i + 1) * base[k].std() * torch.randn(base[k].shape, generator=g)
    if realistic:
        for k, v in base.items():
            if k.endswith(("running_mean", "running_var")):
                ft[k] = v + 1e-3 * v.abs() * torch.randn(v.shape, generator=g)
            elif k.endswith("num_batches_tracked"):
                ft[k] = v + 500
    pa, pb = str(tmp_path / "base.pt"), str(tmp_path / "finetuned.pt")
    torch.save(base, pa)
    torch.save(ft, pb)
    return pa, pb, base, ft


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    return _resnet_pair(tmp_path_factory.mktemp("tuned"), realistic=False)


@pytest.fixture(scope="module")
def tuned_bn(tmp_path_factory):
    return _resnet_pair(tmp_path_factory.mktemp("tuned_bn"), realistic=True)


# ---------------------------------------------------------------- the default table: what was trained, first

def test_trained_weights_lead_the_default_table(tuned):
    pa, pb, base, ft = tuned
    r = run("diff", pa, pb)
    assert r.exit_code == 1 and r.stderr == ""
    by_change = sorted(TRAINED, key=lambda k: -rel(base[k], ft[k]))
    assert names(r.stdout) == by_change
    assert title(r.stdout, "values not bit-equal") == "values not bit-equal (6):"
    assert r.stdout.splitlines()[-1] == "result: DIFFERENT"


def test_trained_weights_lead_even_when_every_bn_buffer_moved(tuned_bn):
    pa, pb, base, ft = tuned_bn
    r = run("diff", pa, pb)
    assert r.exit_code == 1
    rows = names(r.stdout)
    assert len(rows) == 20  # --top 20 by default
    assert rows[:6] == sorted(TRAINED, key=lambda k: -rel(base[k], ft[k]))
    assert not any(n.endswith("num_batches_tracked") for n in rows)
    assert title(r.stdout, "values not bit-equal") == \
        "values not bit-equal (66, the first 20 by relative change; --all for every row):"
    # every row: the floating ones by relative change, the 20 integer step counters after them
    rows = names(run("diff", pa, pb, "--all").stdout)
    assert len(rows) == 66
    floating = [k for k in ft if not k.endswith("num_batches_tracked") and not torch.equal(base[k], ft[k])]
    assert rows[:46] == sorted(floating, key=lambda k: -rel(base[k], ft[k]))
    assert rows[46:] == [k for k in ft if k.endswith("num_batches_tracked")]
    # the module table: the trained modules on top, their change the floating tensors' (not the counters' 1/3)
    mods = table(run("diff", pa, pb, "--depth", "1").stdout, "modules")
    assert [m[:4] for m in mods[:2]] == [["fc", "2", "1", f"{rel(base['fc.weight'], ft['fc.weight']):.3g}"],
                                         ["layer4", "30", "20", f"{rel(base[TRAINED[4]], ft[TRAINED[4]]):.3g}"]]
    assert mods[0][4] == "█" * 20 and mods[-1] == ["conv1", "1", "0", "0"]


def test_value_table_columns_are_labelled(tuned):
    pa, pb, base, ft = tuned
    out = run("diff", pa, pb).stdout
    lines = out.splitlines()
    i = lines.index("values not bit-equal (6):")
    assert lines[i + 1].split() == ["name", "shape", "dtype", "status", "rel", "change", "max", "abs", "max", "rel",
                                    "outside", "tol"]
    k = "fc.weight"
    row = next(r for r in table(out, "values not bit-equal") if r[0] == k)
    d = (base[k].double() - ft[k].double()).abs()
    outside = int((d > 1e-5 + 1.3e-6 * ft[k].double().abs()).sum())
    assert row == [k, "(1000,", "512)", "float32", "differs", f"{rel(base[k], ft[k]):.3g}", f"{d.max().item():.3g}",
                   f"{(d / ft[k].double().abs()).max().item():.3g}", f"{outside:,}/512,000"]


# ---------------------------------------------------------------- --sort

def test_sort_name_size_file(tuned_bn):
    pa, pb, base, ft = tuned_bn
    changed = [k for k in base if not torch.equal(base[k], ft[k])]
    assert names(run("diff", pa, pb, "--all", "--sort", "name").stdout) == sorted(changed)
    assert names(run("diff", pa, pb, "--all", "--sort", "file").stdout) == changed
    by_size = sorted(changed, key=lambda k: -base[k].numel())  # stable: ties keep the file's order
    assert names(run("diff", pa, pb, "--all", "--sort", "size").stdout) == by_size
    r = run("diff", pa, pb, "--sort", "size", "--top", "3")
    assert names(r.stdout) == by_size[:3]
    assert title(r.stdout, "values not bit-equal") == \
        "values not bit-equal (66, the first 3 by size; --all for every row):"
    # the JSON lists follow --sort too, every entry (no --top there)
    d = json.loads(run("diff", pa, pb, "--sort", "name", "--json").stdout)
    assert [v["name"] for v in d["value_mismatch"]] == sorted(changed) and d["sort"] == "name"
    d = json.loads(run("diff", pa, pb, "--json").stdout)
    assert d["sort"] == "change" and len(d["value_mismatch"]) == 66


def test_bad_sort_is_a_usage_error(tuned):
    pa, pb, _, _ = tuned
    r = run("diff", pa, pb, "--sort", "biggest")
    assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.stderr
    r = run("diff", pa, pb, "--top", "0")
    assert r.exit_code == 2 and r.stdout == ""


# ---------------------------------------------------------------- --top / --all

def test_top_and_all_row_counts(tmp_path):
    torch.manual_seed(5)
    a = {f"t{i:02d}": torch.randn(8) for i in range(30)}
    a.update({f"gone{i:02d}": torch.zeros(1) for i in range(25)})
    b = {f"t{i:02d}": v * (1 + i / 100) for i, v in enumerate(a.values()) if i < 30}
    pa, pb = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    torch.save(a, pa)
    torch.save(b, pb)
    out = run("diff", pa, pb).stdout
    assert len(names(out)) == 20
    assert names(out)[:3] == ["t29", "t28", "t27"]  # 29% first
    assert "only in A (25): gone00, gone01" in out and "(+5 more)" in out
    out = run("diff", pa, pb, "--top", "4").stdout
    assert names(out) == ["t29", "t28", "t27", "t26"]
    assert title(out, "only in A") == "only in A (25): gone00, gone01, gone02, gone03 ... (+21 more)"
    out = run("diff", pa, pb, "--all").stdout
    assert len(names(out)) == 29  # t00 is unchanged
    assert title(out, "values not bit-equal") == "values not bit-equal (29):"
    assert "more)" not in title(out, "only in A")
    out = run("diff", pa, pb, "--all", "--top", "2").stdout  # --all wins
    assert len(names(out)) == 29


# ---------------------------------------------------------------- --filter

def test_filter_covers_counts_tables_and_verdict(tuned):
    pa, pb, base, ft = tuned
    r = run("diff", pa, pb, "--filter", r"^fc\.")
    assert r.exit_code == 1
    out = r.stdout
    assert title(out, "filter").split(None, 1)[1] == \
        r"'^fc\.': 2 of 122 pairs, 0 of 0 only in A, 0 of 0 only in B (the counts, tables and result cover these)"
    assert title(out, "keys").split(None, 1)[1] == "2 common, 0 only in A, 0 only in B"
    assert title(out, "values").split(None, 1)[1] == "1 exact, 0 within tolerance, 1 different"
    assert names(out) == ["fc.weight"]
    # the verdict and the exit code cover the filtered pairs: layer1 is untouched
    r = run("diff", pa, pb, "--filter", "^layer1")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "result: EQUAL"
    assert "'^layer1': 24 of 122 pairs" in r.stdout
    assert run("diff", pa, pb, "--filter", "^layer1", "-q").stdout == "result: EQUAL\n"
    d = json.loads(run("diff", pa, pb, "--filter", "^layer4", "--json").stdout)
    assert sorted(v["name"] for v in d["value_mismatch"]) == sorted(TRAINED[:-1])
    assert d["filter"] == {"regex": "^layer4", "pairs": 30, "pairs_total": 122, "only_in_a": 0, "only_in_a_total": 0,
                           "only_in_b": 0, "only_in_b_total": 0}
    assert d["exact_equal"] == 25 and d["equal"] is False
    assert json.loads(run("diff", pa, pb, "--json").stdout)["filter"] is None


def test_filter_matches_a_b_only_name_as_a_spells_it(tmp_path):
    pa, pb = str(tmp_path / "a.pt"), str(tmp_path / "ddp.pt")
    torch.save({"body.w": torch.ones(2), "head.w": torch.ones(2)}, pa)
    torch.save({"module.body.w": torch.ones(2), "module.head.w": torch.ones(2), "module.head.b": torch.ones(1),
                "module.tail.w": torch.ones(1)}, pb)
    d = json.loads(run("diff", pa, pb, "--filter", "^head", "--json").stdout)
    assert d["only_in_b"] == ["module.head.b"] and d["only_in_a"] == []
    assert d["filter"]["pairs"] == 1 and d["filter"]["only_in_b_total"] == 2 and d["equal"] is False
    r = run("diff", pa, pb, "--filter", "^body")
    assert r.exit_code == 0 and "0 of 2 only in B" in r.stdout


def test_filter_errors(tuned):
    pa, pb, _, _ = tuned
    r = run("diff", pa, pb, "--filter", "^nothing")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"ckpttool: error: --filter '^nothing' matches no name of A or B (of 122 pairs, 0 only in A, 0 only in B) "
        f"({pa}, {pb})",
        r"hint: the regex is searched for in A's names (re.search), e.g. --filter '^layer4\.'"]
    r = run("diff", pa, pb, "--filter", "(", "--json")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("ckpttool: error: --filter is not a valid regular expression")
    assert len(r.stderr.splitlines()) == 1


# ---------------------------------------------------------------- --depth

@pytest.fixture
def small(tmp_path):
    """Hand-made: enc.l1.w moved by 100%, enc.l2.w 50%, a step counter 25%, dec.w 15.625%; head.w only in B."""
    a = {"enc.l1.w": torch.full((4,), 2.0), "enc.l1.b": torch.zeros(2), "enc.l2.w": torch.full((4,), 1.5),
         "dec.w": torch.full((2,), 1.15625), "scale": torch.tensor(1.0), "steps": torch.tensor(3)}
    b = {"enc.l1.w": torch.ones(4), "enc.l1.b": torch.zeros(2), "enc.l2.w": torch.ones(4), "dec.w": torch.ones(2),
         "scale": torch.tensor(1.0), "steps": torch.tensor(4), "head.w": torch.ones(3)}
    pa, pb = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    torch.save(a, pa)
    torch.save(b, pb)
    return pa, pb


def test_depth_module_rows_and_bars(small):
    pa, pb = small
    r = run("diff", pa, pb, "--depth", "1")
    assert r.exit_code == 1
    assert title(r.stdout, "modules") == "modules, names folded 1 level (4):"
    lines = r.stdout.splitlines()
    i = lines.index("modules, names folded 1 level (4):")
    assert lines[i + 1].split() == ["module", "tensors", "changed", "max", "rel", "change", "bar", "(largest", "=",
                                    "full)"]
    # by change: head only in B first (no change to measure: after inf, before numbers), enc 1.0 (20 cells),
    # dec 0.15625 (3 cells and 1/8), then (top), whose only change is its step counter's 0.25 (5 cells): integer
    # tensors after floating ones, as in the value table
    assert table(r.stdout, "modules") == [["head", "1", "1", "-"],
                                          ["enc", "3", "2", "1", "█" * 20],
                                          ["dec", "1", "1", "0.156", "███▏"],
                                          ["(top)", "2", "1", "0.25", "█" * 5]]
    out = run("diff", pa, pb, "--depth", "2", "--sort", "file").stdout
    assert table(out, "modules") == [["enc.l1", "2", "1", "1", "█" * 20],
                                     ["enc.l2", "1", "1", "0.5", "█" * 10],
                                     ["dec", "1", "1", "0.156", "███▏"],
                                     ["(top)", "2", "1", "0.25", "█" * 5],
                                     ["head", "1", "1", "-"]]
    out = run("diff", pa, pb, "--depth", "2", "--sort", "name", "--top", "2").stdout
    assert table(out, "modules") == [["(top)", "2", "1", "0.25", "█" * 5], ["dec", "1", "1", "0.156", "███▏"]]
    assert title(out, "modules") == "modules, names folded 2 levels (5, the first 2 by name; --all for every row):"
    assert "modules" not in run("diff", pa, pb).stdout  # no module table without --depth


def test_depth_bars_in_ascii_where_stdout_is_not_utf8(small):
    pa, pb = small
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    p = subprocess.run([sys.executable, "-m", "ckpttool", "diff", pa, pb, "--depth", "1"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 1 and p.stderr == ""
    assert table(p.stdout, "modules") == [["head", "1", "1", "-"], ["enc", "3", "2", "1", "#" * 20],
                                          ["dec", "1", "1", "0.156", "###"], ["(top)", "2", "1", "0.25", "#" * 5]]
    assert diff_text(diff(pa, pb, depth=1, sort="change"), unicode=False) == p.stdout.rstrip("\n")


def test_change_bar():
    assert change_bar(1.0, 1.0) == "█" * 20
    assert change_bar(1 / 160, 1.0) == "▏" and change_bar(7 / 160, 1.0) == "▉" and change_bar(9 / 160, 1.0) == "█▏"
    assert change_bar(1e-12, 1.0) == "▏"  # any change shows
    assert [change_bar(v, 1.0) for v in (0.0, None, float("nan"))] == ["", "", ""]
    assert change_bar(float("inf"), 0.5) == "█" * 20
    assert change_bar(0.26, 1.0, unicode=False) == "#####" and change_bar(1e-9, 1.0, unicode=False) == "#"


def test_depth_json(small):
    pa, pb = small
    d = json.loads(run("diff", pa, pb, "--depth", "1", "--sort", "file", "--json").stdout)
    assert d["depth"] == 1
    assert d["modules"] == [
        {"module": "enc", "tensors": 3, "changed": 2, "max_rel_change": 1.0, "numel": 10},
        {"module": "dec", "tensors": 1, "changed": 1, "max_rel_change": 0.15625, "numel": 2},
        {"module": "(top)", "tensors": 2, "changed": 1, "max_rel_change": 0.25, "numel": 2},
        {"module": "head", "tensors": 1, "changed": 1, "max_rel_change": None, "numel": 3}]
    assert "modules" not in json.loads(run("diff", pa, pb, "--json").stdout)


def test_depth_with_no_values_reads_no_data(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(4)
    good = str(tmp_path / "good.safetensors")
    save_file({"m.a": torch.randn(16, 16), "m.b": torch.randn(16), "n.c": torch.randn(3)}, good)
    data = bytearray(open(good, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\x7f" * (len(data) - header)
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(bytes(data))
    r = run("diff", good, bad, "--no-values", "--depth", "1", "--sort", "size")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "result: EQUAL (names, shapes and dtypes only)"
    assert table(r.stdout, "modules") == [["m", "2", "0", "-"], ["n", "1", "0", "-"]]
    assert run("diff", good, bad, "--depth", "1").exit_code == 1


# ---------------------------------------------------------------- rel_change against torch

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int8, torch.complex64])
def test_rel_change_is_torch_norm_ratio(tmp_path, dtype):
    torch.manual_seed(7)
    if dtype.is_complex:
        a = torch.randn(300, 7, dtype=dtype)
        b = a * (1 + 0.03j) + 0.01
    elif dtype.is_floating_point:
        a = torch.randn(300, 7).to(dtype)
        b = (a.double() * 1.02 + 0.001 * torch.randn(300, 7, dtype=torch.float64)).to(dtype)
    else:
        a = torch.randint(-50, 50, (300, 7)).to(dtype)
        b = a.clone()
        b[::3] += 1
    pa, pb = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    torch.save({"x": a, "same": a.clone()}, pa)
    torch.save({"x": b, "same": a.clone()}, pb)
    r = diff(pa, pb)
    (d,) = r.value_mismatch
    if dtype.is_complex:
        expected = ((a.to(torch.complex128) - b.to(torch.complex128)).norm() / b.to(torch.complex128).norm()).item()
    else:
        expected = rel(a, b)
    assert d.rel_change == pytest.approx(expected, rel=1e-12)
    if dtype in (torch.float32, torch.float64):  # torch in the tensors' own dtype: to its precision
        assert d.rel_change == pytest.approx(((a - b).norm() / b.norm()).item(), rel=1e-5)
    j = json.loads(run("diff", pa, pb, "--json").stdout)
    assert j["value_mismatch"][0]["rel_change"] == d.rel_change


def test_rel_change_across_chunks_and_special_values(tmp_path):
    """A tensor of 1.5M elements (two chunks) whose only difference is in the second chunk: the first chunk's
    ||B||^2 counts too. inf where B is all zeros, exact ones 0, shared NaNs left out of both norms."""
    torch.manual_seed(8)
    big = torch.randn(1_500_000)
    late, early = big.clone(), big.clone()
    late[-10:] += 1.0
    early[:10] -= 1.0
    nan_a = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    nan_b = torch.tensor([1.5, float("nan"), 3.0, 4.0])
    a = {"late": big, "early": big, "zero_b": torch.ones(3), "exact": torch.arange(5.0), "cast": torch.arange(5.0),
         "nan": nan_a}
    b = {"late": late, "early": early, "zero_b": torch.zeros(3), "exact": torch.arange(5.0),
         "cast": torch.arange(5.0).double(), "nan": nan_b}
    pa, pb = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    torch.save(a, pa)
    torch.save(b, pb)
    r = diff(pa, pb, sort="change")
    got = {d.name: d.rel_change for d in r.value_mismatch}
    assert got["late"] == pytest.approx(rel(big, late), rel=1e-10)
    assert got["early"] == pytest.approx(rel(big, early), rel=1e-10)
    assert got["zero_b"] == float("inf")
    keep = ~torch.isnan(nan_a)
    assert got["nan"] == pytest.approx(rel(nan_a[keep], nan_b[keep]), rel=1e-12)
    assert [d.name for d in r.value_mismatch][0] == "zero_b"  # inf: the largest change
    (cast,) = r.dtype_mismatch
    assert (cast.name, cast.status, cast.rel_change) == ("cast", "exact", 0.0)
    j = json.loads(run("diff", pa, pb, "--json").stdout)
    assert {v["name"]: v["rel_change"] for v in j["value_mismatch"]}["zero_b"] == "inf"
    assert j["dtype_mismatch"][0]["rel_change"] == 0.0
    out = run("diff", pa, pb).stdout
    assert next(row for row in table(out, "values not bit-equal") if row[0] == "zero_b")[4] == "inf"


# ---------------------------------------------------------------- exit codes unchanged

def test_exit_codes_unchanged(tuned, small):
    pa, pb, _, _ = tuned
    for extra in ([], ["--sort", "name"], ["--top", "1"], ["--all"], ["--depth", "2"], ["--json"], ["-q"]):
        assert run("diff", pa, pa, *extra).exit_code == 0, extra
        assert run("diff", pa, pb, *extra).exit_code == 1, extra
    assert run("diff", pa, pb, "--depth", "2", "-q").stdout == "result: DIFFERENT\n"
    r = subprocess.run([sys.executable, "-m", "ckpttool", "diff", *small, "--depth", "1"], capture_output=True)
    assert r.returncode == 1
    assert re.search(rb"\nresult: DIFFERENT\n$", r.stdout)
