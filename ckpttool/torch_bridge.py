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


def torch_facts() -> dict:
    """torch's version and build (CUDA / HIP), from the installed package, without importing torch.

    ``torch/version.py`` is a file of plain assignments; once torch is imported, its own answers are used.
    ``{"torch": None, ...}`` where torch is not installed.
    """
    import sys
    mod = sys.modules.get("torch")
    if mod is not None and hasattr(mod, "version"):
        return {"torch": mod.__version__, "cuda": mod.version.cuda, "hip": getattr(mod.version, "hip", None)}
    import ast
    import importlib.util
    import os
    facts = {"torch": None, "cuda": None, "hip": None}
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return facts
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            with open(os.path.join(folder, "version.py"), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):
            continue
        names = {"__version__": "torch", "cuda": "cuda", "hip": "hip"}
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
                node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(target, ast.Name) and target.id in names and isinstance(node.value, ast.Constant):
                facts[names[target.id]] = node.value.value
        break
    return facts


def accelerator_possible() -> bool:
    """Could torch see a GPU here? False only when it certainly cannot, decided without importing torch.

    torch imported already: it is asked. Otherwise, on Linux, a CUDA build needs the NVIDIA driver's
    device files (``/dev/nvidia0``..., ``/dev/dxg`` under WSL, ``/dev/nvhost-ctrl-gpu`` on Jetson), a ROCm
    build ``/dev/kfd``; Apple silicon may have MPS; elsewhere (Windows) only torch can tell.
    ``import torch`` alone costs ~630 MB and 2 s, so the commands that need it only for a device check
    skip it where this says no.
    """
    import glob
    import os
    import platform
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        mps = getattr(torch.backends, "mps", None)
        return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if not sys.platform.startswith("linux"):  # Windows and the rest: no device files to look at, ask torch
        return True
    facts = torch_facts()
    if facts["cuda"] and (glob.glob("/dev/nvidia[0-9]*") or any(os.path.exists(p) for p in _CUDA_DEVICE_FILES)):
        return True
    return bool(facts["hip"] and os.path.exists("/dev/kfd"))


# Beside /dev/nvidia0...: WSL's GPU, and Jetson's integrated GPU (no /dev/nvidiaN there)
_CUDA_DEVICE_FILES = ("/dev/dxg", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")


def from_torch(x, key: str = "0"):
    """A TensorRef over a copy of a CPU torch tensor's bytes, held in memory (a dense, contiguous tensor)."""
    import torch
    from .checkpoint import StorageRef, TensorRef
    from .spans import BufferSpan
    x = x.detach().cpu().contiguous()
    data = x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
    dtype = str(x.dtype).replace("torch.", "")
    shape = tuple(x.shape)
    stride = tuple(x.stride())
    storage = StorageRef(key=key, dtype=dtype, device="cpu", nbytes=len(data), source=BufferSpan(data))
    return TensorRef(shape=shape, dtype=dtype, stride=stride, storage=storage, device="cpu")
