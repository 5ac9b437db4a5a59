"""The one place that turns file bytes into torch tensors (imports torch lazily)."""
from __future__ import annotations

from typing import Sequence


def torch_dtype(name: str):
    """torch's dtype object for a dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    import torch
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        from .errors import FormatError
        raise FormatError(f"this torch ({torch.__version__}) has no dtype {name}")
    return dt


def tensor_from_bytes(data: bytes, dtype: str, shape: Sequence[int]):
    """A CPU tensor of ``shape`` and ``dtype`` over a copy of C-order ``data``."""
    import torch
    dt = torch_dtype(dtype)
    if not data:
        return torch.empty(tuple(shape), dtype=dt)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(dt).reshape(tuple(shape))
