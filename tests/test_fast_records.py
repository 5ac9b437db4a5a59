"""SafeUnpickler's tensor-record fast path does exactly what its opcode loop does.

``load_in_memory`` runs a torch.save tensor record (the argument tuple of a rebuild call) as one regex
match instead of ~27 opcodes (``_tensor_record``). The promise: for any bytes, the fast path and the
opcode loop (``fast_records = False``) end the same way: the same result object graph (sharing
included), the same memo, the same globals, or the same exception with the same message. Checked on
torch.save files of many kinds, on hand-edited records, and on thousands of mutated pickles.
"""
from __future__ import annotations

import collections
import io
import os
import random
import struct

import pytest
import torch
import torchvision

from ckpttool.formats import safe_pickle, torch_zip
from ckpttool.formats.safe_pickle import NumpyDtype, SafeUnpickler, Stub, TorchDtype, _StorageType
from ckpttool.records import StorageRef, TensorRef


def canon(obj, seen: dict):
    """A comparable picture of an object graph: values, types, and which objects are the same object."""
    if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
        return (type(obj).__name__, obj) if not isinstance(obj, float) or obj == obj else ("float", "nan")
    if id(obj) in seen:
        return ("same-as", seen[id(obj)][0])
    seen[id(obj)] = (len(seen), obj)  # kept alive: a freed temporary's id could be reused by another object
    t = type(obj)
    if t is TensorRef:
        return ("tensor", obj.shape, obj.dtype, obj.stride, obj.storage_offset, canon(obj.storage, seen), obj.device,
                obj.requires_grad, obj.is_parameter, obj.kind, obj.subclass, obj.explicit_nbytes)
    if t is StorageRef:
        src = obj.source
        return ("storage", obj.key, obj.dtype, obj.device, obj.nbytes, obj.file, type(src).__name__,
                getattr(src, "size", None), getattr(src, "_header_offset", None))
    if isinstance(obj, Stub):
        d = obj.__dict__
        return ("stub", obj.qualname, canon(d["args"], seen), canon(d["kwargs"], seen), canon(d["state"], seen),
                canon(d["items"], seen), canon(d["list_items"], seen), d["called"])
    if isinstance(obj, (TorchDtype, _StorageType, NumpyDtype)):
        return (t.__name__, repr(obj))
    if isinstance(obj, dict):
        extra = canon(dict(obj.__dict__), seen) if hasattr(obj, "__dict__") else None
        return (t.__name__, [(canon(k, seen), canon(v, seen)) for k, v in obj.items()], extra)
    if isinstance(obj, (list, tuple)):
        return (t.__name__, [canon(v, seen) for v in obj])
    if isinstance(obj, (set, frozenset)):
        return (t.__name__, sorted(repr(canon(v, seen)) for v in obj))
    if isinstance(obj, type) and issubclass(obj, Stub):
        return ("stub-class", obj.stub_module, obj.stub_name)
    if callable(obj):
        return ("callable", getattr(obj, "__qualname__", repr(t)))
    return (t.__name__, repr(obj))


def run(data: bytes, persistent_load, fast: bool):
    """Load ``data`` with the fast path on or off; what it made (or raised), its memo and its globals."""
    bio = io.BytesIO(data)
    up = SafeUnpickler(bio, persistent_load, len(data))
    up._file_for_fallback = bio
    up.fast_records = fast
    seen: dict = {}
    try:
        out = ("ok", canon(up.load_in_memory(data), seen))
    except Exception as e:  # noqa: BLE001 - any exception, compared by type and message
        out = ("raised", type(e).__name__, str(e))
    return out, canon(dict(sorted(up.memo.items())), seen), sorted(up.globals)


def zip_parts(path):
    """(data.pkl bytes, a fresh storage loader on the archive) of a torch zip file."""
    zf = torch_zip.open_zip(str(path))
    folder = torch_zip.find_record_folder(zf, str(path))
    data = torch_zip.read_member(zf, folder + "data.pkl", str(path))
    size = os.path.getsize(path)
    return data, lambda: torch_zip.storage_loader(zf, folder, str(path), size)


