"""render.to_json: inspect's one-line JSON writes its tensor rows itself, and must write json's exact text.

For a pipe (``indent=None``) the rows of an InspectResult are written by ``_info_json`` and the rest by
json; the promise is the same string as ``json.dumps(record.to_dict())``, byte for byte, for every
format's records, for names json must escape, with --stats, and, where a field is of a type the row
writer does not write as json would, by falling back to json itself.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ckpttool.records import InspectResult, TensorInfo
from ckpttool.render import to_json
from ckpttool.summary import inspect as run_inspect


def reference(record) -> str:
    return json.dumps(record.to_dict(), default=repr, check_circular=False)


@pytest.mark.parametrize("name", ["state_dict.pt", "seed_checkpoint.tar", "full_model.pth", "all_dtypes.pt",
                                  "legacy.pt", "legacy_full_model.pt", "gpu_tagged.pt", "torchscript.pt",
                                  "all_dtypes.safetensors", "sharded_safetensors", "sharded_bin", "onnx_external"])
def test_every_format_writes_json_text(make, name):
    for stats in (False, True):
        r = run_inspect(make(name), stats=stats)
        assert r.tensors and to_json(r, indent=None) == reference(r)
    assert json.loads(to_json(r, indent=None))["tensor_count"] == len(r.tensors)


def test_names_json_must_escape(tmp_path):
    names = ['quote"d', "back\\slash", "tab\tnew\nline", "ctl\x01\x1f", "ünïcødé", "emoji 🧪", "line\u2028sep",
             "lone \udc80 surrogate", "", "tensors", '"tensors": []', "x" * 300]
    p = tmp_path / "names.pt"
    torch.save({n: torch.ones(i + 1) for i, n in enumerate(names)}, p)
    r = run_inspect(str(p))
    assert [t.name for t in r.tensors] == names
    text = to_json(r, indent=None)
    assert text == reference(r)
    assert [t["name"] for t in json.loads(text)["tensors"]] == names
    # a path that holds what the row splice looks for
    odd = dataclasses.replace(r, path='/tmp/"tensors": []/x.pt', entry='"tensors": []', metadata={"tensors": []})
    assert to_json(odd, indent=None) == reference(odd)


def test_empty_and_meta_records(tmp_path):
    p = tmp_path / "one.pt"
    torch.save({"w": torch.ones(2)}, p)
    r = run_inspect(str(p))
    empty = dataclasses.replace(r, tensors=())
    assert to_json(empty, indent=None) == reference(empty)
    no_storage = dataclasses.replace(r, tensors=(dataclasses.replace(r.tensors[0], storage=None, stride=()),))
    assert to_json(no_storage, indent=None) == reference(no_storage)


@pytest.mark.parametrize("field,value", [("shape", (2.0, 3)), ("nbytes", 8.5), ("storage_offset", float("nan")),
                                         ("name", b"bytes"), ("dtype", None), ("storage", 7)])
def test_fields_of_other_types_fall_back_to_json(tmp_path, field, value):
    p = tmp_path / "one.pt"
    torch.save({"w": torch.ones(2), "v": torch.ones(3)}, p)
    r = run_inspect(str(p))
    odd = dataclasses.replace(r, tensors=(r.tensors[0], dataclasses.replace(r.tensors[1], **{field: value})))
    assert to_json(odd, indent=None) == reference(odd)


def test_indented_json_is_json_s_own(tmp_path):
    p = tmp_path / "one.pt"
    torch.save({"w": torch.ones(2)}, p)
    r = run_inspect(str(p))
    assert to_json(r) == json.dumps(r.to_dict(), indent=2, default=repr)
    assert json.loads(to_json(r)) == json.loads(to_json(r, indent=None))


def test_tensor_rows_are_written_by_the_row_writer(monkeypatch, tmp_path):
    """The fast writer is what runs for an ordinary record (so the comparisons above test it)."""
    import ckpttool.render as render
    calls = []
    real = render._info_json
    monkeypatch.setattr(render, "_info_json", lambda t: calls.append(t.name) or real(t))
    p = tmp_path / "two.pt"
    torch.save({"w": torch.ones(2), "v": torch.ones(3)}, p)
    r = run_inspect(str(p))
    assert to_json(r, indent=None) == reference(r) and calls == ["w", "v"]
    assert isinstance(r, InspectResult) and all(isinstance(t, TensorInfo) for t in r.tensors)
