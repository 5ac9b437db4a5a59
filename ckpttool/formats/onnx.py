"""ONNX models: initializers (name, shape, dtype) and where their bytes live.

Read with the ``onnx`` package, without loading external data: each external
initializer's file is resolved inside the model's folder (an absolute path,
``..`` or a symlink out of it is refused) and read lazily by offset.
"""
from __future__ import annotations

import math
import os
from typing import Dict

from ..dtypes import ONNX_DTYPE, itemsize
from ..errors import FileAccessError, FormatError, MissingDependencyError
from ..records import BufferSpan, Checkpoint, FileSpan, StorageRef, TensorRef
from .sharded import inside


class _LazyArray:
    """Bytes of an initializer stored in typed fields (float_data...), converted on read."""

    def __init__(self, tensor, size: int, path: str):
        self.tensor, self.size, self.path = tensor, size, path

    def read(self, start: int = 0, size=None) -> bytes:
        from onnx import numpy_helper
        return BufferSpan(numpy_helper.to_array(self.tensor).tobytes(), self.path).read(start, size)


def _import_onnx():
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise MissingDependencyError("reading ONNX files needs the onnx package",
                                     hint="pip install onnx") from None
    return onnx, DecodeError


def read(path: str) -> Checkpoint:
    """Read an ONNX model's initializers (external data located, not read)."""
    onnx, DecodeError = _import_onnx()
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, TypeError) as e:
        raise FormatError(f"not a valid ONNX model: {type(e).__name__}: {e}"[:200], path) from None
    if not model.HasField("graph"):
        raise FormatError("ONNX file has no graph", path)
    folder = os.path.dirname(os.path.abspath(path))
    tensors: Dict[str, TensorRef] = {}
    external = set()
    for init in model.graph.initializer:
        dtype = ONNX_DTYPE.get(init.data_type)
        if dtype is None:
            raise FormatError(f"initializer {init.name!r} has unknown data type {init.data_type}", path)
        shape = tuple(int(d) for d in init.dims)
        if any(d < 0 for d in shape):
            raise FormatError(f"initializer {init.name!r} has a negative dimension {list(shape)}", path)
        numel = math.prod(shape)
        nbytes = (numel + 1) // 2 if dtype in ("int4", "uint4", "float4_e2m1fn_x2") else numel * itemsize(dtype)
        kind = "string" if dtype == "string" else "dense"
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            loc = info.get("location", "")
            full = inside(folder, loc)
            if not os.path.isfile(full):
                raise FileAccessError(f"external data file {loc} of initializer {init.name!r} is missing", path)
            try:
                offset = int(info.get("offset", 0))
                length = int(info.get("length", nbytes))
            except ValueError:
                raise FormatError(f"initializer {init.name!r} has a malformed external offset/length", path) from None
            if offset < 0 or length != nbytes or offset + length > os.path.getsize(full):
                raise FormatError(f"initializer {init.name!r}: external data {loc} [{offset}, +{length}) does "
                                  f"not hold its {nbytes} bytes", path)
            source = FileSpan(full, offset, nbytes)
            external.add(loc)
        elif init.HasField("raw_data") or kind == "string":
            if kind != "string" and len(init.raw_data) != nbytes:
                raise FormatError(f"initializer {init.name!r} holds {len(init.raw_data)} bytes, needs {nbytes}", path)
            source = BufferSpan(init.raw_data, path) if kind != "string" else None
        else:
            source = _LazyArray(init, nbytes, path)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        storage = StorageRef(key=init.name, dtype=dtype, device="cpu", nbytes=nbytes, source=source, file=path)
        tensors[init.name] = TensorRef(shape=shape, dtype=dtype, stride=stride, storage=storage, kind=kind,
                                       explicit_nbytes=nbytes)
    meta = {
        "ir_version": model.ir_version, "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [i.name for i in model.graph.input if i.name not in tensors],
        "outputs": [o.name for o in model.graph.output], "nodes": len(model.graph.node),
        "external_data": sorted(external),
    }
    files = (path,) + tuple(os.path.join(folder, e) for e in sorted(external))
    size = sum(os.path.getsize(f) for f in files)
    return Checkpoint(path=path, format="onnx", file_size=size, root=tensors, metadata=meta, files=files)
