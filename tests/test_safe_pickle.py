"""Attacks on the restricted unpickler and on everything that walks what it returns.

The promise under test (DESIGN.md, principle 2): reading a checkpoint never imports, calls or runs
anything a pickle names, never touches the filesystem beyond reading the file, and no crafted
file makes the reader allocate memory out of proportion to its size, hang, or crash with a
traceback (a bug) instead of a CkptError (exit 2).

Every payload here is hand-assembled from pickle opcodes and is checked to be *real*: under the
stock ``pickle.loads`` (in a throwaway subprocess, ``test_payloads_are_live_under_stock_pickle``)
each one creates its marker file. Each is then fed to ckpttool as a bare pickle, as the
``data.pkl`` of a real torch zip, and as the main pickle of a real legacy-format file, through
``ckpttool.open`` and ``ckpttool inspect`` (table, ``--json``, ``--stats``), under an audit hook.
"""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from typing import List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpttool
import ckpttool.formats.bare_pickle  # noqa: F401  (imported up front so the audit window sees no first-time imports)
import ckpttool.formats.torch_legacy  # noqa: F401
import ckpttool.formats.torch_zip  # noqa: F401
import ckpttool.render  # noqa: F401
import ckpttool.summary  # noqa: F401
from ckpttool.errors import CkptError, FormatError
from ckpttool.pickles import reading as safe_pickle
from ckpttool.pickles.reading import Stub, safe_load
from ckpttool.records import TensorRef

try:  # first-time imports of the renderer's helpers happen here, not inside an audited window
    import tabulate  # noqa: F401
except ImportError:  # pragma: no cover
    pass


from payloads import (  # noqa: F401 - ext_registry is a fixture the tests name
    CONTAINERS, Ctx, EXT_CODES, PAYLOADS, PAYLOAD_IDS, assert_clean, assert_cli_sane, audited, by, call,
    cli_run, dct, embed, ext_registry, glob, i4, legacy_with_pickle, lng, lst, make_ctx, markers_in, pk,
    read_everything, sglob, tup, u, zip_with_pickle)


# =============================================================================================
# 0. The payloads are live: the stock unpickler runs every one (in a throwaway process)
# =============================================================================================