@pytest.fixture
def fast_records_taken(monkeypatch):
    """How many records the fast path ran (so each comparison is known to have exercised it)."""
    count = [0]
    real = SafeUnpickler._tensor_record

    def spy(self, m, stack, memo):
        end = real(self, m, stack, memo)
        count[0] += bool(end)
        return end
    monkeypatch.setattr(SafeUnpickler, "_tensor_record", spy)
    return count


def assert_same(data: bytes, make_loader) -> tuple:
    fast, slow = run(data, make_loader(), True), run(data, make_loader(), False)
    assert fast == slow
    return fast


def _state_dicts():
    """(name, object, fewest records the fast path must run). A storage seen before is named by a GET of its
    key, which the fast path leaves to the loop; so is a record with a storage class or location seen first."""
    g = torch.Generator().manual_seed(0)
    shared = torch.arange(24.0)
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.bool, torch.complex64)
    yield "dtypes", {f"{d}_{i}".replace("torch.", ""): torch.ones(3, 2).to(d) for d in dtypes for i in range(2)}, 11
    yield "shapes", {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "one": torch.ones(7),
                     "three": torch.ones(2, 3, 4), "four": torch.ones(1, 2, 3, 4),
                     "five": torch.ones(1, 1, 2, 1, 3), "six": torch.ones(2, 1, 1, 1, 1, 2)}, 6
    yield "big_dims", {"first": torch.zeros(1), "wide": torch.zeros(300, 2), "wider": torch.zeros(1, 70000),
                       "long": torch.zeros(2 ** 16 + 3), "huge_stride": torch.zeros(3, 2 ** 17)[:, :2]}, 4
    yield "views", {"first": torch.zeros(1), "t": torch.randn(6, 5, generator=g).t(),
                    "slice": torch.randn(6, 5, generator=g)[2:, 1:4], "step": torch.randn(6, 5, generator=g)[::2],
                    "row": torch.randn(6, 5, generator=g)[3], "expand": torch.ones(1, 3).expand(4, 3),
                    "far": torch.randn(400, generator=g)[300:]}, 6
    yield "shared", {"first": torch.zeros(1), "a": shared, "b": shared.view(4, 6), "c": shared[5:9], "d": shared,
                     "e": torch.ones(2)}, 2
    yield "many", collections.OrderedDict((f"layer{i}.weight", torch.full((2,), float(i))) for i in range(700)), 699
    yield "grad", {"first": torch.zeros(1), "p": torch.nn.Parameter(torch.ones(2, 2)),
                   "g": torch.ones(3).requires_grad_(), "h": torch.nn.Parameter(torch.ones(3), requires_grad=False)}, 3
    yield "nested", {"model": {"w": torch.ones(2), "b": torch.ones(3)}, "epoch": 3,
                     "lists": [torch.ones(4), (torch.ones(5), {"x": torch.ones(6)})]}, 4


@pytest.mark.parametrize("name,obj,fewest", list(_state_dicts()), ids=[n for n, _, _ in _state_dicts()])
def test_torch_save_files(tmp_path, fast_records_taken, name, obj, fewest):
    p = tmp_path / f"{name}.pt"
    torch.save(obj, p)
    data, make_loader = zip_parts(p)
    out = assert_same(data, make_loader)
    assert out[0][0] == "ok"
    assert fast_records_taken[0] >= fewest


def test_full_model_and_optimizer(tmp_path, fast_records_taken):
    """A pickled nn.Module (parameters through _rebuild_parameter) and an optimizer checkpoint (0-d steps)."""
    model = torchvision.models.resnet18(weights=None)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    for name, obj in (("model", model), ("ckpt", {"model": model.state_dict(), "optim": opt.state_dict(),
                                                   "sched": {"last_epoch": 1}})):
        p = tmp_path / f"{name}.pt"
        torch.save(obj, p)
        data, make_loader = zip_parts(p)
        assert assert_same(data, make_loader)[0][0] == "ok"
    assert fast_records_taken[0] > 100


