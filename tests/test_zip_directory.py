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


def assert_same_directory(path) -> _ZipFile:
    ref, ours = zipfile.ZipFile(path), _ZipFile(path)
    assert [slots(i) for i in ours.filelist] == [slots(i) for i in ref.filelist]
    assert list(ours.NameToInfo) == list(ref.NameToInfo)
    assert all(ours.NameToInfo[n] is i for n, i in zip(ours.NameToInfo, ours.filelist))
    assert (ours.start_dir, ours.comment) == (ref.start_dir, ref.comment)
    for info in ref.filelist:  # and the records read the same through it
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
    assert fast_path_calls == [True]


def test_prefixed_archive_offsets(tmp_path, fast_path_calls):
    """Bytes before the archive (a self-extracting stub, a concatenation): offsets move with them."""
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(10.0)}, p)
    q = tmp_path / "prefixed.pt"
    q.write_bytes(b"#!junk prefix\n" * 7 + p.read_bytes())
    z = assert_same_directory(q)
    assert fast_path_calls == [True] and z.filelist[0].header_offset == 98


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
    assert fast_path_calls == [plain]


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
