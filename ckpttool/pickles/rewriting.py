"""Rewriting: a pickle's storage location tags replaced in its bytes, every other byte kept.

The pickle runs on the machine under the reading policy (inert stubs, nothing imported or called),
with tracing on: each string the machine pushes carries the bytes of the opcode that pushed it (the
string opcode itself, or the GET or DUP that copied it), and each tuple the TUPLE opcode that closed
it. Each storage id the machine meets names its location through one of those pushes, so the rewrite
knows exactly which opcode's bytes to replace, however the writer shared strings through the memo.
A memo slot is shared by all its GETs: where the rewrite changes what a slot holds, each GET that
must keep the old text gets it as a literal (and each that must see the new one, the other way).

What the rewrite cannot follow (a location computed by a call, a storage id that is not a TUPLE when
its arity must change) is a :class:`FormatError`, never a silent partial rewrite.
"""
from __future__ import annotations

import struct
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import FormatError, UsageError
from ..checkpoint import new_storage_ref
from .machine import Machine
from .reading import ReadPolicy, gc_paused, parse_storage_pid, storage_nbytes


class StorageSeen:
    """A storage id met in the pickle: its key, storage class name, element count, location (rewritten)."""
    __slots__ = ("key", "stype", "numel", "location")

    def __init__(self, key: str, stype: str, numel: int, location: str):
        self.key, self.stype, self.numel, self.location = key, stype, numel, location


class _Text(str):
    """A string the pickle pushed, with the opcode that pushed it (``start``:``end``); a copy (GET, DUP)
    has the value it copied as ``origin``. ``location``: what the rewrite makes it, where a storage id
    uses it as its location; ``after``: the text this push holds once the pickle is rewritten."""


class _Tuple(tuple):
    """A tuple closed by the TUPLE opcode at byte ``close``; ``pushes``: times it was pushed (made, then each GET
    or DUP of it), ``persid``: times it was a persistent id."""


def _plain(value: Any) -> Any:
    """``value`` with the tracing wrappers taken off its top level (and a tuple's or dict's items)."""
    t = type(value)
    if t is _Text:
        return str(value)
    if t is _Tuple or t is tuple:
        return tuple(str(v) if type(v) is _Text else v for v in value)
    if t is dict:
        return {(str(k) if type(k) is _Text else k): v for k, v in value.items()}
    return value


