"""Format detection and the one entry point: ``open(path) -> Checkpoint``.

Each format module turns a path into the same :class:`~ckpttool.records.Checkpoint`.
Detection goes by content (magic bytes), never by extension alone, so a
``.bin`` that is really a torch zip, or a ``.pt`` that is safetensors, reads right.
"""
from __future__ import annotations

import builtins
import os
import stat
from typing import Optional

from ..errors import FileAccessError, FormatError
from ..checkpoint import Checkpoint

# every name detect() and open() give (a Checkpoint's ``format``); "index" is what detect() calls a shard
# index (a .json or a folder holding one), opened as safetensors_sharded or torch_sharded
FORMATS = ("torch_zip", "torch_legacy", "torchscript", "safetensors", "safetensors_sharded",
           "torch_sharded", "onnx", "pickle", "dcp", "index")

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_path(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileAccessError("no such file or directory", path) from None
    except PermissionError:
        raise FileAccessError("permission denied", path) from None
    except OSError as e:
        raise FileAccessError(f"cannot read: {e.strerror or e}", path) from None
    if not os.access(path, os.R_OK):
        raise FileAccessError("permission denied", path)
    return st


def _folder_entry(path: str) -> str:
    """The file that stands for a checkpoint folder (its shard index, or its one checkpoint)."""
    from .sharded import INDEX_NAMES
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise FileAccessError(f"cannot list directory: {e.strerror or e}", path) from None
    for idx in INDEX_NAMES:
        if idx in names:
            return os.path.join(path, idx)
    indexes = [n for n in names if n.endswith(".index.json")]
    if len(indexes) == 1:
        return os.path.join(path, indexes[0])
    singles = [n for n in names if n in ("model.safetensors", "pytorch_model.bin")] or \
        [n for n in names if n.endswith(".onnx")]
    if len(singles) == 1:
        return os.path.join(path, singles[0])
    raise FormatError("directory holds no checkpoint (no *.index.json, model.safetensors, pytorch_model.bin "
                      "or single .onnx model)",
                      path)


def detect(path: str) -> str:
    """Name the format of ``path`` from its bytes (see ``FORMATS``); raise CkptError if none.

    >>> detect("fixtures/seed_checkpoint.tar")
    'torch_zip'
    """
    fmt, _, archive = _detect(path)
    if archive is not None:
        archive.close()
    return fmt


def _detect(path: str):
    """``(format, the file that was probed, its open Archive or None)``.

    A folder is probed through the file that stands for it; a zip archive's directory, parsed to
    tell TorchScript from torch.save, is handed on open so that ``open()`` does not parse it again
    (20,000 records take as long to list as to unpickle). The caller closes it.
    """
    st = _check_path(path)
    if stat.S_ISDIR(st.st_mode):
        if os.path.isfile(os.path.join(path, ".metadata")):
            return "dcp", path, None  # torch.distributed.checkpoint: .metadata + __R_N.distcp files
        return _detect(_folder_entry(path))
    if st.st_size == 0:
        raise FormatError("file is empty", path)
    try:
        with builtins.open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise FileAccessError(f"cannot read: {e.strerror or e}", path) from None
    if head[:4] in _ZIP_MAGIC:
        from .archive import Archive
        from .torchscript import is_torchscript
        archive = Archive.open(path)  # read as torch reads it; an ambiguous archive is refused here
        try:
            names = archive.names()
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                raise FormatError("zip archive is not a PyTorch checkpoint (it has no data.pkl)", path)
            if archive.find("data.pkl") is None:  # raises where torch finds no archive folder
                raise FormatError(f"zip archive has no {archive.folder}data.pkl, the record torch reads: not a "
                                  f"PyTorch checkpoint", path)
            return ("torchscript" if is_torchscript(names) else "torch_zip"), path, archive
        except BaseException:
            archive.close()
            raise
    from . import safetensors, torch_legacy  # not before: a zip checkpoint needs neither
    if torch_legacy.has_magic(head):
        return "torch_legacy", path, None
    if safetensors.looks_like(head, st.st_size):
        return "safetensors", path, None
    if len(head) > 262 and head[257:262] == b"ustar":
        raise FormatError("is a tar archive: the tar format of torch < 0.4 is not supported", path)
    if path.endswith(".json"):
        return "index", path, None
    if path.lower().endswith(".onnx"):
        return "onnx", path, None
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle", path, None
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version), as every ONNX model starts
        return "onnx", path, None
    raise FormatError(f"not a checkpoint format ckpttool knows (starts with {head[:8]!r})", path)


def open(path: str, fmt: Optional[str] = None) -> Checkpoint:  # noqa: A001 - the natural name
    """Read a checkpoint's structure (no tensor bytes) from any known format.

    >>> ckpt = open("model.pt")  # doctest: +SKIP
    >>> ckpt.format  # doctest: +SKIP
    'torch_zip'
    """
    path = os.fspath(path)
    if not fmt:
        fmt, probed, archive = _detect(path)
        if archive is not None:  # a torch zip or TorchScript archive: read with the directory detection parsed
            with archive:
                if fmt == "torchscript":
                    from .torchscript import read as read_script
                    return read_script(probed, archive)
                from .torch_zip import read as read_zip
                return read_zip(probed, archive)
        if fmt != "dcp":
            path = probed  # a folder's entry file, as _folder_entry names it
    if fmt == "dcp":
        from .dcp import read as read_dcp
        return read_dcp(path)
    if os.path.isdir(path):
        path = _folder_entry(path)
    if fmt == "torch_zip":
        from .torch_zip import read
    elif fmt == "torchscript":
        from .torchscript import read
    elif fmt == "torch_legacy":
        from .torch_legacy import read
    elif fmt == "safetensors":
        from .safetensors import read
    elif fmt == "onnx":
        from .onnx import read
    elif fmt == "pickle":
        from .bare_pickle import read
    elif fmt == "index":
        from .sharded import read as read_index
        return read_index(path, open)
    else:
        raise FormatError(f"unknown format {fmt!r}", path)
    return read(path)
