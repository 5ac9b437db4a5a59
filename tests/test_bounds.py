"""Work a file can make the reader do stays bounded: keys whose hash costs their size, compressed pickles."""
from __future__ import annotations

import io
import os
import struct
import zipfile

import pytest
import torch

import ckpttool
from ckpttool.errors import FormatError
from ckpttool.pickles.machine import MAX_KEY_BITS
from ckpttool.pickles.reading import load_stream, safe_load
from ckpttool.formats.torch_zip import MAX_COMPRESSED_PICKLE


def long4(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(data)) + data


@pytest.mark.parametrize("load", [safe_load, lambda d: load_stream(io.BytesIO(d))], ids=["in-memory", "stream"])
def test_big_int_keys_are_refused(load):
    """Hashing an int costs its size, and a tuple key is hashed anew at every probe: a 1 MiB int in 16-element
    tuple keys took 29 s for 4,000 keys before the cap."""
    big = 1 << (8 << 20)
    with pytest.raises(FormatError, match="-bit int|bits"):
        load(b"\x80\x02}" + long4(big) + b"K\x01s.")
    with pytest.raises(FormatError, match="-bit int|bits"):
        load(b"\x80\x02}(" + long4(big) + b"K\x01\x86K\x01u.")
    ok, _ = load(b"\x80\x02}" + long4(1 << (MAX_KEY_BITS - 1)) + b"K\x01s.")
    assert list(ok.values()) == [1]


def test_compressed_data_pkl_is_capped(tmp_path):
    """One-byte opcodes that each make an object: a compressed data.pkl of 100 MiB of ']' is a 100 KB file that
    needed 7 GB. A compressed pickle may declare at most MAX_COMPRESSED_PICKLE bytes."""
    six = tmp_path / "six.pt"
    torch.save({"t": torch.zeros(2)}, six)
    out = tmp_path / "amp.pt"
    with zipfile.ZipFile(six) as zi, zipfile.ZipFile(out, "w") as zo:
        for info in zi.infolist():
            if info.filename.endswith("/data.pkl"):
                zo.writestr(info.filename, b"\x80\x02" + b"]" * (MAX_COMPRESSED_PICKLE + 1) + b".",
                            compress_type=zipfile.ZIP_DEFLATED)
            else:
                zo.writestr(info, zi.read(info))
    assert os.path.getsize(out) < 1 << 20
    with pytest.raises(FormatError, match="compressed"):
        ckpttool.open(str(out))