class RewritePolicy(ReadPolicy):
    """Reading, with every push traced, storage ids recorded and their location tags mapped."""

    tracing = True

    def __init__(self, new_location: Callable[[str], str], arity: Optional[int], path: Optional[str]):
        super().__init__(self._storage)
        self.new_location = new_location
        self.arity = arity
        self.path = path or ""
        self.texts: List[_Text] = []
        self.frames: List[Tuple[int, int]] = []
        self.inserts: Dict[int, bytes] = {}  # byte -> bytes put before the opcode there
        self.counts: Counter = Counter()
        self.seen: Dict[str, StorageSeen] = {}
        self._refs: Dict[str, Any] = {}
        self._changed: Dict[int, Any] = {}  # storage id tuples whose bytes the rewrite changes (kept alive)

    # -- the machine's hooks -----------------------------------------------------------------
    def traced(self, value, start, end, how):  # noqa: D102
        if how == "frame":
            self.frames.append((start, end))
            return None
        if how == "tuple":
            t = _Tuple(value)
            t.close, t.pushes, t.persid = start, 1, 0
            return t
        if type(value) is _Tuple:  # a copy (GET, DUP) of a tuple: counted, to know where else it is used
            value.pushes += 1
            return value
        if type(value) is not str and type(value) is not _Text:
            return value
        t = _Text(value)
        t.start, t.end, t.location = start, end, None
        t.origin = value if how == "copy" and type(value) is _Text else None
        t.copy = how == "copy"
        self.texts.append(t)
        return t

    def computed_global(self, module, name):  # noqa: D102 - traced strings are strings to the loader
        if isinstance(module, str) and isinstance(name, str):
            return self.find_class(str(module), str(name))
        return super().computed_global(module, name)

    def reduce(self, func, args):  # noqa: D102
        return super().reduce(func, _plain(args))

    def newobj(self, cls, args, kwargs):  # noqa: D102
        return super().newobj(cls, _plain(args), _plain(kwargs))

    def inst(self, cls, args):  # noqa: D102
        return super().inst(cls, _plain(args))

    def build(self, inst, state):  # noqa: D102
        return super().build(inst, _plain(state))

    # -- storage ids ---------------------------------------------------------------------------
    def _storage(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module":  # a legacy file's module source
            return pid[1]
        stype, key, _, numel, view = parse_storage_pid(_plain(pid))
        loc = pid[3]
        if type(loc) is not _Text:
            raise FormatError("a storage location the rewrite cannot follow (made by a call, not written as text)")
        old = str(loc)
        new = self.new_location(old)
        if type(pid) is _Tuple:
            pid.persid += 1
        if new != old or (self.arity is not None and len(pid) != self.arity):
            if type(pid) is not _Tuple:  # its location sits in a container built elsewhere (a list made a tuple)
                raise FormatError("a storage id the rewrite cannot follow (not built by TUPLE)")
            self._changed[id(pid)] = pid
        if loc.location is not None and loc.location != new:  # the same push mapped two ways: cannot be
            raise FormatError("a storage location the rewrite cannot follow")
        loc.location = new
        self.counts[(old, new)] += 1
        self.seen.setdefault(str(key), StorageSeen(str(key), stype.name, numel, new))
        self._reshape(pid, view)
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = new_storage_ref(str(key), stype.dtype, new, storage_nbytes(stype, numel),
                                                    None, self.path)
        return ref

    def _reshape(self, pid, view) -> None:
        """Storage ids in the other torch.save format's arity: 5 fields (zip) or 6 (legacy, the last a view)."""
        if self.arity is None or len(pid) == self.arity:
            return
        if self.arity == 5 and len(pid) == 6:
            if view is not None:
                raise UsageError("this legacy file holds storage views (torch < 1.0); they have no zip-format form")
            put = b"0"  # POP the view's None before the TUPLE closes
        elif self.arity == 6 and len(pid) == 5:
            put = b"N"  # a None view before the TUPLE closes
        else:
            raise FormatError(f"a storage id of {len(pid)} fields")
        if type(pid) is not _Tuple:
            raise FormatError("a storage id the rewrite cannot follow (not built by TUPLE)")
        self.inserts[pid.close] = put  # by position: a storage id the memo shares is reshaped once

    # -- the new bytes ---------------------------------------------------------------------------
    def edits(self) -> List[Tuple[int, int, bytes]]:
        """``(start, end, bytes)``: each opcode replaced (or, start == end, bytes inserted), in order."""
        for pid in self._changed.values():
            if pid.pushes != pid.persid:  # the same tuple is also a value somewhere
                raise FormatError("a storage id the rewrite cannot follow (the same tuple is also used as a value, "
                                  "which would change with it)")
        out: List[Tuple[int, int, bytes]] = [(at, at, b) for at, b in self.inserts.items()]
        for t in self.texts:  # in the order pushed: a copy's origin is settled before the copy
            value = str(t)
            wanted = t.location if t.location is not None else value
            have = (t.origin.after if t.origin is not None else value) if t.copy else value
            t.after = wanted
            if have != wanted:
                out.append((t.start, t.end, _text_op(wanted)))
        if out:  # frames declare byte counts the edits change: drop them (they are optional)
            out.extend((s, e, b"") for s, e in self.frames)
        out.sort(key=lambda x: (x[0], x[1]))
        return out


def _text_op(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def rewrite_locations(data: bytes, new_location: Callable[[str], str], arity: Optional[int] = None,
                      seen: Optional[Dict[str, StorageSeen]] = None, path: Optional[str] = None,
                      keep_tail: bool = True) -> Tuple[bytes, Counter]:
    r"""``data`` (a pickle) with each storage's location tag replaced by ``new_location(tag)``.

    ``arity`` 5 or 6 rewrites storage ids to the zip format's 5 fields or the legacy format's 6 (the
    last being a view record, None). ``seen`` collects the storages. Returns the new pickle (bytes
    after its STOP kept as they are, unless not ``keep_tail``) and a Counter of ``(old, new)`` tag
    pairs, one per storage id.

    >>> pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:1K\x04tQ"
    >>> new, counts = rewrite_locations(b"\x80\x02" + pid + b".", lambda loc: "cpu")
    >>> counts
    Counter({('cuda:1', 'cpu'): 1})
    >>> new[-12:]
    b'\x03\x00\x00\x00cpuK\x04tQ.'
    """
    policy = RewritePolicy(new_location, arity, path)
    machine = policy.machine = Machine(policy, len(data))
    try:
        with gc_paused():
            machine.load(data)
        edits = policy.edits()
    except UsageError:
        raise
    except FormatError as e:
        raise FormatError(f"cannot rewrite the pickle: {e.message}", e.path or path) from None
    except RecursionError:
        raise FormatError("cannot rewrite the pickle: nested too deeply", path) from None
    except Exception as e:  # a served builtin's own errors on bad arguments, as reading says them
        raise FormatError(f"malformed pickle: {type(e).__name__}: {e}"[:200], path) from None
    finally:
        machine.memo.clear()
        policy._served = policy._persistent = policy.machine = None
    if seen is not None:
        seen.update(policy.seen)
    if not keep_tail:
        data = data[:machine.end]  # what follows STOP is no part of the pickle (another format reads on there)
    if not edits:
        return data, policy.counts
    out = bytearray()
    pos = 0
    for start, end, new in edits:
        out += data[pos:start]
        out += new
        pos = end
    out += data[pos:]
    return bytes(out), policy.counts
