"""The location rewrite (remap's), on the machine, against the C unpickler.

Each test builds a pickle whose storage ids name locations, rewrites it, and loads the result with
Python's C unpickler (a ``persistent_load`` that records each id): every storage id must carry its
mapped location and every other value must be what it was, however the writer shared strings and
ids (memo GETs, DUP, frames, text opcodes of protocol 0). What the rewrite cannot follow is a loud
FormatError, never a partial rewrite.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch

from ckpttool.errors import FormatError, UsageError
from ckpttool.pickles.rewriting import rewrite_locations

FloatStorage = torch.FloatStorage
LOCATIONS = ["cpu", "cuda", "cuda:0", "cuda:1", "mps"]


def to_cpu(loc: str) -> str:
    return "cpu" if loc.startswith("cuda") else loc


class Storage:
    """A stand-in the pickler turns into a persistent id."""

    def __init__(self, key: str, location: str, numel: int = 4, legacy: bool = False):
        self.key, self.location, self.numel, self.legacy = key, location, numel, legacy


class _Pickler(pickle.Pickler):
    def __init__(self, f, protocol, shared_ids=False):
        super().__init__(f, protocol=protocol)
        self.ids = {}
        self.shared_ids = shared_ids

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", FloatStorage, obj.key, obj.location, obj.numel) + ((None,) if obj.legacy else ())
        if self.shared_ids:  # the same tuple object each time: the pickler memoizes it
            return self.ids.setdefault(obj.key, pid)
        return pid


def dumps(obj, protocol=2, shared_ids=False) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol, shared_ids).dump(obj)
    return buf.getvalue()


class _Loader(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.pids = []

    def find_class(self, module, name):
        if (module, name) == ("torch", "FloatStorage"):
            return FloatStorage
        if module in ("builtins", "__builtin__") and name in ("tuple", "set", "frozenset"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        self.pids.append(pid)
        return ("S", pid[2], pid[3], len(pid))


def c_load(data: bytes):
    loader = _Loader(data)
    return loader.load(), loader.pids


def expected(obj, mapping):
    """``obj`` with each Storage as the loader's marker, its location mapped."""
    if isinstance(obj, Storage):
        return ("S", obj.key, mapping(obj.location), 6 if obj.legacy else 5)
    if isinstance(obj, dict):
        return {k: expected(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expected(v, mapping) for v in obj]
    if isinstance(obj, tuple):
        return tuple(expected(v, mapping) for v in obj)
    return obj


def _shared_world(rng: random.Random, n: int):
    """A checkpoint-like tree where location strings are also plain values (configs, notes)."""
    strings = {loc: loc for loc in LOCATIONS}  # one object per text: the pickler memoizes and shares it
    sd = {}
    for i in range(n):
        loc = strings[rng.choice(LOCATIONS)]
        st_ = Storage(f"k{rng.randrange(max(1, n // 2))}", loc)
        sd[f"w{i}"] = (st_, rng.choice(["x", strings[rng.choice(LOCATIONS)]]))
    return {"sd": sd, "config": {"device": strings[rng.choice(LOCATIONS)],
                                 "devices": [strings[rng.choice(LOCATIONS)] for _ in range(3)]},
            "note": strings[rng.choice(LOCATIONS)]}


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])  # protocol 0 holds only text persistent ids
@pytest.mark.parametrize("seed", range(6))
def test_every_protocol_every_sharing(protocol, seed):
    """Random trees whose location strings the memo shares with plain values: the ids move, nothing else."""
    tree = _shared_world(random.Random(seed), 12)
    data = dumps(tree, protocol)
    assert any(op.name.endswith("GET") for op, _, _ in pickletools.genops(data))  # sharing is really there
    new, counts = rewrite_locations(data, to_cpu)
    got, pids = c_load(new)
    assert got == expected(tree, to_cpu)
    assert sum(counts.values()) == len(pids) and all(p[3] == to_cpu(p[3]) for p in pids)
    # and identity where nothing maps: the same bytes
    same, counts = rewrite_locations(data, lambda loc: loc)
    assert same == data and all(a == b for a, b in counts)


def test_counts_are_one_per_storage_id():
    tree = {"a": Storage("0", "cuda:0"), "b": Storage("1", "cuda:1"), "c": Storage("0", "cuda:0")}
    _, counts = rewrite_locations(dumps(tree), to_cpu)
    assert counts == {("cuda:0", "cpu"): 2, ("cuda:1", "cpu"): 1}


