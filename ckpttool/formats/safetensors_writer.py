"""Writing safetensors files (single, or HF-style shards with an index) a tensor at a time.

The header is computed from metadata alone, then each tensor's C-order bytes
are streamed after it in bounded chunks: memory stays near one chunk whatever
the checkpoint's size. The header is padded with spaces to a multiple of 8,
as the safetensors library writes it, so tensors stay aligned.
"""
from __future__ import annotations

import functools
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..dtypes import SAFETENSORS_WRITABLE, TORCH_TO_SAFETENSORS, itemsize
from ..errors import UsageError



@dataclass(eq=False)
class EntryOut:
    """One tensor to write: name, dtype, shape and a function yielding its C-order bytes."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    chunks: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype) or 1
        for d in self.shape:
            n *= d
        return n


def dtype_code(dtype: str) -> str:
    """The safetensors header dtype for ``dtype``: the ones every safetensors reads, else those the installed
    safetensors writes and reads back (asked of it, once per process); a UsageError for the rest."""
    code = SAFETENSORS_WRITABLE.get(dtype)
    if code is None and TORCH_TO_SAFETENSORS.get(dtype) and installed_safetensors_holds(dtype):
        code = TORCH_TO_SAFETENSORS[dtype]
    if code is None:
        raise UsageError(f"safetensors cannot hold {dtype} tensors (the installed safetensors.torch does not write "
                         "and read them back)", hint="write a .pt state_dict instead")
    return code


@functools.lru_cache(maxsize=None)
def installed_safetensors_holds(dtype: str) -> bool:
    """Does the installed safetensors.torch save a ``dtype`` tensor and load it back as the same (dtype, shape)?
    Asked of the library itself (it imports torch), so its version decides, not a table of ckpttool's."""
    import tempfile
    try:
        import torch
        from safetensors.torch import load_file, save_file
        t = torch.zeros(2, 2, dtype=torch.uint8).view(getattr(torch, dtype))
        with tempfile.TemporaryDirectory(prefix="ckpttool-probe-") as d:  # load_file: what users call
            save_file({"x": t}, os.path.join(d, "p.safetensors"))
            back = load_file(os.path.join(d, "p.safetensors"))["x"]
        return back.dtype == t.dtype and tuple(back.shape) == tuple(t.shape)
    except Exception:  # noqa: BLE001 - any failure of the library is a no
        return False


def header_bytes(entries: Sequence[EntryOut], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The 8-byte length + JSON header for ``entries`` laid out in order."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        code = dtype_code(e.dtype)
        shape = list(e.shape)
        if code == "F4" and shape:  # safetensors counts fp4 values, two a byte: torch's last dim, doubled
            shape[-1] *= 2
        header[e.name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str, entries: Sequence[EntryOut], metadata: Optional[Dict[str, str]] = None,
                      progress: Optional[Callable[[int], None]] = None) -> None:
    """Write one safetensors file; each entry's chunks must add up to its size."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UsageError("two tensors would have the same name in the safetensors file")
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for e in entries:
            written = 0
            for chunk in e.chunks():
                f.write(chunk)
                written += len(chunk)
                if progress:
                    progress(len(chunk))
            if written != e.nbytes:
                raise ValueError(f"tensor {e.name}: wrote {written} bytes, expected {e.nbytes}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (HF's units: GB = 10**9, GiB = 2**30).

    >>> parse_size("5GB"), parse_size("200MiB"), parse_size("1024")
    (5000000000, 209715200, 1024)
    """
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"--max-shard-size {text!r} is not a size like 5GB or 500MiB")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise UsageError("--max-shard-size must be positive")
    return size


def plan_shards(entries: Sequence[EntryOut], max_bytes: int) -> List[List[EntryOut]]:
    """Split entries in order into shards of at most ``max_bytes`` (a bigger tensor gets its own shard)."""
    shards: List[List[EntryOut]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int, stem: str = "model", ext: str = ".safetensors") -> List[str]:
    """HF's names: ``model-00001-of-00003.safetensors``... (``pytorch_model-00001-of-00003.bin`` for torch.save)"""
    return [f"{stem}-{i + 1:05d}-of-{count:05d}{ext}" for i in range(count)]


INDEX = "model.safetensors.index.json"


def write_shards(folder: str, entries: Sequence[EntryOut], max_bytes: int, metadata: Optional[Dict[str, str]] = None,
                 progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """HF-style shards of at most ``max_bytes`` + ``model.safetensors.index.json`` into ``folder``; the file names.

    Each shard's header carries ``metadata``; the index carries its ``format`` entry."""
    shards = plan_shards(entries, max_bytes)
    names = shard_names(len(shards))
    for shard, name in zip(shards, names):
        write_safetensors(os.path.join(folder, name), shard, metadata, progress=progress)
    with open(os.path.join(folder, INDEX), "wb") as f:
        f.write(index_json(shards, names, {k: v for k, v in (metadata or {}).items() if k == "format"}))
    return names + [INDEX]


def index_json(shards: Sequence[Sequence[EntryOut]], names: Sequence[str],
               metadata: Optional[Dict[str, str]] = None) -> bytes:
    """``model.safetensors.index.json``: total_size and the shard of each tensor."""
    meta: Dict[str, object] = {"total_size": sum(e.nbytes for shard in shards for e in shard)}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    return index_bytes(meta, {e.name: name for shard, name in zip(shards, names) for e in shard})


def index_bytes(metadata: Dict[str, object], weight_map: Dict[str, str]) -> bytes:
    """An HF shard index (``*.index.json``) as written: ``metadata`` and each tensor's shard file."""
    return (json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n").encode("utf-8")
