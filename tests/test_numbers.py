"""ckpttool.numbers: tensor bytes as numbers with numpy, held to torch's own values."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ckpttool import numbers

FLOAT8 = ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"]


@pytest.mark.parametrize("dtype", FLOAT8)
def test_every_float8_byte_decodes_as_torch_decodes_it(dtype):
    """All 256 bit patterns of each float8 format: the same value as torch's .to(float64), NaN where torch's NaN."""
    raw = torch.arange(256, dtype=torch.uint8)
    want = raw.view(getattr(torch, dtype)).to(torch.float64).numpy()
    got = numbers.as_numbers(raw.numpy().tobytes(), dtype)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])
    assert np.array_equal(np.signbit(got[ok]), np.signbit(want[ok]))  # -0.0 stays -0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64", "complex32", "complex64",
                                   "complex128", "int8", "uint8", "int16", "int32", "int64", "bool"])
def test_dtypes_decode_as_torch(dtype):
    torch.manual_seed(0)
    t = torch.randn(1000, dtype=torch.float64) * 1e3
    t[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    if dtype.startswith("complex"):
        x = torch.complex(t, t.flip(0)).to(getattr(torch, "chalf" if dtype == "complex32" else dtype))
    elif dtype == "bool":
        x = t > 0
    elif dtype.startswith(("int", "uint")):
        x = t.nan_to_num(0, 0, 0).clamp(-100, 100).to(getattr(torch, dtype))
    else:
        x = t.to(getattr(torch, dtype))
    raw = x.view(-1).view(torch.uint8).numpy().tobytes() if x.dtype != torch.bool else x.numpy().tobytes()
    want = x.to(torch.complex128 if x.is_complex() else torch.float64).numpy()
    got = numbers.as_numbers(raw, dtype)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)


def test_measure_matches_torch_isclose_and_counts():
    a = np.array([1.0, 2.0, np.nan, np.inf, 5.0, 0.0])
    b = np.array([1.0, 2.1, np.nan, np.inf, 5.0 + 1e-9, 1.0])
    bad, max_abs, max_rel, exact = numbers.measure(a, b, atol=1e-5, rtol=1e-3)
    want_bad = int((~torch.isclose(torch.tensor(a), torch.tensor(b), rtol=1e-3, atol=1e-5, equal_nan=True)).sum())
    assert (bad, exact) == (want_bad, False) and bad == 2
    assert max_abs == pytest.approx(1.0) and max_rel == pytest.approx(1.0)
    assert numbers.measure(a, a.copy(), 0.0, 0.0) == (0, 0.0, 0.0, True)


def test_measure_ints_is_exact_past_two_to_the_53():
    a = np.array([2 ** 62 + 1, 5], dtype=np.int64)
    b = np.array([2 ** 62, 5], dtype=np.int64)
    assert numbers.measure_ints(a, b) == (1, 1.0, 1.0 / 2 ** 62, False)


@pytest.mark.parametrize("shape,stride,offset", [((3, 4), (1, 3), 0), ((2, 3), (8, 2), 1), ((4,), (3,), 2),
                                                  ((0, 5), (5, 1), 0)])
def test_gather_is_torch_as_strided(shape, stride, offset):
    base = torch.arange(40, dtype=torch.int16)
    view = base.as_strided(shape, stride, offset)
    span = base.numpy().tobytes()[offset * 2:]
    assert numbers.gather(span, shape, stride, 2) == view.contiguous().numpy().tobytes()


def test_diff_of_values_never_imports_torch(tmp_path):
    """Comparing differing float and int tensors by value, in a fresh interpreter: torch is never imported."""
    torch.manual_seed(0)
    a = {"w": torch.randn(64, 64), "h": torch.randn(100).bfloat16(), "i": torch.arange(10),
         "t": torch.randn(8, 8).t()}
    b = {k: (v + 0.5 if v.is_floating_point() else v + 1) for k, v in a.items()}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    code = ("import sys, ckpttool; r = ckpttool.diff(sys.argv[1], sys.argv[2]); "
            "print(len(r.value_mismatch), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.pt"), str(tmp_path / "b.pt")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4", "False"]
