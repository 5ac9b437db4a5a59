"""One zip reader for every command: torch's (``PyTorchStreamReader`` over miniz), and a refusal where
two readers of the same bytes could disagree.

What torch 2.14's reader does, measured with ``torch.load(weights_only=True)`` and
``torch._C.PyTorchFileReader`` on crafted files:

- Names are looked up ignoring ASCII case, through an index sorted that way: with ``archive/data.pkl``
  and ``archive/DATA.pkl`` torch reads one or the other depending on their places in the directory,
  zipfile reads the exact name. With a name twice, torch and zipfile read the later one.
- The archive folder is the first directory entry's name up to its first ``/``; torch refuses an
  archive whose first entry has no ``/``, and torch.load (listing the records) one with any entry outside
  that folder (compared exactly).
- The end record is the last ``PK\\5\\6`` with 22 bytes after it; a signature in the comment or in
  bytes after the end record wins over the real one. Offsets are used as they are (no zipfile-style
  shift for bytes before the archive): two zips in one file, or a zip behind other bytes, are read
  differently or refused. torch.load takes a file whose first 4 bytes are not ``PK\\3\\4`` for a
  legacy one, although its zip reader would read it. The entry count is the end record's: a smaller
  count hides the last entries from torch, not from zipfile. zip64 end records replace the 32-bit ones.
- Local headers are not compared with the directory (a different name, sizes or method in them is
  ignored; zipfile refuses a different name, streaming unzippers read the local header instead). Data
  starts after the local header's name and extra field (torch pads with an ``FB`` extra field).
- torch writes each record stored, with flag bit 3, local CRC and sizes 0 and a data descriptor
  (``PK\\7\\8``, CRC, 32-bit sizes), and always zip64 end records.
- CRC-32 is never checked: a flipped storage byte or a wrong CRC loads without a word.
  ``torch.serialization.set_crc32_options(False)`` writes CRC 0 (directory and descriptors), which
  zipfile calls corrupt. So here a CRC of 0 is not checked and any other is (``check_crc``).
- Bytes between records, after the end record or in its comment are ignored by torch and zipfile.
- Deflated records read (zipfile re-zips), bzip2/lzma ("unsupported method") and encrypted ones
  ("unsupported encryption") are refused; zip64 extra fields and end records read.

So :meth:`Archive.open` accepts only an archive whose every byte is accounted for: records back to
back from the start (each: local header that agrees with the directory, data, data descriptor where
flag bit 3 says so), then the directory, the zip64 end records, the end record and its comment.
Anything else raises :class:`AmbiguousArchive` or :class:`FormatError`, one line naming what.
"""
from __future__ import annotations

import builtins
import io
import mmap
import os
import re
import struct
import sys
import threading
import zlib
from itertools import repeat
from operator import add
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from ..errors import FileAccessError, FormatError
from ..spans import FileSpan

STORED, DEFLATED = 0, 8

_EOCD = struct.Struct("<4s4H2LH")           # end of central directory: 22 bytes + comment
_Z64_LOCATOR = struct.Struct("<4sLQL")      # 20 bytes, right before the end record
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")     # 56 bytes
_CENTRAL = struct.Struct("<4s6H3L5H2L")     # 46 bytes + name + extra + comment
_LOCAL = struct.Struct("<4s5H3L2H")         # 30 bytes + name + extra
_EXTRA = struct.Struct("<HH")
_EOCD_SIG, _Z64_LOC_SIG, _Z64_SIG = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_CENTRAL_SIG, _LOCAL_SIG, _DD_SIG = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_U32, _U16 = 0xFFFFFFFF, 0xFFFF
_ENCRYPTED = 0x0001 | 0x0040 | 0x2000       # encrypted, strong encryption, masked local headers
_DESCRIPTOR = 0x0008
_CENTRAL_SPLIT = re.compile(b"PK\x01\x02(.{42})", re.S)
_MAX_COMMENT_SEARCH = 0xFFFF + _EOCD.size   # miniz and zipfile look for the end record this far back
_GAP_SEARCH = 64 << 20                      # how much of a gap is searched for another archive's end record
_CHUNK = 1 << 20


class AmbiguousArchive(FormatError):
    """Two zip readers (torch's and another) could read different content from these bytes."""

    def __init__(self, message: str, path: Optional[str] = None, hint: Optional[str] = None):
        super().__init__("ambiguous archive: " + message, path, hint)


