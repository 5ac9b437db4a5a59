"""torch.save's zip format (torch >= 1.6), read without torch.

Layout: ``<folder>/data.pkl`` (the pickle), ``<folder>/data/<key>`` (one
record per storage, usually stored uncompressed and 64-byte aligned),
``<folder>/byteorder``, ``<folder>/version``. The folder is ``archive`` for
files saved to a path ending ``.pt`` by recent torch, but older torch used the
file's stem, and tools that rewrite archives pick their own: it is found as
torch finds it (the first record's), by :class:`~ckpttool.formats.archive.Archive`,
which reads the archive as torch's reader does.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from ..errors import FormatError
from ..checkpoint import Checkpoint, new_storage_ref, StorageRef
from .archive import STORED, Archive, record_span
from .safe_pickle import load_stream, parse_storage_pid, safe_load, storage_nbytes

# data.pkl holds structure, not tensor bytes: even 100k-tensor models stay far below this.
MAX_PICKLE = 2 << 30
# torch writes data.pkl stored; tools that re-zip compress it. 64 MiB holds ~600,000 tensor records.
MAX_COMPRESSED_PICKLE = 64 << 20


def storage_loader(archive: Archive, data_dir: str = "data/"):
    """The persistent_load for a zip archive: storage ids -> StorageRef on ``<folder>/data/<key>``."""
    cache: Dict[str, StorageRef] = {}
    get, path, prefix = archive.get, archive.path, archive.folder + data_dir

    def load(pid):
        stype, key, location, numel, _ = parse_storage_pid(pid, 5)
        ref = cache.get(key)
        if ref is not None:
            return ref
        record = get(prefix + key)
        if record is None:
            raise FormatError(f"storage {key!r} has no record {archive.folder}{data_dir}{key} in the archive")
        nbytes = storage_nbytes(stype, numel)
        if record.size != nbytes:  # torch.load checks the size exactly ("record size ... does not match")
            raise FormatError(f"storage {key!r} needs {nbytes} bytes but its record holds {record.size} (torch.load "
                              "refuses a record of any other size)")
        ref = cache[key] = new_storage_ref(key, stype.dtype, location, nbytes, record_span(path, record), path)
        return ref

    return load


def read_pickle(archive: Archive, name: str = "data.pkl"):
    """Unpickle ``<folder>/<name>`` safely with its storages as lazy StorageRefs."""
    path = archive.path
    record = archive.find(name)
    if record is None:
        raise FormatError(f"zip archive has no record {archive.folder}{name}", path)
    loader = storage_loader(archive)
    if record.method == STORED:
        return safe_load(archive.read(record, limit=MAX_PICKLE), loader, path)
    # A compressed pickle is streamed, never inflated whole: a tiny record can declare gigabytes, and each
    # one-byte opcode can make a ~64-byte object, so its size is capped far below a stored one's.
    if record.size > MAX_COMPRESSED_PICKLE:
        raise FormatError(f"record {record.name} is compressed and declares {record.size} bytes, more than "
                          f"{MAX_COMPRESSED_PICKLE}", path)
    with archive.open_record(record) as f:
        return load_stream(f, loader, path, size=record.size)


def zip_metadata(archive: Archive) -> Dict[str, str]:
    folder = archive.folder
    meta = {"archive_folder": folder.rstrip("/")}
    for rec in ("byteorder", "version", ".data/version", ".format_version", ".storage_alignment"):
        record = archive.find(rec)
        if record is not None and record.size < 64:
            meta[rec.lstrip(".").replace("/", "_")] = archive.read(record).decode("ascii", "replace").strip()
    if meta.get("byteorder", "little") != "little":
        meta["note"] = "big-endian file: tensor bytes are big-endian"
    return meta


def read(path: str, archive: Optional[Archive] = None) -> Checkpoint:
    """Read a torch.save zip checkpoint's structure (no tensor bytes).

    ``archive``: the archive already open on ``path`` (as format detection leaves it); it is closed here.
    """
    if archive is None:
        archive = Archive.open(path)
    with archive:
        root, globs = read_pickle(archive)
        meta = zip_metadata(archive)
    return Checkpoint(path=path, format="torch_zip", file_size=os.path.getsize(path), root=root,
                      metadata=meta, globals=globs, files=(path,))