def test_payloads_are_live_under_stock_pickle(tmp_path):
    """Without this, a 'safe' result could just mean a broken payload."""
    cases = {}
    for i, name in enumerate(PAYLOAD_IDS):
        folder = tmp_path / f"p{i:02d}"
        folder.mkdir()
        ctx = make_ctx(folder)
        build, _ = PAYLOADS[name]
        (folder / "payload.pkl").write_bytes(build(ctx))
        cases[name] = str(folder)
    script = textwrap.dedent("""
        import copyreg, json, os, pickle, sys, time
        ext, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        for mod, name, code in ext:
            copyreg.add_extension(mod, name, code)
        for name, folder in cases.items():
            try:
                pickle.loads(open(os.path.join(folder, "payload.pkl"), "rb").read())
            except BaseException as e:
                print("raised", name, type(e).__name__, e, file=sys.stderr)
        deadline = time.time() + 20
        missing = list(cases)
        while missing and time.time() < deadline:  # subprocess.Popen runs asynchronously
            missing = [n for n, f in cases.items() if not os.path.exists(os.path.join(f, "MARKER"))]
            time.sleep(0.1)
        print(json.dumps(missing))
    """)
    ext = [[m, n, c] for (m, n), c in EXT_CODES.items()]
    r = subprocess.run([sys.executable, "-c", script, json.dumps(ext), json.dumps(cases)], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    missing = json.loads(r.stdout.strip().splitlines()[-1])
    assert missing == [], f"payloads that do nothing under pickle.loads: {missing}\n{r.stderr[-2000:]}"


# =============================================================================================
# 1. No payload runs, through any container, through the library or the CLI
# =============================================================================================

@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", PAYLOAD_IDS)
def test_payload_does_nothing(name, container, tmp_path, make):
    build, named = PAYLOADS[name]
    ctx = make_ctx(tmp_path)
    data = build(ctx)
    path = embed(container, data, tmp_path, make)
    before = set(sys.modules)
    with ext_registry(), audited() as events:
        got, results = read_everything(path)
        lib = None
        try:
            lib = safe_load(data)
        except CkptError:
            pass
    if "Popen" in name:
        time.sleep(0.3)  # a spawned process, had there been one, would have touched the marker by now
    assert markers_in(tmp_path) == [], f"{name} in {container}: the payload ran"
    assert_clean(events, before, named)
    for r in results:
        assert_cli_sane(r)
    if isinstance(got, CkptError):
        # Refused is fine (calling a stub *object*, as getattr chains do, is a TypeError), as one line.
        assert str(got).startswith("malformed pickle"), got
        assert results[0].exit_code == 2
        return
    assert isinstance(lib, tuple)
    handled = {(g.module, g.name): g.handling for g in got.globals}
    assert handled, "the named globals are recorded"
    assert all(h in ("stub", "builtin", "tensor") for h in handled.values())
    assert not any(k[0] in ("os", "posix", "subprocess", "runpy", "pickle", "_pickle") and h != "stub"
                   for k, h in handled.items()), handled
    js = json.loads(results[1].stdout)
    assert js["format"] == {"bare": "pickle", "zip": "torch_zip", "legacy": "torch_legacy"}[container]


def test_audit_window_sees_a_live_payload(tmp_path):
    """Negative control: the checks used above do catch a payload that runs."""
    ctx = make_ctx(tmp_path)
    before = set(sys.modules)
    with audited() as events:
        pickle.loads(PAYLOADS["builtins.open"][0](ctx))
        pickle.loads(pk(call(glob("builtins", "eval"), u("__import__('pstats')"))))
    assert markers_in(tmp_path) == ["MARKER"]
    checks = {"pickle.find_class": "forbidden actions", "open": "opened for writing", "compile": "compiled"}
    if "pstats" not in before:
        checks["import"] = "pstats"
    for event, message in checks.items():
        with pytest.raises(AssertionError, match=message):
            assert_clean([e for e in events if e[0] == event], before, ("pstats",))


def test_payload_globals_become_stubs_that_record_the_call(tmp_path):
    ctx = make_ctx(tmp_path)
    root, globs = safe_load(PAYLOADS["os.system"][0](ctx))
    assert isinstance(root, Stub)
    assert type(root).stub_module == "os" and type(root).stub_name == "system"
    assert root.args == (ctx.cmd,) and root.called is True
    assert [(g.module, g.name, g.handling) for g in globs] == [("os", "system", "stub")]
    # getattr(__import__('os'), 'system') is a stub *object*; calling it is refused, not run
    with pytest.raises(FormatError, match="not callable"):
        safe_load(PAYLOADS["getattr(__import__('os'),'system')"][0](ctx))
    assert markers_in(tmp_path) == []


class _ReduceTo:
    """A module-level class whose pickle runs ``fn(*args)`` on load, as a malicious checkpoint would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _reduce_payloads(ctx: Ctx):
    return {
        "os.system": _ReduceTo(os.system, ctx.cmd),
        "subprocess.check_call": _ReduceTo(subprocess.check_call, ["touch", ctx.marker]),
        "eval": _ReduceTo(eval, ctx.code),
        "exec": _ReduceTo(exec, ctx.code),
        "open": _ReduceTo(open, ctx.marker, "w"),
        "pickle.loads": _ReduceTo(pickle.loads, pickle.dumps(_ReduceTo(os.system, ctx.cmd))),
        "in a checkpoint dict": {"state_dict": {}, "epoch": 1, "hook": _ReduceTo(os.system, ctx.cmd)},
    }


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("kind", ["os.system", "subprocess.check_call", "eval", "exec", "open", "pickle.loads",
                                  "in a checkpoint dict"])
def test_reduce_class_pickled_by_pickle_dumps(kind, protocol, tmp_path, make):
    ctx = make_ctx(tmp_path)
    data = pickle.dumps(_reduce_payloads(ctx)[kind], protocol=protocol)
    bare = os.path.join(str(tmp_path), "reduce.pkl")
    with open(bare, "wb") as f:
        f.write(data)
    zpath = zip_with_pickle(make("state_dict.pt"), os.path.join(str(tmp_path), "reduce.pt"), data)
    lpath = legacy_with_pickle(make("legacy.pt"), os.path.join(str(tmp_path), "reduce_legacy.pt"), data)
    before = set(sys.modules)
    with audited() as events:
        # protocol 0/1 pickles have no PROTO opcode and are not detected as "pickle": force the reader
        outcomes = [read_everything(bare, "pickle"), read_everything(bare), read_everything(zpath),
                    read_everything(lpath)]
    time.sleep(0.05)
    assert markers_in(tmp_path) == []
    assert_clean(events, before)
    for got, results in outcomes:
        for r in results:
            assert_cli_sane(r)
    forced, _ = outcomes[0]
    assert not isinstance(forced, CkptError), forced
    assert any(g.handling == "stub" and g.name in ("system", "check_call", "eval", "exec", "open", "loads")
               for g in forced.globals)


# =============================================================================================
# 2. torch's rebuild functions become TensorRefs, bounds-checked against their storage
# =============================================================================================

def storage_pid(stype: str = "FloatStorage", key: str = "0", numel: int = 6, location: str = "cpu") -> bytes:
    return tup(u("storage"), glob("torch", stype), u(key), u(location), lng(numel)) + b"Q"


def ints(*xs: int) -> bytes:
    return tup(*(lng(x) for x in xs))


def rebuild_v2(pid: bytes, offset: int, size, stride, requires_grad: bool = False) -> bytes:
    return call(glob("torch._utils", "_rebuild_tensor_v2"), pid, lng(offset), ints(*size), ints(*stride),
                b"\x88" if requires_grad else b"\x89", call(glob("collections", "OrderedDict")))


def rebuild_v3(pid: bytes, offset: int, size, stride, dtype: bytes) -> bytes:
    return call(glob("torch._utils", "_rebuild_tensor_v3"), pid, lng(offset), ints(*size), ints(*stride), b"\x89",
                call(glob("collections", "OrderedDict")), dtype)


@pytest.fixture
def six_floats(tmp_path):
    """A real torch zip whose storage '0' is 6 float32 values (24 bytes)."""
    path = os.path.join(str(tmp_path), "six.pt")
    torch.save({"t": torch.arange(6, dtype=torch.float32)}, path)
    return path


@pytest.mark.parametrize("offset,size,stride", [
    (0, (6,), (1,)), (1, (2, 2), (1, 2)), (0, (2, 3), (3, 1)), (0, (3, 2), (1, 3)), (5, (1,), (1,)),
    (2, (2, 2), (0, 1)), (0, (0, 4), (4, 1)), (0, (), ()),
])
def test_rebuild_tensor_v2_is_a_tensorref_matching_torch(six_floats, tmp_path, offset, size, stride):
    data = pk(dct(t=rebuild_v2(storage_pid(), offset, size, stride)))
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "v2.pt"), data)
    ckpt = ckpttool.open(path)
    ref = ckpt.root["t"]
    assert isinstance(ref, TensorRef)
    assert (ref.shape, ref.stride, ref.storage_offset, ref.dtype, ref.device) == \
        (tuple(size), tuple(stride), offset, "float32", "cpu")
    assert ref.storage.key == "0" and ref.storage.nbytes == 24
    assert {(g.module, g.name): g.handling for g in ckpt.globals}[("torch._utils", "_rebuild_tensor_v2")] == "tensor"
    theirs = torch.load(path, weights_only=True)["t"]  # torch's own reading of the same bytes
    assert tuple(theirs.shape) == ref.shape and tuple(theirs.stride()) == ref.stride
    assert theirs.storage_offset() == ref.storage_offset
    assert ref.to_torch().tolist() == theirs.tolist()


@pytest.mark.parametrize("offset,size,stride", [
    (3, (2, 2), (1, 2)),       # last element is 6: one past the end
    (0, (7,), (1,)),
    (6, (1,), (1,)),
    (0, (2,), (6,)),
    (0, (2,), (10 ** 12,)),
    (10 ** 15, (1,), (1,)),
    (0, (2 ** 40, 2 ** 40), (0, 0)),  # stride 0 is fine, but numel says nothing of bytes: in bounds
])
def test_rebuild_tensor_past_storage_end_is_refused(six_floats, tmp_path, offset, size, stride):
    data = pk(dct(t=rebuild_v2(storage_pid(), offset, size, stride)))
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "past.pt"), data)
    if stride == (0, 0):  # a broadcast view of element 0: legal, and must not be materialized by open()
        ref = ckpttool.open(path).root["t"]
        assert ref.shape == size and ref.span() == (0, 4)
        return
    with pytest.raises(CkptError, match="past the end"):
        ckpttool.open(path)
    r = cli_run("inspect", path)
    assert r.exit_code == 2 and r.stderr.startswith("ckpttool: error: malformed pickle: tensor")


@pytest.mark.parametrize("bad", [
    pytest.param(rebuild_v2(storage_pid(), 0, (2, 2), (2,)), id="sizes-vs-strides"),
    pytest.param(call(glob("torch._utils", "_rebuild_tensor_v2"), storage_pid(), i4(-1), ints(1), ints(1), b"\x89",
                      b"N"), id="negative-offset"),
    pytest.param(call(glob("torch._utils", "_rebuild_tensor_v2"), storage_pid(), lng(0), tup(i4(2)),
                      tup(i4(-1)), b"\x89", b"N"), id="negative-stride"),
    pytest.param(call(glob("torch._utils", "_rebuild_tensor_v2"), storage_pid(), lng(0), tup(u("2")),
                      ints(1), b"\x89", b"N"), id="str-size"),
    pytest.param(call(glob("torch._utils", "_rebuild_tensor_v2"), storage_pid(), lng(0), tup(b"\x88"),
                      ints(1), b"\x89", b"N"), id="bool-size"),
    pytest.param(rebuild_v2(u("not a storage"), 0, (1,), (1,)), id="str-storage"),
    pytest.param(rebuild_v2(call(glob("os", "system"), u("x")), 0, (1,), (1,)), id="stub-storage"),
    pytest.param(rebuild_v2(storage_pid(numel=7), 0, (1,), (1,)), id="numel-past-record"),
    pytest.param(rebuild_v2(storage_pid(key="../../../../etc/passwd"), 0, (1,), (1,)), id="key-traversal"),
    pytest.param(rebuild_v2(storage_pid(key="1"), 0, (1,), (1,)), id="key-absent"),
    pytest.param(rebuild_v2(tup(u("storage"), glob("os", "system"), u("0"), u("cpu"), lng(6)) + b"Q", 0, (1,), (1,)),
                 id="stub-storage-type"),
    pytest.param(rebuild_v2(tup(u("storage"), glob("torch", "FloatStorage"), u("0"), u("cpu"), lng(-1)) + b"Q",
                            0, (1,), (1,)), id="negative-numel"),
    pytest.param(rebuild_v2(u("0") + b"Q", 0, (1,), (1,)), id="str-pid"),
    pytest.param(rebuild_v3(storage_pid("UntypedStorage", numel=24), 0, (4,), (1,), u("float32")),
                 id="v3-str-dtype"),
    pytest.param(rebuild_v3(storage_pid("UntypedStorage", numel=24), 0, (4,), (1,), glob("os", "system")),
                 id="v3-stub-dtype"),
    pytest.param(rebuild_v3(storage_pid("UntypedStorage", numel=24), 0, (13,), (1,), glob("torch", "float16")),
                 id="v3-past-end"),
    pytest.param(call(glob("torch._utils", "_rebuild_parameter"), u("x"), b"\x88", b"N"), id="parameter-of-str"),
    pytest.param(call(glob("torch._tensor", "_rebuild_from_type_v2"), u("x"), b"N", b"N", b"N"),
                 id="from-type-not-callable"),
])
def test_malformed_tensor_records_are_format_errors(six_floats, tmp_path, bad):
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "bad.pt"), pk(dct(t=bad)))
    with pytest.raises(FormatError):
        ckpttool.open(path)
    assert_cli_sane(cli_run("inspect", path), allow=(2,))


def test_rebuild_v3_parameter_and_subclass(six_floats, tmp_path):
    v3 = rebuild_v3(storage_pid("UntypedStorage", numel=24), 0, (12,), (1,), glob("torch", "float16"))
    param = call(glob("torch._utils", "_rebuild_parameter"), rebuild_v2(storage_pid(), 0, (3,), (2,)), b"\x88",
                 call(glob("collections", "OrderedDict")))
    sub = call(glob("torch._tensor", "_rebuild_from_type_v2"), glob("torch._utils", "_rebuild_tensor_v2"),
               glob("mypkg", "MyTensor"), tup(storage_pid(), lng(1), ints(5), ints(1), b"\x89", b"N"), b"}")
    meta = call(glob("torch._utils", "_rebuild_meta_tensor_no_storage"), glob("torch", "bfloat16"), ints(10 ** 12),
                ints(1), b"\x89")
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "v3.pt"),
                           pk(dct(v3=v3, param=param, sub=sub, meta=meta)))
    root = ckpttool.open(path).root
    assert (root["v3"].shape, root["v3"].dtype, root["v3"].storage.nbytes) == ((12,), "float16", 24)
    assert root["param"].is_parameter and root["param"].requires_grad and root["param"].stride == (2,)
    assert root["sub"].subclass == "mypkg.MyTensor" and root["sub"].storage_offset == 1
    assert root["meta"].kind == "meta" and root["meta"].storage is None  # no bytes: huge shape costs nothing


def test_legacy_storage_bounds(make, tmp_path):
    """The legacy reader: storage from the key list and headers, views bounded, tensor bounded."""
    src = make("legacy.pt")
    pid = tup(u("storage"), glob("torch", "FloatStorage"), u("k"), u("cpu"), lng(6), b"N") + b"Q"
    keys = pickle.dumps(["k"], protocol=2)
    storage = struct.pack("<q", 6) + struct.pack("<6f", *range(6))
    ok = legacy_with_pickle(src, os.path.join(str(tmp_path), "ok.pt"),
                            pk(dct(t=rebuild_v2(pid, 2, (2, 2), (2, 1)))), keys, storage)
    ref = ckpttool.open(ok).root["t"]
    assert (ref.shape, ref.stride, ref.storage_offset) == ((2, 2), (2, 1), 2)
    assert struct.unpack("<4f", ref.read_bytes()) == (2.0, 3.0, 4.0, 5.0)
    bad = legacy_with_pickle(src, os.path.join(str(tmp_path), "bad.pt"),
                             pk(dct(t=rebuild_v2(pid, 3, (2, 2), (2, 1)))), keys, storage)
    with pytest.raises(CkptError, match="past the end"):
        ckpttool.open(bad)
    view = tup(u("storage"), glob("torch", "FloatStorage"), u("k"), u("cpu"), lng(6),
               tup(u("v"), lng(4), lng(3))) + b"Q"
    outside = legacy_with_pickle(src, os.path.join(str(tmp_path), "view.pt"),
                                 pk(dct(t=rebuild_v2(view, 0, (1,), (1,)))), keys, storage)
    with pytest.raises(CkptError, match="outside its storage"):
        ckpttool.open(outside)
    short = legacy_with_pickle(src, os.path.join(str(tmp_path), "short.pt"),
                               pk(dct(t=rebuild_v2(pid, 0, (6,), (1,)))), keys, storage[:-4])
    with pytest.raises(CkptError, match="truncated"):
        ckpttool.open(short)


# =============================================================================================
# 3. Memory and time bombs: refused quickly, or read in bounded memory; never a crash
# =============================================================================================

BIG = 10 ** 10


@pytest.mark.parametrize("body", [
    pytest.param(call(glob("builtins", "bytes"), lng(BIG)), id="bytes(10**10)"),
    pytest.param(call(glob("builtins", "bytearray"), lng(BIG)), id="bytearray(10**10)"),
    pytest.param(call(glob("__builtin__", "bytearray"), lng(BIG)), id="__builtin__.bytearray"),
    pytest.param(call(glob("builtins", "bytes"), b"\x88"), id="bytes(True)"),
    pytest.param(b"(" + lng(BIG) + b"i__builtin__\nbytes\n", id="INST bytes"),
    pytest.param(b"(" + glob("builtins", "bytearray") + lng(BIG) + b"o", id="OBJ bytearray"),
    pytest.param(call(glob("torch._tensor", "_rebuild_from_type_v2"), glob("builtins", "bytes"), b"N",
                      tup(lng(BIG)), b"N"), id="rebuild_from_type(bytes)"),
    pytest.param(call(glob("builtins", "bytes"), lng(BIG), u("utf-8")), id="bytes(big, enc)"),
])
def test_allocation_by_count_is_refused_quickly(body, tmp_path, make):
    for container in ("bare", "zip"):
        path = embed(container, pk(body), tmp_path, make)
        t0 = time.monotonic()
        with pytest.raises(CkptError):
            ckpttool.open(path)
        assert time.monotonic() - t0 < 10.0  # hang guard
        assert_cli_sane(cli_run("inspect", path), allow=(2,))


@pytest.mark.parametrize("head", [
    pytest.param(b"\x8e" + struct.pack("<Q", 1 << 62), id="BINBYTES8 2**62"),
    pytest.param(b"\x8e" + struct.pack("<Q", BIG), id="BINBYTES8 10**10"),
    pytest.param(b"\x96" + struct.pack("<Q", BIG), id="BYTEARRAY8 10**10"),
    pytest.param(b"\x8d" + struct.pack("<Q", BIG), id="BINUNICODE8 10**10"),
    pytest.param(b"B" + struct.pack("<I", 0xFFFFFFF0), id="BINBYTES 4GB"),
    pytest.param(b"\x8a\xff", id="LONG1 short"),
    pytest.param(b"\x8b" + struct.pack("<i", 2 ** 31 - 1), id="LONG4 2GB"),
    pytest.param(b"\x95" + struct.pack("<Q", BIG), id="FRAME 10**10"),
])
def test_declared_lengths_beyond_the_file_are_refused_quickly(head, tmp_path, make):
    data = b"\x80\x04" + head + b"abc."
    for container in CONTAINERS:
        path = embed(container, data, tmp_path, make)
        t0 = time.monotonic()
        with pytest.raises(CkptError):
            ckpttool.open(path)
        assert time.monotonic() - t0 < 10.0, container  # hang guard
        assert_cli_sane(cli_run("inspect", path), allow=(2,))


def _run_isolated(script: str, tmp_path, timeout: float, mem_limit: int = 6 << 30):
    """Run ``script`` in a fresh interpreter with an address-space cap; return (completed or None, wall)."""
    pre = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({mem_limit}, {mem_limit}))
    """)
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(script)], cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0
    return r, time.monotonic() - t0


