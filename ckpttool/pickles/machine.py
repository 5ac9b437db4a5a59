"""The pickle machine: one interpreter of the pickle opcode stream, with the C unpickler's semantics.

Every command that reads a pickle (reading a checkpoint, scanning it, rewriting its device tags)
runs it here, so what ckpttool sees in a pickle is what ``_pickle.c`` would do with the same
bytes. The machine only moves values: the stack, the marks, the memo, the containers it builds
(tuples, lists, dicts, sets, frozensets) and the scalars it decodes. Everything that gives a pickle
meaning is the *policy*'s: what a global is (``find_class``), what a call makes (``reduce``,
``newobj``, ``inst``), what a persistent id is, what BUILD does, and what filling an object that is
not a plain list, dict or set means (``appends``, ``setitems``, ``additems``: in C these call the
object's methods).

As in ``_pickle.c`` (Python 3.11):

- any protocol 0-5, with or without a PROTO opcode; PROTO above 5 is an error;
- FRAME asks that its bytes be there. What follows differs by reader: ``pickle.loads`` reads on
  across a frame's end; the C unpickler over a file without ``peek`` (the ``BytesIO`` torch.load
  unpickles a zip's data.pkl from) holds the frame as its buffer and, for an opcode that runs past
  its end, reads afresh from *after* the frame, dropping the frame's tail; Python's own unpickler
  refuses. So an opcode that straddles a frame's end, a frame inside a frame, and a STOP short of
  its frame's end are *ambiguous* (:class:`AmbiguousPickle`): no reader can say what the loader
  would see. Pickles as Python writes them never do any of these;
- INT/LONG lines are read with C's ``strtol(.., 0)`` then ``int(.., 0)``; ``00``/``01`` are bools;
- STRING/BINSTRING/SHORT_BINSTRING decode as utf-8 (what torch.load asks for); UNICODE as
  raw-unicode-escape; BINUNICODE* as utf-8 with surrogatepass;
- POP on an empty mark frame pops the mark; APPENDS/SETITEMS/ADDITEMS of nothing do nothing, even
  on an object of any type (no method is looked up);
- ADDITEMS fills any set (subclasses too) directly; APPEND(S) any exact list; SETITEM(S) any exact
  dict (``collections.OrderedDict`` too: its C ``__setitem__`` is a dict's);
- STOP returns the top of the stack; what lies under it is dropped;
- NEXT_BUFFER fails (torch.load gives no out-of-band buffers); READONLY_BUFFER makes a bytearray a
  read-only view, and fails on what is not bytes-like.

It is bounded where C is not: the memo is a dict (a 4-byte index allocates nothing), every length
a pickle declares is checked against the input before it is read, dict keys and set members whose
hash a file can aim are capped (no quadratic dict build), and ``work`` counts what the policy's
calls copy, capped in proportion to the input (no memo amplification).
"""
from __future__ import annotations

import codecs
import collections
import struct
from typing import Any, List, Optional, Tuple

from ..errors import FormatError

HIGHEST_PROTOCOL = 5

_P = (1 << 61) - 1  # ints below this hash to themselves: no engineered collisions
MAX_HARD_KEYS = 4096   # dict keys / set members whose hash a file can aim (floats, big ints, int tuples...)
MAX_KEY_NODES = 16     # elements in one tuple / frozenset key
MAX_KEY_BITS = 256     # an int key hashes in time proportional to its size
WORK_PER_BYTE = 64     # what the policy may copy, per byte of input...
WORK_FLOOR = 1 << 22   # ...and at least this much

_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_F64 = struct.Struct(">d").unpack_from

_FREE_KEY_TYPES = frozenset({str, bytes, bool, type(None)})
_DICTS = (dict, collections.OrderedDict)


class AmbiguousPickle(FormatError):
    """Readers of these bytes disagree on what the pickle holds (see the module doc on FRAME)."""


