"""torch.save's zip format (torch >= 1.6), read without torch.

Layout: ``<folder>/data.pkl`` (the pickle), ``<folder>/data/<key>`` (one
record per storage, usually stored uncompressed and 64-byte aligned),
``<folder>/byteorder``, ``<folder>/version``. The folder is ``archive`` for
files saved to a path ending ``.pt`` by recent torch, but older torch used the
file's stem, and tools that rewrite archives pick their own: it is found, not
assumed.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from typing import Dict, Optional

from ..errors import FormatError
from ..records import Checkpoint, FileSpan, StorageRef, new_storage_ref
from .safe_pickle import load_stream, parse_storage_pid, safe_load, storage_nbytes

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
# data.pkl holds structure, not tensor bytes: even 100k-tensor models stay far below this.
MAX_PICKLE = 2 << 30
# torch writes data.pkl stored; tools that re-zip compress it. 64 MiB holds ~600,000 tensor records.
MAX_COMPRESSED_PICKLE = 64 << 20
# what zipfile raises on records it cannot read (RuntimeError: encrypted; ValueError: bad names, sizes)
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError, RuntimeError,
              struct.error)
_KNOWN_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


_CENTRAL = struct.Struct(zipfile.structCentralDir)


class _ZipFile(zipfile.ZipFile):
    """A ZipFile whose central directory is read in one tight loop where it is plain, as torch writes it.

    zipfile's own reader makes each entry through four reads of a BytesIO and an extra-field parse:
    51 ms for the 20,006 records of a 20,000-tensor checkpoint, against 32 ms here. An entry with
    extra fields or a comment (zip64 sizes, timestamps), a version zipfile cannot read, or anything
    malformed hands the whole directory back to zipfile's reader, which also makes its errors.
    """

    def _RealGetContents(self):
        if not self._plain_contents():
            self.filelist, self.NameToInfo = [], {}
            super()._RealGetContents()

    def _plain_contents(self) -> bool:
        if self.debug or getattr(self, "metadata_encoding", None):
            return False
        fp = self.fp
        try:
            endrec = zipfile._EndRecData(fp)
        except OSError:
            return False
        if not endrec:
            return False
        size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]
        concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd
        if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        start = offset_cd + concat
        if start < 0:
            return False
        fp.seek(start, 0)
        data = fp.read(size_cd)
        if len(data) != size_cd:
            return False
        unpack, info_of, newest = _CENTRAL.unpack_from, zipfile.ZipInfo, zipfile.MAX_EXTRACT_VERSION
        filelist, by_name = [], {}
        pos = 0
        while pos < size_cd:
            if pos + 46 > size_cd:
                return False
            (sig, create_version, create_system, extract_version, reserved, flags, compress_type, t, d, crc,
             compress_size, file_size, name_len, extra_len, comment_len, volume, internal_attr, external_attr,
             header_offset) = unpack(data, pos)
            if sig != zipfile.stringCentralDir or extra_len or comment_len or extract_version > newest:
                return False
            raw = data[pos + 46:pos + 46 + name_len]
            pos += 46 + name_len
            if len(raw) != name_len:
                return False
            x = info_of(raw.decode("utf-8") if flags & 0x800 else raw.decode("cp437"))  # the UTF-8 name flag
            x.create_version, x.create_system, x.extract_version, x.reserved = (create_version, create_system,
                                                                               extract_version, reserved)
            x.flag_bits, x.compress_type, x.CRC = flags, compress_type, crc
            x.compress_size, x.file_size = compress_size, file_size
            x.volume, x.internal_attr, x.external_attr = volume, internal_attr, external_attr
            x._raw_time = t
            x.date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)
            x.header_offset = header_offset + concat
            filelist.append(x)
            by_name[x.filename] = x
        if pos != size_cd:
            return False
        if "_end_offset" in getattr(info_of, "__slots__", ()):  # zipfile's overlap check (newer Pythons)
            end = start
            for x in sorted(filelist, key=lambda i: i.header_offset, reverse=True):
                x._end_offset = end
                end = x.header_offset
        self._comment = endrec[zipfile._ECD_COMMENT]
        self.start_dir = start
        self.filelist, self.NameToInfo = filelist, by_name
        return True


def open_zip(path: str) -> zipfile.ZipFile:
    """Open a zip archive; anything wrong with its directory is a FormatError."""
    try:
        return _ZipFile(path)
    except zipfile.BadZipFile as e:
        raise FormatError(f"not a valid zip archive, or truncated: {e}", path) from None
    except (OSError, ValueError, EOFError, struct.error, NotImplementedError) as e:
        raise FormatError(f"unreadable zip archive: {e}", path) from None


def find_record_folder(zf: zipfile.ZipFile, path: str, marker: str = "data.pkl") -> str:
    """The folder holding ``data.pkl`` (``archive/``, the file's stem, or another name)."""
    hits = [n for n in zf.namelist() if n.endswith("/" + marker) and n.count("/") == 1]
    if not hits:
        if marker in zf.namelist():
            return ""
        raise FormatError(f"zip archive has no {marker}: not a PyTorch checkpoint", path)
    if len(set(hits)) > 1:
        raise FormatError(f"zip archive has {len(set(hits))} {marker} records ({', '.join(sorted(set(hits))[:3])})", path)
    return hits[0][: -len(marker)]


def read_member(zf: zipfile.ZipFile, name: str, path: str, limit: Optional[int] = None) -> bytes:
    """Read a whole small record (checked against its CRC)."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FormatError(f"zip archive has no record {name}", path) from None
    if limit is not None and info.file_size > limit:
        raise FormatError(f"record {name} declares {info.file_size} bytes, more than {limit}", path)
    try:
        return zf.read(info)
    except ZIP_ERRORS as e:  # RuntimeError: an encrypted record
        raise FormatError(f"record {name} is corrupt, truncated or encrypted: {e}", path) from None


def _member_start(info: zipfile.ZipInfo, path: str, file_size: int) -> int:
    """Where a stored record's bytes start, from its local header (checked)."""
    with open(path, "rb") as f:
        head = os.pread(f.fileno(), _LOCAL_HEADER.size, info.header_offset)
    if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise FormatError(f"record {info.filename} has no valid local header", path)
    fields = _LOCAL_HEADER.unpack(head)
    start = info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]  # name, extra lengths
    if start + info.file_size > file_size:
        raise FormatError(f"record {info.filename} runs past the end of the file (truncated?)", path)
    return start