def test_memo_index_bomb_is_bounded(tmp_path):
    """LONG_BINPUT with a large index makes CPython's C unpickler grow (and zero) its memo array.

    An 8-byte file with index 2**26 costs ~1 GB of resident memory; index 0xFFFFFFFF asks for
    64 GB. The reader must refuse such an index (or use a memo that does not preallocate).
    """
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 26) + b".")
    script = f"""
        import resource, ckpttool
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            ckpttool.open({str(path)!r})
            print("read")
        except ckpttool.CkptError as e:
            print("refused")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """
    r, _ = _run_isolated(script, tmp_path, timeout=120, mem_limit=4 << 30)
    assert r is not None and r.returncode == 0, r and r.stderr[-1000:]
    outcome, grew_mb = r.stdout.split()
    assert int(grew_mb) < 200, f"an 11-byte pickle made the reader grow by {grew_mb} MB ({outcome})"


def test_deflated_data_pkl_is_not_inflated_whole(make, tmp_path):
    """A zip bomb: data.pkl deflated ~1000:1 (a tiny pickle, then 200 MB of zeros it never reads)."""
    import tracemalloc
    data = pickle.dumps({"epoch": 1}, protocol=2) + bytes(200 << 20)
    path = zip_with_pickle(make("state_dict.pt"), os.path.join(str(tmp_path), "bomb.pt"), data,
                           compress=zipfile.ZIP_DEFLATED)
    del data
    assert os.path.getsize(path) < 1 << 20
    tracemalloc.start()
    try:
        try:
            ckpttool.open(path)
        except CkptError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"a {os.path.getsize(path) >> 10} KiB file made open() hold {peak >> 20} MiB"


