"""torch_zip._ZipFile: its fast central-directory reader makes exactly the ZipInfo records zipfile makes.

It reads plain directories (no extra fields, no comments: what torch.save writes) in one loop and hands
anything else to zipfile's reader; every case here compares every slot of every record with zipfile's.
"""
from __future__ import annotations

import io
import zipfile

import pytest
import torch

from ckpttool.formats import torch_zip
from ckpttool.formats.torch_zip import _ZipFile


def slots(info: zipfile.ZipInfo) -> dict:
    names = [s for cls in type(info).__mro__ for s in getattr(cls, "__slots__", ())]
    return {s: getattr(info, s, "<unset>") for s in names}


def assert_same_directory(path, read: bool = True) -> _ZipFile:
    ref = zipfile.ZipFile(path)
    # one record at a time, before any other ZipInfo is made (what reading a torch checkpoint asks for)
    ours = _ZipFile(path)
    plain = ours._pending is not None
    if plain:  # where each record ends, as newer zipfiles (3.12+) set ZipInfo._end_offset for their overlap check
        ends, end = {}, ref.start_dir
        for i in sorted(ref.filelist, key=lambda i: i.header_offset, reverse=True):
            ends[i.filename], end = end, i.header_offset
        assert ours._end_offsets() == ends
    assert ours.names() == ref.namelist()
    for i in reversed(list(ref.NameToInfo.values())):  # the last record of a name, as getinfo
        assert ours.entry(i.filename) == (i.file_size, i.compress_type, i.header_offset)
        assert slots(ours.info(i.filename)) == slots(i)
    assert ours.entry("no/such/record") is None
    with pytest.raises(KeyError) as ref_error:
        ref.getinfo("no/such/record")
    with pytest.raises(KeyError) as our_error:
        ours.info("no/such/record")
    assert str(our_error.value) == str(ref_error.value)
    made_one_by_one = [ours.info(n) for n in ours.names()]
    assert [slots(i) for i in ours.filelist] == [slots(i) for i in ref.filelist]
    if plain:  # the ZipInfo records made first are the ones kept
        assert all(a is b for a, b in zip(made_one_by_one, ours.filelist))
    # all at once (what zipfile's own methods ask for)
    ours = _ZipFile(path)
    assert [slots(i) for i in ours.filelist] == [slots(i) for i in ref.filelist]
    assert list(ours.NameToInfo) == list(ref.NameToInfo)
    assert ours.NameToInfo == {i.filename: i for i in ours.filelist}  # each name's last record, as zipfile's
    assert (ours.start_dir, ours.comment) == (ref.start_dir, ref.comment)
    for info in ref.filelist if read else ():  # and the records read the same through it
        assert ours.read(info.filename) == ref.read(info.filename)
    return ours


@pytest.fixture
def fast_path_calls(monkeypatch):
    """How often the plain reader kept the directory (True) or gave it to zipfile's (False)."""
    seen = []
    real = _ZipFile._plain_contents

    def spy(self):
        seen.append(real(self))
        return seen[-1]
    monkeypatch.setattr(_ZipFile, "_plain_contents", spy)
    return seen


def test_torch_save_directory_is_read_plain(tmp_path, fast_path_calls):
    p = tmp_path / "m.pt"
    torch.save({f"layer{i}.weight": torch.randn(i + 1, 3) for i in range(300)} | {"ünï": torch.ones(2)}, p)
    assert_same_directory(p)
    assert fast_path_calls == [True, True]


def test_prefixed_archive_offsets(tmp_path, fast_path_calls):
    """Bytes before the archive (a self-extracting stub, a concatenation): offsets move with them."""
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(10.0)}, p)
    q = tmp_path / "prefixed.pt"
    q.write_bytes(b"#!junk prefix\n" * 7 + p.read_bytes())
    z = assert_same_directory(q)
    assert fast_path_calls == [True, True] and z.filelist[0].header_offset == 98


