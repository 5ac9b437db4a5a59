"""The examples in the package's docstrings run and give what they show (paths from the repository root:
the committed fixtures in fixtures/)."""
import doctest
import importlib
import os
import pkgutil

import pytest

import ckpttool

MODULES = sorted(m.name for m in pkgutil.walk_packages(ckpttool.__path__, "ckpttool."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