def bounded_key(key, state: list) -> None:
    """Refuse a dict key / set member whose hashing a file could make slow (``state``: [hard keys seen])."""
    t = type(key)
    if t in _FREE_KEY_TYPES or t.__hash__ is object.__hash__ or (t is int and -_P < key < _P):
        return
    if issubclass(t, str):
        return
    if t is not tuple and issubclass(t, tuple) and t.__hash__ is tuple.__hash__:
        t = tuple  # torch.Size, a traced tuple: hashed as tuples are
    if t not in (int, float, tuple, frozenset, complex):
        if isinstance(key, (list, dict, set, bytearray)):
            raise FormatError(f"unhashable type: '{t.__name__}' used as a dict key or set member")
        raise FormatError(f"pickle uses a {t.__name__} as a dict key or set member")
    if t is int and key.bit_length() > MAX_KEY_BITS:  # hashing a big int costs its size, every time
        raise FormatError(f"pickle uses an int of {key.bit_length()} bits as a dict key or set member")
    if t in (tuple, frozenset):
        todo, nodes = [key], 0
        while todo:
            for item in todo.pop():
                nodes += 1
                if nodes > MAX_KEY_NODES:
                    raise FormatError(f"pickle uses a {t.__name__} of more than {MAX_KEY_NODES} items as a key")
                it = type(item)
                if it is int and item.bit_length() > MAX_KEY_BITS:
                    raise FormatError(f"pickle uses a {t.__name__} holding a {item.bit_length()}-bit int as a key")
                if it is not tuple and issubclass(it, tuple) and it.__hash__ is tuple.__hash__:
                    it = tuple
                if it in (tuple, frozenset):
                    todo.append(item)
                elif not (it in _FREE_KEY_TYPES or it in (int, float, complex) or it.__hash__ is object.__hash__
                          or issubclass(it, str)):
                    raise FormatError(f"pickle uses a {t.__name__} holding a {it.__name__} as a key")
    state[0] += 1
    if state[0] > MAX_HARD_KEYS:
        raise FormatError(f"pickle has more than {MAX_HARD_KEYS} dict keys or set members that are not "
                          "strings or small ints")


def bounded_keys(items, state: list) -> None:
    """:func:`bounded_key` for each item; a list of plain names (a state_dict's) in one C pass."""
    if type(items) is list and set(map(type, items)) <= _FREE_KEY_TYPES:
        return
    for k in items:
        bounded_key(k, state)


class Policy:
    """What a pickle's operations mean. The default refuses everything a machine cannot do alone."""

    def find_class(self, module: str, name: str) -> Any:
        raise FormatError(f"pickle names a global ({module}.{name})")

    def computed_global(self, module: Any, name: Any) -> Any:
        """STACK_GLOBAL of names that are not both str (C refuses them; a scanner may not know them)."""
        raise FormatError("STACK_GLOBAL requires str")

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError("pickle refers to external data (a persistent id) where none is allowed")

    def reduce(self, func: Any, args: Any) -> Any:
        raise FormatError("pickle calls something")

    def newobj(self, cls: Any, args: Any, kwargs: Optional[Any]) -> Any:
        raise FormatError("pickle creates an object")

    def inst(self, cls: Any, args: tuple) -> Any:
        raise FormatError("pickle calls something (INST/OBJ)")

    def build(self, obj: Any, state: Any) -> None:
        raise FormatError("pickle sets an object's state")

    def appends(self, obj: Any, items: list) -> None:
        raise FormatError(f"pickle appends to a {type(obj).__name__}")

    def setitems(self, obj: Any, pairs: list) -> None:
        raise FormatError(f"pickle sets items of a {type(obj).__name__}")

    def additems(self, obj: Any, items: list) -> None:
        raise FormatError(f"pickle adds set items to a {type(obj).__name__}")

    def extension(self, code: int) -> Any:
        raise FormatError(f"pickle uses unregistered extension code {code}")

    def note_bytes(self, data, at: int) -> None:
        """Bytes the pickle holds (BINBYTES and kin, the opcode at byte ``at``): a scanner looks for pickles
        nested in them."""

    #: Whether the machine tells :meth:`traced` where values came from (a rewriter needs the bytes behind
    #: a value; readers and scanners do not, and pay nothing for it).
    tracing = False

    def traced(self, value: Any, start: int, end: int, how: str) -> Any:
        """The value to push for one opcode at bytes ``start:end`` of the input (``tracing`` only).

        ``how``: ``"text"`` (a string opcode pushed ``value``), ``"copy"`` (GET or DUP pushed ``value``
        again), ``"tuple"`` (TUPLE closed ``value``), ``"frame"`` (a FRAME opcode; ``value`` None, the
        return value unused).
        """
        return value