def test_dup_of_a_location_keeps_the_other_copy():
    """DUP pushes the same string twice: the original a plain value, the copy (through the memo) a location."""
    body = (b"\x80\x02}q\x00(X\x03\x00\x00\x00devq\x01"  # {  (MARK 'dev'
            b"X\x06\x00\x00\x00cuda:0"                     # 'cuda:0'
            b"2"                                           # DUP: a second copy
            b"q\x02"                                       # memo 2 <- the copy
            b"0"                                           # POP the copy
            b"X\x01\x00\x00\x00w(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00k"
            b"h\x02K\x04tQ"                                # the id's location: GET of the DUP copy
            b"u.")
    before, _ = c_load(body)
    assert before == {"dev": "cuda:0", "w": ("S", "k", "cuda:0", 5)}
    new, _ = rewrite_locations(body, to_cpu)
    after, _ = c_load(new)
    assert after == {"dev": "cuda:0", "w": ("S", "k", "cpu", 5)}


def test_dup_used_as_the_location_itself():
    body = (b"\x80\x02}(X\x03\x00\x00\x00dev"
            b"X\x01\x00\x00\x00w(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00k"
            b"X\x06\x00\x00\x00cuda:1"
            b"2"                 # DUP, memo 5 <- the copy, POP it: the original is the location
            b"q\x05"
            b"0"
            b"K\x04tQ"
            b"h\x05"             # the copy comes back (through the memo) as a plain value
            b"u.")
    before, _ = c_load(body)
    new, counts = rewrite_locations(body, to_cpu)
    after, _ = c_load(new)
    assert counts == {("cuda:1", "cpu"): 1}
    assert after == expected_from(before, {"cuda:1": "cpu"})


def expected_from(value, locations):
    """``value`` (a loaded tree) with each persistent id's location mapped, everything else the same."""
    if isinstance(value, tuple) and len(value) == 4 and value[0] == "S":
        return ("S", value[1], locations.get(value[2], value[2]), value[3])
    if isinstance(value, dict):
        return {expected_from(k, locations): expected_from(v, locations) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(expected_from(v, locations) for v in value)
    return value


@pytest.mark.parametrize("protocol", [2, 4])
def test_shared_id_tuple_reshaped_once(protocol):
    """A storage id the memo shares (the same tuple twice) gets one more field once, not twice."""
    st_ = Storage("0", "cuda:0")
    tree = {"a": st_, "b": st_, "c": Storage("1", "cuda:1")}
    data = dumps(tree, protocol, shared_ids=True)
    assert sum(1 for op, _, _ in pickletools.genops(data) if op.name == "BINPERSID") == 3
    new, _ = rewrite_locations(data, to_cpu, arity=6)
    got, pids = c_load(new)
    assert [len(p) for p in pids] == [6, 6, 6] and all(p[5] is None for p in pids)
    assert {p[3] for p in pids} == {"cpu"}
    back, _ = rewrite_locations(new, lambda x: x, arity=5)
    got, pids = c_load(back)
    assert [len(p) for p in pids] == [5, 5, 5]
    assert got == {"a": ("S", "0", "cpu", 5), "b": ("S", "0", "cpu", 5), "c": ("S", "1", "cpu", 5)}


def test_legacy_view_has_no_zip_form():
    data = (b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04"
            b"(X\x01\x00\x00\x001K\x00K\x02ttQ.")
    with pytest.raises(UsageError, match="storage views"):
        rewrite_locations(data, to_cpu, arity=5)


def test_frames_are_dropped_when_bytes_change():
    tree = {f"w{i}": Storage(str(i), "cuda:0") for i in range(300)}
    data = dumps(tree, 4)
    assert any(op.name == "FRAME" for op, _, _ in pickletools.genops(data))
    new, _ = rewrite_locations(data, to_cpu)
    assert not any(op.name == "FRAME" for op, _, _ in pickletools.genops(new))
    got, _ = c_load(new)
    assert got == expected(tree, to_cpu)


def test_a_location_made_by_a_call_is_refused():
    """builtins.str('cuda:0') as the location: no opcode's bytes hold it; the rewrite says so."""
    data = (b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
            b"c__builtin__\nstr\nX\x06\x00\x00\x00cuda:0\x85RK\x04tQ.")
    with pytest.raises(FormatError, match="cannot follow"):
        rewrite_locations(data, to_cpu)


@pytest.mark.parametrize("text", [b"S'cuda:1'\n", b"Vcuda:1\n", b"U\x06cuda:1", b"T\x06\x00\x00\x00cuda:1"])
def test_text_opcodes_and_text_memo(text):
    """The location as STRING / UNICODE / SHORT_BINSTRING / BINSTRING, shared by the text PUT and GET."""
    data = (b"(dp0\nVd\n" + text + b"p5\n"                       # {'d': <text>} and memo 5 <- the text
            b"sVw\n(Vstorage\nctorch\nFloatStorage\nV0\ng5\nI4\ntQs.")  # 'w': id whose location is GET 5
    before, _ = c_load(data)
    assert before == {"d": "cuda:1", "w": ("S", "0", "cuda:1", 5)}
    new, counts = rewrite_locations(data, to_cpu)
    got, _ = c_load(new)
    assert counts == {("cuda:1", "cpu"): 1}
    assert got == {"d": "cuda:1", "w": ("S", "0", "cpu", 5)}


def test_bad_pickles_are_format_errors():
    for bad in (b"", b"\x80\x02", b"\x80\x02X\xff\xff\xff\xff", b"\x80\x02(Q.", b"\x80\x09N."):
        with pytest.raises(FormatError):
            rewrite_locations(bad, to_cpu)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LOCATIONS), st.sampled_from(["cfg", "id", "both"])), min_size=1,
                max_size=20), st.sampled_from([1, 2, 3, 4, 5]), st.sampled_from([None, 5, 6]))
