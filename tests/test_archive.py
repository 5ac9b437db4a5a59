"""formats.archive: zip archives read as torch's reader (PyTorchStreamReader over miniz) reads them, and refused
where two readers of the same bytes could disagree.

The tricky archives are written byte by byte here (``build``), each from the records of a real torch.save file.
"""
from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from typing import List, Optional

import pytest
import torch
from clitools import assert_error, js, run
from hypothesis import HealthCheck, given, settings, strategies as st

from ckpttool.errors import FormatError
from ckpttool.formats import archive as archive_mod
from ckpttool.formats.archive import AmbiguousArchive, Archive


# ---------------------------------------------------------------------------------------------
# A byte-level zip writer


def build(entries: List[dict], *, prefix: bytes = b"", trailer: bytes = b"", comment: bytes = b"",
          descriptor: bool = False, zip64: bool = False, count: Optional[int] = None, before_end: bytes = b"",
          z64_count: Optional[int] = None, eocd_count: Optional[int] = None) -> bytes:
    """A zip of ``entries`` (dicts: ``name``, ``data``; optional ``method`` 0/8, ``crc``, ``flags`` and the local
    header's own ``lname``, ``lmethod``, ``lflags``, ``lsizes`` (crc, csize, size), ``dd`` (descriptor bytes),
    ``after`` (bytes after the record), ``offset`` (the directory's header offset), ``csize``, ``size``)."""
    out = bytearray(prefix)
    central = []
    for e in entries:
        name = e["name"].encode() if isinstance(e["name"], str) else e["name"]
        data = e["data"]
        method = e.get("method", 0)
        if method == 8:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            comp = c.compress(data) + c.flush()
        else:
            comp = data
        crc = e.get("crc", zlib.crc32(data))
        flags = e.get("flags", 0x8 if descriptor else 0)
        csize = e.get("csize", len(comp))
        size = e.get("size", len(data))
        offset = len(out)
        lname = e.get("lname", name)
        lflags = e.get("lflags", flags)
        lsizes = e.get("lsizes", (0, 0, 0) if flags & 8 else (crc, csize, size))
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, lflags, e.get("lmethod", method), 0, 0x21, *lsizes,
                           len(lname), 0) + lname + comp
        if flags & 8:
            out += e.get("dd", struct.pack("<4s3L", b"PK\x07\x08", crc, csize, size))
        out += e.get("after", b"")
        central.append((name, method, crc, csize, size, e.get("offset", offset), flags))
    cd_start = len(out)
    for name, method, crc, csize, size, offset, flags in central:
        if zip64:
            extra = struct.pack("<HHQQQ", 1, 24, size, csize, offset)
            out += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, flags, method, 0, 0x21, crc, 0xFFFFFFFF,
                               0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + name + extra
        else:
            out += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, method, 0, 0x21, crc, csize, size,
                               len(name), 0, 0, 0, 0, 0, offset) + name
    cd_size = len(out) - cd_start
    out += before_end
    n = len(central) if count is None else count
    if zip64:
        z64 = len(out)
        zn = n if z64_count is None else z64_count
        out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, zn, zn, cd_size, cd_start)
        out += struct.pack("<4sLQL", b"PK\x06\x07", 0, z64, 1)
        en = 0xFFFF if eocd_count is None else eocd_count
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, en, en, 0xFFFFFFFF, 0xFFFFFFFF, len(comment)) + comment
    else:
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, cd_size, cd_start, len(comment)) + comment
    return bytes(out + trailer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("archive") / "archive.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64), "n": 7}, path)
    return str(path)


@pytest.fixture(scope="module")
def members(saved) -> List[dict]:
    with zipfile.ZipFile(saved) as z:
        return [{"name": i.filename, "data": z.read(i)} for i in z.infolist()]


def write(tmp_path, data: bytes, name: str = "t.pt") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def same_as_torch(path: str) -> Archive:
    """Every record reads as torch's PyTorchFileReader reads it, and the two list the same records."""
    reader = torch._C.PyTorchFileReader(path)
    with Archive.open(path) as a:
        folder = a.folder
        assert sorted(reader.get_all_records()) == sorted(n[len(folder):] for n in a.names())
        for rec in a.records:
            name = rec.name[len(folder):]
            ours = a.read(rec)
            assert ours == bytes(reader.get_record(name)), rec.name
            assert a.find(name) == rec
            with a.open_record(rec) as f:
                assert f.read() == ours
            if rec.method == 0:  # torch's offset of a stored record's bytes (what mmap=True loads from)
                assert reader.get_record_offset(name) == rec.data_offset
    return a


# ---------------------------------------------------------------------------------------------
# Ordinary archives: every record's bytes as torch reads them


def test_torch_save_archive_reads_as_torch(saved):
    a = same_as_torch(saved)
    assert a.folder == "archive/" and len(a) == len(a.records) > 5
    assert all(r.flags & 8 for r in a.records)  # torch writes data descriptors


def test_torch_jit_save_archive_reads_as_torch(tmp_path):
    p = str(tmp_path / "script.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), p)
    a = same_as_torch(p)
    assert any(n.endswith("/constants.pkl") for n in a.names())


def test_deflated_rezip_reads_as_torch(saved, tmp_path):
    p = str(tmp_path / "deflated.pt")
    with zipfile.ZipFile(saved) as zi, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zo:
        for i in zi.infolist():
            zo.writestr(i.filename, zi.read(i))
    a = same_as_torch(p)
    assert {r.method for r in a.records} == {8}
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("how", ["zipfile_force_zip64", "zip64_directory"])
def test_zip64_archive_reads_as_torch(saved, members, tmp_path, how):
    p = str(tmp_path / "z64.pt")
    if how == "zipfile_force_zip64":  # zip64 extra fields in the local headers (sizes 0xFFFFFFFF there)
        with zipfile.ZipFile(p, "w") as zo:
            for m in members:
                with zo.open(zipfile.ZipInfo(m["name"]), "w", force_zip64=True) as f:
                    f.write(m["data"])
    else:  # zip64 extra fields in the directory, zip64 end records
        open(p, "wb").write(build(members, zip64=True, descriptor=True))
    same_as_torch(p)


def test_written_without_crc32_reads_as_torch(tmp_path):
    p = str(tmp_path / "nocrc.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(4.0)}, p)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(p) as z:
        assert {i.CRC for i in z.infolist()} == {0}
        with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
            z.read(z.infolist()[0])
    same_as_torch(p)


def test_names_are_found_ignoring_case_as_torch_finds_them(members, tmp_path):
    renamed = [dict(m, name=m["name"].replace("data.pkl", "Data.PKL")) for m in members]
    p = write(tmp_path, build(renamed))
    reader = torch._C.PyTorchFileReader(p)
    with Archive.open(p) as a:
        rec = a.find("data.pkl")
        assert rec.name == "archive/Data.PKL" and a.read(rec) == bytes(reader.get_record("data.pkl"))
        assert a.find("DATA.pkl") == rec and a.find("data.pk") is None
    assert torch.load(p, weights_only=True)["n"] == 7


def test_records_match_zipfiles_fields(saved, members, tmp_path):
    """Names, methods, CRCs, sizes, header offsets and flags as zipfile reads them; data offsets after each local
    header's name and extra field; the same from the one-record-at-a-time reader as from the column reader."""
    files = [saved, write(tmp_path, build(members), "plain.pt"), write(tmp_path, build(members, zip64=True), "64.pt"),
             write(tmp_path, build([dict(m, method=8) for m in members], descriptor=True), "defl.pt")]
    for path in files:
        with zipfile.ZipFile(path) as z, Archive.open(path) as a:
            infos = z.infolist()
            assert a.names() == [i.filename for i in infos]
            for i, r in zip(infos, a.records):
                assert (r.name, r.method, r.crc, r.compressed_size, r.size, r.header_offset, r.flags) == \
                       (i.filename, i.compress_type, i.CRC, i.compress_size, i.file_size, i.header_offset, i.flag_bits)
                head = open(path, "rb").read()[i.header_offset:i.header_offset + 30]
                n, m = struct.unpack("<HH", head[26:30])
                assert r.data_offset == i.header_offset + 30 + n + m
                assert a.read(r) == z.read(i)


@pytest.mark.parametrize("kind", ["zip64", "comment", "extra", "utf8_name", "deflated", "empty_record"])
def test_other_directories_match_zipfiles_fields(tmp_path, monkeypatch, kind):
    """What zipfile writes besides torch's layout (a record comment, extra fields, zip64 fields in local headers
    and the directory, a UTF-8 name, deflated records, an empty record): read with zipfile's fields and bytes."""
    p = str(tmp_path / f"{kind}.zip")
    if kind == "zip64":  # sizes and offsets past the limit go to zip64 extra fields, as in a > 4 GiB file
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 500)
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED if kind == "deflated" else zipfile.ZIP_STORED) as z:
        info = zipfile.ZipInfo("arch\u00e9/data.pkl" if kind == "utf8_name" else "arch/data.pkl",
                               date_time=(2024, 5, 17, 13, 45, 58))
        if kind == "comment":
            info.comment = b"a record comment"
        if kind == "extra":
            info.extra = b"\xca\xfe\x04\x00abcd"
        z.writestr(info, b"\x80\x02}q\x00.", compress_type=None)
        if kind == "zip64":
            with z.open("arch/big", "w", force_zip64=True) as f:
                f.write(b"x" * 1000)
        last = ("arch/empty", b"") if kind == "empty_record" else ("arch/version", b"3\n")
        z.writestr(*last)
    with zipfile.ZipFile(p) as z, Archive.open(p) as a:
        assert a.names() == z.namelist() and len(a) == len(z.infolist())
        for i, r in zip(z.infolist(), a.records):
            assert (r.name, r.method, r.crc, r.compressed_size, r.size, r.header_offset) == \
                   (i.filename, i.compress_type, i.CRC, i.compress_size, i.file_size, i.header_offset)
            assert a.read(r) == z.read(i) and a.get(i.filename.encode().upper().decode()) == r  # ASCII case only
        if kind == "zip64":
            assert a.get("arch/version").header_offset > 500


def test_damaged_directories_are_format_errors(saved, tmp_path):
    """A central directory overwritten in its signature, lengths or name: a one-line FormatError (or, where the
    bytes still make an archive, one that names what disagrees)."""
    data = open(saved, "rb").read()
    with zipfile.ZipFile(saved) as z:
        start = z.start_dir
    for cut in (0, 1, 28, 30, 46, 60):
        bad = bytearray(data)
        bad[start + cut:start + cut + 4] = b"\xff\xfe\xfd\xfc"
        p = write(tmp_path, bytes(bad), f"bad{cut}.pt")
        with pytest.raises(FormatError) as e:
            with Archive.open(p) as a:
                a.find("data.pkl")
        assert "\n" not in str(e.value) and str(e.value).endswith(f"({p})")


def test_fast_path_and_general_path_agree(saved, members, tmp_path, monkeypatch):
    many = str(tmp_path / "many.pt")
    torch.save({f"t{i}": torch.full((i % 5,), float(i)) for i in range(300)}, many)
    files = [saved, many, write(tmp_path, build(members), "plain.pt"),
             write(tmp_path, build(members, descriptor=True), "dd.pt")]
    plain_hits = []
    real_plain = archive_mod._plain
    monkeypatch.setattr(archive_mod, "_plain", lambda *a: plain_hits.append(real_plain(*a)) or plain_hits[-1])
    fast = [(a.records, a._index, a.folder) for a in map(Archive.open, files)]
    assert all(c is not None for c in plain_hits)  # these are the layouts the column reader takes
    monkeypatch.setattr(archive_mod, "_plain", lambda *a: None)
    slow = [(a.records, a._index, a.folder) for a in map(Archive.open, files)]
    assert fast == slow


def test_a_window_of_a_file(saved, tmp_path):
    """An archive at an offset of a larger file (a .distcp holds many): offsets are the file's."""
    body = open(saved, "rb").read()
    p = write(tmp_path, b"x" * 1000 + body + b"y" * 77, "window.bin")
    with Archive.open(p, 1000, len(body)) as a, Archive.open(saved) as b:
        assert [r.name for r in a.records] == [r.name for r in b.records]
        for ra, rb in zip(a.records, b.records):
            assert ra.data_offset == rb.data_offset + 1000 and a.read(ra) == b.read(rb)
    with pytest.raises(FormatError, match="outside"):
        Archive.open(p, 1000, len(body) + 78)


# ---------------------------------------------------------------------------------------------
# CRC-32, deflate bombs, unreadable records


def test_crc_checked_unless_zero_or_not_asked(members, tmp_path):
    bad = [dict(m, crc=12345) if m["name"].endswith("data/0") else m for m in members]
    p = write(tmp_path, build(bad))
    with Archive.open(p) as a:
        rec = a.find("data/0")
        with pytest.raises(FormatError) as e:
            a.read(rec)
        assert str(e.value) == f"record archive/data/0 fails its CRC-32 check: corrupt ({p})"
        with pytest.raises(FormatError, match="fails its CRC-32 check"):
            with a.open_record(rec) as f:
                f.read()
        assert a.read(rec, check_crc=False) == members[[m["name"] for m in members].index("archive/data/0")]["data"]
    zero = write(tmp_path, build([dict(m, crc=0) for m in members]), "zero.pt")
    with Archive.open(zero) as a:
        assert all(a.read(r) for r in a.records if r.size)


def test_deflate_bomb_is_never_inflated_past_its_declared_size(tmp_path, monkeypatch):
    bomb = b"\0" * (64 << 20)
    entries = [{"name": "archive/data.pkl", "data": b"\x80\x02}q\x00."}, {"name": "archive/bomb", "data": bomb,
                                                                           "method": 8}]
    p = write(tmp_path, build(entries[:1] + [dict(entries[1], size=1000)]))  # says it inflates to 1000 bytes
    with Archive.open(p) as a:
        rec = a.get("archive/bomb")
        assert rec.size == 1000 and rec.compressed_size < 100_000
        with pytest.raises(FormatError, match="inflates to more than its declared 1000 bytes"):
            a.read(rec, check_crc=False)
        with pytest.raises(FormatError, match="more than 10"):
            a.read(rec, limit=10)
        with pytest.raises(FormatError, match="inflates to more than"):
            with a.open_record(rec, check_crc=False) as f:
                while f.read(1 << 16):
                    pass
    # declared honestly, the stream is read in pieces (never the whole 64 MiB at once)
    p2 = write(tmp_path, build(entries), "honest.pt")
    with Archive.open(p2) as a:
        with a.open_record(a.get("archive/bomb")) as f:
            sizes = []
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                sizes.append(len(block))
        assert sum(sizes) == len(bomb) and max(sizes) <= 1 << 20


def test_unsupported_compression_is_refused_on_read(members, tmp_path):
    raw = bytearray(build(members))
    at = raw.index(b"PK\x01\x02")
    struct.pack_into("<H", raw, at + 10, 12)  # bzip2 in the directory...
    struct.pack_into("<H", raw, 8, 12)  # ...and in the local header
    p = write(tmp_path, bytes(raw))
    with Archive.open(p) as a:
        with pytest.raises(FormatError, match="uses compression method 12, which torch cannot read"):
            a.read(a.find("data.pkl"))


# ---------------------------------------------------------------------------------------------
# Ambiguous archives: refused by Archive.open and by every command (inspect here)


def _shifted(members, prefix: bytes) -> bytes:
    return build(members, prefix=prefix)  # offsets past the prefix: what miniz reads; zipfile reads it too


def _two_zips(members):
    other = [dict(m, data=m["data"] + b"\0") if m["name"].endswith("data/0") else m for m in members]
    first = build(other)
    return first + build(members, prefix=b"\0" * len(first))[len(first):]


AMBIGUOUS = {
    "names equal ignoring case": (lambda m: build(m + [dict(m[0], name="archive/DATA.pkl")]),
                                  "two records named archive/data.pkl and archive/DATA.pkl, equal ignoring case"),
    "a name twice": (lambda m: build(m + [m[0]]), "two records named archive/data.pkl"),
    "an end record in the comment": (lambda m: build(m, comment=b"PK\x05\x06" + bytes(18)),
                                     "more than one end-of-central-directory record"),
    "an end record after the last": (lambda m: build(m, trailer=b"PK\x05\x06" + bytes(17)),
                                     "more than one end-of-central-directory record (a signature after the last one)"),
    "two archives in one file": (_two_zips, "more than one end-of-central-directory record"),
    "bytes after the end record": (lambda m: build(m, trailer=b"\0" * 8),
                                   "the end record's comment is 0 bytes but 8 bytes follow it"),
    "local name differs": (lambda m: build([dict(m[0], lname=b"archive/xata.pkl")] + m[1:]),
                           "record archive/data.pkl's local header names it 'archive/xata.pkl'"),
    "local sizes differ": (lambda m: build([dict(m[0], lsizes=(zlib.crc32(m[0]["data"]), 3, 3))] + m[1:]),
                           "record archive/data.pkl's local header says CRC"),
    "local method differs": (lambda m: build([dict(m[0], lmethod=8)] + m[1:]),
                             "record archive/data.pkl's local header says compression method 8, its directory entry 0"),
    "local flags differ": (lambda m: build([dict(m[0], lflags=0x800)] + m[1:]),
                           "record archive/data.pkl's local header has flags 0x800, its directory entry 0x0"),
    "descriptor differs": (lambda m: build([dict(m[0], dd=struct.pack("<4s3L", b"PK\x07\x08", 1, 2, 3))] + m[1:],
                                           descriptor=True),
                           "record archive/data.pkl's data descriptor says CRC 0x1 and sizes 2/3"),
    "overlapping records": (lambda m: build(m[:-1] + [dict(m[-1], offset=0)]), "overlap"),
    "bytes before the first record": (lambda m: _shifted(m, b"JUNK" * 4),
                                      "16 bytes before the first record archive/data.pkl"),
    "bytes between records": (lambda m: build([dict(m[0], after=b"\0" * 8)] + m[1:]),
                              "8 bytes between records archive/data.pkl and archive/"),
    "bytes between the last record and the directory": (
        lambda m: build(m[:-1] + [dict(m[-1], after=b"\0" * 5)]),
        "5 bytes between record archive/.data/serialization_id and the central directory"),
    "bytes between the directory and the end record": (lambda m: build(m, before_end=b"\0" * 3),
                                                       "3 bytes between the central directory and the end record"),
    "a smaller entry count": (lambda m: build(m, count=len(m) - 1), "the central directory holds"),
    "a larger entry count": (lambda m: build(m, count=len(m) + 1), "the central directory holds"),
    "zip64 and 32-bit end records disagree": (lambda m: build(m, zip64=True, eocd_count=len(m) - 1),
                                              "the end record and the zip64 end record disagree"),
    "an encrypted record": (lambda m: build([dict(m[0], flags=1)] + m[1:]), "record archive/data.pkl is encrypted"),
    "a NUL in a name": (lambda m: build(m + [dict(m[1], name=b"archive/x\0y")]), "holds a NUL byte"),
    "a stored record of two sizes": (lambda m: build([dict(m[0], csize=len(m[0]["data"]) - 1, after=b"")] + m[1:]),
                                     "stored record archive/data.pkl declares"),
}


@pytest.mark.parametrize("kind", list(AMBIGUOUS))
def test_ambiguous_archives_are_refused(members, tmp_path, kind):
    make, words = AMBIGUOUS[kind]
    p = write(tmp_path, make(members))
    with pytest.raises(AmbiguousArchive) as e:
        Archive.open(p)
    line = str(e.value)
    assert line.startswith("ambiguous archive: ") and words in line and "\n" not in line, line
    r = run("inspect", p)
    if kind == "bytes before the first record":  # torch.load takes it for a legacy file: no zip to refuse
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    else:
        assert_error(r, f"ckpttool: error: {line}")


def test_torch_reads_some_ambiguous_archives_differently_from_zipfile(members, tmp_path):
    """Why they are refused: with two names equal ignoring case, which one torch reads for data.pkl depends on
    where they stand in the directory (it binary-searches an index sorted ignoring case), zipfile reads the exact
    name; torch reads only the records the end record counts, zipfile all it finds."""
    other = b"\x80\x02}q\x00X\x01\x00\x00\x00nK\x08s."
    dup = {"name": "archive/DATA.pkl", "data": other}
    seen = set()
    for at in range(len(members) + 1):
        p = write(tmp_path, build(members[:at] + [dup] + members[at:]), f"case{at}.pt")
        seen.add(bytes(torch._C.PyTorchFileReader(p).get_record("data.pkl")))
        with zipfile.ZipFile(p) as z:
            assert z.read("archive/data.pkl") == members[0]["data"]
    assert seen == {other, members[0]["data"]}
    q = write(tmp_path, build(members, count=len(members) - 1), "count.pt")
    assert len(torch._C.PyTorchFileReader(q).get_all_records()) == len(members) - 1
    with zipfile.ZipFile(q) as z:
        assert len(z.infolist()) == len(members)


def test_records_outside_the_archive_folder_are_refused_as_torch_refuses_them(members, tmp_path):
    p = write(tmp_path, build(members + [{"name": "other/x", "data": b"1"}]))
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch._C.PyTorchFileReader(p).get_all_records()
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch.load(p, weights_only=True)
    with Archive.open(p) as a, pytest.raises(FormatError) as e:
        a.folder
    assert str(e.value) == \
        f"record other/x is not in the archive folder archive/ (torch.load refuses the archive) ({p})"
    q = write(tmp_path, build([{"name": "readme", "data": b"1"}] + members), "first.pt")
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch._C.PyTorchFileReader(q)
    with Archive.open(q) as a, pytest.raises(FormatError, match="first record readme is in no folder"):
        a.find("data.pkl")
    assert_error(run("inspect", p), f"ckpttool: error: {e.value}")


def test_broken_archives_are_one_line_format_errors(saved, tmp_path):
    data = open(saved, "rb").read()
    for cut in (0, 10, len(data) // 2, len(data) - 23, len(data) - 1):
        p = write(tmp_path, data[:cut], "cut.pt")
        if cut == 0:
            with pytest.raises(FormatError, match="empty"):
                Archive.open(p)
            continue
        with pytest.raises(FormatError) as e:
            Archive.open(p)
        assert "\n" not in str(e.value) and str(e.value).endswith(f"({p})")
    from ckpttool.errors import FileAccessError
    with pytest.raises(FileAccessError):
        Archive.open(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------
# Files written without CRC-32: every command reads them


@pytest.fixture
def nocrc(tmp_path) -> str:
    p = str(tmp_path / "nocrc.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"fc.weight": torch.randn(4, 3), "fc.bias": torch.arange(4.0)}, p)
    finally:
        torch.serialization.set_crc32_options(True)
    return p


def test_written_without_crc32_reads_in_every_command(nocrc, tmp_path):
    d = js("inspect", nocrc)
    assert d["format"] == "torch_zip" and {t["name"] for t in d["tensors"]} == {"fc.weight", "fc.bias"}
    assert js("diff", nocrc, nocrc)["equal"] is True
    for out in ("c.pt", "c.safetensors"):
        r = run("convert", nocrc, "-o", tmp_path / out, "--check")
        assert r.exit_code == 0, r.output
    r = run("remap", nocrc, "-o", tmp_path / "r.pt", "--map", "cpu=cuda", "--check")
    assert r.exit_code == 0, r.output
    r = run("remap", nocrc, "-o", tmp_path / "legacy.pt", "--map", "cpu=cpu", "--to", "legacy")
    assert r.exit_code == 0, r.output
    ref = torch.load(nocrc, weights_only=True)
    for out in ("c.pt", "r.pt", "legacy.pt"):
        back = torch.load(tmp_path / out, weights_only=True, map_location="cpu")
        assert all(torch.equal(back[k], ref[k]) for k in ref)
    r = run("filter", nocrc, "--target", nocrc, "-o", tmp_path / "f.pt")
    assert r.exit_code == 0, r.output
    from ckpttool.verifying import verify
    checks = {c.name: c for c in verify(nocrc).checks}
    assert checks["integrity"].status == "skip" and "without CRC-32" in checks["integrity"].detail
    assert checks["format round trip"].status == "pass"


# ---------------------------------------------------------------------------------------------
# Whatever the bytes: FormatError or success, never another exception; where it succeeds, torch's bytes


def _small_file(tmp_path_factory, deflated: bool) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "archive.pt"
    torch.save({"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int16)}, p)
    if not deflated:
        return p.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(p) as zi, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zo:
        for i in zi.infolist():
            zo.writestr(i.filename, zi.read(i))
    return buf.getvalue()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return [_small_file(tmp_path_factory, False), _small_file(tmp_path_factory, True)]


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x50, 0x4B, 1, 2, 3, 4, 5, 6, 7, 8]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 24))]
    return bytes(data)


def test_mutated_archives_read_or_raise_format_error(seeds, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mutants")
    disagreements = []

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(mutated(seeds))
    def check(data):
        p = str(folder / "m.pt")
        with open(p, "wb") as f:
            f.write(data)
        try:
            a = Archive.open(p)
        except FormatError:
            return
        with a:
            read = {}
            for rec in a.records:
                try:
                    read[rec.name] = a.read(rec, limit=1 << 20, check_crc=False)
                    with a.open_record(rec, check_crc=False) as f:
                        assert f.read(1 << 21) == read[rec.name]
                except FormatError:
                    pass
            try:
                folder_ = a.folder
                a.find("data.pkl")
            except FormatError:
                return
        try:
            reader = torch._C.PyTorchFileReader(p)
        except RuntimeError:
            return  # torch refuses it (no version record...): nothing to compare
        for name, ours in read.items():
            try:
                theirs = bytes(reader.get_record(name[len(folder_):]))
            except RuntimeError as e:
                disagreements.append((name, f"torch: {str(e)[:80]}"))
                continue
            if theirs != ours:
                disagreements.append((name, "bytes differ"))

    check()
    assert not disagreements, disagreements[:5]


@pytest.mark.parametrize("seed", range(3))
def test_mutated_archives_through_every_reader_are_ckpt_errors(seeds, tmp_path, seed):
    from ckpttool.errors import CkptError
    from ckpttool.formats import open as open_checkpoint
    rng = random.Random(seed)
    for n in range(150):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        p = write(tmp_path, bytes(data), f"m{n}.pt")
        try:
            open_checkpoint(p)
        except CkptError as e:
            assert "\n" not in str(e)
