"""Running models and comparing what they compute: the part verify and ONNX export share.

Seeded inputs (the same tensors for the same shapes and dtypes, on every run and in both commands), an
ONNX graph run by onnxruntime, and two lists of outputs compared as float64 (the largest absolute and
relative difference, and whether they are close). Each caller keeps its own tolerances: verify's by output
dtype, ONNX export's by the dtype it exported in. Imports torch (and onnxruntime) when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from .errors import UsageError


def seeded_inputs(specs: Sequence[Tuple[Sequence[int], Optional[str]]]) -> List[Any]:
    """One tensor per ``(shape, dtype)`` from one generator seeded 0: floating ones normal (drawn as float32,
    then cast), integer and bool ones 0 or 1 (valid as ids, masks and flags). ``dtype`` None is float32."""
    import torch
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype in specs:
        dt = getattr(torch, dtype, None) if dtype else torch.float32
        if not isinstance(dt, torch.dtype):
            dt = torch.float32
        if dt.is_floating_point or dt.is_complex:
            x = torch.randn(tuple(shape), generator=gen)
            out.append(x if dt == torch.float32 else x.to(dt))
        elif dt == torch.bool:
            out.append(torch.randint(0, 2, tuple(shape), generator=gen).bool())
        else:
            out.append(torch.randint(0, 2, tuple(shape), generator=gen).to(dt))
    return out


def run_onnx(path: str, inputs: Sequence[Any], names: Optional[Sequence[str]] = None) -> List[Any]:
    """The outputs onnxruntime (CPU) gives for ``inputs`` (torch tensors, fed in the graph's input order, a
    bfloat16 one as float32, which onnxruntime's CPU kernels take), as torch tensors."""
    import onnxruntime as ort
    import torch
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = [i.name for i in sess.get_inputs()] if names is None else list(names)
    if len(feed) != len(inputs):
        raise UsageError(f"the ONNX model takes {len(feed)} inputs ({', '.join(feed)}), {len(inputs)} given", path)
    try:
        got = sess.run(None, {n: x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
                              for n, x in zip(feed, inputs)})
    except Exception as e:  # onnxruntime's errors: shapes and types the graph does not take
        shown = ", ".join("x".join(map(str, x.shape)) for x in inputs)
        raise UsageError(f"onnxruntime cannot run the model on inputs of shape {shown}: "
                         f"{str(e).splitlines()[0][:200]}", path) from None
    return [torch.from_numpy(g) for g in got]


@dataclass(frozen=True)
class Difference:
    """How one output differs from its reference: the largest absolute and relative differences, and
    whether every element is within ``atol + rtol * |ref|`` (NaN equal to NaN)."""

    max_abs: float
    max_rel: float
    close: bool


def difference(got: Any, ref: Any, atol: float, rtol: float) -> Difference:
    """``got`` against ``ref`` (same shape), compared in float64."""
    import torch
    g64, r64 = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    diff = (g64 - r64).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = diff / r64.abs().clamp_min(1e-12)
    max_rel = float(rel.max()) if rel.numel() else 0.0
    return Difference(max_abs, max_rel, bool(torch.allclose(g64, r64, atol=atol, rtol=rtol, equal_nan=True)))
