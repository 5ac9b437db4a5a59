"""ckpttool: inspect, compare, fit, remap, convert and verify PyTorch checkpoints.

The library API; nothing here imports torch until a function needs it.

>>> import ckpttool
>>> r = ckpttool.inspect("model.pt")        # doctest: +SKIP
>>> ckpt = ckpttool.open("model.safetensors")  # doctest: +SKIP
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__", "open", "detect", "inspect", "find_state_dict", "tensor_stats",
    "diff", "filter_state_dict", "load_into", "convert", "remap", "verify", "scan",
    "Checkpoint", "TensorRef", "StorageRef", "InspectResult", "TensorInfo", "DiffResult", "FilterResult",
    "ConvertResult", "RemapResult", "VerifyReport", "ScanResult",
    "CkptError", "FormatError", "FileAccessError", "KeyNotFoundError", "UsageError",
    "TrustRequiredError", "MissingDependencyError", "CheckFailedError",
]

_LAZY = {
    "open": ("ckpttool.formats", "open"),
    "detect": ("ckpttool.formats", "detect"),
    "inspect": ("ckpttool.summary", "inspect"),
    "tensor_stats": ("ckpttool.summary", "tensor_stats"),
    "find_state_dict": ("ckpttool.tree", "find_state_dict"),
    "diff": ("ckpttool.diffing", "diff"),
    "filter_state_dict": ("ckpttool.filtering", "filter_state_dict"),
    "load_into": ("ckpttool.filtering", "load_into"),
    "DiffResult": ("ckpttool.records", "DiffResult"),
    "convert": ("ckpttool.converting", "convert"),
    "remap": ("ckpttool.remapping", "remap"),
    "verify": ("ckpttool.verifying", "verify"),
    "scan": ("ckpttool.scanning", "scan"),
    "ScanResult": ("ckpttool.records", "ScanResult"),
    "VerifyReport": ("ckpttool.records", "VerifyReport"),
    "ConvertResult": ("ckpttool.records", "ConvertResult"),
    "RemapResult": ("ckpttool.records", "RemapResult"),
    "FilterResult": ("ckpttool.records", "FilterResult"),
    "CheckFailedError": ("ckpttool.errors", "CheckFailedError"),
    "Checkpoint": ("ckpttool.records", "Checkpoint"),
    "TensorRef": ("ckpttool.records", "TensorRef"),
    "StorageRef": ("ckpttool.records", "StorageRef"),
    "InspectResult": ("ckpttool.records", "InspectResult"),
    "TensorInfo": ("ckpttool.records", "TensorInfo"),
    "CkptError": ("ckpttool.errors", "CkptError"),
    "FormatError": ("ckpttool.errors", "FormatError"),
    "FileAccessError": ("ckpttool.errors", "FileAccessError"),
    "KeyNotFoundError": ("ckpttool.errors", "KeyNotFoundError"),
    "UsageError": ("ckpttool.errors", "UsageError"),
    "TrustRequiredError": ("ckpttool.errors", "TrustRequiredError"),
    "MissingDependencyError": ("ckpttool.errors", "MissingDependencyError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckpttool' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
