"""torchao's quantized weights, written by torchao itself, through every command.

torchao (the writer) quantizes a small model from a config, with random weights, and its state_dict is
saved with torch.save; torch.load (weights_only=True, torchao imported) is the reader ckpttool is held
to. Each quantized weight is one tensor (a torchao subclass with its inner tensors as parts), convert to
.pt gives the very same subclass and inner tensors, safetensors refuses naming the weights, and diff sees
equal files as equal and a re-quantized different model as different.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import torchao.quantization as torchao_quantization  # the test extra installs it

from ckpttool import convert, diff, inspect
from ckpttool.errors import UsageError

CONFIGS = ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "IntxWeightOnlyConfig",
           "Float8WeightOnlyConfig", "Int4WeightOnlyConfig"]


def quantized_state_dict(config: str, seed: int = 0):
    cfg = getattr(torchao_quantization, config, None)
    if cfg is None:
        pytest.fail(f"torchao {config} is gone: update the list")
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao_quantization.quantize_(m, cfg())
    return m.state_dict()


def inner(t):
    """The tensors a torchao subclass holds (its __tensor_flatten__ names), or the tensor itself."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return {n: getattr(t, n) for n in names}
    return {"": t}


@pytest.mark.parametrize("config", CONFIGS)
def test_torchao_weights_convert_exactly(config, tmp_path):
    sd = quantized_state_dict(config)
    src, out = str(tmp_path / "q.pt"), str(tmp_path / "o.pt")
    torch.save(sd, src)
    r = inspect(src)
    assert [t.name for t in r.tensors] == list(sd)
    quantized = [t for t in r.tensors if t.form != "dense"]
    if config != "Int4WeightOnlyConfig":  # on CPU torchao keeps int4 weights as plain Parameters
        assert [t.name for t in quantized] == ["0.weight", "2.weight"]
        assert all(t.form.startswith("subclass torchao.") and t.form.endswith(type(sd[t.name]).__name__)
                   for t in quantized), [t.form for t in quantized]
        with pytest.raises(UsageError, match="0.weight \\(subclass torchao"):
            convert(src, str(tmp_path / "o.safetensors"))
    convert(src, out, check=True)
    a, b = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert type(a[k]) is type(b[k]), k
        ia, ib = inner(a[k]), inner(b[k])
        assert list(ia) == list(ib) and all(torch.equal(ia[n], ib[n]) for n in ia), k
    assert diff(src, out).equal


def test_torchao_diff_sees_other_weights(tmp_path):
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    torch.save(quantized_state_dict("Int8WeightOnlyConfig", 0), a)
    torch.save(quantized_state_dict("Int8WeightOnlyConfig", 1), b)
    r = diff(a, b)
    assert not r.equal and {d.name for d in r.value_mismatch} >= {"0.weight", "2.weight"}


def test_torchao_dense_is_torchaos_own_dequantize(tmp_path):
    from safetensors.torch import load_file
    sd = quantized_state_dict("Int8WeightOnlyConfig")
    src, out = str(tmp_path / "q.pt"), str(tmp_path / "q.safetensors")
    torch.save(sd, src)
    r = convert(src, out, dense=True, check=True)
    assert {n for n, _ in r.densified} == {"0.weight", "2.weight"}
    got = load_file(out)
    for k, v in sd.items():
        assert torch.equal(got[k], v.dequantize() if type(v) is not torch.Tensor else v), k
