"""Comparing two tensors' bytes, the fast way: shared by diff, verify's round trips and convert's --check.

``pieces`` gives a tensor's C-order bytes in bounded pieces (a strided view gathered first);
``bytes_equal`` compares two contiguous tensors with two reused buffers and a memcmp, no arithmetic (the
common case of equal tensors at the speed of the disk; tested against the piece-by-piece way in
tests/test_diff.py); ``same_bits`` compares two pieces. The buffers are per thread (``threading.local``).
"""
from __future__ import annotations

import threading
from typing import Iterator

from .checkpoint import TensorRef
from .spans import read_pieces


def pieces(t: TensorRef, n: int, reuse: bool = False) -> Iterator[bytes]:
    """The tensor's C-order bytes, ``n`` elements at a time (a strided view is gathered first).

    With ``reuse``, pieces of a contiguous tensor are views of a reused buffer (``read_pieces``),
    each valid until the next piece is asked for.
    """
    if reuse and t.is_contiguous and t.has_data:
        yield from read_pieces(t.storage.source, t.span()[0], t.nbytes, n * t.itemsize)
        return
    step = n * t.itemsize
    if t.is_contiguous or t.numel <= 1:
        yield from t.iter_chunks(step)
        return
    held = bytearray()  # a strided view, gathered a block at a time (iter_chunks), cut into pieces of n
    for chunk in t.iter_chunks(step):
        held += chunk
        while len(held) >= step:
            yield bytes(held[:step])
            del held[:step]
    if held:
        yield bytes(held)


FAST_CHUNK = 8 << 20
_THREAD = threading.local()  # per thread: two reusable buffers whose contents are equal between calls


def bytes_equal(a: TensorRef, b: TensorRef) -> bool:
    """Are two contiguous tensors' bytes equal? Two reusable buffers, no arithmetic, no torch.

    Each chunk is read into the front of both buffers and the whole buffers compared (a C memcmp):
    the bytes past the chunk are equal too, because any earlier difference ended the comparison,
    after which the buffers are made anew.
    """
    sa, sb = a.storage.source, b.storage.source
    if not (a.is_contiguous and b.is_contiguous and hasattr(sa, "readinto") and hasattr(sb, "readinto")):
        return False
    buffers = getattr(_THREAD, "buffers", None)
    if buffers is None:
        buffers = _THREAD.buffers = []
    if not buffers:
        buffers.extend((bytearray(FAST_CHUNK), bytearray(FAST_CHUNK)))
    bufa, bufb = buffers
    (start_a, _), (start_b, _) = a.span(), b.span()
    total = a.nbytes
    step = FAST_CHUNK - FAST_CHUNK % a.itemsize
    va, vb = memoryview(bufa), memoryview(bufb)
    for off in range(0, total, step):
        n = min(step, total - off)
        sa.readinto(start_a + off, va[:n])
        sb.readinto(start_b + off, vb[:n])
        if bufa != bufb:
            buffers.clear()  # unequal now: the next call starts from fresh, equal buffers
            return False
    return True


def same_bits(pa: bytes, pb: bytes) -> bool:
    if isinstance(pa, memoryview) or isinstance(pb, memoryview):  # a memoryview's == goes element by element
        import numpy as np
        return bool(np.array_equal(np.frombuffer(pa, dtype=np.uint8), np.frombuffer(pb, dtype=np.uint8)))
    return pa == pb
