"""The ``diff`` library API: keys, shapes, dtypes and values of two checkpoints, checked against torch.

Every expected number (max abs / rel difference, elements outside the tolerance) is
computed here independently with torch on the tensors that were saved.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckpttool
from ckpttool import errors
from ckpttool.diffing import compare_tensors
from ckpttool.diffing import diff as _diff_fn
from ckpttool.records import TensorDiff

# The public function, whatever `ckpttool.diff` is bound to at the moment (see test_lazy_api_*).
diff = _diff_fn

F32 = (1e-5, 1.3e-6)  # torch.testing.assert_close's defaults (atol, rtol)


# ---------------------------------------------------------------- helpers

def save(tmp_path, name, obj, **kw) -> str:
    p = str(tmp_path / name)
    if name.endswith(".safetensors"):
        save_file(obj, p)
    else:
        torch.save(obj, p, **kw)
    return p


def pair(tmp_path, a, b, **kw):
    """diff of {'x': a} and {'x': b}, and the one TensorDiff of 'x' (or None when exact)."""
    pa = save(tmp_path, "a.pt", {"x": a})
    pb = save(tmp_path, "b.pt", {"x": b})
    r = diff(pa, pb, **kw)
    found = [d for d in r.value_mismatch + r.value_close if d.name == "x"]
    return r, (found[0] if found else None)


def ref_stats(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float):
    """(max abs, max rel against B, elements not close) computed by torch in float64/complex128."""
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    xa, xb = a.to(wide), b.to(wide)
    d = (xa - xb).abs()
    rel = d / xb.abs()
    bad = int((~torch.isclose(xa, xb, atol=atol, rtol=rtol, equal_nan=True)).sum())
    return d.max().item(), rel.max().item(), bad


def refs(path: str, key=None):
    return ckpttool.find_state_dict(ckpttool.open(path), key).tensors


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    """resnet18(weights=None) saved as a zip state_dict, legacy, safetensors, TorchScript and a pickled model."""
    import torchvision
    d = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    sd = m.state_dict()
    files = {"pt": str(d / "r.pt"), "legacy": str(d / "r_legacy.pt"), "safetensors": str(d / "r.safetensors"),
             "torchscript": str(d / "r_script.pt"), "full_model": str(d / "r_full.pth")}
    torch.save(sd, files["pt"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, files["safetensors"])
    torch.jit.save(torch.jit.script(m), files["torchscript"])
    torch.save(m, files["full_model"])
    return files, sd


# ---------------------------------------------------------------- same model, any format

def test_file_against_itself_is_equal(resnet_files):
    files, sd = resnet_files
    r = diff(files["pt"], files["pt"])
    assert r.equal is True and r.exit_code == 0
    assert r.exact == len(sd) == r.count_a == r.count_b == 122
    assert r.only_in_a == r.only_in_b == ()
    assert r.shape_mismatch == r.dtype_mismatch == r.value_mismatch == r.value_close == ()
    assert r.prefix_alignment.to_dict() is None and r.values_compared is True


@pytest.mark.parametrize("fmt", ["legacy", "safetensors", "torchscript", "full_model"])
def test_same_model_in_another_format_is_equal(resnet_files, fmt):
    files, sd = resnet_files
    r = diff(files["pt"], files[fmt])
    assert (r.only_in_a, r.only_in_b) == ((), ())
    assert r.equal is True and r.exit_code == 0
    assert r.exact == len(sd)
    assert r.format_a == "torch_zip"
    r = diff(files[fmt], files["pt"])  # and the other way round
    assert r.equal is True and r.exact == len(sd)


def test_fixture_formats_agree(make, committed):
    base = make("state_dict.pt")
    n = len(torch.load(base, weights_only=True))
    for other, entry in [("full_model.pth", None), ("legacy.pt", "state_dict"), ("sharded_bin", None),
                         ("legacy_full_model.pt", None)]:
        r = diff(base, make(other))
        assert (r.equal, r.exact, r.entry_b) == (True, n, entry), other
    # the safetensors fixture leaves the tied head.weight out: one key only in A, the rest bit-equal
    r = diff(base, committed("model.safetensors"))
    assert r.only_in_a == ("head.weight",) and r.only_in_b == ()
    assert r.exact == n - 1 and r.equal is False and r.exit_code == 1


# ---------------------------------------------------------------- keys, shapes, dtypes

def test_keys_shapes_and_dtypes(tmp_path):
    torch.manual_seed(0)
    same = torch.randn(3, 4)
    pa = save(tmp_path, "a.pt", {"same": same, "only_a": torch.ones(2), "shape": torch.zeros(2, 3),
                                 "dtype": torch.arange(4.0), "shape_numel": torch.zeros(2, 3)})
    pb = save(tmp_path, "b.pt", {"only_b": torch.ones(2), "same": same.clone(), "shape": torch.zeros(3, 3),
                                 "dtype": torch.arange(4.0).half(), "shape_numel": torch.zeros(3, 2)})
    r = diff(pa, pb)
    assert r.only_in_a == ("only_a",) and r.only_in_b == ("only_b",)
    assert [(d.name, d.shape_a, d.shape_b) for d in r.shape_mismatch] == [
        ("shape", (2, 3), (3, 3)), ("shape_numel", (2, 3), (3, 2))]
    assert [(d.name, d.dtype_a, d.dtype_b) for d in r.dtype_mismatch] == [("dtype", "float32", "float16")]
    assert r.dtype_mismatch[0].status == "exact"  # 0..3 are exact in float16
    assert r.value_mismatch == () and r.exact == 2  # same, dtype (numerically equal)
    assert r.equal is False and r.exit_code == 1
    assert (r.count_a, r.count_b) == (5, 5)


def test_float16_copy_of_float32_is_a_dtype_mismatch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(20, 30)
    r, d = pair(tmp_path, x, x.half())
    assert [t.name for t in r.dtype_mismatch] == ["x"]
    assert r.equal is False and r.exit_code == 1
    # the values differ only by float16 rounding: within the looser (float16) tolerance
    max_abs, max_rel, bad = ref_stats(x, x.half(), 1e-5, 1e-3)
    assert bad == 0 and max_abs > 0
    assert d.status == "close" and (d.atol, d.rtol) == (1e-5, 1e-3)
    assert d.max_abs == max_abs and d.max_rel == pytest.approx(max_rel, rel=1e-12)
    assert r.dtype_mismatch[0].status == "close"


# ---------------------------------------------------------------- values

def test_value_mismatch_numbers_match_torch(tmp_path):
    torch.manual_seed(2)
    a = torch.randn(50, 40)
    b = a.clone()
    b[3, 7] += 0.25
    b[49, 39] -= 3.0
    b[10, 10] = -b[10, 10]
    b[20, 5] += 1e-7  # within tolerance: not counted
    other = torch.randn(7)
    pa = save(tmp_path, "a.pt", {"w": a, "other": other})
    pb = save(tmp_path, "b.pt", {"w": b, "other": other.clone()})
    r = diff(pa, pb)
    assert r.equal is False and r.exit_code == 1 and r.exact == 1
    (d,) = r.value_mismatch
    max_abs, max_rel, bad = ref_stats(a, b, *F32)
    assert d.name == "w" and d.status == "mismatch"
    assert d.max_abs == max_abs
    assert d.max_rel == pytest.approx(max_rel, rel=1e-12)
    assert d.mismatched == bad == 3 and d.numel == 2000
    assert (d.atol, d.rtol) == F32


def test_max_rel_is_relative_to_b(tmp_path):
    r, d = pair(tmp_path, torch.tensor([1.0, 10.0]), torch.tensor([2.0, 10.0]))
    assert (d.max_abs, d.max_rel) == (1.0, 0.5)
    r, d = pair(tmp_path, torch.tensor([2.0, 10.0]), torch.tensor([1.0, 10.0]))
    assert (d.max_abs, d.max_rel) == (1.0, 1.0)


def test_tiny_float32_difference_is_close_and_equal(tmp_path):
    torch.manual_seed(4)
    a = torch.rand(30, 30) + 0.5
    b = a + 1e-7
    assert bool((a != b).any())  # the perturbation survived float32 rounding
    r, d = pair(tmp_path, a, b)
    max_abs, max_rel, bad = ref_stats(a, b, *F32)
    assert bad == 0
    assert d.status == "close" and d.mismatched == 0 and d.max_abs == max_abs
    assert [t.name for t in r.value_close] == ["x"] and r.value_mismatch == ()
    assert r.equal is True and r.exit_code == 0 and r.exact == 0


def test_atol_rtol_loosen_a_mismatch(tmp_path):
    torch.manual_seed(5)
    a = torch.rand(100) + 1.0
    b = a + 1e-3
    r, d = pair(tmp_path, a, b)
    assert d.status == "mismatch" and d.mismatched == ref_stats(a, b, *F32)[2] == 100
    r, d = pair(tmp_path, a, b, atol=1e-2)
    assert d.status == "close" and r.equal is True and (d.atol, d.rtol) == (1e-2, 1.3e-6)
    r, d = pair(tmp_path, a, b, rtol=1e-2)
    assert d.status == "close" and r.equal is True and (d.atol, d.rtol) == (1e-5, 1e-2)
    # loosened, but not enough for every element: counted exactly as torch.isclose does
    r, d = pair(tmp_path, a, b, atol=1e-4, rtol=5e-4)
    assert d.status == "mismatch" and r.equal is False
    assert d.mismatched == ref_stats(a, b, 1e-4, 5e-4)[2]
    assert 0 < d.mismatched < 100


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_integers_and_bools_are_never_tolerance_close(tmp_path, dtype):
    a = torch.tensor([0, 1, 0, 1, 1], dtype=dtype)
    b = a.clone()
    b[2] = 1
    r, d = pair(tmp_path, a, b, atol=10.0, rtol=1.0)
    assert d.status == "mismatch" and d.mismatched == 1 and d.numel == 5
    assert (d.atol, d.rtol) == (0.0, 0.0)
    assert d.max_abs == 1.0
    assert r.equal is False and r.exit_code == 1


@pytest.mark.parametrize("values", [[2 ** 53, 0], [2 ** 62, -5], [-(2 ** 60) - 1, 7]])
def test_int64_beyond_float64_precision_is_compared_exactly(tmp_path, values):
    a = torch.tensor(values, dtype=torch.int64)
    b = a.clone()
    b[0] += 1  # still distinct int64s, but the same number once rounded to float64
    assert not torch.equal(a, b)
    r, d = pair(tmp_path, a, b)
    assert r.equal is False and r.exit_code == 1, "int64 tensors differing by 1 were reported equal"
    assert d is not None and d.status == "mismatch" and d.mismatched == 1


def test_nan_at_the_same_position_is_equal(tmp_path):
    a = torch.tensor([1.0, float("nan"), 3.0, float("nan")])
    r, d = pair(tmp_path, a, a.clone())
    assert r.equal is True and r.exact == 1 and d is None
    # the same NaNs, and a real difference elsewhere: only that element counts
    b = a.clone()
    b[2] = 4.0
    r, d = pair(tmp_path, a, b)
    assert d.status == "mismatch" and d.mismatched == 1 and d.max_abs == 1.0


def test_nan_against_a_number_is_a_mismatch(tmp_path):
    a = torch.tensor([1.0, float("nan"), 3.0])
    b = torch.tensor([1.0, 2.0, 3.0])
    for x, y in ((a, b), (b, a)):
        r, d = pair(tmp_path, x, y, atol=1e6, rtol=1e6)  # no tolerance makes a NaN close to a number
        assert d.status == "mismatch" and d.mismatched == 1
        assert not math.isfinite(d.max_abs)
        assert r.equal is False and r.exit_code == 1


def test_inf_handling(tmp_path):
    inf = float("inf")
    a = torch.tensor([inf, -inf, 1.0])
    r, d = pair(tmp_path, a, a.clone())
    assert r.equal is True and r.exact == 1
    r, d = pair(tmp_path, a, torch.tensor([-inf, -inf, 1.0]))
    assert d.status == "mismatch" and d.mismatched == 1 and d.max_abs == inf
    r, d = pair(tmp_path, a, torch.tensor([3e38, -inf, 1.0]), atol=1e6, rtol=1e6)
    assert d.status == "mismatch" and d.mismatched == 1 and d.max_abs == inf
    # an infinite element elsewhere does not hide a finite difference's count
    r, d = pair(tmp_path, a, torch.tensor([inf, -inf, 2.0]))
    assert d.status == "mismatch" and (d.mismatched, d.max_abs, d.max_rel) == (1, 1.0, 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_default_tolerances_agree_with_torch_testing(tmp_path, dtype):
    """For a same-dtype pair, diff's default verdict is torch.testing.assert_close's."""
    torch.manual_seed(6)
    a = (torch.rand(64, dtype=torch.float64) + 0.5).to(dtype)
    eps = torch.finfo(dtype).eps
    for ulps in (1, 2, 3, 8, 64):
        b = (a.double() * (1 + ulps * eps)).to(dtype)
        if torch.equal(a, b):
            continue
        try:
            torch.testing.assert_close(a, b)
            close = True
        except AssertionError:
            close = False
        r, d = pair(tmp_path, a, b)
        atol, rtol = d.atol, d.rtol
        assert r.equal is close, (dtype, ulps)
        assert d.status == ("close" if close else "mismatch")
        assert d.mismatched == ref_stats(a, b, atol, rtol)[2]
        assert d.max_abs == ref_stats(a, b, atol, rtol)[0]


def test_float16_and_bfloat16_default_tolerances(tmp_path):
    one16 = torch.ones(4, dtype=torch.float16)
    r, d = pair(tmp_path, one16, torch.tensor([1, 1 + 2 ** -10, 1, 1], dtype=torch.float16))  # 1 ulp
    assert d.status == "close" and (d.atol, d.rtol) == (1e-5, 1e-3) and d.max_abs == 2 ** -10 and r.equal
    r, d = pair(tmp_path, one16, torch.tensor([1, 1 + 2 ** -9, 1, 1], dtype=torch.float16))  # 2 ulps
    assert d.status == "mismatch" and d.mismatched == 1 and not r.equal
    one_bf = torch.ones(4, dtype=torch.bfloat16)
    r, d = pair(tmp_path, one_bf, torch.tensor([1, 1 + 2 * 2 ** -7, 1, 1], dtype=torch.bfloat16))  # 2 ulps
    assert d.status == "close" and (d.atol, d.rtol) == (1e-5, 1.6e-2) and r.equal
    r, d = pair(tmp_path, one_bf, torch.tensor([1, 1 + 3 * 2 ** -7, 1, 1], dtype=torch.bfloat16))  # 3 ulps
    assert d.status == "mismatch" and not r.equal
    assert d.max_abs == 3 * 2 ** -7


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_values(tmp_path, dtype):
    torch.manual_seed(7)
    a = torch.randn(12, dtype=dtype)
    r, d = pair(tmp_path, a, a.clone())
    assert r.equal and r.exact == 1
    b = a.clone()
    b[5] += 3 + 4j
    r, d = pair(tmp_path, a, b)
    max_abs, max_rel, bad = ref_stats(a, b, 1e-5 if dtype == torch.complex64 else 1e-7,
                                      1.3e-6 if dtype == torch.complex64 else 1e-7)
    assert d.status == "mismatch" and d.mismatched == bad == 1
    assert d.max_abs == pytest.approx(max_abs, rel=1e-12) and d.max_abs == pytest.approx(5.0, rel=1e-6)
    assert d.max_rel == pytest.approx(max_rel, rel=1e-12)
    c = a.clone()
    c[5] += 1e-9j
    r, d = pair(tmp_path, a, c)
    if torch.equal(a, c):  # vanished in complex64 rounding
        assert r.exact == 1
    else:
        assert d.status == "close" and r.equal


def test_bool_tensors(tmp_path):
    a = torch.tensor([[True, False], [False, True]])
    r, d = pair(tmp_path, a, a.clone())
    assert r.equal and r.exact == 1
    r, d = pair(tmp_path, a, ~a)
    assert d.status == "mismatch" and d.mismatched == 4 and d.max_abs == 1.0


def test_scalars_and_empty_tensors(tmp_path):
    pa = save(tmp_path, "a.pt", {"s": torch.tensor(2.5), "e": torch.empty(0, 3), "z": torch.empty(0, 3)})
    pb = save(tmp_path, "b.pt", {"s": torch.tensor(3.5), "e": torch.empty(0, 3), "z": torch.empty(3, 0)})
    r = diff(pa, pb)
    assert [(d.name, d.max_abs, d.mismatched) for d in r.value_mismatch] == [("s", 1.0, 1)]
    assert [d.name for d in r.shape_mismatch] == ["z"]
    assert r.exact == 1


def test_meta_tensor_is_not_equal_to_a_real_one(tmp_path):
    """A file of meta tensors (no data at all) must not pass for the real weights."""
    pa = save(tmp_path, "meta.pt", {"w": torch.empty(3, 4, device="meta")})
    pb = save(tmp_path, "real.pt", {"w": torch.randn(3, 4)})
    r = diff(pa, pb)
    assert [d.name for d in r.value_mismatch] == ["w"] and "A has no data" in r.value_mismatch[0].note
    assert r.equal is False and r.exit_code == 1, "values never compared, yet reported EQUAL"
    # meta on both sides: nothing can differ; listed as not compared, and the files are equal
    both = diff(pa, pa)
    assert [d.name for d in both.not_compared] == ["w"] and both.not_compared[0].status == "no_data"
    assert both.equal is True


# ---------------------------------------------------------------- views and shared storages

def test_strided_views_equal_their_contiguous_clones(tmp_path):
    torch.manual_seed(8)
    x = torch.randn(6, 10)
    views = {"t": x.t(), "cols": x[:, ::2], "rows": x[2:4], "block": x[1:5, 3:9],
             "bcast": torch.arange(3.0).expand(4, 3), "full": x}
    pa = save(tmp_path, "views.pt", views)
    flat = {k: v.clone().contiguous() for k, v in views.items()}
    pb = save(tmp_path, "flat.pt", flat)
    ps = save(tmp_path, "flat.safetensors", flat)
    a_refs = refs(pa)
    # the test is about views: the reader must see them as strided
    assert not a_refs["t"].is_contiguous and not a_refs["cols"].is_contiguous and not a_refs["bcast"].is_contiguous
    for other in (pb, ps):
        for r in (diff(pa, other), diff(other, pa)):
            assert r.equal is True and r.exact == len(views), other
            assert r.not_compared == ()


def test_strided_views_report_differences_where_torch_sees_them(tmp_path):
    torch.manual_seed(9)
    x = torch.randn(6, 10)
    y = x.clone()
    y[5, 4] += 2.0  # in x.t(), x[:, ::2] and x itself; not in x[2:4]
    mk = lambda t: {"t": t.t(), "cols": t[:, ::2], "rows": t[2:4], "full": t}  # noqa: E731
    va, vb = mk(x), mk(y)
    r = diff(save(tmp_path, "a.pt", va), save(tmp_path, "b.pt", vb))
    expected = {k for k in va if not torch.equal(va[k], vb[k])}
    assert expected == {"t", "cols", "full"}
    assert {d.name for d in r.value_mismatch} == expected and r.exact == 1
    for d in r.value_mismatch:
        max_abs, max_rel, bad = ref_stats(va[d.name], vb[d.name], *F32)
        assert (d.max_abs, d.mismatched) == (max_abs, bad)
        assert d.max_rel == pytest.approx(max_rel, rel=1e-12)
    # a view against a contiguous float64 copy: dtype differs, values are numerically exact
    r = diff(save(tmp_path, "a.pt", va), save(tmp_path, "c.pt", {k: v.double() for k, v in va.items()}))
    assert [d.status for d in r.dtype_mismatch] == ["exact"] * 4 and r.exact == 4


def test_tied_weights(tmp_path):
    torch.manual_seed(10)
    w = torch.randn(16, 8)
    tied = {"embed.weight": w, "head.weight": w, "bias": torch.zeros(8)}
    pa = save(tmp_path, "tied.pt", tied)
    untied = {k: v.clone() for k, v in tied.items()}
    r = diff(pa, save(tmp_path, "untied.pt", untied))
    assert r.equal and r.exact == 3
    untied["head.weight"] = w.clone()
    untied["head.weight"][0, 0] += 1.0
    r = diff(pa, save(tmp_path, "untied2.pt", untied))
    assert [(d.name, d.max_abs, d.mismatched) for d in r.value_mismatch] == [("head.weight", 1.0, 1)]


# ---------------------------------------------------------------- chunked comparison

def _ref_pair(tmp_path, a, b):
    pa = save(tmp_path, "ca.pt", {"w": a})
    pb = save(tmp_path, "cb.pt", {"w": b})
    ra, rb = refs(pa)["w"], refs(pb)["w"]
    return ra, rb, TensorDiff("w", "w", ra.shape, rb.shape, ra.dtype, rb.dtype)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10 ** 6])
def test_compare_tensors_in_small_chunks(tmp_path, chunk):
    torch.manual_seed(11)
    a = torch.randn(10, 10)
    b = a.clone()
    b[9, 3] += 0.5     # element 93: the 14th chunk of 7
    b[7, 1] -= 2.0     # element 71
    b[8, 8] += 1e-6    # element 88: within tolerance
    ra, rb, d = _ref_pair(tmp_path, a, b)
    out = compare_tensors(d, ra, rb, chunk_elements=chunk)
    max_abs, max_rel, bad = ref_stats(a, b, *F32)
    assert out.status == "mismatch"
    assert (out.max_abs, out.mismatched, out.numel) == (max_abs, bad, 100) and bad == 2
    assert out.max_rel == pytest.approx(max_rel, rel=1e-12)


def test_compare_tensors_chunks_only_the_last_one_differs(tmp_path):
    a = torch.arange(50, dtype=torch.float32)
    b = a.clone()
    b[49] += 1e-5  # in the last chunk of 7 (elements 49..49)
    ra, rb, d = _ref_pair(tmp_path, a, b)
    out = compare_tensors(d, ra, rb, chunk_elements=7)
    assert out.status == "close" and out.max_abs == ref_stats(a, b, *F32)[0] and out.mismatched == 0
    b[49] += 1.0
    ra, rb, d = _ref_pair(tmp_path, a, b)
    out = compare_tensors(d, ra, rb, chunk_elements=7)
    assert out.status == "mismatch" and out.mismatched == 1 and out.max_abs == ref_stats(a, b, *F32)[0]
    ra, rb, d = _ref_pair(tmp_path, a, a.clone())
    assert compare_tensors(d, ra, rb, chunk_elements=7).status == "exact"


def test_compare_tensors_chunks_strided_and_mixed_dtypes(tmp_path):
    torch.manual_seed(12)
    a = torch.randn(9, 13)
    b = a.double().t().contiguous().t()  # float64, stored transposed: a strided view
    b[8, 12] += 0.125
    b[0, 1] += 1e-4
    ra, rb, d = _ref_pair(tmp_path, a, b)
    assert ra.is_contiguous and not rb.is_contiguous
    for chunk in (5, 7, 1000):
        out = compare_tensors(d, ra, rb, chunk_elements=chunk)
        max_abs, max_rel, bad = ref_stats(a, b, *F32)
        assert out.status == "mismatch" and (out.max_abs, out.mismatched) == (max_abs, bad) and bad == 2
        out = compare_tensors(d, rb, ra, chunk_elements=chunk)
        assert out.mismatched == bad and out.max_abs == max_abs


def test_compare_tensors_nan_inf_across_chunks(tmp_path):
    a = torch.zeros(40)
    a[3] = float("nan")
    a[30] = float("inf")
    b = a.clone()
    b[35] = 0.5
    ra, rb, d = _ref_pair(tmp_path, a, b)
    out = compare_tensors(d, ra, rb, chunk_elements=7)
    assert out.status == "mismatch" and out.mismatched == 1 and out.max_abs == 0.5


# ---------------------------------------------------------------- prefix alignment

def test_dataparallel_prefix_is_aligned(tmp_path):
    m = small_net()
    plain = m.state_dict()
    dp = nn.DataParallel(m).state_dict()
    assert all(k.startswith("module.") for k in dp)
    p_dp, p_plain = save(tmp_path, "dp.pt", dp), save(tmp_path, "plain.pt", plain)
    r = diff(p_dp, p_plain)
    assert r.prefix_alignment.to_dict() == {"a": "module.", "b": ""}
    assert r.equal and r.exact == len(plain) and r.only_in_a == r.only_in_b == ()
    r = diff(p_plain, p_dp)
    assert r.prefix_alignment.to_dict() == {"a": "", "b": "module."}
    assert r.equal and r.exact == len(plain)
    # a difference is reported under both names
    changed = {k: v.clone() for k, v in plain.items()}
    changed["3.bias"] += 1.0
    r = diff(p_dp, save(tmp_path, "changed.pt", changed))
    (d,) = r.value_mismatch
    assert (d.name, d.name_b, d.max_abs) == ("module.3.bias", "3.bias", 1.0)
    assert d.to_dict()["name_b"] == "3.bias"


def test_no_align_reports_every_key_as_unmatched(tmp_path):
    m = small_net()
    plain, dp = m.state_dict(), nn.DataParallel(m).state_dict()
    r = diff(save(tmp_path, "dp.pt", dp), save(tmp_path, "plain.pt", plain), align=False)
    assert r.prefix_alignment.to_dict() is None
    assert r.only_in_a == tuple(dp) and r.only_in_b == tuple(plain)
    assert r.exact == 0 and r.equal is False and r.exit_code == 1


@pytest.mark.parametrize("prefix_a,prefix_b", [
    ("_orig_mod.module.", ""), ("module._orig_mod.", ""), ("_orig_mod.", ""),
    ("_orig_mod.module.", "module._orig_mod."), ("", "module._orig_mod."),
    ("model.", ""), ("backbone.", "module."), ("model.", "module._orig_mod."),
])
def test_wrapper_prefixes_are_aligned(tmp_path, prefix_a, prefix_b):
    sd = small_net().state_dict()
    pa = save(tmp_path, "a.pt", {prefix_a + k: v for k, v in sd.items()})
    pb = save(tmp_path, "b.pt", {prefix_b + k: v.clone() for k, v in sd.items()})
    r = diff(pa, pb)
    assert r.prefix_alignment.to_dict() == {"a": prefix_a, "b": prefix_b}
    assert r.equal and r.exact == len(sd) and r.only_in_a == r.only_in_b == ()


def test_lightning_checkpoint_model_prefix(tmp_path):
    sd = small_net().state_dict()
    ckpt = {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 4, "global_step": 100}
    pa = save(tmp_path, "light.ckpt", ckpt)
    r = diff(pa, save(tmp_path, "plain.pt", sd))
    assert r.entry_a == "state_dict" and r.entry_b is None
    assert r.prefix_alignment.to_dict() == {"a": "model.", "b": ""}
    assert r.equal and r.exact == len(sd)


def test_prefix_on_only_some_keys_is_not_stripped(tmp_path):
    sd = small_net().state_dict()
    names = list(sd)
    prefixed = set(names[::2])
    mixed = {("module." + k if k in prefixed else k): v for k, v in sd.items()}
    r = diff(save(tmp_path, "mixed.pt", mixed), save(tmp_path, "plain.pt", sd))
    assert r.prefix_alignment.to_dict() is None
    assert r.only_in_a == tuple("module." + k for k in names if k in prefixed)
    assert r.only_in_b == tuple(k for k in names if k in prefixed)
    assert r.exact == len(names) - len(prefixed) and r.equal is False


def test_no_alignment_when_names_already_meet(tmp_path):
    sd = {"module." + k: v for k, v in small_net().state_dict().items()}
    r = diff(save(tmp_path, "a.pt", sd), save(tmp_path, "b.pt", sd))
    assert r.prefix_alignment.to_dict() is None and r.equal and r.exact == len(sd)


# ---------------------------------------------------------------- which entry is the state_dict

def test_key_a_and_key_b(committed, tmp_path):
    seed = committed("seed_checkpoint.tar")
    r = diff(seed, seed, key_b="model")  # model_state_dict vs the pickled model's own tensors
    loaded = torch.load(seed, weights_only=False)
    n = len(loaded["model_state_dict"])
    assert (r.entry_a, r.entry_b) == ("model_state_dict", "model")
    assert r.equal and r.exact == n == r.count_b
    sd = loaded["model_state_dict"]
    nested = save(tmp_path, "nested.pt", {"ema": {"model": {k: v.clone() for k, v in sd.items()}}, "step": 3})
    r = diff(nested, seed, key_a="ema/model", key_b="model_state_dict")
    assert r.entry_a == "ema/model" and r.equal and r.exact == n
    with pytest.raises(errors.KeyNotFoundError) as e:
        diff(seed, nested, key_b="ema/nope")
    assert e.value.path == nested and "'nope'" in str(e.value)


def test_automatic_state_dict_discovery(committed, make):
    """The seed checkpoint is one SGD step past the fixture's fresh ClassNet: diff finds which tensors moved."""
    seed = committed("seed_checkpoint.tar")
    fresh = make("state_dict.pt")
    r = diff(seed, fresh)
    assert r.entry_a == "model_state_dict" and r.entry_b is None
    sa = torch.load(seed, weights_only=False)["model_state_dict"]
    sb = torch.load(fresh, weights_only=True)
    moved = set()
    for k in sa:
        a, b = sa[k], sb[k]
        atol, rtol = (0.0, 0.0) if not a.is_floating_point() else F32
        if ref_stats(a, b, atol, rtol)[2]:
            moved.add(k)
    assert moved and len(moved) < len(sa)
    assert {d.name for d in r.value_mismatch} == moved
    for d in r.value_mismatch:
        assert d.max_abs == ref_stats(sa[d.name], sb[d.name], 0, 0)[0]


