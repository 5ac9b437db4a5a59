"""running.py: the seeded inputs and output comparison verify and ONNX export share."""
from __future__ import annotations

import pytest
import torch

from ckpttool.running import difference, run_onnx, seeded_inputs


def test_seeded_inputs_are_the_same_every_call_and_typed():
    specs = [((2, 3), "float32"), ((4,), "int64"), ((2, 2), "bool"), ((3,), "float16"), ((1, 2), None)]
    a, b = seeded_inputs(specs), seeded_inputs(specs)
    assert [x.dtype for x in a] == [torch.float32, torch.int64, torch.bool, torch.float16, torch.float32]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert set(a[1].tolist()) <= {0, 1}  # valid as ids and masks
    gen = torch.Generator().manual_seed(0)  # the draw ONNX export made before it used this module
    assert torch.equal(a[0], torch.randn(2, 3, generator=gen))


def test_difference_measures_and_judges():
    ref = torch.tensor([1.0, -2.0, 0.0])
    got = torch.tensor([1.0, -2.5, 1e-3])
    d = difference(got, ref, atol=1e-2, rtol=0.0)
    assert d.max_abs == pytest.approx(0.5) and d.max_rel == pytest.approx(1e-3 / 1e-12) and not d.close
    assert difference(got, ref, atol=0.6, rtol=0.0).close
    assert not difference(got, ref, atol=0.0, rtol=0.2).close  # 1e-3 against 0: no relative slack
    nan = torch.tensor([1.0, float("nan")])
    assert difference(nan, nan.clone(), 0.0, 0.0).close  # NaN where both are NaN is equal
    assert not difference(nan, torch.tensor([1.0, 2.0]), 1.0, 1.0).close
    assert difference(torch.zeros(0), torch.zeros(0), 0.0, 0.0) == type(d)(0.0, 0.0, True)


def test_run_onnx_feeds_inputs_in_graph_order(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Sub", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = str(tmp_path / "sub.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    (y,) = run_onnx(path, [torch.tensor([5.0, 1.0]), torch.tensor([2.0, 3.0])])
    assert y.tolist() == [3.0, -2.0]
    from ckpttool.errors import UsageError
    with pytest.raises(UsageError, match="takes 2 inputs"):
        run_onnx(path, [torch.zeros(2)])
