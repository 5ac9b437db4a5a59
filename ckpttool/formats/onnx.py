"""ONNX models: initializers (name, shape, dtype) and where their bytes live.

Read with the ``onnx`` package, without loading external data: each external
initializer's file is resolved inside the model's folder (an absolute path,
``..`` or a symlink out of it is refused) and read lazily by offset.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Union

from ..dtypes import ONNX_DTYPE, itemsize
from ..errors import FileAccessError, FormatError, MissingDependencyError
from ..checkpoint import Checkpoint, StorageRef, TensorRef
from ..spans import BufferSpan, FileSpan
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
                                     hint="pip install 'ckpttool[onnx]'") from None
    return onnx, DecodeError


MAX_TOP_LEVEL_FIELDS = 1 << 20


def _varint(f) -> int:
    value = shift = 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            raise EOFError
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def check_framing(path: str) -> None:
    """Walk the ModelProto's top-level protobuf fields by seeking over them.

    onnx.load parses the whole file before it can say anything is wrong; this
    reads a few bytes per top-level field, so a large file that is not ONNX is
    refused without being read.
    """
    size = os.path.getsize(path)
    seen_graph = False
    with open(path, "rb") as f:
        try:
            for _ in range(MAX_TOP_LEVEL_FIELDS):
                if f.tell() >= size:
                    break
                tag = _varint(f)
                field, wire = tag >> 3, tag & 7
                if field == 0:
                    raise ValueError("field number 0")
                if wire == 0:
                    _varint(f)
                elif wire == 1 or wire == 5:
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                elif wire == 2:
                    length = _varint(f)
                    if f.tell() + length > size:
                        raise ValueError(f"field {field} runs past the end of the file")
                    f.seek(length, os.SEEK_CUR)
                    seen_graph |= field == 7
                else:
                    raise ValueError(f"wire type {wire} of field {field}")
            else:
                raise ValueError("too many top-level fields")
            if f.tell() != size:
                raise ValueError("the last field runs past the end of the file")
        except EOFError:
            raise FormatError("not a valid ONNX model: truncated protobuf", path) from None
        except ValueError as e:
            raise FormatError(f"not a valid ONNX model: {e}", path) from None
    if not seen_graph:
        raise FormatError("not a valid ONNX model: it has no graph", path)


def value_info(v: Any) -> Dict[str, Any]:
    """A graph input or output as ``{"name", "dtype", "shape"}``, dtypes in torch's names.

    A dimension is its size, the name of a symbolic one (``"batch"``), or None where the graph says
    nothing; ``shape`` is None for an input of unknown rank, ``dtype`` names a non-tensor type
    (``"sequence"``, ``"map"``, ``"optional"``) as such.
    """
    kind = v.type.WhichOneof("value") if v.HasField("type") else None
    if kind != "tensor_type":
        return {"name": v.name, "dtype": {"sequence_type": "sequence", "map_type": "map", "optional_type": "optional",
                                          "sparse_tensor_type": "sparse"}.get(kind or "", "unknown"), "shape": None}
    tt = v.type.tensor_type
    dtype = ONNX_DTYPE.get(tt.elem_type, "unknown")
    if not tt.HasField("shape"):
        return {"name": v.name, "dtype": dtype, "shape": None}
    shape: List[Union[int, str, None]] = []
    for d in tt.shape.dim:
        which = d.WhichOneof("value")
        shape.append(int(d.dim_value) if which == "dim_value" else d.dim_param if which == "dim_param" else None)
    return {"name": v.name, "dtype": dtype, "shape": shape}


def read(path: str) -> Checkpoint:
    """Read an ONNX model's initializers (external data located, not read)."""
    check_framing(path)
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
            full = inside(folder, loc, path)
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
        # what a caller feeds and gets back (an initializer listed as an input is a weight, not an input)
        "inputs": [value_info(i) for i in model.graph.input if i.name not in tensors],
        "outputs": [value_info(o) for o in model.graph.output], "nodes": len(model.graph.node),
        "external_data": sorted(external),
    }
    files = (path,) + tuple(os.path.join(folder, e) for e in sorted(external))
    size = sum(os.path.getsize(f) for f in files)
    return Checkpoint(path=path, format="onnx", file_size=size, root=tensors, metadata=meta, files=files)
