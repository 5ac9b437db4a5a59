"""The fast record makers build exactly what the dataclass constructors build."""
from __future__ import annotations

import dataclasses

from ckpttool.records import (StorageRef, TensorInfo, TensorRef, new_storage_ref, new_tensor_info,
                              new_tensor_ref)


def _same(fast, slow) -> None:
    assert type(fast) is type(slow)
    assert vars(fast) == vars(slow)
    assert list(vars(fast)) == [f.name for f in dataclasses.fields(type(slow))]  # every field, in order


def test_new_storage_ref_is_the_constructor():
    args = dict(key="3", dtype="float16", device="cuda:1", nbytes=64, source=object(), file="m.pt")
    _same(new_storage_ref(**args), StorageRef(**args))


def test_new_tensor_ref_is_the_constructor():
    st = StorageRef(key="0", dtype="float32", device="cpu", nbytes=24)
    args = dict(shape=(2, 3), dtype="float32", stride=(3, 1), storage_offset=0, storage=st, device="cpu",
                requires_grad=True, kind="quantized")
    fast, slow = new_tensor_ref(**args), TensorRef(**args)
    _same(fast, slow)
    assert (fast.numel, fast.nbytes, fast.is_contiguous) == (6, 24, True)
    assert vars(dataclasses.replace(fast, is_parameter=True)) == vars(dataclasses.replace(slow, is_parameter=True))


def test_new_tensor_info_is_the_constructor():
    args = dict(name="w", shape=(4,), dtype="int8", device="cpu", nbytes=4, stride=(1,), storage_offset=2,
                storage="0", stats=None)
    fast, slow = new_tensor_info(**args), TensorInfo(**args)
    _same(fast, slow)
    assert fast == slow and hash(fast) == hash(slow) and fast.to_dict() == slow.to_dict()
