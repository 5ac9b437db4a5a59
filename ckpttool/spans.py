"""Bytes of a file, read where they are: a span read with positioned reads (``FileSpan``), bytes held in
memory (``BufferSpan``), and ``read_pieces``, which reads a span in pieces into a reused per-thread buffer."""
from __future__ import annotations

import os
import threading
from typing import Any, Iterator, Optional

from .errors import FormatError


class FileSpan:
    """Bytes ``[offset, offset + size)`` of a file, read with positioned reads.

    The offset may be resolved lazily (``resolve``), so that opening a
    checkpoint never touches tensor data.
    """

    __slots__ = ("path", "_offset", "size", "_resolve")  # a 20,000-tensor archive makes 20,000 of them

    def __init__(self, path: str, offset: Optional[int] = None, size: int = 0, resolve=None):
        self.path = path
        self._offset = offset
        self.size = size
        self._resolve = resolve

    @property
    def offset(self) -> int:
        if self._offset is None:
            self._offset = self._locate()
        return self._offset

    def _locate(self) -> int:
        """The offset, found on first use (subclasses that know how override this)."""
        resolve, self._resolve = self._resolve, None
        return resolve()

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        """Read ``size`` bytes from ``start`` within the span; a short read is an error."""
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        out = bytearray()
        with open(self.path, "rb") as f:
            fd = f.fileno()
            pos = self.offset + start
            if size <= 1 << 30:  # the usual case: one read, no copies
                first = os.pread(fd, size, pos)
                if len(first) == size:
                    return first
                out += first
            while len(out) < size:
                chunk = os.pread(fd, min(size - len(out), 1 << 26), pos + len(out))
                if not chunk:
                    raise FormatError(
                        f"file is truncated: tensor data ends at byte {self.offset + start + size}, "
                        f"file has {os.fstat(fd).st_size}", self.path)
                out += chunk
        return bytes(out)


def _readinto(self, start: int, buf) -> None:
    """Fill ``buf`` (a bytearray or a writable memoryview) with the span's bytes from ``start``."""
    size = len(buf)
    if start < 0 or start + size > self.size:
        raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
    with open(self.path, "rb") as f:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        done = 0
        while done < size:
            n = os.preadv(f.fileno(), [view[done:]], self.offset + start + done)
            if not n:
                raise FormatError(f"file is truncated: tensor data ends at byte {self.offset + start + size}",
                                  self.path)
            done += n


FileSpan.readinto = _readinto

# Read buffers not in use, reused so reading allocates (and faults in) no new memory: one pool per thread
# (threading.local), so two threads never share a buffer.
_THREAD = threading.local()


def _pool() -> list:
    pool = getattr(_THREAD, "pool", None)
    if pool is None:
        pool = _THREAD.pool = []
    return pool


def read_pieces(source: Any, start: int, size: int, step: int) -> Iterator[bytes]:
    """Bytes ``[start, start + size)`` of ``source`` in pieces of ``step`` bytes.

    Where the source can ``readinto``, each piece is a view of a pooled buffer, valid until the next
    piece is asked for (callers write or compare each piece before the next); generators alive at
    the same time (the two sides of a comparison) each hold their own buffer.
    """
    if not hasattr(source, "readinto") or size <= 0:
        for off in range(0, size, step):
            yield source.read(start + off, min(step, size - off))
        return
    pool = _pool()
    buf = pool.pop() if pool else bytearray(step)
    try:
        if len(buf) < min(step, size):
            buf = bytearray(step)
        view = memoryview(buf)
        for off in range(0, size, step):
            n = min(step, size - off)
            source.readinto(start + off, view[:n])
            yield view[:n]
    finally:
        pool.append(buf)


class BufferSpan:
    """Bytes held in memory (small embedded data, e.g. an ONNX initializer's raw_data)."""

    def __init__(self, data: bytes, path: str = ""):
        self._data = data
        self.size = len(data)
        self.path = path

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        return self._data[start:start + size]
