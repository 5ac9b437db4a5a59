"""filter --complete: the target's full state_dict, so the output loads strictly (issue 17)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torchvision

from ckpttool.errors import CheckFailedError  # noqa: F401 - the check's failure type
from ckpttool.filtering import filter_checkpoint

from clitools import run

TIED = '''
import torch
class Tied(torch.nn.Module):
    def __init__(self, vocab=10):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, vocab, bias=False)
        self.head.weight = self.embed.weight
'''


@pytest.fixture
def r18(tmp_path):
    src = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), src)
    return src


def test_complete_writes_a_state_dict_that_loads_strictly_with_the_seeded_init(r18, tmp_path):
    out = tmp_path / "full.pt"
    state = torch.random.get_rng_state()
    r = filter_checkpoint(str(r18), str(out), model="torchvision.models:resnet18", model_args=["num_classes=120"],
                          complete=True, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
    assert r.filled == ("fc.weight", "fc.bias") and "torch.manual_seed(7)" in r.filled_from
    assert r.verified["load_into_model"]["how"] == "load_state_dict(strict=True)"
    got = torch.load(out, weights_only=True)
    m = torchvision.models.resnet18(weights=None, num_classes=120)
    m.load_state_dict(got, strict=True)
    torch.manual_seed(7)
    fresh = torchvision.models.resnet18(weights=None, num_classes=120)
    assert torch.equal(got["fc.weight"], fresh.fc.weight) and torch.equal(got["fc.bias"], fresh.fc.bias)
    src = torch.load(r18, weights_only=True)
    assert torch.equal(got["layer4.1.conv2.weight"], src["layer4.1.conv2.weight"])
    assert list(got) == list(m.state_dict())  # the model's own order


def test_without_complete_the_output_lacks_the_missing_keys(r18, tmp_path):
    r = run("filter", r18, "-m", "torchvision.models:resnet18", "--arg", "num_classes=120", "-o", tmp_path / "o.pt",
            "--json")
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and d["filled"] == [] and d["missing"] == ["fc.weight", "fc.bias"]
    assert "fc.weight" not in torch.load(tmp_path / "o.pt", weights_only=True)


def test_complete_on_the_command_line_says_what_was_filled(r18, tmp_path):
    r = run("filter", r18, "-m", "torchvision.models:resnet18", "--arg", "num_classes=120", "-o",
            tmp_path / "o.safetensors", "--complete")
    assert r.exit_code == 0, r.output
    assert "missing           2 target keys, written from the model's own initialisation (torch.manual_seed(0), " \
           "built on the CPU) (--complete)" in r.stdout
    assert "missing, filled (--complete) (2): fc.weight, fc.bias" in r.stdout
    assert "wrote 122 tensors" in r.stdout and "load_state_dict(strict=True)" in r.stdout


def test_complete_with_a_target_checkpoint_takes_the_targets_tensors(r18, tmp_path):
    target = tmp_path / "target.pt"
    tsd = torchvision.models.resnet18(weights=None, num_classes=5).state_dict()
    torch.save(tsd, target)
    out = tmp_path / "o.pt"
    r = filter_checkpoint(str(r18), str(out), target=str(target), complete=True)
    assert r.filled == ("fc.weight", "fc.bias") and r.filled_from == "the target checkpoint's tensors"
    got = torch.load(out, weights_only=True)
    assert set(got) == set(tsd) and torch.equal(got["fc.weight"], tsd["fc.weight"])


def test_a_missing_name_tied_to_a_kept_one_stays_tied(tmp_path, monkeypatch):
    (tmp_path / "tiedmod.py").write_text(TIED)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tiedmod", None)
    import tiedmod
    m = tiedmod.Tied()
    src = tmp_path / "src.pt"
    torch.save({k: v for k, v in m.state_dict().items() if k != "head.weight"}, src)  # as safetensors drops ties
    out = tmp_path / "o.pt"
    r = filter_checkpoint(str(src), str(out), model=str(tmp_path / "tiedmod.py") + ":Tied", complete=True)
    assert r.filled == ("head.weight",)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["head.weight"], got["embed.weight"])
    assert got["head.weight"].untyped_storage().data_ptr() == got["embed.weight"].untyped_storage().data_ptr()
    assert os.path.getsize(out) < 2 * 10 * 4 * 4 + 4096  # stored once


def test_filter_and_convert_write_a_tied_input_alike(tmp_path, monkeypatch):
    """One rule for tied weights in safetensors (issue 18): stored once under the sorted-first name, the other
    recorded in the header, as safetensors' save_model does; filter stored the tie twice."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from ckpttool.converting import convert
    (tmp_path / "tiedmod.py").write_text(TIED)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tiedmod", None)
    import tiedmod
    src = tmp_path / "src.pt"
    torch.save(tiedmod.Tied().state_dict(), src)
    filter_checkpoint(str(src), str(tmp_path / "f.safetensors"), model=str(tmp_path / "tiedmod.py") + ":Tied")
    convert(str(src), str(tmp_path / "c.safetensors"))
    headers = []
    for name in ("f", "c"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            headers.append((sorted(f.keys()), f.metadata()))
        m = tiedmod.Tied()
        assert load_model(m, str(tmp_path / f"{name}.safetensors")) == (set(), [])
        assert m.head.weight is m.embed.weight
    assert headers[0] == headers[1] == (["body.bias", "body.weight", "embed.weight"],
                                        {"format": "pt", "head.weight": "embed.weight"})