def test_colliding_int_keys_do_not_hang(tmp_path):
    """Hash flooding: dict keys k*(2**61-1) all hash to 0, so building the dict is quadratic.

    60,000 such keys are a 900 KB pickle that a stock dict takes ~25 s (and 10 MB, ~an hour) to build.
    """
    m = (1 << 61) - 1
    body = b"".join(lng(i * m) + b"N" for i in range(1, 60001))
    path = tmp_path / "flood.pkl"
    path.write_bytes(b"\x80\x02}(" + body + b"u.")
    script = f"""
        import ckpttool
        try:
            ckpttool.open({str(path)!r})
        except ckpttool.CkptError:
            pass
    """
    r, wall = _run_isolated(script, tmp_path, timeout=8)
    assert r is not None, f"opening a {path.stat().st_size >> 10} KiB pickle did not finish in 8 s"
    assert r.returncode == 0, r.stderr[-1000:]


def nest(open_op: bytes, close_op: bytes, n: int) -> bytes:
    return open_op * n + close_op * (n - 1)


DEEP = 100_000


@pytest.mark.parametrize("body", [
    pytest.param(nest(b"]", b"a", DEEP), id="lists"),
    pytest.param(b"]" + b"N\x85" * 1 + b"\x85" * DEEP + b"a", id="tuples"),
    pytest.param(b"}" + u("k") + b"}" * 1 + (u("k") + b"}") * (DEEP - 1) + b"s" * (DEEP - 1) + b"s", id="dicts"),
    pytest.param(glob("m", "Obj") + b"q\x00" + b"h\x00)\x81" * DEEP + b"b" * (DEEP - 1), id="stub-states"),
    pytest.param(dct(state_dict=nest(b"]", b"a", DEEP)), id="under-state_dict"),
])
def test_deep_nesting_is_read_or_refused_never_a_crash(body, tmp_path, make):
    for container in ("bare", "zip"):
        path = embed(container, pk(body), tmp_path, make)
        try:
            ckpttool.open(path)
        except CkptError:
            pass
        for args in (("inspect", path), ("inspect", path, "--json"), ("inspect", path, "--key", "0")):
            assert_cli_sane(cli_run(*args))