def test_gpu_tagged_and_committed_files(committed, fast_records_taken):
    data, make_loader = zip_parts(committed("gpu_tagged.pt"))
    out = assert_same(data, make_loader)
    assert out[0][0] == "ok" and "cuda" in repr(out[0]) and fast_records_taken[0] > 0


def _record_spans(data: bytes):
    return [m for m in (safe_pickle._TENSOR_RECORD.match(data, i) for i in range(len(data) - 1)
                        if data[i] == 0x28 and data[i + 1] == 0x28) if m is not None]


def _three_tensor_pickle(tmp_path):
    """A small torch.save pickle; ``_record_spans`` of it: the records of 'b' and 'c' (the first has GLOBALs)."""
    p = tmp_path / "three.pt"
    torch.save({"a": torch.ones(2, 3), "b": torch.zeros(4), "c": torch.ones(5)}, p)
    return zip_parts(p)


def test_record_reads_memo_in_stream_order(tmp_path):
    """A GET of an index the same record PUT a moment before sees the new object, as in the loop."""
    data, make_loader = _three_tensor_pickle(tmp_path)
    m = _record_spans(data)[0]
    # the second record's location GET now reads the index its own storage key was just PUT at
    put_key, get_loc = m.span(5), m.span(6)
    put = data[put_key[0]:put_key[1]]
    index = put[1] if len(put) == 2 else struct.unpack("<I", put[1:])[0]
    assert get_loc[1] - get_loc[0] == 2 and index < 256
    edited = data[:get_loc[0]] + b"h" + bytes([index]) + data[get_loc[1]:]
    out = assert_same(edited, make_loader)
    assert out[0][0] == "ok"  # the key '1' became the location, and so the storage's device
    assert "('tensor', (4,), 'float32', (1,), 0, ('storage', '1', 'float32', '1'" in repr(out[0])


def test_declared_key_length_mismatch_is_left_to_the_loop(tmp_path, fast_records_taken):
    data, make_loader = _three_tensor_pickle(tmp_path)
    m = _record_spans(data)[1]
    length_at = m.start(3)
    edited = data[:length_at] + b"\x05" + data[length_at + 1:]  # BINUNICODE now declares 5 bytes for '2'
    assert assert_same(edited, make_loader)[0][0] == "raised"
    assert fast_records_taken[0] == 1  # b's record ran fast (in the fast load), c's was left to the loop


@pytest.mark.parametrize("edit", ["not_callable_hooks", "not_callable_func", "missing_memo", "missing_long_memo",
                                  "missing_long_type", "missing_long_location", "missing_long_hooks", "bad_storage_word",
                                  "negative_dim", "negative_offset", "negative_numel", "hooks_call_other", "stack_empty"])
def test_errors_are_the_loops(tmp_path, edit):
    data, make_loader = _three_tensor_pickle(tmp_path)
    m = _record_spans(data)[1]
    if edit == "not_callable_hooks":  # the hooks GET reads the storage key string
        s, e = m.span(15)
        edited = data[:s] + b"h" + bytes([data[m.start(5) + 1]]) + data[e:]
    elif edit == "hooks_call_other":  # the hooks GET reads the rebuild function, called with no arguments
        s, e = m.span(15)
        edited = data[:s] + data[m.start() - 2:m.start()] + data[e:]
    elif edit == "not_callable_func":  # the rebuild GET before the record reads a string
        edited = data[:m.start() - 2] + b"h\x01" + data[m.start():]
    elif edit == "missing_memo":
        s, e = m.span(1)
        edited = data[:s] + b"h\xfe" + data[e:]
    elif edit.startswith("missing_long"):  # LONG_BINGET of an index never PUT: pickle's UnpicklingError, not KeyError
        group = {"memo": 1, "type": 2, "location": 6, "hooks": 15}[edit.rsplit("_", 1)[1]]
        s, e = m.span(group)
        edited = data[:s] + b"j\x39\x30\x00\x00" + data[e:]
    elif edit == "bad_storage_word":  # 'storage' GET reads the location string
        s, e = m.span(1)
        edited = data[:s] + data[m.start(6):m.end(6)] + data[e:]
    elif edit == "negative_dim":  # size (4,) -> (-1,)
        s, e = m.span(10)
        assert data[s:s + 2] == b"K\x05"
        edited = data[:s] + b"J\xff\xff\xff\xff" + data[s + 2:]
    elif edit in ("negative_offset", "negative_numel"):  # BININT is signed: -1, not 2**32 - 1
        s, e = m.span(9 if edit == "negative_offset" else 7)
        edited = data[:s] + b"J\xff\xff\xff\xff" + data[e:]
    else:  # the record at the very start, nothing on the stack for its REDUCE
        edited = b"\x80\x02" + data[m.start():m.end()] + b"."
    out = assert_same(edited, make_loader)
    assert out[0][0] == "raised"