class Record(NamedTuple):
    """One directory entry: offsets are absolute in the file, sizes in bytes."""

    name: str              # the full name, folder included
    method: int            # 0 stored, 8 deflated
    crc: int               # CRC-32 the directory declares (0: written without one)
    compressed_size: int
    size: int
    header_offset: int     # the local header
    data_offset: int       # the record's first byte
    flags: int


_new_record = tuple.__new__


class Archive:
    """A zip archive (or a window of a file holding one) read as torch reads it.

    >>> with Archive.open("model.pt") as a:             # doctest: +SKIP
    ...     a.folder, a.read(a.find("data.pkl"))[:2]
    ('archive/', b'\\x80\\x02')
    """

    def __init__(self, path: str, buf, base: int, end: int, columns: tuple, comment: bytes):
        self.path = path
        self._buf = buf
        self.base, self.end = base, end
        # columns, one item per record in directory order; the names as one text ("\0" between names, which
        # hold none); any column may be a function that makes it, called on first use
        (self._text, self._count, self._cols) = columns[0], columns[1], dict(zip(
            ("_names", "_methods", "_crcs", "_csizes", "_sizes", "_offsets", "_datas", "_flags"), columns[2:10]))
        self._index = columns[10]
        self.comment = comment
        self._records: Optional[List[Record]] = None
        self._folder: Optional[str] = None

    def __getattr__(self, attr: str):
        cols = self.__dict__.get("_cols")
        if cols is None or attr not in cols:
            raise AttributeError(attr)
        value = cols[attr]
        if callable(value):
            value = value()
        self.__dict__[attr] = value
        return value

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path, base: int = 0, length: Optional[int] = None) -> "Archive":
        """Read the directory and every local header of the zip archive at ``[base, base + length)``
        of ``path`` (the whole file by default); FormatError / AmbiguousArchive on anything amiss."""
        path = os.fspath(path)
        try:
            f = builtins.open(path, "rb")
        except FileNotFoundError:
            raise FileAccessError("no such file or directory", path) from None
        except OSError as e:
            raise FileAccessError(f"cannot read: {e.strerror or e}", path) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if length is None:
                length = size - base
            if type(base) is not int or type(length) is not int or base < 0 or length < 0 or base + length > size:
                raise FormatError(f"zip archive window [{base}, +{length}) lies outside the {size}-byte file", path)
            if length == 0:
                raise FormatError("not a zip archive: it is empty", path)
            buf = _map(f, size, path)
        try:
            columns, comment = _read(buf, base, base + length, path)
        except BaseException:
            _close(buf)
            raise
        return cls(path, buf, base, base + length, columns, comment)

    def close(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            _close(buf)

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the directory ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def names(self) -> List[str]:
        """Every record's full name, in directory order."""
        return list(self._names)

    @property
    def records(self) -> List[Record]:
        """Every record, in directory order."""
        if self._records is None:
            self._records = list(map(_new_record, repeat(Record), zip(  # tuple.__new__: no per-record frame
                self._names, self._methods, self._crcs, self._csizes, self._sizes, self._offsets, self._datas,
                self._flags)))
        return self._records

    def _record(self, i: int) -> Record:
        return _new_record(Record, (self._names[i], self._methods[i], self._crcs[i], self._csizes[i],
                                    self._sizes[i], self._offsets[i], self._datas[i], self._flags[i]))

    @property
    def folder(self) -> str:
        """torch's archive folder, with its trailing ``/``: the first record's, which every record must be in."""
        if self._folder is None:
            if not self._count:
                raise FormatError("zip archive holds no records", self.path)
            text = self._text
            first = text[:text.find("\0")] if self._count > 1 else text
            slash = first.find("/")
            if slash < 0:
                raise FormatError(f"zip archive's first record {first} is in no folder (torch takes its archive "
                                  f"folder from it)", self.path)
            folder = first[:slash + 1]
            if ("\0" + text).count("\0" + folder) != self._count:
                bad = next(name for name in self._names if not name.startswith(folder))
                raise FormatError(f"record {bad} is not in the archive folder {folder} (torch.load refuses the "
                                  f"archive)", self.path)
            self._folder = folder
        return self._folder

    def find(self, name: str) -> Optional[Record]:
        """The record torch reads for ``folder + name`` (names compared ignoring ASCII case), or None."""
        return self.get(self.folder + name)

    def get(self, full_name: str) -> Optional[Record]:
        """The record of this full name (ignoring ASCII case, as torch does), or None."""
        i = self._index.get(full_name.encode("utf-8", "surrogateescape").lower())
        if i is None:
            return None
        if self._records is not None:
            return self._records[i]
        return self._record(i)

    # -- reading ---------------------------------------------------------------------------------

    def read(self, record: Record, limit: Optional[int] = None, check_crc: bool = True) -> bytes:
        """A record's bytes, inflated if deflated (never more than its declared size, nor ``limit``)."""
        _check_readable(record, limit, self.path)
        buf = self._buf
        if buf is None:
            raise ValueError("read from a closed Archive")
        if record.method == STORED:
            data = buf[record.data_offset:record.data_offset + record.size]
        else:
            def chunks() -> Iterator[bytes]:
                for pos in range(record.data_offset, record.data_offset + record.compressed_size, _CHUNK):
                    yield buf[pos:min(pos + _CHUNK, record.data_offset + record.compressed_size)]
            data = b"".join(_inflate(chunks(), record, self.path))
        if check_crc and record.crc and zlib.crc32(data) != record.crc:
            raise FormatError(f"record {record.name} fails its CRC-32 check: corrupt", self.path)
        return data

    def open_record(self, record: Record, check_crc: bool = True) -> io.BufferedReader:
        """A readable binary file of a record's bytes, read and inflated as it is read (for large records).
        A CRC-32 that does not match is a FormatError at its end (``check_crc``)."""
        _check_readable(record, None, self.path)
        return io.BufferedReader(_RecordReader(self.path, record, check_crc), _CHUNK)


def record_span(path: str, record: Record):
    """A span (``.read(start, size)``, ``.size``, ``.path``) of a record's bytes, read lazily from ``path``:
    a FileSpan for a stored record, an inflating reader for a deflated one."""
    _check_readable(record, None, path)
    if record.method == STORED:
        return FileSpan(path, record.data_offset, record.size)
    return _DeflatedSpan(path, record)


def _check_readable(record: Record, limit: Optional[int], path: str) -> None:
    if record.method not in (STORED, DEFLATED):
        raise FormatError(f"record {record.name} uses compression method {record.method}, which torch cannot read",
                          path)
    if limit is not None and record.size > limit:
        raise FormatError(f"record {record.name} declares {record.size} bytes, more than {limit}", path)


def _inflate(chunks, record: Record, path: str) -> Iterator[bytes]:
    """Inflate a deflated record's compressed chunks into pieces of at most ``_CHUNK`` bytes: never more
    than its declared size (a bomb stops one byte past it), or a FormatError."""
    d = zlib.decompressobj(-15)
    left = record.size
    try:
        for chunk in chunks:
            data = chunk
            while True:
                cap = min(left + 1, _CHUNK)
                out = d.decompress(data, cap)
                if len(out) > left:
                    raise FormatError(f"record {record.name} inflates to more than its declared {record.size} "
                                      f"bytes", path)
                left -= len(out)
                if out:
                    yield out
                data = d.unconsumed_tail
                if d.eof or (not data and len(out) < cap):
                    break
            if d.eof:
                break
        if not d.eof:
            raise FormatError(f"record {record.name} is corrupt or truncated: its deflate stream does not end", path)
    except zlib.error as e:
        raise FormatError(f"record {record.name} is corrupt: {e}", path) from None
    if left:
        raise FormatError(f"record {record.name} inflates to {record.size - left} bytes, its directory says "
                          f"{record.size}", path)


def _file_chunks(fd: int, offset: int, size: int, path: str) -> Iterator[bytes]:
    done = 0
    while done < size:
        block = os.pread(fd, min(_CHUNK, size - done), offset + done)
        if not block:
            raise FormatError(f"file is truncated: record data ends at byte {offset + size}", path)
        done += len(block)
        yield block


class _RecordReader(io.RawIOBase):
    """A record's bytes as a raw file, from its own file descriptor (the Archive may be closed first)."""

    def __init__(self, path: str, record: Record, check_crc: bool):
        super().__init__()
        self._path, self._record, self._check = path, record, check_crc and record.crc != 0
        self._fd = os.open(path, os.O_RDONLY)
        self._crc = 0
        self._pending = b""
        if record.method == STORED:
            self._pieces = _file_chunks(self._fd, record.data_offset, record.size, path)
        else:
            self._pieces = _inflate(_file_chunks(self._fd, record.data_offset, record.compressed_size, path),
                                    record, path)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._pending:
            piece = next(self._pieces, None)
            if piece is None:
                if self._check and self._crc != self._record.crc:
                    self._check = False
                    raise FormatError(f"record {self._record.name} fails its CRC-32 check: corrupt", self._path)
                return 0
            if self._check:
                self._crc = zlib.crc32(piece, self._crc)
            self._pending = piece
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _DeflatedSpan:
    """A deflated record as a span, inflated as it is read: reads in order continue where the last one stopped,
    a read before that starts again from the record's first byte (rare: archives re-zipped deflated)."""

    def __init__(self, path: str, record: Record):
        self.path, self.record, self.size = path, record, record.size
        self._lock = threading.Lock()
        self._state = None  # (file, pieces, position of the first pending byte, pending bytes)

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        with self._lock:
            state = self._state
            self._state = None
            if state is None or state[2] > start:
                if state is not None:
                    state[0].close()
                f = open(self.path, "rb")
                pieces = _inflate(_file_chunks(f.fileno(), self.record.data_offset, self.record.compressed_size,
                                               self.path), self.record, self.path)
                state = (f, pieces, 0, b"")
            f, pieces, pos, pending = state
            out = bytearray()
            try:
                while len(out) < size:
                    if not pending:
                        pending = next(pieces, b"")
                        if not pending:
                            raise FormatError(f"record {self.record.name} is truncated", self.path)
                    if pos + len(pending) <= start:
                        pos, pending = pos + len(pending), b""
                        continue
                    skip = max(0, start - pos)
                    take = pending[skip:skip + size - len(out)]
                    out += take
                    pos, pending = pos + skip + len(take), pending[skip + len(take):]
            except BaseException:
                f.close()
                raise
            if pos >= self.size:
                f.close()
            else:
                self._state = (f, pieces, pos, pending)
        return bytes(out)


# ---------------------------------------------------------------------------------------------
# Reading the structure


def _map(f, size: int, path: str):
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # not a regular file: read it whole
        data = f.read()
        if len(data) != size:
            raise FormatError("file changed while it was read", path) from None
        return data


def _close(buf) -> None:
    if isinstance(buf, mmap.mmap):
        try:
            buf.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
            pass


def _read(buf, base: int, end: int, path: str):
    """(columns, comment) of the archive in ``buf[base:end]``."""
    cd_start, cd_end, count, comment = _end_records(buf, base, end, path)
    with memoryview(buf) as view:  # not a copy: fresh memory costs a page fault per 4 KiB
        columns = _plain(buf, base, cd_start, view[cd_start:cd_end], count)
    if columns is None:
        columns = _general(buf, base, cd_start, buf[cd_start:cd_end], count, path)
    return columns, comment


def _end_records(buf, base: int, end: int, path: str) -> Tuple[int, int, int, bytes]:
    """(directory start, its end, entry count, comment), absolute; every byte after the directory checked."""
    if end - base < _EOCD.size:
        raise FormatError("not a zip archive, or truncated: too short for an end-of-central-directory record", path)
    pos = buf.rfind(_EOCD_SIG, max(base, end - _MAX_COMMENT_SEARCH), end - _EOCD.size + 4)
    if pos < 0:
        raise FormatError("not a zip archive, or truncated: no end-of-central-directory record", path)
    _, disk, cd_disk, here, count, cd_size, cd_offset, comment_len = _EOCD.unpack_from(buf, pos)
    after = end - pos - _EOCD.size
    if _EOCD_SIG in buf[pos + 4:end]:
        raise AmbiguousArchive("more than one end-of-central-directory record (a signature after the last one)", path)
    if comment_len != after:
        raise AmbiguousArchive(f"the end record's comment is {comment_len} bytes but {after} bytes follow it", path)
    comment = bytes(buf[pos + _EOCD.size:end])
    stop = pos  # where the directory must end
    if pos - base >= _Z64_LOCATOR.size and buf[pos - _Z64_LOCATOR.size:pos - _Z64_LOCATOR.size + 4] == _Z64_LOC_SIG:
        loc = pos - _Z64_LOCATOR.size
        _, z_disk, z_offset, disks = _Z64_LOCATOR.unpack_from(buf, loc)
        if z_disk != 0 or disks != 1:
            raise FormatError(f"zip64 locator names disk {z_disk} of {disks}: multi-disk archives are not supported",
                              path)
        z = loc - _Z64_EOCD.size
        if z < base or base + z_offset != z:
            raise AmbiguousArchive("the zip64 end record is not right before its locator", path)
        (sig, rec_size, _, _, z_disk, z_cd_disk, z_here, z_count, z_cd_size,
         z_cd_offset) = _Z64_EOCD.unpack_from(buf, z)
        if sig != _Z64_SIG:
            raise FormatError("the zip64 locator points to no zip64 end record", path)
        if rec_size != _Z64_EOCD.size - 12:
            raise AmbiguousArchive("the zip64 end record has an extensible data sector", path)
        for short, long_, sentinel in ((disk, z_disk, _U16), (cd_disk, z_cd_disk, _U16), (here, z_here, _U16),
                                       (count, z_count, _U16), (cd_size, z_cd_size, _U32),
                                       (cd_offset, z_cd_offset, _U32)):
            if short != long_ and short != sentinel:
                raise AmbiguousArchive("the end record and the zip64 end record disagree", path)
        disk, cd_disk, here, count, cd_size, cd_offset = z_disk, z_cd_disk, z_here, z_count, z_cd_size, z_cd_offset
        stop = z
    if disk != 0 or cd_disk != 0:
        raise FormatError("multi-disk zip archives are not supported", path)
    if here != count:
        raise AmbiguousArchive(f"the end record counts {count} records in all but {here} on this disk", path)
    cd_start = base + cd_offset
    cd_end = cd_start + cd_size
    if cd_end != stop and buf.rfind(_EOCD_SIG, max(base, pos - _MAX_COMMENT_SEARCH), pos) >= 0:
        # the last end record (the one torch takes) does not fit: another (a zip before it) may
        raise AmbiguousArchive("more than one end-of-central-directory record", path)
    if cd_end > stop:
        raise FormatError("not a zip archive, or truncated: the central directory runs past the end record", path)
    if cd_end < stop:
        raise AmbiguousArchive(f"{stop - cd_end} bytes between the central directory and the end record", path)
    return cd_start, cd_end, count, comment


# -- the plain layout, checked a column at a time ------------------------------------------------

_NATIVE_LITTLE = sys.byteorder == "little"


def _column(data: bytes, start: int, step: int, width: int, n: int) -> list:
    """The little-endian unsigned ints of ``width`` bytes at ``start``, ``start + step``, ... of ``data``."""
    out = bytearray(width * n)
    for k in range(width):
        out[(k if _NATIVE_LITTLE else width - 1 - k)::width] = data[start + k:start + k + step * (n - 1) + 1:step]
    return memoryview(out).cast("H" if width == 2 else "I").tolist()


def _plain(buf, base: int, cd_start: int, cd, n: int):
    """The columns of an archive laid out as torch.save or zipfile write one (every record stored, with or without
    a 16-byte data descriptor, in offset order, no extra fields in the directory, no zip64 fields), checked with
    whole-column comparisons; None where anything differs (``_general`` then decides, one record at a time)."""
    parts = _CENTRAL_SPLIT.split(cd)  # "", entry 0 after its signature (42 bytes), name 0, entry 1, name 1...
    if parts[0] or len(parts) != 2 * n + 1 or n == 0:
        return None
    fixed = b"".join(parts[1::2])
    raws = parts[2::2]
    zero = bytes(n)
    # extra and comment lengths, disk number 0; method 0 (stored)
    if any(fixed[k::42] != zero for k in (26, 27, 28, 29, 30, 31, 6, 7)):
        return None
    # one flag word for all but bit 3 (torch writes no data descriptor for an empty record), no encryption;
    # stored: compressed size == size
    low = fixed[4::42]
    if low.translate(_NO_BIT3) != bytes([fixed[4] & ~8 & 0xFF]) * n or fixed[5::42] != fixed[5:6] * n:
        return None
    if (fixed[4] | fixed[5] << 8) & _ENCRYPTED or any(fixed[16 + k::42] != fixed[20 + k::42] for k in range(4)):
        return None
    nls = _column(fixed, 24, 42, 2, n)
    if nls != list(map(len, raws)):
        return None
    joined = b"\x00".join(raws)
    if joined.count(b"\x00") != n - 1:  # a NUL in a name
        return None
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        return None
    index = dict(zip(joined.lower().split(b"\x00"), range(n)))
    if len(index) != n:
        return None
    sizes = _column(fixed, 20, 42, 4, n)
    offsets = _column(fixed, 38, 42, 4, n)
    if _U32 in sizes or _U32 in offsets or offsets[0] != 0:
        return None
    at = offsets if not base else list(map(add, offsets, repeat(base)))
    # One 46-byte piece per record: the 16 bytes before its local header (the descriptor of the record before,
    # where it has one), then the header; the first is padded in front, one more holds the last record's 16.
    pieces = [buf[o - 16:o + 30] for o in at]
    pieces[0] = bytes(16) + buf[base:base + 30]
    pieces.append(buf[cd_start - 16:cd_start] + bytes(30))
    blob = b"".join(pieces)
    if len(blob) != 46 * (n + 1):
        return None
    end = 46 * n + 16  # local header byte k of record i at blob[46 * i + 16 + k]; descriptor byte k at 46 * (i + 1) + k
    if any(blob[16 + k:end:46] != _LOCAL_SIG[k:k + 1] * n for k in range(4)):
        return None
    # local flags and method, name length as the directory's
    if any(blob[22 + k:end:46] != fixed[4 + k::42] for k in range(4)) or \
            blob[42:end:46] != fixed[24::42] or blob[43:end:46] != fixed[25::42]:
        return None
    # with flag bit 3: local CRC and sizes 0 and a descriptor that says the directory's; without: the local
    # header says them (compared as whole columns, one big integer each, masked by which records have bit 3)
    has = _int(low.translate(_BIT3_MASK))
    hasnt = _int(low.translate(_NO_BIT3_MASK))
    for k in range(12):
        want = _int(fixed[12 + k::42])
        if _int(blob[30 + k:end:46]) != want & hasnt:
            return None
        got = _int(blob[46 + 4 + k::46])
        if (got ^ want) & has:
            return None
    for k in range(4):
        if (_int(blob[46 + k::46]) ^ _int(_DD_SIG[k:k + 1] * n)) & has:
            return None
    # back to back: each record starts where the one before ends. Checked for all records at once on whole
    # columns packed as 64-bit lanes of one integer each (no lane can carry into the next: every value is below
    # 2 ** 34), so that lane i of the next offsets is offset i + 30 + name + extra + size + descriptor lengths.
    ones = _int((b"\x01" + bytes(7)) * n)
    starts = _lanes(fixed, 38, 42, 4, n)
    lengths = (_lanes(fixed, 24, 42, 2, n) + _lanes(blob, 44, 46, 2, n) + _lanes(fixed, 20, 42, 4, n) +
               _lanes(low.translate(_DD_LENGTH), 0, 1, 1, n) + 30 * ones)
    if (starts >> 64) | (cd_start - base) << (64 * (n - 1)) != starts + lengths:
        return None
    # each local name as the directory's (the headers are in bounds, so the names are)
    if [buf[o + 30:o + 30 + nl] for o, nl in zip(at, nls)] != raws:
        return None
    return (text, n, lambda: text.split("\0"), lambda: [STORED] * n, lambda: _column(fixed, 12, 42, 4, n), sizes,
            sizes, at, lambda: list(map(add, map(add, map(add, at, nls), _column(blob, 44, 46, 2, n)), repeat(30))),
            lambda: _column(fixed, 4, 42, 2, n), index)


def _int(column: bytes) -> int:
    return int.from_bytes(column, "little")


def _lanes(data: bytes, start: int, step: int, width: int, n: int) -> int:
    """The little-endian ints of ``width`` bytes at ``start``, ``start + step``, ... of ``data``, as the 64-bit
    lanes of one integer (value i in bits 64 i to 64 i + 63)."""
    out = bytearray(8 * n)
    for k in range(width):
        out[k::8] = data[start + k:start + k + step * (n - 1) + 1:step]
    return int.from_bytes(out, "little")


_NO_BIT3 = bytes(b & ~8 for b in range(256))
_BIT3_MASK = bytes(0xFF if b & 8 else 0 for b in range(256))
_NO_BIT3_MASK = bytes(0 if b & 8 else 0xFF for b in range(256))
_DD_LENGTH = bytes(16 if b & 8 else 0 for b in range(256))


# -- any layout, one record at a time ------------------------------------------------------------


def _zip64_fields(extra: bytes, wanted: List[bool], name: str, where: str, path: str) -> List[Optional[int]]:
    """The values of a zip64 extra field (id 1) for the fields marked in ``wanted`` (size, compressed size,
    header offset: 8 bytes each; disk: 4), in that order; None for each where there is no zip64 field."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = _EXTRA.unpack_from(extra, pos)
        data = extra[pos + 4:pos + 4 + size]
        if len(data) != size:
            raise FormatError(f"record {name} has a malformed extra field in its {where}", path)
        if tag == 1:
            out: List[Optional[int]] = []
            at = 0
            for i, want in enumerate(wanted):
                if not want:
                    out.append(None)
                    continue
                width = 4 if i == 3 else 8
                if at + width > len(data):
                    raise FormatError(f"record {name}'s zip64 extra field in its {where} is too short", path)
                out.append(int.from_bytes(data[at:at + width], "little"))
                at += width
            return out
        pos += 4 + size
    return [None] * len(wanted)


def _general(buf, base: int, cd_start: int, cd: bytes, count: int, path: str):
    entries = []
    pos = 0
    size_cd = len(cd)
    while pos < size_cd:
        if pos + _CENTRAL.size > size_cd:
            raise FormatError("central directory is truncated or malformed", path)
        (sig, _, _, flags, method, _, _, crc, csize, size, nl, el, cl, disk, _, _,
         offset) = _CENTRAL.unpack_from(cd, pos)
        if sig != _CENTRAL_SIG:
            raise FormatError(f"central directory entry {len(entries)} has no valid signature", path)
        stop = pos + _CENTRAL.size + nl + el + cl
        if stop > size_cd:
            raise FormatError(f"central directory entry {len(entries)} runs past the directory", path)
        raw = cd[pos + 46:pos + 46 + nl]
        extra = cd[pos + 46 + nl:pos + 46 + nl + el]
        entries.append([raw, flags, method, crc, csize, size, offset, disk, extra])
        pos = stop
    if len(entries) != count:
        raise AmbiguousArchive(f"the central directory holds {len(entries)} records, the end record says {count}",
                               path)
    names: List[str] = []
    index: Dict[bytes, int] = {}
    for i, e in enumerate(entries):
        raw = e[0]
        shown = raw.decode("utf-8", "backslashreplace")
        if b"\x00" in raw:
            raise AmbiguousArchive(f"record name {shown!r} holds a NUL byte", path)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"record name {shown!r} is not valid UTF-8 (torch cannot list it)", path) from None
        key = raw.lower()
        if key in index:
            other = names[index[key]]
            if other == name:
                raise AmbiguousArchive(f"two records named {name}", path)
            raise AmbiguousArchive(f"two records named {other} and {name}, equal ignoring case", path)
        index[key] = i
        names.append(name)
        if e[1] & _ENCRYPTED:
            raise AmbiguousArchive(f"record {name} is encrypted", path)
        csize, size, offset, disk = e[4], e[5], e[6], e[7]
        wanted = [size == _U32, csize == _U32, offset == _U32, disk == _U16]
        if any(wanted):
            z = _zip64_fields(e[8], wanted, name, "directory entry", path)
            size, csize, offset, disk = (v if w and v is not None else old
                                         for v, w, old in zip(z, wanted, (size, csize, offset, disk)))
            e[4], e[5], e[6] = csize, size, offset
        if disk != 0:
            raise FormatError(f"record {name} is on disk {disk}: multi-disk archives are not supported", path)
        if e[2] == STORED and csize != size:
            raise AmbiguousArchive(f"stored record {name} declares {size} bytes but holds {csize}", path)
    n = len(entries)
    datas = [0] * n
    for e, name in zip(entries, names):
        if base + e[6] + _LOCAL.size > cd_start:
            raise FormatError(f"record {name}'s local header lies past the start of the central directory", path)
    order = sorted(range(n), key=lambda i: entries[i][6])
    starts = [base + entries[i][6] for i in order] + [cd_start]
    if starts[0] != base:
        _gap(buf, base, starts[0], None, names[order[0]] if n else None, path)
    for k, i in enumerate(order):
        raw, flags, method, crc, csize, size, offset, _, _ = entries[i]
        name = names[i]
        head, nxt = starts[k], starts[k + 1]
        after = names[order[k + 1]] if k + 1 < n else None
        (sig, _, l_flags, l_method, _, _, l_crc, l_csize, l_size, l_nl,
         l_el) = _LOCAL.unpack_from(buf, head)
        if sig != _LOCAL_SIG:
            raise FormatError(f"record {name} has no local header at offset {offset}", path)
        l_raw = buf[head + 30:head + 30 + l_nl]
        if l_raw != raw:
            raise AmbiguousArchive(f"record {name}'s local header names it "
                                   f"{l_raw.decode('utf-8', 'backslashreplace')!r}", path)
        if l_flags != flags:
            raise AmbiguousArchive(f"record {name}'s local header has flags {l_flags:#x}, its directory entry "
                                   f"{flags:#x}", path)
        if l_method != method:
            raise AmbiguousArchive(f"record {name}'s local header says compression method {l_method}, its directory "
                                   f"entry {method}", path)
        data = head + 30 + l_nl + l_el
        if data > cd_start:
            raise FormatError(f"record {name}'s local header runs into the central directory (truncated?)", path)
        wanted = [l_size == _U32, l_csize == _U32, False, False]
        if any(wanted):
            z = _zip64_fields(buf[head + 30 + l_nl:data], wanted, name, "local header", path)
            l_size = z[0] if z[0] is not None else l_size
            l_csize = z[1] if z[1] is not None else l_csize
        local = (l_crc, l_csize, l_size)
        if local != (crc, csize, size) and not (flags & _DESCRIPTOR and local == (0, 0, 0)):
            raise AmbiguousArchive(f"record {name}'s local header says CRC {l_crc:#x} and sizes {l_csize}/{l_size}, "
                                   f"its directory entry {crc:#x} and {csize}/{size}", path)
        stop = data + csize
        if stop > nxt:
            if after is None and stop > cd_start and head < cd_start and stop <= cd_start + len(cd):
                raise AmbiguousArchive(f"record {name} overlaps the central directory", path)
            if after is None:
                raise FormatError(f"record {name} runs past the central directory (truncated?)", path)
            raise AmbiguousArchive(f"records {name} and {after} overlap", path)
        datas[i] = data
        if flags & _DESCRIPTOR:
            _descriptor(buf, stop, nxt, entries[i], name, after, path)
        elif stop != nxt:
            _gap(buf, stop, nxt, name, after, path)
    offsets = [base + e[6] for e in entries]
    return ("\0".join(names), n, names, [e[2] for e in entries], [e[3] for e in entries], [e[4] for e in entries],
            [e[5] for e in entries], offsets, datas, [e[1] for e in entries], index)


_DESCRIPTORS = {16: (True, "<L2L"), 24: (True, "<L2Q"), 12: (False, "<L2L"), 20: (False, "<L2Q")}


def _descriptor(buf, at: int, nxt: int, entry, name: str, after: Optional[str], path: str) -> None:
    """Record ``name``'s data ends at ``at``: its data descriptor must fill the bytes up to ``nxt`` (the next
    record or the directory) and agree with the directory entry."""
    layout = _DESCRIPTORS.get(nxt - at)
    blob = buf[at:nxt]
    if layout is None or (layout[0] and blob[:4] != _DD_SIG):
        _gap(buf, at, nxt, name, after, path, " (where a 12 to 24-byte data descriptor should be)")
    fields = struct.unpack(layout[1], blob[4:] if layout[0] else blob)
    crc, csize, size = entry[3], entry[4], entry[5]
    if fields != (crc, csize, size):
        raise AmbiguousArchive(f"record {name}'s data descriptor says CRC {fields[0]:#x} and sizes "
                               f"{fields[1]}/{fields[2]}, its directory entry {crc:#x} and {csize}/{size}", path)


def _gap(buf, start: int, stop: int, before: Optional[str], after: Optional[str], path: str, why: str = "") -> None:
    """Raise for the bytes ``[start, stop)``, which belong to no record."""
    where = (f"between records {before} and {after}" if before and after else
             f"before the first record {after}" if after else
             f"between record {before} and the central directory" if before else
             "before the central directory")
    if stop - start <= _GAP_SEARCH and _EOCD_SIG in buf[start:stop]:
        raise AmbiguousArchive(f"more than one end-of-central-directory record ({stop - start} bytes {where} "
                               f"hold another)", path)
    raise AmbiguousArchive(f"{stop - start} bytes {where}{why}", path)
