"""``--model SPEC --arg k=v``: build the user's model from their own code.

SPEC is ``package.module:factory`` (``torchvision.models:resnet50``) or
``path/to/file.py:ClassNet``. This runs the user's model code, never code from
a checkpoint. The model is built on the meta device when it can be, so that a
large model costs no memory until weights are loaded into it.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import importlib
import importlib.util
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import FileAccessError, UsageError
from .checkpoint import Checkpoint


def parse_args(items: Sequence[str]) -> Dict[str, Any]:
    """``["num_classes=120", "name=tiny"]`` -> ``{"num_classes": 120, "name": "tiny"}``.

    Values are Python literals (``120``, ``None``, ``(3, 5)``, ``'x'``); a value that is
    not a literal is taken as a plain string.

    >>> parse_args(["num_classes=120", "weights=None", "act=relu", "k=(5, 5)"])
    {'num_classes': 120, 'weights': None, 'act': 'relu', 'k': (5, 5)}
    """
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg {item!r} is not NAME=VALUE")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[key] = raw
    return out


def resolve(spec: str) -> Any:
    """The factory (class or function) that SPEC names, importing its module."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"--model {spec!r} is not MODULE:NAME or FILE.py:NAME",
                         hint="e.g. --model torchvision.models:resnet50 or --model nets/mine.py:ClassNet")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        module = _import_file(module_part)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise UsageError(f"--model {spec!r}: cannot import {module_part}: {e}") from None
        except Exception as e:  # the user's module raised while importing
            raise UsageError(f"--model {spec!r}: importing {module_part} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model {spec!r}: {module_part} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model {spec!r}: {attr} is not a class or function")
    return obj


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FileAccessError("model file not found", path)
    name = "_ckpttool_model_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    folder = os.path.dirname(os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError("cannot load this file as a Python module", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, folder)  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise UsageError(f"importing the model file failed: {type(e).__name__}: {e}", path) from None
    finally:
        sys.path.remove(folder)
    return module


def build_model(spec: str, args: Sequence[str] = (), device: Optional[str] = "meta") -> Tuple[Any, str]:
    """Build the model SPEC names with ``--arg`` values; returns ``(model, device it was built on)``.

    Built on ``device`` (meta by default: shapes and dtypes without memory); a model
    whose constructor cannot run on meta is built on the CPU instead.

    >>> model, dev = build_model("torchvision.models:resnet18", ["num_classes=10"])  # doctest: +SKIP
    >>> dev, model.fc.weight.shape  # doctest: +SKIP
    ('meta', torch.Size([10, 512]))
    """
    import torch
    factory = resolve(spec)
    kwargs = parse_args(args)
    attempts = [device, "cpu"] if device not in (None, "cpu") else ["cpu"]
    error: Optional[BaseException] = None
    for dev in attempts:
        try:
            with torch.device(dev):
                model = factory(**kwargs)
        except Exception as e:  # the user's constructor: report, don't crash
            error = e
            continue
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model {spec!r} made a {type(model).__name__}, not a torch.nn.Module")
        return model, dev
    raise UsageError(f"--model {spec!r} failed to build: {type(error).__name__}: {error}")


@contextlib.contextmanager
def import_path_added(dirs: Sequence[str]) -> Iterator[None]:
    added = [os.path.abspath(d) for d in dirs]
    for d in added:
        if not os.path.isdir(d):
            raise UsageError("--import-path is not a folder", d)
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def trusted_module(ckpt: Checkpoint, key: Optional[str], import_path: Sequence[str]) -> Any:
    """Load the file with its code (the user said --trust) and pick the nn.Module in it."""
    import torch
    with import_path_added(import_path):
        try:
            if ckpt.format == "torchscript":
                obj = torch.jit.load(ckpt.path, map_location="cpu")
            else:
                obj = torch.load(ckpt.path, map_location="cpu", weights_only=False)
        except Exception as e:  # the file's own code failed to import or run
            raise UsageError(f"loading the model with its code failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             ckpt.path, hint="--import-path DIR points at the folder holding the model's package")
    if key:
        for part in key.split("/"):
            obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    if isinstance(obj, dict):
        found = [v for v in obj.values() if isinstance(v, torch.nn.Module)]
        if not found:
            raise UsageError("the file holds no pickled model; pass --model SPEC for its state_dict", ckpt.path)
        obj = found[0]
    if not isinstance(obj, torch.nn.Module):
        raise UsageError(f"the file holds a {type(obj).__name__}, not a model", ckpt.path)
    return obj


def tied_groups(model: Any) -> List[List[str]]:
    """Names of parameters/buffers that are one object in ``model`` (tied weights), grouped."""
    groups: Dict[int, List[str]] = collections.defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        groups[id(b)].append(name)
    return [names for names in groups.values() if len(names) > 1]