def test_random_trees(items, protocol, arity):
    strings = {loc: loc for loc in LOCATIONS}
    tree = {}
    for i, (loc, kind) in enumerate(items):
        s = strings[loc]
        if kind in ("id", "both"):
            tree[f"w{i}"] = Storage(f"k{i % 5}", s)
        if kind in ("cfg", "both"):
            tree[f"c{i}"] = [s, (s,)]
    data = dumps(tree, protocol)
    new, counts = rewrite_locations(data, to_cpu, arity=arity)
    got, pids = c_load(new)
    want = expected(tree, to_cpu)
    if arity == 6:
        want = {k: (v[:3] + (6,) if isinstance(v, tuple) and v[:1] == ("S",) else v) for k, v in want.items()}
    assert got == want
    assert sum(counts.values()) == len(pids)


def test_rewritten_string_is_binunicode_with_its_length():
    data = dumps({"w": Storage("0", "cuda:0")})
    new, _ = rewrite_locations(data, lambda loc: "cuda:10")
    assert b"X" + struct.pack("<I", 7) + b"cuda:10" in new


# the attacker review's findings: each a silent difference before, a refusal or the exact result now
_PID = (b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:1K\x04t")


def test_a_storage_id_also_used_as_a_value_is_refused():
    """The id tuple memoized and stored under 'cfg' too: changing its location would change cfg's value."""
    data = b"\x80\x02}(X\x01\x00\x00\x00w" + _PID + b"q\x01QX\x03\x00\x00\x00cfgh\x01u."
    before, _ = c_load(data)
    assert before["cfg"][3] == "cuda:1"
    for arity in (None, 6):
        with pytest.raises(FormatError, match="also used as a value"):
            rewrite_locations(data, to_cpu, arity=arity)
    same, _ = rewrite_locations(data, lambda loc: loc)  # nothing changes: nothing to refuse
    assert same == data


def test_a_storage_id_dup_kept_in_a_list_is_refused():
    """DUP of the id tuple: one copy is the persistent id, the other stays in the list as a value."""
    data = b"\x80\x02](" + _PID + b"2Qe."
    before, _ = c_load(data)
    assert before[0][3] == "cuda:1" and before[1][2] == "cuda:1"
    with pytest.raises(FormatError, match="also used as a value"):
        rewrite_locations(data, to_cpu)


def test_a_storage_id_made_from_a_list_is_refused():
    data = (b"\x80\x02}(X\x01\x00\x00\x00wc__builtin__\ntuple\n(]q\x05(X\x07\x00\x00\x00storagectorch\n"
            b"FloatStorage\nX\x01\x00\x00\x000X\x06\x00\x00\x00cuda:1K\x04etRQX\x03\x00\x00\x00cfgh\x05u.")
    before, _ = c_load(data)
    assert before["cfg"][3] == "cuda:1"
    with pytest.raises(FormatError, match="not built by TUPLE"):
        rewrite_locations(data, to_cpu)


def test_bytes_after_stop_are_dropped_when_asked():
    data = b"\x80\x02}(X\x01\x00\x00\x00w" + _PID + b"Qu." + b"trailing"
    kept, _ = rewrite_locations(data, to_cpu)
    cut, _ = rewrite_locations(data, to_cpu, keep_tail=False)
    assert kept.endswith(b".trailing") and cut.endswith(b"u.") and kept[:-8] == cut


def test_tuple_keys_and_frozensets_of_tuples():
    """A traced tuple hashes as a tuple: a (1, 2, 3, 4) key is not refused as an odd type."""
    tree = {(1, 2, 3, 4): Storage("0", "cuda:0"), "fs": frozenset({(1, 2), (3, 4)})}
    new, _ = rewrite_locations(dumps(tree, 2), to_cpu)
    got, _ = c_load(new)
    assert got == {(1, 2, 3, 4): ("S", "0", "cpu", 5), "fs": frozenset({(1, 2), (3, 4)})}
