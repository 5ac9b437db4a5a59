"""Where the formats get the reading policy: :mod:`ckpttool.pickles.reading` (kept for their imports)."""
from ..pickles.reading import (NumpyDtype, NumpyScalar, PersistentLoad, ReadPolicy, Stub, TorchDtype,  # noqa: F401
                               gc_paused, load_stream, parse_storage_pid, py3_name, safe_load, storage_nbytes)