def test_deep_nesting_costs_linear_time(tmp_path):
    """A million nested lists (a 2 MB pickle) must not cost quadratic time to walk (e.g. by building
    every node's full ``0/0/0/...`` path name, 3 MB each at the bottom)."""
    n = 1_000_000
    path = tmp_path / "deep.pkl"
    path.write_bytes(pk(nest(b"]", b"a", n)))
    assert_cli_finishes(str(path), tmp_path, timeout=12)


def _stub_chain(depth: int, fan: int, module: bool) -> bytes:
    """Objects whose state holds ``fan`` references to the one below: a DAG of size depth*fan, a tree of fan**depth."""
    def get(i):
        return b"j" + struct.pack("<I", i)
    out = glob("m", "Node") + b"\x94" + b")\x81}b\x94" + b"0"  # memo 0: the class; 1: a leaf object
    for level in range(depth):
        refs = b"".join(u(f"f{i}") + get(level + 1) for i in range(fan))
        state = (u("_parameters") + b"}" + u("_modules") + b"}(" + refs + b"u") if module else refs
        out += get(0) + b")\x81}(" + state + b"ub\x94" + b"0"
    return out + get(depth + 1)


@pytest.mark.parametrize("module", [False, True], ids=["object-fields", "module-children"])
def test_shared_references_do_not_explode(module, tmp_path):
    """A 2 KB pickle of objects that share their children: walking it as a tree costs 2**40 (or 6**30) visits."""
    depth, fan = (40, 2) if module else (30, 6)
    path = tmp_path / "dag.pkl"
    path.write_bytes(pk(dct(x=_stub_chain(depth, fan, module)), 4))
    assert path.stat().st_size < 16 << 10
    assert_cli_finishes(str(path), tmp_path, "--json")


def assert_cli_finishes(path: str, tmp_path, *extra: str, timeout: float = 8) -> None:
    """``ckpttool inspect PATH`` in a fresh, memory-capped process: done in time, exit 0 or 2, no traceback."""
    r, wall = _run_isolated(f"""
        from ckpttool.cli import main
        main(["inspect", {path!r}, *{list(extra)!r}])
    """, tmp_path, timeout=timeout, mem_limit=3 << 30)
    assert r is not None, f"ckpttool inspect {' '.join(extra)} on a {os.path.getsize(path)} B file ran past {timeout} s"
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr[-1500:]


def dag(depth: int, kind: str = "list", base: int = 1000) -> bytes:
    """Memo-shared lists (or tuples): ~15 bytes a level, but 2**depth leaves to any walk that ignores sharing."""
    def put(i):
        return b"r" + struct.pack("<I", base + i)

    def get(i):
        return b"j" + struct.pack("<I", base + i)
    out = (b"]" if kind == "list" else b")") + put(0) + b"0"
    for k in range(depth):
        pair = (b"](" + get(k) + get(k) + b"e") if kind == "list" else (get(k) + get(k) + b"\x86")
        out += pair + put(k + 1) + b"0"
    return out + get(depth)


def _legacy_parts(src: str) -> List[bytes]:
    """The magic, protocol-version and sys_info pickles of a real legacy file, each as bytes."""
    parts = []
    with open(src, "rb") as f:
        for _ in range(3):
            start = f.tell()
            pickle.load(f)
            end = f.tell()
            f.seek(start)
            parts.append(f.read(end - start))
    return parts


def _place(where: str, data: bytes, tmp_path, make) -> str:
    if where in ("bare", "zip"):
        return embed(where, data, tmp_path, make)
    magic, version, sys_info = _legacy_parts(make("legacy.pt"))
    main = pk(dct(epoch=b"K\x03")) + pickle.dumps([], protocol=2)
    path = os.path.join(str(tmp_path), f"{where}.pt")
    with open(path, "wb") as f:
        if where == "legacy-version":
            f.write(magic + data + sys_info + main)
        else:  # legacy-sys_info
            f.write(magic + version + data + main)
    return path