@pytest.mark.parametrize("kind", ["zip64", "comment", "extra", "cp437_name", "deflated"])
def test_other_directories(tmp_path, fast_path_calls, monkeypatch, kind):
    p = tmp_path / f"{kind}.zip"
    if kind == "zip64":  # sizes and offsets past the limit go to a zip64 extra field, as in a > 4 GiB file
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 500)
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED if kind == "deflated" else zipfile.ZIP_STORED) as z:
        info = zipfile.ZipInfo("arch\x8e/data.pkl" if kind == "cp437_name" else "arch/data.pkl",
                               date_time=(2024, 5, 17, 13, 45, 58))
        if kind == "comment":
            info.comment = b"a record comment"
        if kind == "extra":
            info.extra = b"\xca\xfe\x04\x00abcd"
        z.writestr(info, b"\x80\x02}q\x00.", compress_type=None)
        if kind == "zip64":
            with z.open("arch/big", "w", force_zip64=True) as f:
                f.write(b"x" * 1000)
        z.writestr("arch/version", b"3\n")
    z = assert_same_directory(p)
    if kind == "zip64":
        assert z.getinfo("arch/version").header_offset > 500 and z.getinfo("arch/version").extra
    plain = kind in ("cp437_name", "deflated")
    assert fast_path_calls == [plain, plain]


@pytest.mark.parametrize("cut", [1, 30, 60])
def test_damaged_directories_fail_as_zipfile_does(tmp_path, fast_path_calls, cut):
    """A central directory cut short or overwritten: zipfile's reader runs and raises its own error."""
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(10.0), "b": torch.ones(3)}, p)
    data = bytearray(p.read_bytes())
    start = zipfile.ZipFile(p).start_dir
    data[start + cut:start + cut + 4] = b"\xff\xfe\xfd\xfc"  # a signature, a length, a name
    q = tmp_path / "bad.pt"
    q.write_bytes(bytes(data))
    try:
        zipfile.ZipFile(q)
    except Exception as e:
        with pytest.raises(type(e)):
            _ZipFile(q)
    else:
        assert_same_directory(q)
    with pytest.raises(Exception):
        zipfile.ZipFile(io.BytesIO(bytes(data[:start + cut])))
    with pytest.raises(torch_zip.FormatError):
        torch_zip.open_zip(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("kind", ["duplicate", "nul"])
def test_names_zipfile_would_keep_twice_or_cut(tmp_path, fast_path_calls, kind):
    """A name twice (zipfile lists both, maps the last) or a name with a NUL (ZipInfo cuts it): zipfile's reader."""
    p = tmp_path / f"{kind}.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("arch/data.pkl", b"\x80\x02}q\x00.")
        if kind == "duplicate":
            with pytest.warns(UserWarning, match="Duplicate name"):
                z.writestr("arch/data.pkl", b"\x80\x02]q\x00.")
        else:
            info = zipfile.ZipInfo("arch/version")
            z.writestr(info, b"3\n")
    if kind == "nul":  # zipfile will not write a NUL in a name: put it in the central directory by hand
        data = bytearray(p.read_bytes())
        at = data.rindex(b"arch/version")
        data[at + 4] = 0
        p.write_bytes(bytes(data))
    z = assert_same_directory(p, read=kind == "duplicate")  # zipfile will not open 'arch\x00version'
    assert fast_path_calls == [False, False]
    assert len(z.filelist) == 2


def test_reading_a_checkpoint_makes_few_zipinfo_records(tmp_path, monkeypatch):
    """formats.open on a torch zip reads storages from the directory's fields: no ZipInfo for each record."""
    from ckpttool.formats import open as open_checkpoint
    p = tmp_path / "m.pt"
    torch.save({f"w{i}": torch.ones(2) * i for i in range(200)}, p)
    made = []
    real = _ZipFile._info_of
    monkeypatch.setattr(_ZipFile, "_info_of", lambda self, name, fields: made.append(name) or real(self, name, fields))
    ckpt = open_checkpoint(str(p))
    assert len(ckpt.root) == 200 and ckpt.root["w7"].read_bytes() == torch.full((2,), 7.0).numpy().tobytes()
    assert len(made) <= 6 and all(not n.split("/", 1)[1].startswith("data/") for n in made), made
