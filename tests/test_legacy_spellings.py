"""torch.load reads a legacy file's magic number by value: every spelling it accepts, ckpttool reads too.

A legacy file's first pickle is compared with the magic number after unpickling, so protocol 0/1
spellings and opcodes before the value (which torch.load runs, then drops) are all the legacy format.
"""
from __future__ import annotations

import pickle

import pytest
import torch

import ckpttool
from ckpttool.formats import detect
from ckpttool.formats.torch_legacy import MAGIC_NUMBER

M2 = pickle.dumps(MAGIC_NUMBER, protocol=2)
SPELLINGS = {
    "protocol 0": pickle.dumps(MAGIC_NUMBER, protocol=0),
    "protocol 1": pickle.dumps(MAGIC_NUMBER, protocol=1),
    "framed protocol 4": pickle.dumps(MAGIC_NUMBER, protocol=4),
    "junk before the value": b"\x80\x02K\x050" + M2[2:],
    "leftover stack under the value": b"\x80\x02K\x05" + M2[2:],
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_magic_spelling_torch_accepts_reads_as_legacy(name, tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}, src, _use_new_zipfile_serialization=False)
    raw = src.read_bytes()
    assert raw.startswith(M2)
    path = tmp_path / "spelled.pt"
    path.write_bytes(SPELLINGS[name] + raw[len(M2):])
    expected = torch.load(path, weights_only=False)  # the real loader reads it (weights_only refuses junk ops)
    assert torch.equal(expected["w"], torch.arange(6.0).reshape(2, 3))
    assert detect(str(path)) == "torch_legacy"
    assert ckpttool.diff(str(src), str(path)).equal
    assert ckpttool.scan([str(path)]).exit_code == 0


def test_a_first_pickle_of_another_value_is_not_legacy(tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(MAGIC_NUMBER + 1, protocol=2))
    assert detect(str(path)) == "pickle"
