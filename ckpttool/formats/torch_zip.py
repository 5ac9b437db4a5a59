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
from typing import Dict, Optional, Tuple

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
    """A ZipFile whose central directory is read in one tight loop where it is plain, as torch writes it,
    and whose ZipInfo records are made only when asked for.

    zipfile's own reader makes each entry through four reads of a BytesIO and an extra-field parse, and
    a ZipInfo for each: 46 ms to open a 20,000-tensor checkpoint (20,006 records), 37 ms with a ZipInfo
    made here from each entry's fields, 22 ms here keeping the fields (best of 15, this machine).
    ``names()``, ``entry(name)`` and ``info(name)`` answer from
    them, and ``filelist`` / ``NameToInfo`` (so all of zipfile's own methods) make every ZipInfo on first
    use, exactly as zipfile would. An entry with extra fields or a comment (zip64 sizes, timestamps), a
    version zipfile cannot read, a name it would change (a NUL, a backslash path on Windows), a name twice,
    or anything malformed hands the whole directory back to zipfile's reader, which also makes its errors.
    (``zipfile.Path`` copies a ZipFile's attributes into its own class, without these properties: give it
    a ``zipfile.ZipFile``.)
    """

    _pending: Optional[Dict[str, tuple]] = None  # name -> its directory fields, until the ZipInfo records are made

    def _made(self, attr: str):
        if self._pending is not None:
            self._make_all()
        return self.__dict__[attr]

    filelist = property(lambda self: self._made("_filelist"),
                        lambda self, value: self.__dict__.__setitem__("_filelist", value))
    NameToInfo = property(lambda self: self._made("_name_to_info"),
                          lambda self, value: self.__dict__.__setitem__("_name_to_info", value))

    def _RealGetContents(self):
        if not self._plain_contents():
            self._pending = None
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
        unpack, newest, central = _CENTRAL.unpack_from, zipfile.MAX_EXTRACT_VERSION, zipfile.stringCentralDir
        entries: Dict[str, tuple] = {}
        pos = count = 0
        while pos < size_cd:
            if pos + 46 > size_cd:
                return False
            fields = unpack(data, pos)
            if fields[0] != central or fields[13] or fields[14] or fields[3] > newest:  # extra, comment, version
                return False
            name_len = fields[12]
            raw = data[pos + 46:pos + 46 + name_len]
            pos += 46 + name_len
            if len(raw) != name_len or b"\x00" in raw:  # ZipInfo cuts a name at a NUL
                return False
            entries[raw.decode("utf-8") if fields[5] & 0x800 else raw.decode("cp437")] = fields  # the UTF-8 flag
            count += 1
        if pos != size_cd or len(entries) != count:  # a name twice: zipfile keeps both in its filelist
            return False
        if os.sep != "/" and any(os.sep in name for name in entries):  # ZipInfo would rewrite these names
            return False
        self._comment = endrec[zipfile._ECD_COMMENT]
        self.start_dir = start
        self._concat = concat
        self._one = {}  # ZipInfo records made one at a time by info(), reused when all are made
        self._pending = entries
        return True

    def _info_of(self, name: str, fields: tuple) -> zipfile.ZipInfo:
        (_, create_version, create_system, extract_version, reserved, flags, compress_type, t, d, crc,
         compress_size, file_size, _, _, _, volume, internal_attr, external_attr, header_offset) = fields
        x = zipfile.ZipInfo(name)
        x.create_version, x.create_system, x.extract_version, x.reserved = (create_version, create_system,
                                                                           extract_version, reserved)
        x.flag_bits, x.compress_type, x.CRC = flags, compress_type, crc
        x.compress_size, x.file_size = compress_size, file_size
        x.volume, x.internal_attr, x.external_attr = volume, internal_attr, external_attr
        x._raw_time = t
        x.date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)
        x.header_offset = header_offset + self._concat
        return x

    def _make_all(self) -> None:
        ends = self._end_offsets() if _END_OFFSET else None
        pending, self._pending = self._pending, None
        filelist = [self._one.get(n) or self._info_of(n, f) for n, f in pending.items()]
        if ends is not None:
            for x in filelist:
                x._end_offset = ends[x.filename]
        self.filelist, self.NameToInfo = filelist, {x.filename: x for x in filelist}

    def names(self) -> list:
        """``namelist()``, without making ZipInfo records."""
        return list(self._pending) if self._pending is not None else self.namelist()

    def entry(self, name: str) -> Optional[Tuple[int, int, int]]:
        """A record's ``(file_size, compress_type, header_offset)``, None where there is none (no ZipInfo made)."""
        pending = self._pending
        if pending is not None:
            f = pending.get(name)
            return None if f is None else (f[11], f[6], f[18] + self._concat)
        x = self.NameToInfo.get(name)
        return None if x is None else (x.file_size, x.compress_type, x.header_offset)

    def info(self, name: str) -> zipfile.ZipInfo:
        """``getinfo(name)``, making only that record's ZipInfo (KeyError where there is none)."""
        pending = self._pending
        if pending is None:
            return self.getinfo(name)
        x = self._one.get(name)
        if x is None:
            fields = pending.get(name)
            if fields is None:
                raise KeyError(f"There is no item named {name!r} in the archive")  # getinfo's words
            x = self._one[name] = self._info_of(name, fields)
            if _END_OFFSET:
                x._end_offset = self._end_offsets()[name]
        return x

    def _end_offsets(self) -> Dict[str, int]:
        """Where each record ends, for zipfile's overlap check (newer Pythons' ``ZipInfo._end_offset``): where
        the next record by offset starts, the directory for the last; zipfile's own order (made once)."""
        ends = self.__dict__.get("_ends")
        if ends is None:
            ends, end, concat = {}, self.start_dir, self._concat
            for name, f in sorted(self._pending.items(), key=lambda nf: nf[1][18], reverse=True):
                ends[name] = end
                end = f[18] + concat
            self._ends = ends
        return ends