def test_pickled_full_model_equals_its_state_dict(tmp_path):
    m = small_net()
    r = diff(save(tmp_path, "full.pt", m), save(tmp_path, "sd.pt", m.state_dict()))
    assert r.equal and r.exact == len(m.state_dict()) and r.only_in_a == r.only_in_b == ()


# ---------------------------------------------------------------- --no-values reads no tensor data

def test_no_values_reads_no_tensor_data(tmp_path, make, monkeypatch):
    from ckpttool import records

    class Touched(Exception):
        pass

    def refuse(self, *a, **k):
        raise Touched("tensor data was read")

    torch.manual_seed(13)
    sd = {"a": torch.randn(8, 8), "b": torch.randn(4), "c": torch.arange(5)}
    other = {"a": torch.randn(8, 8) + 100, "b": torch.randn(5), "c": torch.arange(5).int()}
    files = [save(tmp_path, "a.pt", sd), save(tmp_path, "a_legacy.pt", sd, _use_new_zipfile_serialization=False),
             save(tmp_path, "a.safetensors", sd), make("torchscript.pt"), make("sharded_safetensors")]
    pb = save(tmp_path, "b.pt", other)
    monkeypatch.setattr(records.FileSpan, "read", refuse)
    monkeypatch.setattr(records.FileSpan, "readinto", refuse)
    monkeypatch.setattr(records.BufferSpan, "read", refuse)
    for pa in files[:3]:
        r = diff(pa, pb, values=False)
        assert r.values_compared is False and r.exact == 0
        assert [(d.name, d.shape_a, d.shape_b) for d in r.shape_mismatch] == [("b", (4,), (5,))]
        assert [(d.name, d.dtype_a, d.dtype_b, d.status) for d in r.dtype_mismatch] == [("c", "int64", "int32", "")]
        assert r.value_mismatch == r.value_close == ()  # "a" differs in value, but values were not read
        assert r.equal is False
        assert diff(pa, files[0], values=False).equal is True
    assert diff(files[3], files[4], values=False).count_a > 0
    with pytest.raises(Touched):  # the patch does catch a read
        diff(files[0], pb)