class Source:
    """The bytes a machine reads: a buffer (bytes, mmap), or a stream read in windows."""

    def __init__(self, data, stream=None, limit: Optional[int] = None, chunk: int = 1 << 20):
        self.data = data
        self.base = 0  # absolute offset of data[0]
        self.stream = stream
        self.chunk = chunk
        self.limit = limit if limit is not None else (len(data) if stream is None else 1 << 62)

    @classmethod
    def of_stream(cls, f, limit: Optional[int] = None) -> "Source":
        return cls(b"", stream=f, limit=limit)

    def more(self, pos: int, need: int) -> Tuple[Any, int]:
        """A window holding ``need`` bytes from ``pos`` (of the current window), moved; EOFError if none."""
        if self.stream is None:
            raise EOFError
        keep = self.data[pos:]
        want = max(need - len(keep), self.chunk)
        if need > self.limit:
            raise FormatError(f"pickle declares {need} bytes in a {self.limit}-byte input")
        got = self.stream.read(want)
        if not got:
            raise EOFError
        self.base += pos
        self.data = bytes(keep) + got
        while len(self.data) < need:
            got = self.stream.read(need - len(self.data))
            if not got:
                raise EOFError
            self.data += got
        return self.data, 0


def _strtol(s: bytes) -> Optional[int]:
    """C's ``strtol(s, &end, 0)`` where it consumes all of ``s`` and fits a 64-bit long, else None."""
    t = s.lstrip(b" \t\n\v\f\r")
    sign = 1
    if t[:1] in (b"+", b"-"):
        sign = -1 if t[:1] == b"-" else 1
        t = t[1:]
    if t[:2].lower() == b"0x" and len(t) > 2:
        digits, base = t[2:], 16
    elif t[:1] == b"0" and len(t) > 1:
        digits, base = t[1:], 8
    else:
        digits, base = t, 10
    if not digits or not all(c in b"0123456789abcdefABCDEF"[:base if base != 16 else 22] for c in digits):
        return None
    v = sign * int(digits, base)
    if not -(1 << 63) <= v < (1 << 63):
        return None
    return v


def _py_int(s: bytes) -> int:
    """``PyLong_FromString(s, NULL, 0)``: Python's ``int(s, 0)``."""
    try:
        return int(s.decode("ascii"), 0)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"invalid literal for int() with base 0: {s[:40]!r}") from None


def _float(s: bytes) -> float:
    text = s.decode("ascii", "replace")
    if not text or "_" in text or text != text.strip():  # PyOS_string_to_double takes neither
        raise FormatError("could not convert string to float")
    try:
        return float(text)
    except ValueError:
        raise FormatError("could not convert string to float") from None


def _decode_string(raw: bytes) -> str:
    # torch.load unpickles with encoding="utf-8" (errors "strict"): protocol-0/1 strings become str.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"pickle string is not utf-8: {e.reason}") from None


def _quoted(line: bytes) -> bytes:
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        try:
            return codecs.escape_decode(line[1:-1])[0]
        except ValueError as e:
            raise FormatError(f"malformed STRING argument: {e}") from None
    raise FormatError("the STRING opcode argument must be quoted")


