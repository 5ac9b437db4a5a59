"""Writing a state_dict of torch tensors as a torch.save file or a safetensors file."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional

from ..errors import FileAccessError, UsageError
from ..writing import atomic_output

TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".tar")
FORMATS = {"pt": "torch", "state_dict": "torch", "torch": "torch", "safetensors": "safetensors"}


def output_format(path: str, to: Optional[str] = None) -> str:
    """``"torch"`` or ``"safetensors"``: from ``to`` when given, else from the extension.

    >>> output_format("out.safetensors"), output_format("out.pth"), output_format("x", "pt")
    ('safetensors', 'torch', 'torch')
    """
    if to:
        if to not in FORMATS:
            raise UsageError(f"unknown output format {to!r} (pt, state_dict or safetensors)")
        return FORMATS[to]
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in TORCH_EXTENSIONS:
        return "torch"
    raise UsageError(f"cannot tell the output format from {os.path.basename(path)!r}",
                     hint="name it .pt/.pth/.bin or .safetensors, or pass --to")


def write_state_dict(tensors: Mapping[str, Any], out: str, fmt: str,
                     metadata: Optional[Dict[str, str]] = None, check: Optional[Callable[[str], None]] = None) -> None:
    """Write ``tensors`` (name -> torch.Tensor) to ``out`` atomically.

    torch: ``torch.save`` of a plain dict (loadable with ``weights_only=True``);
    tensors that are the same object stay shared. safetensors: every tensor
    stored contiguously, each on its own (safetensors holds no shared storage).
    """
    import torch
    if fmt == "safetensors":
        from .safetensors_writer import dtype_code
        for name, t in tensors.items():
            dtype_code(str(t.dtype).replace("torch.", ""))  # a UsageError naming the dtype safetensors lacks
    try:
        with atomic_output(out) as tmp:
            if fmt == "torch":
                torch.save(dict(tensors), tmp)
            else:
                from safetensors.torch import save_file
                seen: Dict[int, Any] = {}
                flat = {}
                for name, t in tensors.items():
                    t = t.contiguous()
                    if id(t) in seen or t.untyped_storage().data_ptr() in seen:
                        t = t.clone()
                    seen[id(t)] = seen[t.untyped_storage().data_ptr()] = True
                    flat[name] = t
                save_file(flat, tmp, metadata=metadata)
            if check is not None:
                check(tmp)
    except OSError as e:
        raise FileAccessError(f"cannot write the output: {e.strerror or e}", out) from None
