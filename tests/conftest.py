"""Shared test helpers: fixture checkpoints made on demand into a temporary folder."""
from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "fixtures")


def _load_makers():
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURES, "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_makers()


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
    """A session-wide folder where fixtures are made once, on first request."""
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def make(fixture_dir):
    """``make("legacy.pt")`` -> path of that fixture (see fixtures/make_fixtures.py MAKERS)."""
    made = {}

    def _make(name: str) -> str:
        if name not in made:
            made[name] = make_fixtures.make(name, str(fixture_dir))
        return made[name]
    return _make


@pytest.fixture
def committed():
    """Path of a committed fixture in fixtures/."""
    return lambda name: os.path.join(FIXTURES, name)


@pytest.fixture(autouse=True)
def _mypkg_on_path(monkeypatch):
    # Only torch.load(weights_only=False) in tests needs fixtures/mypkg importable; ckpttool never imports it.
    monkeypatch.syspath_prepend(FIXTURES)