class Machine:
    """Run one pickle under ``policy``.

    >>> import pickle
    >>> Machine(Policy()).load(pickle.dumps([1, (2, "a"), {"k": b"v"}]))
    [1, (2, 'a'), {'k': b'v'}]
    """

    def __init__(self, policy: Policy, size: Optional[int] = None):
        self.policy = policy
        self.size = size  # the bound on any declared length (default: the input's size)
        self.memo: dict = {}
        self.proto = 0
        self.keys = [0]
        self.work = 0
        self.work_limit = WORK_FLOOR
        self.end = 0  # where the last pickle ended (absolute)
        #: Opcodes run outside the hot path (every opcode but protocol 2's common binary ones): what a
        #: scanner needs to say which opcodes a pickle uses, at no cost to reading.
        self.cold_ops: set = set()

    def charge(self, n: int) -> None:
        """Count ``n`` units of work a policy does for the file (copies); refuse past the cap."""
        self.work += n
        if self.work > self.work_limit:
            raise FormatError("pickle asks for more work than its size allows (amplification)")

    def load(self, data, pos: int = 0):
        """The value of the pickle in ``data`` (bytes, mmap) at ``pos``; ``self.end`` is where it ended."""
        return self.load_source(Source(data), pos)

    def load_source(self, src: Source, pos: int = 0):
        """The value of the pickle read from ``src`` (a buffer, or a stream in windows) at ``pos``."""
        size = self.size if self.size is not None else src.limit
        self.work_limit = max(WORK_FLOOR, WORK_PER_BYTE * min(size, 1 << 40))
        try:
            return self._run(src, src.data, pos, size)
        except EOFError:
            raise FormatError("pickle data was truncated") from None
        except RecursionError:
            raise FormatError("nested too deeply") from None
        except UnicodeDecodeError as e:
            raise FormatError(f"pickle text is not {e.encoding}: {e.reason}") from None
        except OverflowError as e:
            raise FormatError(f"number out of range: {e}") from None
        except MemoryError:
            raise FormatError("asks for more memory than it can hold") from None

    def _run(self, src: Source, data, pos: int, size: int):
        try:
            return self._loop(src, data, pos, size)
        except IndexError:  # stack[-1] of an empty frame, metastack.pop() with no MARK: as C says it
            raise FormatError("unpickling stack underflow") from None

    def _loop(self, src: Source, data, pos: int, size: int):  # noqa: C901 - one loop, by design
        policy = self.policy
        memo = self.memo
        keys = self.keys
        metastack: List[list] = []
        stack: list = []
        append = stack.append
        n = len(data)
        u32 = _U32
        reduce = policy.reduce
        persistent_load = policy.persistent_load
        tracing = policy.tracing
        traced = policy.traced
        cold = self.cold_ops

        frame_end = -1  # inside a frame, ``n`` is its end: a read past it comes here first

        def more(p: int, need: int):
            nonlocal data, n, frame_end
            if frame_end >= 0:
                if p < frame_end:
                    raise AmbiguousPickle(f"ambiguous pickle: an opcode at byte {src.base + p} runs past the end of "
                                          f"its frame (byte {src.base + frame_end}); readers disagree on what follows")
                frame_end = -1
                n = len(data)
                if p + need <= n:
                    return p
            data, p = src.more(p, need)
            n = len(data)
            return p

        def line(p: int) -> Tuple[bytes, int]:
            e = data.find(b"\n", p)
            while e < 0:
                old = n - p
                p = more(p, old + 1)
                e = data.find(b"\n", p + old)
            return bytes(data[p:e]), e + 1

        def counted(p: int, length: int, what: str) -> Tuple[bytes, int]:
            if length < 0 or length > size:
                raise FormatError(f"pickle declares a {length}-byte {what} in a {size}-byte input")
            if p + length > n:
                p = more(p, length)
            return data[p:p + length], p + length

        def pop_mark() -> list:
            nonlocal stack, append
            items = stack
            if not metastack:
                raise FormatError("could not find MARK")
            stack = metastack.pop()
            append = stack.append
            return items

        def names(p: int) -> Tuple[str, str, int]:
            """GLOBAL's and INST's two lines, module and name, decoded as C decodes them."""
            module, p = line(p)
            name, p = line(p)
            try:
                return module.decode("utf-8"), name.decode("utf-8"), p
            except UnicodeDecodeError:
                raise FormatError("pickle names a global that is not utf-8") from None

        def batch():
            """The items after the MARK and the object under it (APPENDS, SETITEMS, ADDITEMS); (None, None)
            for no items: C then touches nothing, not even the object."""
            items = pop_mark()
            if not items:
                return None, None
            if not stack:
                raise FormatError("unpickling stack underflow")
            return items, stack[-1]

        def top():
            if not stack:
                raise FormatError("unpickling stack underflow")
            return stack[-1]

        while True:
            if pos >= n:
                pos = more(pos, 1)
            op = data[pos]
            pos += 1
            # the opcodes of a torch data.pkl first, in the order of how often they come (all of them ones
            # torch's weights_only loader runs); every other opcode in the ``else`` below
            if op == 0x71:  # BINPUT
                if pos >= n:
                    pos = more(pos, 1)
                memo[data[pos]] = stack[-1]
                pos += 1
            elif op == 0x72:  # LONG_BINPUT
                if pos + 4 > n:
                    pos = more(pos, 4)
                memo[u32(data, pos)[0]] = stack[-1]
                pos += 4
            elif op == 0x68:  # BINGET
                if pos >= n:
                    pos = more(pos, 1)
                try:
                    append(memo[data[pos]])
                except KeyError:
                    raise FormatError(f"Memo value not found at index {data[pos]}") from None
                pos += 1
                if tracing:
                    stack[-1] = traced(stack[-1], src.base + pos - 2, src.base + pos, "copy")
            elif op == 0x6A:  # LONG_BINGET
                if pos + 4 > n:
                    pos = more(pos, 4)
                i = u32(data, pos)[0]
                try:
                    append(memo[i])
                except KeyError:
                    raise FormatError(f"Memo value not found at index {i}") from None
                pos += 4
                if tracing:
                    stack[-1] = traced(stack[-1], src.base + pos - 5, src.base + pos, "copy")
            elif op == 0x4B:  # BININT1
                if pos >= n:
                    pos = more(pos, 1)
                append(data[pos])
                pos += 1
            elif op == 0x28:  # MARK
                metastack.append(stack)
                stack = []
                append = stack.append
            elif op == 0x58:  # BINUNICODE
                if pos + 4 > n:
                    pos = more(pos, 4)
                length = u32(data, pos)[0]
                raw, pos = counted(pos + 4, length, "string")
                append(str(raw, "utf-8", "surrogatepass"))
                if tracing:
                    stack[-1] = traced(stack[-1], src.base + pos - 5 - length, src.base + pos, "text")
            elif op == 0x74:  # TUPLE
                items = tuple(stack)
                stack = metastack.pop()  # IndexError: no MARK
                append = stack.append
                append(items)
                if tracing:
                    stack[-1] = traced(items, src.base + pos - 1, src.base + pos, "tuple")
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
            elif op == 0x86:  # TUPLE2
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == 0x87:  # TUPLE3
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                stack[-1] = reduce(stack[-1], args)
            elif op == 0x51:  # BINPERSID
                stack[-1] = persistent_load(stack[-1])
            elif op == 0x4D:  # BININT2
                if pos + 2 > n:
                    pos = more(pos, 2)
                append(_U16(data, pos)[0])
                pos += 2
            elif op == 0x4A:  # BININT
                if pos + 4 > n:
                    pos = more(pos, 4)
                append(_I32(data, pos)[0])
                pos += 4
            elif op == 0x89:  # NEWFALSE
                append(False)
            elif op == 0x88:  # NEWTRUE
                append(True)
            elif op == 0x29:  # EMPTY_TUPLE
                append(())
            elif op == 0x7D:  # EMPTY_DICT
                append({})
            elif op == 0x5D:  # EMPTY_LIST
                append([])
            elif op == 0x4E:  # NONE
                append(None)
            elif op == 0x75:  # SETITEMS
                items, target = batch()
                if items is None:
                    continue
                if len(items) % 2:
                    raise FormatError("odd number of items for SETITEMS")
                if type(target) in _DICTS:
                    bounded_keys(items[0::2], keys)
                    target.update(zip(items[0::2], items[1::2]))
                else:
                    policy.setitems(target, list(zip(items[0::2], items[1::2])))
            elif op == 0x73:  # SETITEM
                if len(stack) < 3:
                    raise FormatError("unpickling stack underflow")
                value = stack.pop()
                key = stack.pop()
                target = stack[-1]
                if type(target) in _DICTS:
                    bounded_key(key, keys)
                    target[key] = value
                else:
                    policy.setitems(target, [(key, value)])
            elif op == 0x65:  # APPENDS
                items, target = batch()
                if items is None:
                    continue
                if type(target) is list:
                    target.extend(items)
                else:
                    policy.appends(target, items)
            elif op == 0x61:  # APPEND
                if len(stack) < 2:
                    raise FormatError("unpickling stack underflow")
                value = stack.pop()
                target = stack[-1]
                if type(target) is list:
                    target.append(value)
                else:
                    policy.appends(target, [value])
            elif op == 0x62:  # BUILD
                if len(stack) < 2:
                    raise FormatError("unpickling stack underflow")
                state = stack.pop()
                policy.build(stack[-1], state)
            elif op == 0x63:  # GLOBAL
                module_s, name_s, pos = names(pos)
                append(policy.find_class(module_s, name_s))
            elif op == 0x81:  # NEWOBJ
                if len(stack) < 2:
                    raise FormatError("unpickling stack underflow")
                args = stack.pop()
                stack[-1] = policy.newobj(stack[-1], args, None)
            elif op == 0x2E:  # STOP
                if frame_end >= 0 and pos != frame_end:
                    raise AmbiguousPickle(f"ambiguous pickle: it stops at byte {src.base + pos}, inside a frame that "
                                          f"ends at byte {src.base + frame_end}")
                self.end = src.base + pos
                if not stack:
                    raise FormatError("unpickling stack underflow")
                return stack.pop()
            elif op == 0x80:  # PROTO
                if pos >= n:
                    pos = more(pos, 1)
                proto = data[pos]
                pos += 1
                if proto > HIGHEST_PROTOCOL:
                    raise FormatError(f"unsupported pickle protocol: {proto}")
                self.proto = proto
            else:  # the rest: noted (``cold_ops``), then run
                cold.add(op)
                if op == 0x8C:  # SHORT_BINUNICODE
                    if pos >= n:
                        pos = more(pos, 1)
                    raw, pos = counted(pos + 1, data[pos], "string")
                    append(str(raw, "utf-8", "surrogatepass"))
                    if tracing:
                        stack[-1] = traced(stack[-1], src.base + pos - 2 - len(raw), src.base + pos, "text")
                elif op == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                elif op == 0x93:  # STACK_GLOBAL
                    if len(stack) < 2:
                        raise FormatError("unpickling stack underflow")
                    name = stack.pop()
                    module = stack.pop()
                    if type(name) is not str or type(module) is not str:
                        append(policy.computed_global(module, name))
                    else:
                        append(policy.find_class(module, name))
                elif op == 0x92:  # NEWOBJ_EX
                    if len(stack) < 3:
                        raise FormatError("unpickling stack underflow")
                    kwargs = stack.pop()
                    args = stack.pop()
                    stack[-1] = policy.newobj(stack[-1], args, kwargs)
                elif op == 0x95:  # FRAME: its bytes must be there; ``n`` becomes its end (see ``more``)
                    if frame_end >= 0 and pos - 1 != frame_end:
                        raise AmbiguousPickle(f"ambiguous pickle: a frame begins at byte {src.base + pos - 1}, inside "
                                              f"another that ends at byte {src.base + frame_end}")
                    if pos + 8 > n:
                        pos = more(pos, 8)
                    length = _U64(data, pos)[0]
                    pos += 8
                    if length > size:
                        raise FormatError(f"pickle declares a {length}-byte frame in a {size}-byte input")
                    if pos + length > n:
                        pos = more(pos, length)
                    if length:
                        frame_end = pos + length
                        n = frame_end
                    if tracing:
                        traced(None, src.base + pos - 9, src.base + pos, "frame")
                elif op == 0x8E or op == 0x42 or op == 0x43 or op == 0x96:  # BINBYTES8 BINBYTES SHORT_BINBYTES BYTEARRAY8
                    w = 8 if op in (0x8E, 0x96) else 4 if op == 0x42 else 1
                    at = src.base + pos - 1
                    if pos + w > n:
                        pos = more(pos, w)
                    length = _U64(data, pos)[0] if w == 8 else u32(data, pos)[0] if w == 4 else data[pos]
                    raw, pos = counted(pos + w, length, "bytes")
                    append(bytearray(raw) if op == 0x96 else bytes(raw))
                    policy.note_bytes(stack[-1], at)
                elif op == 0x8D:  # BINUNICODE8
                    if pos + 8 > n:
                        pos = more(pos, 8)
                    raw, pos = counted(pos + 8, _U64(data, pos)[0], "string")
                    append(str(raw, "utf-8", "surrogatepass"))
                    if tracing:
                        stack[-1] = traced(stack[-1], src.base + pos - 9 - len(raw), src.base + pos, "text")
                elif op == 0x8A:  # LONG1
                    if pos >= n:
                        pos = more(pos, 1)
                    raw, pos = counted(pos + 1, data[pos], "int")
                    append(int.from_bytes(raw, "little", signed=True))
                elif op == 0x8B:  # LONG4
                    if pos + 4 > n:
                        pos = more(pos, 4)
                    length = _I32(data, pos)[0]
                    if length < 0:
                        raise FormatError("LONG pickle has negative byte count")
                    raw, pos = counted(pos + 4, length, "int")
                    append(int.from_bytes(raw, "little", signed=True))
                elif op == 0x47:  # BINFLOAT
                    if pos + 8 > n:
                        pos = more(pos, 8)
                    append(_F64(data, pos)[0])
                    pos += 8
                elif op == 0x54 or op == 0x55:  # BINSTRING SHORT_BINSTRING
                    w = 4 if op == 0x54 else 1
                    if pos + w > n:
                        pos = more(pos, w)
                    length = _I32(data, pos)[0] if w == 4 else data[pos]
                    if length < 0:
                        raise FormatError("BINSTRING pickle has negative byte count")
                    raw, pos = counted(pos + w, length, "string")
                    append(_decode_string(bytes(raw)))
                    if tracing:
                        stack[-1] = traced(stack[-1], src.base + pos - 1 - w - length, src.base + pos, "text")
                elif op == 0x30:  # POP: on an empty mark frame, the mark
                    if stack:
                        stack.pop()
                    elif metastack:
                        pop_mark()
                    else:
                        raise FormatError("unpickling stack underflow")
                elif op == 0x31:  # POP_MARK
                    pop_mark()
                elif op == 0x32:  # DUP
                    append(top())
                    if tracing:
                        stack[-1] = traced(stack[-1], src.base + pos - 1, src.base + pos, "copy")
                elif op == 0x6C:  # LIST
                    items = pop_mark()
                    append(items)
                elif op == 0x64:  # DICT
                    items = pop_mark()
                    if len(items) % 2:
                        raise FormatError("odd number of items for DICT")
                    bounded_keys(items[0::2], keys)
                    append(dict(zip(items[0::2], items[1::2])))
                elif op == 0x8F:  # EMPTY_SET
                    append(set())
                elif op == 0x90:  # ADDITEMS
                    items, target = batch()
                    if items is None:
                        continue
                    if isinstance(target, set):
                        bounded_keys(items, keys)
                        target.update(items)
                    else:
                        policy.additems(target, items)
                elif op == 0x91:  # FROZENSET
                    items = pop_mark()
                    bounded_keys(items, keys)
                    append(frozenset(items))
                elif op == 0x49:  # INT
                    full, pos = line(pos)
                    if len(full) < 1:
                        raise FormatError("pickle data was truncated")
                    raw = full.split(b"\0", 1)[0]  # C reads the number as a C string: a NUL ends it
                    v = _strtol(raw) if raw else 0  # strtol of an empty C string: 0, its end is the NUL: accepted
                    if v is None:
                        append(_py_int(raw))
                    elif len(full) == 2 and v in (0, 1):
                        append(bool(v))
                    else:
                        append(v)
                elif op == 0x4C:  # LONG
                    raw, pos = line(pos)
                    raw = raw.split(b"\0", 1)[0]
                    if raw.endswith(b"L"):
                        raw = raw[:-1]
                    append(_py_int(raw))
                elif op == 0x46:  # FLOAT
                    raw, pos = line(pos)
                    raw = raw.split(b"\0", 1)[0]
                    append(_float(raw))
                elif op == 0x53:  # STRING
                    at = src.base + pos - 1
                    raw, pos = line(pos)
                    append(_decode_string(_quoted(raw)))
                    if tracing:
                        stack[-1] = traced(stack[-1], at, src.base + pos, "text")
                elif op == 0x56:  # UNICODE
                    at = src.base + pos - 1
                    raw, pos = line(pos)
                    try:
                        append(str(raw, "raw-unicode-escape"))
                    except UnicodeDecodeError as e:
                        raise FormatError(f"malformed UNICODE argument: {e.reason}") from None
                    if tracing:
                        stack[-1] = traced(stack[-1], at, src.base + pos, "text")
                elif op == 0x67 or op == 0x70:  # GET PUT (decimal lines)
                    at = src.base + pos - 1
                    raw, pos = line(pos)
                    raw = raw.split(b"\0", 1)[0]
                    try:
                        i = int(raw.decode("ascii"), 10)
                    except (ValueError, UnicodeDecodeError):
                        raise FormatError(f"invalid memo index {raw[:20]!r}") from None
                    if op == 0x67:
                        try:
                            append(memo[i])
                        except KeyError:
                            raise FormatError(f"Memo value not found at index {i}") from None
                        if tracing:
                            stack[-1] = traced(stack[-1], at, src.base + pos, "copy")
                    else:
                        if i < 0:
                            raise FormatError("negative PUT argument")
                        memo[i] = top()
                elif op == 0x50:  # PERSID
                    raw, pos = line(pos)
                    try:
                        pid = raw.decode("ascii")
                    except UnicodeDecodeError:
                        raise FormatError("persistent IDs in protocol 0 must be ASCII strings") from None
                    append(policy.persistent_load(pid))
                elif op == 0x69:  # INST: C looks for its MARK before it reads the names
                    if not metastack:
                        raise FormatError("could not find MARK")
                    module_s, name_s, pos = names(pos)
                    cls = policy.find_class(module_s, name_s)
                    args = tuple(pop_mark())
                    append(policy.inst(cls, args))
                elif op == 0x6F:  # OBJ
                    items = pop_mark()
                    if not items:
                        raise FormatError("unpickling stack underflow")
                    append(policy.inst(items[0], tuple(items[1:])))
                elif op == 0x82 or op == 0x83 or op == 0x84:  # EXT1 EXT2 EXT4
                    w = 1 if op == 0x82 else 2 if op == 0x83 else 4
                    if pos + w > n:
                        pos = more(pos, w)
                    code = data[pos] if w == 1 else _U16(data, pos)[0] if w == 2 else _I32(data, pos)[0]
                    pos += w
                    if code <= 0:
                        raise FormatError("EXT specifies code <= 0")
                    append(policy.extension(code))
                elif op == 0x97:  # NEXT_BUFFER
                    raise FormatError("pickle stream refers to out-of-band data but no *buffers* argument was given")
                elif op == 0x98:  # READONLY_BUFFER: a bytearray becomes a read-only view; bytes stay
                    obj = top()
                    if type(obj) is bytearray:
                        stack[-1] = memoryview(obj).toreadonly()
                    elif type(obj) not in (bytes, memoryview):
                        raise FormatError(f"memoryview: a bytes-like object is required, not '{type(obj).__name__}'")
                else:
                    raise FormatError(f"invalid load key, {chr(op)!r} (byte {src.base + pos - 1})")