@pytest.mark.parametrize("where,body,extra", [
    pytest.param("bare", call(glob("torch._utils", "_rebuild_meta_tensor_no_storage"), glob("torch", "float32"),
                              dag(40), ints(1), b"\x89"), (), id="meta-tensor-size-in-error-message"),
    pytest.param("zip", dct(t=rebuild_v2(tup(u("storage"), glob("torch", "FloatStorage"), dag(40), u("cpu"), lng(6))
                                         + b"Q", 0, (1,), (1,))), (), id="storage-key-in-error-message"),
    pytest.param("zip", dct(t=rebuild_v3(storage_pid(), 0, (1,), (1,), dag(40))), (), id="v3-dtype-in-error-message"),
    pytest.param("zip", dct(t=tup(dag(40), u("x")) + b"Q"), (), id="persistent-id-kind-in-error-message"),
    pytest.param("legacy-version", dag(40), (), id="legacy-version-in-error-message"),
    pytest.param("legacy-sys_info", dct(little_endian=dag(40)), ("--json",), id="legacy-sys_info-to-json"),
    pytest.param("legacy-version", nest(b"]", b"a", DEEP), (), id="legacy-version-deeply-nested"),
    pytest.param("legacy-sys_info", dct(little_endian=nest(b"]", b"a", DEEP)), ("--json",),
                 id="legacy-sys_info-deeply-nested-to-json"),
    pytest.param("bare", b"}" + dag(60, "tuple") + b"Ns", (), id="tuple-dag-as-dict-key"),
    pytest.param("bare", b"(" + dag(60, "tuple") + b"\x91", (), id="tuple-dag-in-frozenset"),
    pytest.param("bare", dct(x=call(glob("builtins", "set"), lst(dag(60, "tuple")))), (), id="tuple-dag-in-set()"),
])
def test_shared_structure_is_never_expanded(where, body, extra, tmp_path, make):
    """A few hundred bytes of memo-shared lists/tuples are 2**40 leaves to repr(), hash(), or a naive walk.

    Error messages that repr() what the file gave, metadata turned into JSON, and hashing a tuple
    (dict keys, set members: inside the unpickler itself, in C) must not expand them.
    """
    path = _place(where, pk(body, 4), tmp_path, make)
    assert os.path.getsize(path) < 1 << 20
    assert_cli_finishes(path, tmp_path, *extra, timeout=6)


@pytest.mark.parametrize("body", [
    pytest.param(b"]q\x00h\x00a", id="list-contains-itself"),
    pytest.param(b"}q\x00" + u("self") + b"h\x00s", id="dict-contains-itself"),
    pytest.param(dct(a=glob("m", "C") + b")\x81q\x00" + b"}" + u("me") + b"h\x00sb"), id="object-state-cycle"),
    pytest.param(dct(model=glob("m", "Net") + b")\x81q\x00" + dct(_parameters=b"}", _modules=b"}" + u("c") + b"h\x00s")
                     + b"b"), id="module-is-its-own-child"),
    pytest.param(dct(a=glob("m", "C") + b")\x81q\x00" + b"N" + b"}" + u("me") + b"h\x00s" + b"\x86b"),
                 id="object-slotstate-cycle"),
    pytest.param(glob("m", "C") + b")\x81q\x00" + tup(b"h\x00") + b"b", id="root-stub-state-is-tuple-of-itself"),
])
def test_cycles_are_read_or_refused_never_a_crash(body, tmp_path, make):
    for container in ("bare", "zip"):
        path = embed(container, pk(body), tmp_path, make)
        try:
            ckpttool.open(path)
        except CkptError:
            pass
        for args in (("inspect", path), ("inspect", path, "--json"), ("inspect", path, "--depth", "2")):
            assert_cli_sane(cli_run(*args))


@pytest.mark.parametrize("body", [
    pytest.param(dct(epoch=b"\x8b" + struct.pack("<i", 5000) + b"\x01" * 5000), id="int-of-12000-digits"),
    pytest.param(dct(cfg=glob("m", "Cfg") + b")\x81" + dct(seed=b"\x8b" + struct.pack("<i", 5000) + b"\x01" * 5000)
                     + b"b"), id="object-field-int-of-12000-digits"),
    pytest.param(dct(x=call(glob("builtins", "complex"), u("1e400"))), id="inf-complex"),
    pytest.param(dct(x=call(glob("builtins", "float"), u("nan")), y=call(glob("builtins", "slice"), b"N")),
                 id="nan-and-slice"),
    pytest.param(dct(x=call(glob("builtins", "set"), lst(call(glob("m", "K")), call(glob("m", "K"))))),
                 id="set-of-stubs"),
    pytest.param(dct(**{"param_groups": lst(call(glob("m", "G"))), "state": b"}"}), id="optimizer-with-stub-group"),
    pytest.param(b"}" + glob("m", "Key") + b")\x81" + u("v") + b"s", id="stub-as-key"),
])
def test_odd_values_render_without_crashing(body, tmp_path, make):
    for container in ("bare", "zip"):
        path = embed(container, pk(body, 4), tmp_path, make)
        try:
            ckpttool.open(path)
        except CkptError:
            pass
        for args in (("inspect", path), ("inspect", path, "--json")):
            assert_cli_sane(cli_run(*args))


# =============================================================================================
# The objects a pickle can reach must not let it change the reader
# =============================================================================================

def _snapshot_functions():
    funcs = {id(f): f for f in list(safe_pickle.TENSOR_FUNCS.values()) + list(safe_pickle._SAFE_BUILTINS.values())
             if callable(f) and hasattr(f, "__code__")}
    return {i: (f, f.__defaults__, f.__kwdefaults__, dict(f.__dict__), f.__name__) for i, f in funcs.items()}


def _restore_functions(snap):
    for f, defaults, kwdefaults, d, name in snap.values():
        f.__defaults__, f.__kwdefaults__, f.__name__ = defaults, kwdefaults, name
        f.__dict__.clear()
        f.__dict__.update(d)


@pytest.mark.parametrize("target", [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                                    ("builtins", "bytes"), ("_codecs", "encode"), ("torch", "device")])
def test_build_cannot_rewrite_the_readers_functions(target, tmp_path):
    """BUILD on a served function: slot state is setattr() on the reader's own module-level function,
    so one file could change how every later file in the same process is read."""
    evil = pk(glob(*target) + b"N" + b"}(" + u("__defaults__") + tup(b"\x88", b"N", b"N") + u("__name__")
              + u("pwned") + b"u\x86b" + b"}" + u("planted") + b"K\x01" + b"sb")
    snap = _snapshot_functions()
    before = set(sys.modules)
    try:
        with audited() as events:
            try:
                safe_load(evil)
            except CkptError:
                pass
        after = _snapshot_functions()
        changed = [f"{s[0].__qualname__}: defaults {s[1]} -> {after[i][1]}, dict {s[3]} -> {after[i][3]}"
                   for i, s in snap.items() if s[1:] != after[i][1:]]
        assert not changed, "a pickle rewrote the reader's functions: " + "; ".join(changed)
        assert_clean(events, before)
    finally:
        _restore_functions(snap)


