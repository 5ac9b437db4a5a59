"""Dtype tables shared by the readers, with no torch import.

Names are torch's (``"float32"``, ``"bfloat16"``). Sizes are in bytes; the
sub-byte packed dtypes are counted by their storage unit.
"""
from __future__ import annotations

from typing import Dict, Optional

from .errors import UsageError

ITEMSIZE: Dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}

# Legacy typed-storage classes (``torch.FloatStorage``...) as they appear in pickles.
STORAGE_CLASS_DTYPE: Dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    # The untyped byte storage of torch >= 2.0; its numel counts bytes.
    "UntypedStorage": "uint8",
}

# Legacy CUDA storage classes (``torch.cuda.FloatStorage``) of very old files.
CUDA_STORAGE_MODULES = ("torch.cuda",)

# safetensors header dtype -> torch name
SAFETENSORS_DTYPE: Dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
    "C64": "complex64", "C128": "complex128",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPE.items()}
# What ckpttool writes into safetensors: the dtypes safetensors.torch can load back.
SAFETENSORS_WRITABLE = {d: TORCH_TO_SAFETENSORS[d] for d in (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "complex64", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
    "bool")}

# ONNX TensorProto.DataType numbers -> torch name (strings have no torch dtype).
ONNX_DTYPE: Dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
    14: "complex64", 15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn",
    18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4_e2m1fn_x2", 24: "float8_e8m0fnu",
}

FLOATING = {
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
}


def itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name; 0 where the size is not byte-sized.

    >>> itemsize("bfloat16")
    2
    """
    return ITEMSIZE.get(dtype, 0)


# --dtype: torch's names, their torch. spellings and the usual aliases (what every output prints is accepted)
DTYPES = {"fp16": "float16", "float16": "float16", "half": "float16", "f16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp32": "float32", "float32": "float32", "float": "float32", "f32": "float32",
          "fp64": "float64", "float64": "float64", "double": "float64", "f64": "float64"}


def parse_dtype(dtype: Optional[str]) -> Optional[str]:
    """``--dtype`` (``fp16``, ``half``, ``torch.float16``...) -> torch's dtype name, or None; a UsageError for the rest.

    >>> parse_dtype("torch.float16"), parse_dtype("bf16"), parse_dtype(None)
    ('float16', 'bfloat16', None)
    """
    if not dtype:
        return None
    name = str(dtype).lower()
    cast = DTYPES.get(name[len("torch."):] if name.startswith("torch.") else name)
    if cast is None:
        raise UsageError(f"--dtype {dtype!r}: use float16 (fp16, half), bfloat16 (bf16), float32 (fp32, float) "
                         "or float64 (fp64, double)")
    return cast
