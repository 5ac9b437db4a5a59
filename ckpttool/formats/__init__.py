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

# Every format, registered once: its name (a Checkpoint's ``format``, what detect() gives), the module that
# reads it (imported only when a file of it is opened) and what it is, in words. "index" is what detect()
# calls a shard index (a .json or a folder holding one), opened as safetensors_sharded or torch_sharded.
READERS = {
    "torch_zip": ("torch_zip", "torch.save zip archive (torch >= 1.6)"),
    "torch_legacy": ("torch_legacy", "torch.save legacy format (torch < 1.6, _use_new_zipfile_serialization=False)"),
    "torchscript": ("torchscript", "TorchScript archive (torch.jit.save)"),
    "safetensors": ("safetensors", "safetensors"),
    "safetensors_sharded": ("sharded", "safetensors shards with a model.safetensors.index.json"),
    "torch_sharded": ("sharded", "torch.save shards with a pytorch_model.bin.index.json"),
    "onnx": ("onnx", "ONNX model (external data too)"),
    "pickle": ("bare_pickle", "a bare pickle (pickle.dump)"),
    "dcp": ("dcp", "torch.distributed.checkpoint folder"),
    "index": ("sharded", "a shard index (.index.json)"),
    "pt2": ("pt2", "torch.export archive (torch.export.save, AOTInductor package)"),
    "gguf": ("gguf", "GGUF (llama.cpp)"),
}
FORMATS = tuple(READERS)

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


def _is_dcp_folder(path: str) -> bool:
    """A torch.distributed.checkpoint folder (``.metadata``), unless a transformers or PEFT config says the
    folder is a model that from_pretrained reads from its weight files (the DCP files are then ignored)."""
    return os.path.isfile(os.path.join(path, ".metadata")) and not any(
        os.path.isfile(os.path.join(path, n)) for n in ("config.json", "adapter_config.json"))


def _folder_entry(path: str) -> str:
    """The file that stands for a checkpoint folder (its shard index, or its one checkpoint)."""
    from .folders import find
    return find(path).entry


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
        if _is_dcp_folder(path):
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
                from .pt2 import is_pt2
                if is_pt2(names):
                    return "pt2", path, archive
                raise FormatError("zip archive is not a PyTorch checkpoint (it has no data.pkl)", path)
            if archive.find("data.pkl") is None:  # raises where torch finds no archive folder
                raise FormatError(f"zip archive has no {archive.folder}data.pkl, the record torch reads: not a "
                                  f"PyTorch checkpoint", path)
            return ("torchscript" if is_torchscript(names) else "torch_zip"), path, archive
        except BaseException:
            archive.close()
            raise
    if head[:4] == b"GGUF":
        return "gguf", path, None
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

    A folder is read through the file its writing library's loader would read (a transformers model
    folder, a PEFT adapter folder, a folder of shards), and what the folder says (its config, the
    files read and ignored) is added to the checkpoint's metadata.

    >>> ckpt = open("model.pt")  # doctest: +SKIP
    >>> ckpt.format  # doctest: +SKIP
    'torch_zip'
    """
    path = os.fspath(path)
    if fmt not in (None, "", "dcp") and os.path.isdir(path) or not fmt and os.path.isdir(path) and \
            not _is_dcp_folder(path):
        from .folders import annotate, find
        folder = find(path)
        return annotate(open(folder.entry, None if fmt == "index" else fmt), folder)
    if not fmt:
        fmt, probed, archive = _detect(path)
        if archive is not None:  # a zip archive: read with the directory detection parsed
            with archive:
                return _reader(fmt, path)(probed, archive)
        path = probed
    if fmt in ("index", "safetensors_sharded", "torch_sharded"):  # the shards are opened through open()
        from .sharded import read as read_index
        return read_index(path, open)
    return _reader(fmt, path)(path)


def _reader(fmt: str, path: str):
    """The ``read`` function of ``fmt``'s module (imported now: only the formats in use are)."""
    import importlib
    if fmt not in READERS:
        raise FormatError(f"unknown format {fmt!r}", path)
    return importlib.import_module(f".{READERS[fmt][0]}", __name__).read