def test_no_values_ignores_corrupted_tensor_bytes(tmp_path):
    torch.manual_seed(14)
    sd = {"a": torch.randn(16, 16), "b": torch.randn(16)}
    good = save(tmp_path, "good.safetensors", sd)
    data = bytearray(open(good, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)  # every value now a NaN
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(bytes(data))
    r = diff(good, bad, values=False)
    assert r.equal is True and r.exit_code == 0 and r.values_compared is False
    r = diff(good, bad)
    assert {d.name for d in r.value_mismatch} == {"a", "b"}
    assert [d.mismatched for d in r.value_mismatch] == [256, 16]


# ---------------------------------------------------------------- GPU-saved files on a CPU machine

@pytest.mark.parametrize("name", ["gpu_tagged.pt", "gpu_tagged_legacy.pt"])
def test_gpu_tagged_file_against_a_cpu_file(committed, make, tmp_path, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = committed(name)
    cpu = make("state_dict.pt")
    assert {t.device for t in refs(gpu).values()} == {"cuda:0", "cuda:1"}
    r = diff(gpu, cpu)
    assert r.entry_a == "model_state_dict"
    assert r.equal and r.exact == len(torch.load(cpu, weights_only=True))
    sd = torch.load(gpu, map_location="cpu", weights_only=True)["model_state_dict"]
    changed = {k: v.clone() for k, v in sd.items()}
    changed["fc.bias"][3] -= 0.75
    r = diff(gpu, save(tmp_path, "changed.pt", changed))
    (d,) = r.value_mismatch
    assert d.name == "fc.bias" and d.max_abs == ref_stats(sd["fc.bias"], changed["fc.bias"], *F32)[0]


# ---------------------------------------------------------------- errors, progress, API

@pytest.mark.parametrize("kw", [{"atol": -1.0}, {"rtol": -1e-3}, {"atol": math.nan}, {"rtol": math.inf}])
def test_bad_tolerance_is_a_usage_error(make, kw):
    with pytest.raises(errors.UsageError) as e:
        diff(make("state_dict.pt"), make("state_dict.pt"), **kw)
    assert ("--atol" if "atol" in kw else "--rtol") in str(e.value)


def test_unreadable_inputs_raise_ckpt_errors(tmp_path, make):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(errors.CkptError) as e:
        diff(make("state_dict.pt"), missing)
    assert e.value.path == missing and e.value.exit_code == 2
    junk = str(tmp_path / "junk.pt")
    open(junk, "wb").write(os.urandom(64) + b"not a checkpoint")
    with pytest.raises(errors.CkptError) as e:
        diff(junk, make("state_dict.pt"))
    assert e.value.path == junk


def test_progress_reaches_the_total(tmp_path):
    torch.manual_seed(15)
    sd = {"a": torch.randn(10), "b": torch.randn(3, 3).half()}
    calls = []
    r = diff(save(tmp_path, "a.pt", sd), save(tmp_path, "b.pt", sd),
             progress=lambda done, total: calls.append((done, total)))
    total = 2 * (10 * 4 + 9 * 2)
    assert r.equal and calls[-1] == (total, total) and len(calls) == 2


def test_result_to_dict(tmp_path):
    pa = save(tmp_path, "a.pt", {"x": torch.tensor([1.0, float("nan")]), "y": torch.ones(2)})
    pb = save(tmp_path, "b.pt", {"x": torch.tensor([1.0, 2.0]), "z": torch.ones(2)})
    d = diff(pa, pb).to_dict()
    assert set(d) >= {"equal", "only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "value_mismatch",
                      "prefix_alignment"}
    assert d["equal"] is False and d["only_in_a"] == ["y"] and d["only_in_b"] == ["z"]
    (vm,) = d["value_mismatch"]
    assert vm["name"] == "x" and vm["shape"] == [2] and vm["dtype"] == "float32" and vm["mismatched"] == 1
    assert isinstance(vm["max_abs"], str)  # inf spelled as a string: JSON has no Infinity
    assert d["prefix_alignment"] is None


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_lazy_api_diff_is_the_function(make):
    path = make("state_dict.pt")
    out = _python("import sys, ckpttool\n"
                  f"r = ckpttool.diff({path!r}, {path!r}, values=False)\n"
                  "print(type(r).__name__, r.equal, 'torch' in sys.modules, 'diff' in ckpttool.__all__)")
    assert out == "DiffResult True False True"


IMPORT_FIRST = {
    "import_module": "import ckpttool.diffing",
    "from_module": "from ckpttool.diffing import compare_tensors",
    "cli_diff_ran": "import io, contextlib\nfrom ckpttool.cli import main\n"
                    "with contextlib.redirect_stdout(io.StringIO()):\n"
                    "    try: main(['diff', P, P, '--no-values'])\n"
                    "    except SystemExit: pass",
}


@pytest.mark.parametrize("first", sorted(IMPORT_FIRST))
def test_lazy_api_diff_survives_importing_the_diff_module(make, first):
    """Importing the module that implements `ckpttool.diff` (or running the CLI) must not shadow the function."""
    path = make("state_dict.pt")
    out = _python(f"P = {path!r}\n{IMPORT_FIRST[first]}\nimport ckpttool\n"
                  "print(type(ckpttool.diff).__name__)\n"
                  "try: print(ckpttool.diff(P, P, values=False).equal)\n"
                  "except TypeError as e: print('TypeError:', e)")
    assert out.splitlines() == ["function", "True"]


def test_metadata_and_bit_equal_diff_import_no_torch(make, committed):
    a, b = make("state_dict.pt"), make("legacy.pt")
    out = _python("import sys\nfrom ckpttool.diffing import diff\n"
                  f"r1 = diff({a!r}, {b!r}, values=False)\n"
                  f"r2 = diff({a!r}, {committed('model.safetensors')!r}, values=False)\n"
                  f"r3 = diff({a!r}, {b!r})\n"  # bit-equal values need no arithmetic
                  "print(r1.equal, r2.only_in_a, r3.equal, r3.exact, 'torch' in sys.modules)")
    assert out == "True ('head.weight',) True 19 False"


def test_fast_byte_comparison_reuses_its_buffers_safely(tmp_path, monkeypatch):
    """comparing.bytes_equal compares whole reused buffers: stale bytes past a short chunk must never
    make unequal tensors equal, nor equal ones unequal, whatever was compared before."""
    from ckpttool import comparing
    monkeypatch.setattr(comparing, "FAST_CHUNK", 64)  # many chunks, most tensors end in a short one
    monkeypatch.setattr(comparing, "_THREAD", __import__("threading").local())  # fresh buffers (per thread)
    torch.manual_seed(3)
    x = torch.randn(101)
    y = x.clone()
    y[100] += 1  # differs only in the last, short chunk
    z = x.clone()
    z[3] += 1    # differs in the first chunk, leaving the buffers unequal
    pa = save(tmp_path, "a.pt", {"x": x, "short": x[:5].clone(), "long": torch.randn(37)})
    pb = save(tmp_path, "b.pt", {"x": y, "short": x[:5].clone(), "long": torch.randn(37)})
    pc = save(tmp_path, "c.pt", {"x": z, "short": x[:5].clone(), "long": torch.randn(37)})
    a, b, c = (ckpttool.open(p).root for p in (pa, pb, pc))
    assert comparing.bytes_equal(a["x"], b["x"]) is False
    assert comparing.bytes_equal(a["short"], b["short"]) is True
    assert comparing.bytes_equal(a["x"], c["x"]) is False
    assert comparing.bytes_equal(a["x"], a["x"]) is True
    assert comparing.bytes_equal(a["long"], b["long"]) is False
    assert comparing.bytes_equal(a["short"], c["short"]) is True
    # and through diff(): the equal tensor is exact, the others are measured
    r = diff(pa, pb)
    assert r.exact == 1 and {d.name for d in r.value_mismatch} == {"x", "long"}
