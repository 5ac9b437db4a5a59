"""Checkpoints written by the libraries people train with, against each library's own loader.

Models come from configs with random weights (nothing downloaded). The state_dict ckpttool takes is the one
the writer's loader uses, and convert gives exactly its tensors: ultralytics loads ``ckpt['ema'] or
ckpt['model']``; timm's ``load_state_dict`` takes ``state_dict`` unless ``use_ema=True``.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ckpttool import convert, inspect


def _same(ref, got):
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("model_too", [False, True], ids=["model_none", "model_and_ema"])
def test_ultralytics_training_checkpoint(model_too, tmp_path):
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = DetectionModel("yolov8n.yaml", verbose=False)
    ema = copy.deepcopy(m).half()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the model moves away from the EMA: taking the wrong one shows
    path = str(tmp_path / "last.pt")
    torch.save({"epoch": 5, "best_fitness": 0.1, "model": copy.deepcopy(m).half() if model_too else None, "ema": ema,
                "updates": 50, "optimizer": opt.state_dict(), "train_args": {"imgsz": 640}}, path)
    r = inspect(path)
    assert r.entry == "ema" and len(r.tensors) == len(ema.state_dict())
    out = str(tmp_path / "sd.pt")
    convert(path, out, check=True)
    model, _ = load_checkpoint(path)  # ultralytics' own loader (it makes the weights float32)
    got = torch.load(out, weights_only=True)
    _same(model.state_dict(), {k: (v.float() if v.is_floating_point() else v) for k, v in got.items()})
    raw = torch.load(path, weights_only=False)  # and as stored: the file's half-precision EMA, bit for bit
    _same((raw.get("ema") or raw["model"]).state_dict(), got)


def test_timm_checkpoint_with_ema(tmp_path):
    import timm
    from timm.models import load_state_dict
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    m = timm.create_model("resnet18", pretrained=False)
    ema = ModelEmaV3(m)
    for p in ema.module.parameters():
        p.data.mul_(0.5)  # the EMA differs from the model
    path = str(tmp_path / "ckpt.pth.tar")
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": m.state_dict(), "state_dict_ema": ema.module.state_dict(),
                "version": 2}, path)
    r = inspect(path)
    assert r.entry == "state_dict_ema" and any("use_ema=True" in n for n in r.notes)
    convert(path, str(tmp_path / "ema.pt"))  # the default: timm's (use_ema=True)
    _same(load_state_dict(path), torch.load(str(tmp_path / "ema.pt"), weights_only=True))
    convert(path, str(tmp_path / "sd.pt"), key="state_dict")
    _same(load_state_dict(path, use_ema=False), torch.load(str(tmp_path / "sd.pt"), weights_only=True))