_END_OFFSET = "_end_offset" in getattr(zipfile.ZipInfo, "__slots__", ())


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
    names = _names(zf)
    end = "/" + marker
    hits = [n for n in names if n.endswith(end) and n.count("/") == 1]
    if not hits:
        if marker in names:
            return ""
        raise FormatError(f"zip archive has no {marker}: not a PyTorch checkpoint", path)
    if len(set(hits)) > 1:
        raise FormatError(f"zip archive has {len(set(hits))} {marker} records ({', '.join(sorted(set(hits))[:3])})", path)
    return hits[0][: -len(marker)]


def read_member(zf: zipfile.ZipFile, name: str, path: str, limit: Optional[int] = None) -> bytes:
    """Read a whole small record (checked against its CRC)."""
    try:
        info = zf.info(name) if isinstance(zf, _ZipFile) else zf.getinfo(name)
    except KeyError:
        raise FormatError(f"zip archive has no record {name}", path) from None
    if limit is not None and info.file_size > limit:
        raise FormatError(f"record {name} declares {info.file_size} bytes, more than {limit}", path)
    try:
        return zf.read(info)
    except ZIP_ERRORS as e:  # RuntimeError: an encrypted record
        raise FormatError(f"record {name} is corrupt, truncated or encrypted: {e}", path) from None


def _names(zf: zipfile.ZipFile) -> list:
    return zf.names() if isinstance(zf, _ZipFile) else zf.namelist()


def _member_start(name: str, header_offset: int, size: int, path: str, file_size: int) -> int:
    """Where a stored record's bytes start, from its local header (checked)."""
    with open(path, "rb") as f:
        head = os.pread(f.fileno(), _LOCAL_HEADER.size, header_offset)
    if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise FormatError(f"record {name} has no valid local header", path)
    fields = _LOCAL_HEADER.unpack(head)
    start = header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]  # name, extra lengths
    if start + size > file_size:
        raise FormatError(f"record {name} runs past the end of the file (truncated?)", path)
    return start


class _StoredMember(FileSpan):
    """A stored record's bytes: a FileSpan whose offset comes from the local header, read and
    checked on first use (a class, not a closure per record: archives hold 20,000 of them)."""

    __slots__ = ("_name", "_header_offset", "_file_size")

    def __init__(self, path: str, name: str, header_offset: int, size: int, file_size: int):
        super().__init__(path, None, size)
        self._name = name
        self._header_offset = header_offset
        self._file_size = file_size

    def _locate(self) -> int:
        return _member_start(self._name, self._header_offset, self.size, self.path, self._file_size)


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


def storage_loader(zf: _ZipFile, folder: str, path: str, file_size: int, data_dir: str = "data/"):
    """The persistent_load for a zip archive: storage ids -> StorageRef on ``<folder>/data/<key>``."""
    cache: Dict[str, StorageRef] = {}
    prefix = folder + data_dir
    entry = zf.entry
    stored = zipfile.ZIP_STORED

    def load(pid):
        stype, key, location, numel, _ = parse_storage_pid(pid)
        ref = cache.get(key)
        if ref is not None:
            return ref
        name = prefix + key
        record = entry(name)
        if record is None:
            raise FormatError(f"storage {key!r} has no record {name} in the archive")
        size, compression, header_offset = record
        nbytes = storage_nbytes(stype, numel)
        if size < nbytes:
            raise FormatError(f"storage {key!r} needs {nbytes} bytes but its record holds {size}")
        if compression == stored:
            source = _StoredMember(path, name, header_offset, size, file_size)
        elif compression in _KNOWN_COMPRESSION:
            source = _CompressedMember(path, name, size)
        else:
            raise FormatError(f"storage {key!r} uses unknown zip compression method {compression}")
        ref = cache[key] = new_storage_ref(key, stype.dtype, location, nbytes, source, path)
        return ref

    return load


def read_zip_pickle(path: str, zf: _ZipFile, folder: str, name: str = "data.pkl"):
    """Unpickle ``<folder>/<name>`` safely with its storages as lazy StorageRefs."""
    file_size = os.path.getsize(path)
    loader = storage_loader(zf, folder, path, file_size)
    record = zf.entry(folder + name)
    if record is None or record[1] == zipfile.ZIP_STORED:
        return safe_load(read_member(zf, folder + name, path, limit=MAX_PICKLE), loader, path)
    info = zf.info(folder + name)
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


def zip_metadata(zf: _ZipFile, folder: str, path: str) -> Dict[str, str]:
    meta = {"archive_folder": folder.rstrip("/")}
    for rec in ("byteorder", "version", ".data/version", ".format_version", ".storage_alignment"):
        name = folder + rec
        record = zf.entry(name)
        if record is not None and record[0] < 64:
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
