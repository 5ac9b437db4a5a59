"""A plain pickle file (``pickle.dump`` of a dict, hyper-parameters...), read safely.

No persistent ids are allowed: a plain pickle has no storages, so any
tensor it holds was pickled by value (``torch.storage._load_from_bytes``)
and appears as an inert stub.
"""
from __future__ import annotations

import os

from ..checkpoint import Checkpoint
from .safe_pickle import load_stream


def read(path: str) -> Checkpoint:
    """Read a bare pickle file through the restricted unpickler (streamed, never slurped)."""
    with open(path, "rb") as f:
        root, globs = load_stream(f, None, path)
    return Checkpoint(path=path, format="pickle", file_size=os.path.getsize(path), root=root, globals=globs,
                      files=(path,))
