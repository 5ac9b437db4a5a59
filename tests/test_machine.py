"""The pickle machine against the C unpickler: the same value, or both refuse.

``ckpttool.pickles.machine`` promises ``_pickle.c``'s semantics for every opcode; these tests hold
it to that by running the same bytes through both: pickles of random data in every protocol,
hand-written opcode streams where C and ``pickle._Unpickler`` (Python's own) differ, and random
mutations of real pickles. Globals are refused on both sides (the C side by a ``find_class`` that
raises), so only the machine's own semantics are compared.
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttool.errors import FormatError
from ckpttool.pickles.machine import AmbiguousPickle, Machine, Policy, Source


class _Refuse(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name}")


def c_load(data: bytes):
    """The C unpickler's value, or the exception it raised (torch.load's encoding: utf-8)."""
    try:
        return ("ok", _Refuse(io.BytesIO(data), encoding="utf-8").load())
    except Exception as e:  # noqa: BLE001 - any refusal is a refusal
        return ("error", type(e).__name__)


def m_load(data: bytes):
    try:
        return ("ok", Machine(Policy()).load(data))
    except AmbiguousPickle as e:
        return ("ambiguous", e.message)
    except FormatError as e:
        return ("error", e.message)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def assert_agree(data: bytes):
    c, m = c_load(data), m_load(data)
    if m[0] == "ambiguous":  # refused by design: frames read differently by C over a file and by loads()
        return
    assert c[0] == m[0], f"C: {c}, machine: {m}, bytes {data[:80]!r}"
    if c[0] == "ok":
        assert same(c[1], m[1]), f"C gives {c[1]!r}, the machine {m[1]!r}"


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=300))
keys = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none())
data_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.tuples(inner, inner),
                                     st.dictionaries(keys, inner, max_size=5),
                                     st.frozensets(keys, max_size=4).map(tuple)),
    max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(data_values, st.sampled_from([3, 4, 5]))
def test_random_data_same_value_as_c(value, protocol):
    # protocols 3-5 spell everything here with opcodes alone (0-2 name _codecs.encode for bytes)
    assert_agree(pickle.dumps(value, protocol=protocol))


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                              st.text(max_size=10)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                    max_leaves=20),
       st.sampled_from([0, 1, 2]))
def test_random_data_protocols_0_to_2_same_value_as_c(value, protocol):
    assert_agree(pickle.dumps(value, protocol=protocol))


# Opcode streams where a reader that is not C could go another way.
HAND = {
    "INT base 0: octal": b"I010\n.",
    "INT base 0: hex": b"I0x1f\n.",
    "INT 00 is False": b"I00\n.",
    "INT 01 is True": b"I01\n.",
    "INT big": b"I123456789012345678901234567890\n.",
    "INT ended by a NUL": b"I1\x00junk\n.",
    "INT of only a NUL": b"I\x00\n.",
    "INT of a space": b"I \n.",
    "LONG ended by a NUL": b"L12\x00x\n.",
    "FLOAT ended by a NUL": b"F1.5\x00z\n.",
    "PUT and GET ended by a NUL": b"K\x07p3\x00a\n0g3\x00b\n.",
    "INT signed": b"I-5\n.",
    "INT with L": b"I5L\n.",
    "LONG with L": b"L12345678901234567890L\n.",
    "LONG base 0 hex": b"L0x10\n.",
    "FLOAT": b"F1.5\n.",
    "FLOAT inf": b"Finf\n.",
    "FLOAT with space": b"F 1.5\n.",
    "STRING quoted": b"S'abc\\n'\n.",
    "STRING double quotes": b'S"x"\n.',
    "STRING unquoted": b"Sabc\n.",
    "STRING mismatched quotes": b"S'abc\"\n.",
    "UNICODE": b"V\\u00e9t\xe9\n.",
    "POP pops a MARK": b"K\x01(0.",
    "POP_MARK": b"K\x01(K\x02K\x031.",
    "leftover stack at STOP": b"K\x01K\x02K\x03.",
    "STOP on empty": b".",
    "APPENDS of nothing onto an int": b"K\x05(e.",
    "SETITEMS of nothing onto an int": b"K\x05(u.",
    "ADDITEMS of nothing onto an int": b"K\x05(\x90.",
    "APPEND onto an int": b"K\x05K\x06a.",
    "SETITEMS odd": b"}(K\x01u.",
    "DICT odd": b"(K\x01d.",
    "FRAME straddled": b"\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86.",
    "FRAME past the end": b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00K\x01.",
    "PROTO 6": b"\x80\x06K\x01.",
    "PROTO 5 then bytes": b"\x80\x05C\x03abc.",
    "no PROTO, protocol 2 opcodes": b"\x88\x89\x86.",
    "MEMOIZE and GET": b"K\x07\x94\x30h\x00.",
    "GET missing": b"h\x05.",
    "LONG_BINGET missing": b"j\x05\x00\x00\x00.",
    "PUT text": b"K\x07p3\n0g3\n.",
    "PUT negative": b"K\x07p-1\n.",
    "BINSTRING negative": b"T\xff\xff\xff\xff.",
    "LONG4 negative": b"\x8b\xff\xff\xff\xff.",
    "BINSTRING utf8": b"U\x02\xc3\xa9.",
    "BINSTRING not utf8": b"U\x01\xff.",
    "BINUNICODE surrogate": b"X\x03\x00\x00\x00\xed\xa0\x80.",
    "SHORT_BINBYTES": b"C\x02ab.",
    "BYTEARRAY8": b"\x96\x02\x00\x00\x00\x00\x00\x00\x00ab.",
    "NEXT_BUFFER": b"\x97.",
    "READONLY_BUFFER": b"C\x01a\x98.",
    "TUPLE without MARK": b"K\x01t.",
    "TUPLE2 underflow": b"K\x01\x86.",
    "EXT code 0": b"\x82\x00.",
    "invalid opcode": b"\xff.",
    "truncated": b"X\x05\x00\x00\x00ab",
    "empty": b"",
    "STACK_GLOBAL of ints": b"K\x01K\x02\x93.",
    "NEWOBJ of an int": b"K\x01)\x81.",
    "REDUCE of an int with a list": b"K\x01]R.",
    "set built by ADDITEMS": b"\x8f(K\x01K\x02\x90.",
    "FROZENSET": b"(K\x01K\x01\x91.",
    "dict key a list": b"}]K\x01s.",
    "BINPERSID without a loader": b"K\x01Q.",
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_written_streams_agree_with_c(name):
    assert_agree(HAND[name])


def _memo_bomb(data: bytes) -> bool:
    # A mutated memo index makes C's memo allocate (and zero) 16x the index in bytes: skip C there.
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "LONG_BINGET") and int(arg) > 1 << 16:
                return True
    except Exception:  # noqa: BLE001 - where genops stops, C stops reading memo indexes too
        pass
    return False


SEEDS = [pickle.dumps(v, protocol=p) for p in (2, 3, 4, 5)
         for v in ({"a": [1, 2.5, (3, "x")], "b": b"yz", "c": {1: None}}, [list(range(300)), "é" * 5],
                   (True, False, None, -1, 2 ** 40, 2 ** 100))]


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_mutated_pickles_agree_with_c(seed):
    rng = random.Random(seed)
    base = SEEDS[seed]
    checked = 0
    for _ in range(1500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[i] = rng.randrange(256)
            elif rng.random() < 0.5:
                del data[i]
            else:
                data.insert(i, rng.randrange(256))
        data = bytes(data)
        if _memo_bomb(data):
            continue
        assert_agree(data)
        checked += 1
    assert checked > 1000  # the skip above must leave most mutations compared


def test_stream_source_reads_the_same_as_a_buffer():
    value = {"k": [b"x" * 5000, "y" * 3000, list(range(2000))]}
    data = pickle.dumps(value, protocol=4)
    got = Machine(Policy()).load_source(Source.of_stream(io.BytesIO(data), limit=len(data)))
    assert got == value
    # windows smaller than a record
    src = Source(b"", stream=io.BytesIO(data), limit=len(data), chunk=7)
    assert Machine(Policy()).load_source(src) == value


def test_end_is_where_the_pickle_stopped():
    a, b = pickle.dumps([1, 2], protocol=2), pickle.dumps("second", protocol=0)
    m = Machine(Policy())
    assert m.load(a + b) == [1, 2] and m.end == len(a)
    m2 = Machine(Policy())
    assert m2.load(a + b, m.end) == "second" and m2.end == len(a + b)


def test_an_opcode_straddling_its_frame_reads_two_ways_and_is_refused():
    # A 3-byte frame ends inside a 5-byte string: pickle.loads reads the string on; the C unpickler over a
    # BytesIO (how torch.load unpickles data.pkl) reads the string's bytes afresh from after the frame.
    body = b"X\x05\x00\x00\x00ab"  # BINUNICODE of 5 bytes, of which the frame holds 'ab'
    data = b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body + b"cde..."
    from_memory = pickle.loads(data)
    from_file = pickle.Unpickler(io.BytesIO(data)).load()
    assert (from_memory, from_file) == ("abcde", "cde..")  # the two real readers disagree...
    with pytest.raises(AmbiguousPickle, match="runs past the end of its frame"):
        Machine(Policy()).load(data)  # ...so the machine refuses to pick one


def test_stop_inside_a_frame_and_nested_frames_are_ambiguous():
    framed = b"\x80\x04\x95" + struct.pack("<Q", 4) + b"K\x01.\x00"
    with pytest.raises(AmbiguousPickle, match="inside a frame"):
        Machine(Policy()).load(framed)
    nested = b"\x80\x04\x95" + struct.pack("<Q", 12) + b"\x95" + struct.pack("<Q", 2) + b"K\x01" + b"."
    with pytest.raises(AmbiguousPickle, match="inside another"):
        Machine(Policy()).load(nested)
    exact = b"\x80\x04\x95" + struct.pack("<Q", 3) + b"K\x01."
    assert Machine(Policy()).load(exact) == 1