def _mutants(data: bytes, rng: random.Random, count: int):
    spans = [m.span() for m in _record_spans(data)]
    for _ in range(count):
        s, e = rng.choice(spans)
        i = rng.randrange(max(0, s - 4), min(len(data), e + 2))
        kind = rng.random()
        if kind < 0.6:
            yield data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
        elif kind < 0.8:
            yield data[:i] + data[i + 1:]
        else:
            yield data[:i] + bytes([rng.choice(b"hjqrKMJ()t\x85\x86\x87QRX\x88\x89")]) + data[i:]


def test_mutated_records_end_the_same_way(tmp_path):
    """Thousands of one-byte edits in and around tensor records: fast path and loop never differ."""
    p = tmp_path / "m.pt"
    torch.save({"a": torch.ones(2, 3), "b": torch.arange(300.0).view(3, 100)[:, 1:], "c": torch.tensor(1),
                "d": torch.zeros(70000, dtype=torch.int8)[::7], "e": torch.ones(2, 2, 2, 2)}, p)
    data, make_loader = zip_parts(p)
    rng = random.Random(7)
    outcomes = collections.Counter()
    for mutant in _mutants(data, rng, 3000):
        out = assert_same(mutant, make_loader)
        outcomes[out[0][0]] += 1
    assert outcomes["ok"] > 100 and outcomes["raised"] > 100  # both kinds of ending were compared


def test_inspect_takes_the_fast_path(tmp_path, fast_records_taken):
    """The records of an ordinary torch.save file are run whole (all but the first of each kind)."""
    from ckpttool.formats import open as open_checkpoint
    p = tmp_path / "sd.pt"
    torch.save({f"w{i}": torch.ones(i % 5 + 1) for i in range(50)}, p)
    ckpt = open_checkpoint(str(p))
    assert len(ckpt.root) == 50 and fast_records_taken[0] == 49


@pytest.mark.parametrize("load", [safe_pickle.safe_load, lambda d: safe_pickle.load_stream(io.BytesIO(d))],
                         ids=["in-memory", "stream"])
def test_setitems_batches(load):
    """SETITEMS fills a dict in one C call where it can: the same items, order, last-wins, and errors."""
    def u(s):
        return b"X" + struct.pack("<I", len(s)) + s.encode()
    items = u("b") + b"K\x01" + u("a") + b"K\x02" + u("b") + b"K\x03"
    assert load(b"\x80\x02}(" + items + b"u.")[0] == {"b": 3, "a": 2}
    od = load(b"\x80\x02ccollections\nOrderedDict\n)R(" + items + b"u.")[0]
    assert type(od) is collections.OrderedDict and list(od.items()) == [("b", 3), ("a", 2)]
    with pytest.raises(safe_pickle.FormatError, match="malformed pickle"):  # an odd count: no key left unset silently
        load(b"\x80\x02}(" + items + u("c") + b"u.")
    with pytest.raises(safe_pickle.FormatError, match="as a dict key"):
        load(b"\x80\x02}(]K\x01u.")
    stub = load(b"\x80\x02cmod\nThing\n)\x81(" + items + b"u.")[0]
    assert isinstance(stub, Stub) and stub.items == {"b": 3, "a": 2}
