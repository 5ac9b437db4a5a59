"""Turning values a file chose into short, harmless text.

A checkpoint decides what its values are: lists that share themselves 2**40
times over through the pickle memo, ints of a million digits, names full of
terminal escape sequences. ``repr()`` of such values can take forever, raise,
or drive the user's terminal. Everything the tool prints or puts in an error
message about a value from a file goes through here.
"""
from __future__ import annotations

from typing import Any

_CONTAINERS = (list, tuple, dict, set, frozenset)


def safe_repr(value: Any, limit: int = 60, depth: int = 2) -> str:
    """A repr of ``value`` at most ``limit`` characters long, built in bounded work.

    Containers show their first few items ``depth`` levels deep; objects of
    classes that are not known to have a short repr show only their type.

    >>> safe_repr([1, [2, [3, [4]]]])
    '[1, [2, <list of 2>]]'
    >>> safe_repr(10 ** 5000)
    '<int of 16610 bits>'
    """
    text = _repr(value, depth, limit)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _repr(v: Any, depth: int, limit: int) -> str:
    t = type(v)
    if v is None or t in (bool, float, complex):
        return repr(v)
    if isinstance(v, int):
        return repr(int(v)) if v.bit_length() <= 256 else f"<int of {v.bit_length()} bits>"
    if isinstance(v, str):
        return repr(str(v[:limit])) + ("..." if len(v) > limit else "")
    if isinstance(v, (bytes, bytearray)):
        return repr(bytes(v[:limit])) + ("..." if len(v) > limit else "")
    if isinstance(v, _CONTAINERS):
        name = t.__name__
        if depth <= 0:
            return f"<{name} of {len(v)}>"
        items = list(v.items())[:4] if isinstance(v, dict) else list(v)[:4] if isinstance(v, (list, tuple)) \
            else []
        if isinstance(v, dict):
            inner = ", ".join(f"{_repr(k, depth - 1, limit)}: {_repr(x, depth - 1, limit)}" for k, x in items)
            return "{" + inner + (", ..." if len(v) > 4 else "") + "}"
        if isinstance(v, (set, frozenset)):
            return f"<{name} of {len(v)}>"
        inner = ", ".join(_repr(x, depth - 1, limit) for x in items)
        more = ", ..." if len(v) > 4 else ("," if isinstance(v, tuple) and len(v) == 1 else "")
        return ("[" if isinstance(v, list) else "(") + inner + more + ("]" if isinstance(v, list) else ")")
    if getattr(t, "_bounded_repr", False):
        return repr(v)
    return f"<{t.__name__}>"


# C0 and C1 control characters, DEL, and the bidirectional overrides that can reorder a line.
_UNSAFE = {c for c in range(0x20) if c != 0x0A} | set(range(0x7F, 0xA0)) | \
    set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE}
_ESCAPES_ONE_LINE = {**_ESCAPES, 0x0A: "\\n"}


def printable(text: str, one_line: bool = True) -> str:
    """``text`` with control characters escaped, safe to write to a terminal.

    >>> printable("w\\x1b[2J")
    'w\\\\x1b[2J'
    """
    return text.translate(_ESCAPES_ONE_LINE if one_line else _ESCAPES)


def plural(n: int, word: str, many: str = "") -> str:
    """``1 tensor``, ``2 tensors``, ``1,024 storages``."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