def test_build_cannot_rewrite_a_checked_tensor(six_floats, tmp_path):
    """BUILD on a TensorRef writes its __dict__ directly, past the frozen dataclass and past the bounds check."""
    grow = rebuild_v2(storage_pid(), 0, (2,), (1,)) + dct(shape=ints(10 ** 9), dtype=u("float64"),
                                                         storage_offset=lng(-5)) + b"b"
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "grow.pt"), pk(dct(t=grow)))
    try:
        ref = ckpttool.open(path).root["t"]
    except CkptError:
        return  # refused: fine
    start, length = ref.span()
    assert ref.storage_offset >= 0 and start + length <= ref.storage.nbytes, \
        f"tensor now claims shape {ref.shape} {ref.dtype} offset {ref.storage_offset} over a " \
        f"{ref.storage.nbytes}-byte storage"
    assert ref.dtype == "float32"


def test_build_cannot_rewrite_a_storage_record(six_floats, tmp_path):
    pid = storage_pid() + dct(nbytes=lng(10 ** 12), dtype=u("float64"), source=b"N") + b"b"
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "st.pt"),
                           pk(dct(t=rebuild_v2(pid, 0, (6,), (1,)))))
    try:
        ref = ckpttool.open(path).root["t"]
    except CkptError:
        return
    assert ref.storage.nbytes == 24 and ref.storage.source is not None and ref.storage.dtype == "float32"


def test_build_on_a_storage_type_cannot_break_the_reader(six_floats, tmp_path):
    """torch.FloatStorage is served as a small object; BUILD can set its fields before the pid uses it."""
    stype = glob("torch", "FloatStorage") + dct(dtype=call(glob("m", "Weird")), name=u("UntypedStorage")) + b"b"
    pid = tup(u("storage"), stype, u("0"), u("cpu"), lng(0)) + b"Q"
    path = zip_with_pickle(six_floats, os.path.join(str(tmp_path), "stype.pt"),
                           pk(dct(t=rebuild_v2(pid, 0, (0,), (1,)))))
    try:
        ckpttool.open(path)
    except CkptError:
        pass
    for args in (("inspect", path), ("inspect", path, "--json"), ("inspect", path, "--stats")):
        assert_cli_sane(cli_run(*args))


@pytest.mark.parametrize("encoding", ["cp1125", "hp_roman8", "koi8_t", "mac_farsi", "uu_codec"])
def test_codec_names_do_not_import_modules(encoding, tmp_path):
    """bytes/str/bytearray(x, encoding) look the codec up, which imports ``encodings.<name>``."""
    mod = f"encodings.{encoding}"
    if mod in sys.modules:
        pytest.skip(f"{mod} already imported in this process")
    data = pk(lst(call(glob("builtins", "bytes"), u("x"), u(encoding)),
                  call(glob("builtins", "str"), by(b"x"), u(encoding)),
                  call(glob("builtins", "bytearray"), u("x"), u(encoding))))
    before = set(sys.modules)
    with audited() as events:
        try:
            safe_load(data)
        except CkptError:
            pass
    assert mod not in sys.modules, f"reading the pickle imported {mod}"
    assert_clean(events, before, (mod,))


def test_text_output_carries_no_terminal_control_sequences(tmp_path, make):
    """Names in a file (keys, class names) are printed; raw escapes would let a file drive the terminal."""
    esc = "\x1b]0;owned\x07\x1b[2J"
    t = rebuild_v2(storage_pid(), 0, (6,), (1,))
    body = dct(**{"state_dict": b"}" + u("w" + esc) + t + b"s", "note" + esc: u(esc),
                  "obj": call(sglob("evil" + esc, "C" + esc))})
    six = os.path.join(str(tmp_path), "six.pt")
    torch.save({"t": torch.arange(6, dtype=torch.float32)}, six)
    path = zip_with_pickle(six, os.path.join(str(tmp_path), "esc.pt"), pk(body, 4))
    r = cli_run("inspect", path)
    assert_cli_sane(r)
    bad = sorted({hex(ord(ch)) for ch in r.output if ord(ch) < 0x20 and ch not in "\n"} | (
        {"0x7f"} if "\x7f" in r.output else set()))
    assert not bad, f"control characters {bad} reach the terminal: {r.output!r:.600}"


@pytest.mark.parametrize("code", [
    pytest.param("class A(Module):\n" + " \n" * 200_000, id="member-regex-backtracking"),
    pytest.param("class A(Module):\n  __parameters__ = [" + "+".join(["1"] * 100_000) + "]\n", id="deep-binop"),
    pytest.param("class A(Module):\n  __buffers__ = [" + "-" * 100_000 + "1]\n", id="deep-unary"),
])
def test_torchscript_code_records_cannot_hang_or_crash(code, tmp_path, make):
    """TorchScript's generated code is parsed for __parameters__ / __buffers__ with a regex and literal_eval."""
    src = make("torchscript.pt")
    dst = os.path.join(str(tmp_path), "ts.pt")
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
        folder = next(n for n in zi.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info))
        zo.writestr(folder + "code/__torch__/evil.py", code)
    assert os.path.getsize(dst) < 2 << 20
    assert_cli_finishes(dst, tmp_path, timeout=10)


# =============================================================================================
# 4. Stubs are inert
# =============================================================================================

STUB_DICT_KEYS = {"args", "kwargs", "state", "items", "list_items", "called"}


def copy_of(obj):
    import copy
    return copy.copy(obj)


def callable_check(obj):
    if not callable(obj):
        raise TypeError("not callable")
    return obj()


def _stub_zoo(ctx: Ctx) -> bytes:
    """Stubs made every way a pickle can: REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD with hostile state."""
    hostile = dct(__class__=glob("os", "system"), __eq__=glob("os", "system"), __repr__=glob("os", "system"),
                  __getattr__=glob("os", "system"), __hash__=glob("os", "system"), args=u(ctx.cmd))
    return b"\x80\x04(" + b"".join([
        call(glob("os", "system"), u(ctx.cmd)),
        glob("subprocess", "Popen") + tup(lst(u("touch"), u(ctx.marker))) + b"\x81",
        sglob("builtins", "eval") + tup(u(ctx.code)) + dct(globals=b"}") + b"\x92",
        b"(" + u(ctx.cmd) + b"ios\nsystem\n",
        b"(" + glob("os", "system") + u(ctx.cmd) + b"o",
        glob("m", "Evil") + b")\x81" + hostile + b"b",
        glob("m", "Evil") + b")\x81" + b"N" + hostile + b"\x86b",   # slot state: setattr()
        glob("m", "Evil") + b")\x81" + b"(" + u(ctx.cmd) + b"e" + u("k") + glob("os", "system") + b"s"
        + b"(" + u("a") + u("b") + b"u",                             # APPENDS / SETITEM on a stub
    ]) + b"l."


