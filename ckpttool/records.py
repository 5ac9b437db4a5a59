"""Where the records used to live, kept so that ``from ckpttool.records import ...`` keeps working: the bytes of
a file are in :mod:`ckpttool.spans`, the checkpoint model in :mod:`ckpttool.checkpoint`, the results the commands
return in :mod:`ckpttool.results`. New code imports from those."""
from __future__ import annotations

from .checkpoint import (Checkpoint, GlobalRef, Layout, Rebuild, StorageRef, TensorRef, Value,  # noqa: F401
                         new_storage_ref, new_tensor_ref)
from .results import (CheckResult, ConvertResult, DiffResult, FilterResult, InspectResult, KeptTensor,  # noqa: F401
                      RemapResult, ScanFile, ScanGlobal, ScanResult, ShapeDrop, TensorDiff, TensorInfo, VerifyReport,
                      exit_code, new_tensor_info)
from .spans import BufferSpan, FileSpan, read_pieces  # noqa: F401