class _StoredMember(FileSpan):
    """A stored record's bytes: a FileSpan whose offset comes from the local header, read and
    checked on first use (a class, not a closure per record: archives hold 20,000 of them)."""

    def __init__(self, path: str, info: zipfile.ZipInfo, file_size: int):
        super().__init__(path, size=info.file_size)
        self._info = info
        self._file_size = file_size

    def _locate(self) -> int:
        info, self._info = self._info, None
        return _member_start(info, self.path, self._file_size)


class _CompressedMember:
    """A deflated record: decompressed on each read (rare; tools that re-zip do this)."""

    def __init__(self, zf_path: str, name: str, size: int):
        self.path, self.name, self.size = zf_path, name, size

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        with zipfile.ZipFile(self.path) as zf:
            try:
                with zf.open(self.name) as f:
                    f.seek(start)
                    data = f.read(size)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError,
                    ValueError, struct.error) as e:
                raise FormatError(f"record {self.name} is corrupt: {e}", self.path) from None
        if len(data) != size:
            raise FormatError(f"record {self.name} is truncated", self.path)
        return data


def storage_loader(zf: zipfile.ZipFile, folder: str, path: str, file_size: int, data_dir: str = "data/"):
    """The persistent_load for a zip archive: storage ids -> StorageRef on ``<folder>/data/<key>``."""
    cache: Dict[str, StorageRef] = {}
    prefix = folder + data_dir
    records = zf.NameToInfo  # what zf.getinfo looks in
    stored = zipfile.ZIP_STORED

    def load(pid):
        stype, key, location, numel, _ = parse_storage_pid(pid)
        ref = cache.get(key)
        if ref is not None:
            return ref
        name = prefix + key
        info = records.get(name)
        if info is None:
            raise FormatError(f"storage {key!r} has no record {name} in the archive")
        nbytes = storage_nbytes(stype, numel)
        if info.file_size < nbytes:
            raise FormatError(f"storage {key!r} needs {nbytes} bytes but its record holds {info.file_size}")
        compression = info.compress_type
        if compression == stored:
            source = _StoredMember(path, info, file_size)
        elif compression in _KNOWN_COMPRESSION:
            source = _CompressedMember(path, name, info.file_size)
        else:
            raise FormatError(f"storage {key!r} uses unknown zip compression method {compression}")
        ref = cache[key] = new_storage_ref(key, stype.dtype, location, nbytes, source, path)
        return ref

    return load


def read_zip_pickle(path: str, zf: zipfile.ZipFile, folder: str, name: str = "data.pkl"):
    """Unpickle ``<folder>/<name>`` safely with its storages as lazy StorageRefs."""
    file_size = os.path.getsize(path)
    loader = storage_loader(zf, folder, path, file_size)
    info = zf.NameToInfo.get(folder + name)
    if info is None or info.compress_type == zipfile.ZIP_STORED:
        return safe_load(read_member(zf, folder + name, path, limit=MAX_PICKLE), loader, path)
    # A compressed pickle is streamed, never inflated whole: a tiny record can declare gigabytes, and each
    # one-byte opcode can make a ~64-byte object, so its size is capped far below a stored one's.
    if info.file_size > MAX_COMPRESSED_PICKLE:
        raise FormatError(f"record {info.filename} is compressed and declares {info.file_size} bytes, more than "
                          f"{MAX_COMPRESSED_PICKLE}", path)
    try:
        with zf.open(info) as f:
            return load_stream(f, loader, path, size=info.file_size)
    except ZIP_ERRORS as e:
        raise FormatError(f"record {info.filename} is corrupt, truncated or encrypted: {e}", path) from None


def zip_metadata(zf: zipfile.ZipFile, folder: str, path: str) -> Dict[str, str]:
    meta = {"archive_folder": folder.rstrip("/")}
    for rec in ("byteorder", "version", ".data/version", ".format_version", ".storage_alignment"):
        name = folder + rec
        if name in zf.NameToInfo and zf.NameToInfo[name].file_size < 64:
            meta[rec.lstrip(".").replace("/", "_")] = read_member(zf, name, path).decode("ascii", "replace").strip()
    if meta.get("byteorder", "little") != "little":
        meta["note"] = "big-endian file: tensor bytes are big-endian"
    return meta


def read(path: str, zf: Optional[zipfile.ZipFile] = None) -> Checkpoint:
    """Read a torch.save zip checkpoint's structure (no tensor bytes).

    ``zf``: the archive already open on ``path`` (as format detection leaves it); it is closed here.
    """
    if zf is None:
        zf = open_zip(path)
    with zf:
        folder = find_record_folder(zf, path)
        root, globs = read_zip_pickle(path, zf, folder)
        meta = zip_metadata(zf, folder, path)
    return Checkpoint(path=path, format="torch_zip", file_size=os.path.getsize(path), root=root,
                      metadata=meta, globals=globs, files=(path,))