def test_stubs_are_inert(tmp_path):
    ctx = make_ctx(tmp_path)
    before = set(sys.modules)
    base_dict = dict(vars(Stub))
    with audited() as events:
        try:
            root, _ = safe_load(_stub_zoo(ctx))
        except CkptError as e:  # slot state on a stub may be refused; the rest must still be inert
            root = None
            refused = e
        stubs = [o for o in (root or []) if isinstance(o, Stub)]
        for s in stubs:
            repr(s), str(s), format(s, ""), hash(s), bool(s), dir(s), copy_of(s)
            assert s == s and not (s != s)
            assert (s == stubs[0]) == (s is stubs[0])
            for op in ("__lt__", "__le__", "__gt__", "__ge__"):
                assert getattr(s, op)(stubs[0]) is NotImplemented
            for name in ("system", "__call__", "__getattr__", "read", "keys", "__iter__", "__len__", "__index__",
                         "__int__", "__bytes__", "__fspath__", "__enter__", "__class_getitem__", "__reduce__x"):
                assert not hasattr(s, name), f"{s!r} has {name}: {getattr(s, name)!r}"
            for fn in (iter, len, int, bytes, os.fspath, callable_check):
                with pytest.raises(TypeError):
                    fn(s)
    time.sleep(0.05)
    assert markers_in(tmp_path) == []
    assert_clean(events, before, ("subprocess",))
    assert dict(vars(Stub)) == base_dict, "the shared Stub base class was changed by a pickle"
    assert root is not None, f"refused: {refused}"
    assert len(stubs) == 8
    for s in stubs:
        assert type(s).__mro__[1:] == (Stub, object), type(s).__mro__
        assert set(vars(s)) == STUB_DICT_KEYS, f"{s!r} carries attributes the pickle chose: {sorted(vars(s))}"
        assert repr(s) == f"<{type(s).stub_module}.{type(s).stub_name}>"
        assert type(s).__eq__ is object.__eq__ and type(s).__hash__ is object.__hash__
        assert type(s).__getattribute__ is object.__getattribute__
        assert not any(n in vars(c) for c in type(s).__mro__ for n in ("__getattr__", "__call__", "__del__"))
    system = stubs[0]
    assert system.qualname == "os.system" and system.args == (ctx.cmd,) and system.called
    popen = stubs[1]
    assert popen.qualname == "subprocess.Popen" and popen.called is False
    assert popen.args == (["touch", ctx.marker],)
    ev = stubs[2]
    assert ev.kwargs == {"globals": {}} and ev.args == (ctx.code,)
    hostile = stubs[5]
    assert isinstance(hostile.state, dict) and set(hostile.state) >= {"__class__", "__eq__", "__repr__"}
    assert type(hostile).stub_name == "Evil" and hostile.args == ()
    assert isinstance(hostile.state["__eq__"], type) and issubclass(hostile.state["__eq__"], Stub)
    listy = stubs[7]
    assert listy.list_items == [ctx.cmd] and listy.items["a"] == "b" and issubclass(listy.items["k"], Stub)


def test_stub_classes_are_per_load_and_named_like_the_file():
    a, _ = safe_load(pk(call(glob("os", "system"), u("x"))))
    b, _ = safe_load(pk(call(glob("os", "system"), u("y"))))
    assert type(a) is not type(b), "stub classes are shared across files"
    assert type(a).stub_module == type(b).stub_module == "os"
    assert a.args == ("x",) and b.args == ("y",)


def test_describe_and_children_of_stubs_call_nothing(tmp_path):
    from ckpttool.summary import describe
    from ckpttool.tree import all_tensors, children
    ctx = make_ctx(tmp_path)
    before = set(sys.modules)
    with audited() as events:
        root, _ = safe_load(_stub_zoo(ctx))
        for s in root:
            describe(s)
            list(children(s))
            list(all_tensors(s))
    assert markers_in(tmp_path) == []
    assert_clean(events, before)


# =============================================================================================
# Fuzz: whatever the bytes, a FormatError or a value, and nothing runs
# =============================================================================================

def _memo_and_size_safe(data: bytes) -> bool:
    """Skip inputs that hit the (separately tested) memo-index bomb or hash flooding in this process."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and arg > 100_000:
                return False
    except Exception:
        pass
    return True


_FUZZ_MARKER = os.path.join(tempfile.gettempdir(), f"ckpttool_fuzz_marker_{os.getpid()}")
_SEED_PICKLES = [
    pk(dct(t=rebuild_v2(storage_pid(), 0, (2, 3), (3, 1)), epoch=b"K\x03", opt=call(glob("torch.optim", "SGD")))),
    pk(call(glob("os", "system"), u("touch " + _FUZZ_MARKER))),
    pickle.dumps({"a": [1, 2.5, (3, b"x")], "b": {"c": None, "d": True}}, protocol=4),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_SEED_PICKLES), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=6), st.integers(0, 4)), max_size=4))
def test_fuzzed_pickles_raise_only_format_errors(seed, edits):
    data = bytearray(seed)
    for pos, ins, delete in edits:
        pos %= len(data) + 1
        data[pos:pos + delete] = ins
    data = bytes(data)
    if not _memo_and_size_safe(data):
        return
    loader_calls = []

    def persistent(pid):
        loader_calls.append(pid)
        stype, key, location, numel, _ = safe_pickle.parse_storage_pid(pid)
        from ckpttool.records import StorageRef
        return StorageRef(key=key, dtype=stype.dtype, device=location,
                          nbytes=safe_pickle.storage_nbytes(stype, numel))

    before = set(sys.modules)
    with audited() as events:
        try:
            safe_load(data, persistent)
        except FormatError:
            pass
    assert not os.path.exists(_FUZZ_MARKER)
    assert_clean(events, before, ("os",))
