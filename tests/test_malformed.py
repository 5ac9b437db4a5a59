"""Bad input, for the readers and for `ckpttool inspect`.

The contract (DESIGN.md, "Command-line contract"): whatever the bytes, the library raises a
``CkptError`` and the CLI exits 2 with exactly one stderr line
``ckpttool: error: <what went wrong> (<path>)`` (and at most one ``hint:`` line after it),
nothing on stdout, no traceback, in well under a second, and without reading the whole file
when it is big. Anything else (another exception type, a traceback, a hang, a second line, a
message naming some other path) is a bug.

Every file is made in ``tmp_path``; the session-wide ``make`` fixtures are only read.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from typing import Callable, Dict, List, Optional, Sequence

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

import ckpttool
from ckpttool.cli import cli
from ckpttool.errors import CkptError
from ckpttool.formats.torch_legacy import MAGIC_PREFIX

FAST = 10.0  # seconds: a hang guard (bad input must fail fast, not wait on a bomb); no benchmark here

# Hypothesis writes a cache (.hypothesis/) into the working directory, the repository, as soon as
# this module's tests are collected: send it to a temporary folder instead.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="ckpttool-test-hypothesis-")
    configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)

# ---------------------------------------------------------------------------------------------
# Helpers


def cli_inspect(*args: str):
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


def _describe_result(r) -> str:
    import traceback
    tb = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info and not isinstance(r.exception, SystemExit) \
        else ""
    return f"exit={r.exit_code}\nstdout={r.stdout!r}\nstderr={r.stderr!r}\n{tb}"


def assert_error_line(stderr: str, path, contains: Optional[str] = None) -> str:
    """stderr is one ``ckpttool: error: ... (<path>)`` line, optionally one ``hint:`` line; return the message."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, stderr
    assert 1 <= len(lines) <= 2, f"expected one error line (plus an optional hint), got {lines!r}"
    assert stderr.endswith("\n")
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), lines
    line = lines[0]
    prefix, suffix = "ckpttool: error: ", f" ({path})"
    assert line.startswith(prefix), line
    assert line.endswith(suffix), f"the error line does not name {path}: {line!r}"
    message = line[len(prefix):-len(suffix)]
    assert message.strip(), line
    if contains is not None:
        assert contains.lower() in message.lower(), line
    return message


def assert_cli_error(path, *extra: str, name=None, contains: Optional[str] = None) -> str:
    """``ckpttool inspect PATH [extra]`` fails the documented way; return the message."""
    t0 = time.perf_counter()
    r = cli_inspect(path, *extra)
    elapsed = time.perf_counter() - t0
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        pytest.fail(f"ckpttool inspect {path} {' '.join(extra)} raised instead of exiting 2:\n{_describe_result(r)}")
    assert r.exit_code == 2, _describe_result(r)
    assert r.stdout == "", _describe_result(r)
    message = assert_error_line(r.stderr, path if name is None else name, contains)
    assert elapsed < FAST, f"took {elapsed:.2f}s"
    return message


def assert_lib_error(path, name=None, contains: Optional[str] = None) -> CkptError:
    """``ckpttool.open`` and ``ckpttool.inspect`` both raise a CkptError naming the file."""
    name = path if name is None else name
    err = None
    for fn in (ckpttool.open, ckpttool.inspect):
        t0 = time.perf_counter()
        with pytest.raises(CkptError) as ei:
            fn(str(path))
        assert time.perf_counter() - t0 < FAST
        err = ei.value
        text = str(err)
        assert "\n" not in text, f"{fn.__name__}: message spans lines: {text!r}"
        assert text.endswith(f"({name})"), f"{fn.__name__}: message does not name {name}: {text!r}"
        assert err.exit_code == 2
        if contains is not None:
            assert contains.lower() in err.message.lower(), text
    return err


def assert_bad(path, name=None, contains: Optional[str] = None) -> None:
    """Library and CLI (table and --json) both refuse ``path`` the documented way."""
    assert_lib_error(path, name, contains)
    assert_cli_error(path, name=name, contains=contains)
    assert_cli_error(path, "--json", name=name, contains=contains)


def run_subprocess(path, *extra: str, timeout: float = 10.0, cwd=None):
    """``python -m ckpttool inspect PATH`` in a real process (real stderr, real exit code)."""
    try:
        return subprocess.run([sys.executable, "-m", "ckpttool", "inspect", str(path), *extra],
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ckpttool inspect {path} hung (no answer in {timeout}s)")


def assert_subprocess_error(path, *extra: str, name=None, cwd=None, contains: Optional[str] = None) -> None:
    t0 = time.perf_counter()
    p = run_subprocess(path, *extra, cwd=cwd)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    assert_error_line(p.stderr, path if name is None else name, contains)
    assert elapsed < 5 * FAST, f"took {elapsed:.2f}s including interpreter start"


def read_every_tensor(ckpt) -> None:
    for t in ckpttool.find_state_dict(ckpt).tensors.values():
        if t.has_data:
            t.read_bytes()


def check_message(err: CkptError, path) -> Optional[str]:
    """None when the error is one line naming ``path``; else what is wrong with it."""
    text = str(err)
    if "\n" in text:
        return f"multi-line message {text!r}"
    if not text.endswith(f"({path})"):
        return f"message does not name the file: {text!r}"
    return None


@contextlib.contextmanager
def watch_opens():
    """Record every path opened through open()/io.open()/os.open() in this process."""
    opened: List[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def note(file):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))

    def spy_open(file, *a, **k):
        note(file)
        return real_open(file, *a, **k)

    def spy_os_open(file, *a, **k):
        note(file)
        return real_os_open(file, *a, **k)

    builtins.open, io.open, os.open = spy_open, spy_open, spy_os_open
    try:
        yield opened
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open


def safetensors_bytes(header, buffer: bytes = b"", length: Optional[int] = None, raw: Optional[bytes] = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + buffer


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# Paths that are not checkpoints


def test_missing_path(tmp_path):
    assert_bad(tmp_path / "nope.pt", contains="no such file")


def test_missing_relative_path_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_bad("nope.pt", contains="no such file")
    assert_subprocess_error("nope.pt", cwd=tmp_path, contains="no such file")


def test_missing_path_under_a_file(tmp_path):
    f = write(tmp_path / "file.pt", b"x")
    assert_bad(f / "inner.pt")


def test_dangling_symlink_and_symlink_loop(tmp_path):
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "gone.pt")
    assert_bad(dangling)
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    assert_bad(loop)


def test_empty_directory(tmp_path):
    d = tmp_path / "empty_dir"
    d.mkdir()
    assert_bad(d, contains="no checkpoint")


def test_directory_of_unrelated_files(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README.md").write_text("hello")
    (d / "weights.npy").write_bytes(b"\x93NUMPY")
    assert_bad(d, contains="no checkpoint")


def test_dcp_directory_with_bad_metadata_is_refused(tmp_path):
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(b"\x80\x04N.")
    (d / "__0_0.distcp").write_bytes(b"\0" * 16)
    assert_bad(d)


def test_empty_file(tmp_path):
    assert_bad(write(tmp_path / "empty.pt", b""), contains="empty")


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_empty_file_any_suffix(tmp_path, suffix):
    assert_bad(write(tmp_path / f"empty{suffix}", b""))


def test_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    assert_subprocess_error(fifo)


@pytest.mark.parametrize("data", [b"\x80", b"\x80\x04", b"P", b"PK", b"PK\x03\x04", b"{", b"\x08"],
                         ids=repr)
def test_tiny_files(tmp_path, data):
    """A file of a byte or two, each a prefix of some format's magic."""
    assert_bad(write(tmp_path / "tiny.bin", data))


# ---------------------------------------------------------------------------------------------
# Random bytes


@pytest.mark.parametrize("seed,size", [(0, 1), (1, 2), (2, 9), (3, 100), (4, 513), (5, 4096), (6, 65536),
                                       (7, 1 << 20)])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".onnx", ".json", ".pkl"])
def test_random_bytes(tmp_path, seed, size, suffix):
    data = random.Random(seed * 1000 + size).randbytes(size)
    assert_bad(write(tmp_path / f"random{suffix}", data))


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_in_a_real_process(tmp_path, seed):
    p = write(tmp_path / "random.pt", random.Random(seed).randbytes(1000))
    assert_subprocess_error(p)


# ---------------------------------------------------------------------------------------------
# Zip archives that are not (valid) checkpoints


def test_zip_with_a_text_member(tmp_path):
    p = tmp_path / "notes.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello, not a checkpoint\n")
    assert_bad(p, contains="zip")


def test_empty_zip(tmp_path):
    p = tmp_path / "empty.zip"
    with zipfile.ZipFile(p, "w"):
        pass
    assert_bad(p)


def _zip_members(path) -> Dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _rezip(dst, members: Dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(dst, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def _data_pkl(members) -> str:
    return next(n for n in members if n.endswith("/data.pkl"))


def _first_storage(members) -> str:
    return sorted(n for n in members if "/data/" in n and n.rsplit("/", 1)[1].isdigit())[0]


ZIP_BREAKAGES: Dict[str, Callable[[Dict[str, bytes]], None]] = {
    "data.pkl is text": lambda m: m.__setitem__(_data_pkl(m), b"hello, world"),
    "data.pkl is truncated": lambda m: m.__setitem__(_data_pkl(m), m[_data_pkl(m)][:len(m[_data_pkl(m)]) // 2]),
    "data.pkl is empty": lambda m: m.__setitem__(_data_pkl(m), b""),
    "data.pkl is random": lambda m: m.__setitem__(_data_pkl(m), random.Random(0).randbytes(300)),
    "storage record missing": lambda m: m.pop(_first_storage(m)),
    "storage record too short": lambda m: m.__setitem__(_first_storage(m), m[_first_storage(m)][:3]),
    "no data.pkl": lambda m: m.pop(_data_pkl(m)),
    "two data.pkl folders": lambda m: m.update({"other/data.pkl": m[_data_pkl(m)]}),
    "persistent id is a string": lambda m: m.__setitem__(_data_pkl(m), b"\x80\x02X\x03\x00\x00\x00abcQ."),
}


@pytest.mark.parametrize("breakage", list(ZIP_BREAKAGES))
def test_broken_torch_zip(tmp_path, make, breakage):
    members = _zip_members(make("state_dict.pt"))
    ZIP_BREAKAGES[breakage](members)
    p = _rezip(tmp_path / "broken.pt", members)
    assert_bad(p)


def _set_central_compression(data: bytes, member: str, method: int) -> bytes:
    """Rewrite the compression method of ``member`` in the zip's central directory."""
    b = bytearray(data)
    name = member.encode()
    i = 0
    while True:
        i = b.index(b"PK\x01\x02", i)
        (n,) = struct.unpack_from("<H", b, i + 28)
        if bytes(b[i + 46:i + 46 + n]) == name:
            struct.pack_into("<H", b, i + 10, method)
            return bytes(b)
        i += 4


@pytest.mark.parametrize("method", [2, 8, 12, 99])
@pytest.mark.parametrize("which", ["data.pkl", "storage"])
def test_zip_record_with_unsupported_or_wrong_compression(tmp_path, make, which, method):
    """A central directory that claims another compression method (2 = shrink, 99 = unknown).

    BUG (storage, 2 and 99): reading the tensor raises NotImplementedError from zipfile.
    """
    src = make("state_dict.pt")
    members = _zip_members(src)
    member = _data_pkl(members) if which == "data.pkl" else _first_storage(members)
    p = write(tmp_path / "method.pt", _set_central_compression(read(src), member, method))
    try:
        ckpt = ckpttool.open(str(p))
        read_every_tensor(ckpt)
    except CkptError as e:
        assert check_message(e, p) is None, check_message(e, p)
    else:
        pytest.fail("a record with a wrong compression method read without error")
    assert_cli_error(p, "--stats")


# ---------------------------------------------------------------------------------------------
# Truncation at every offset (library), at sampled offsets (CLI)


TRUNCATED = ["state_dict.pt", "legacy.pt", "torchscript.pt", "model.safetensors", "exported.pt2", "model.gguf"]


@pytest.mark.parametrize("name", TRUNCATED)
def test_truncated_at_every_offset(tmp_path, make, name):
    """Every proper prefix of a real file: CkptError from open, or (legacy only, a cut in the
    tensor data) from reading the tensor bytes. Never success, never another exception."""
    data = read(make(name))
    p = tmp_path / name
    p.write_bytes(data)
    full = ckpttool.open(str(p))  # the whole file reads: the test can tell a break from a bad fixture
    read_every_tensor(full)
    assert ckpttool.find_state_dict(full).tensors
    problems = []
    for n in range(len(data) - 1, -1, -1):
        os.truncate(p, n)
        try:
            ckpt = ckpttool.open(str(p))
        except CkptError as e:
            bad = check_message(e, p)
            if bad:
                problems.append((n, bad))
            continue
        except Exception as e:  # noqa: BLE001 - any other type is the bug being looked for
            problems.append((n, f"open raised {type(e).__name__}: {e}"))
            continue
        if name != "legacy.pt":
            problems.append((n, "a truncated file opened without error"))
            continue
        try:
            read_every_tensor(ckpt)
        except CkptError as e:
            bad = check_message(e, p)
            if bad:
                problems.append((n, bad))
        except Exception as e:  # noqa: BLE001
            problems.append((n, f"reading tensor bytes raised {type(e).__name__}: {e}"))
        else:
            problems.append((n, "a truncated file opened and all its tensors read without error"))
    assert not problems, f"{len(problems)} bad offsets of {len(data)}, first: {problems[:5]}"


def _sample_offsets(size: int) -> List[int]:
    fixed = [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 64, 100, 511, 512, 513, size // 4, size // 2, 3 * size // 4,
             size - 100, size - 22, size - 21, size - 2, size - 1]
    rnd = random.Random(size).sample(range(size), 8)
    return sorted({o for o in fixed + rnd if 0 <= o < size})


@pytest.mark.parametrize("name", TRUNCATED)
def test_truncated_cli(tmp_path, make, name):
    data = read(make(name))
    for n in _sample_offsets(len(data)):
        p = write(tmp_path / f"cut{n}_{name}", data[:n])
        assert_cli_error(p)
        assert_cli_error(p, "--json", "--stats")


@pytest.mark.parametrize("name", ["state_dict.pt", "legacy.pt", "model.safetensors"])
def test_truncated_in_a_real_process(tmp_path, make, name):
    data = read(make(name))
    p = write(tmp_path / name, data[:len(data) // 2])
    assert_subprocess_error(p)
    assert_subprocess_error(p, "--json")


def test_truncated_safetensors_header_says_truncated(tmp_path, make):
    """A safetensors file cut inside its header is a truncated safetensors file, and the reader has
    that message ("header claims N bytes but the file has M (truncated?)").

    BUG (message): detection falls through to "not a checkpoint format ckpttool knows (starts with
    b'...')" because looks_like() needs the whole header to be present.
    """
    data = read(make("model.safetensors"))
    p = write(tmp_path / "cut.safetensors", data[:200])
    assert_bad(p, contains="truncated")


# ---------------------------------------------------------------------------------------------
# safetensors headers that lie

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _st_deep_json() -> bytes:
    return safetensors_bytes(None, raw=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


LYING_SAFETENSORS: Dict[str, Callable[[], bytes]] = {
    "header length past the end": lambda: safetensors_bytes({"a": F32x2}, b"\0" * 8, length=1000),
    "header length 2**60": lambda: safetensors_bytes({"a": F32x2}, b"\0" * 8, length=2 ** 60),
    "header length 2**64-1": lambda: safetensors_bytes({"a": F32x2}, b"\0" * 8, length=2 ** 64 - 1),
    "header length 0": lambda: safetensors_bytes(None, b"{}", length=0, raw=b""),
    "header not JSON": lambda: safetensors_bytes(None, raw=b"{not json at all"),
    "header not UTF-8": lambda: safetensors_bytes(None, raw=b"{\xff\xfe}"),
    "header is a JSON list": lambda: safetensors_bytes([{"a": 1}]),
    "header is a JSON string": lambda: safetensors_bytes("abc"),
    "entry is not an object": lambda: safetensors_bytes({"a": [1, 2]}),
    "unknown dtype": lambda: safetensors_bytes({"a": {**F32x2, "dtype": "F33"}}, b"\0" * 8),
    "dtype missing": lambda: safetensors_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "dtype is a list": lambda: safetensors_bytes({"a": {**F32x2, "dtype": ["F32"]}}, b"\0" * 8),
    "dtype is an object": lambda: safetensors_bytes({"a": {**F32x2, "dtype": {"F32": 1}}}, b"\0" * 8),
    "shape/offset size mismatch": lambda: safetensors_bytes({"a": {**F32x2, "shape": [3]}}, b"\0" * 12),
    "offsets past the end": lambda: safetensors_bytes({"a": {**F32x2, "shape": [4], "data_offsets": [0, 16]}},
                                                      b"\0" * 8),
    "offsets far past the end": lambda: safetensors_bytes(
        {"a": {**F32x2, "data_offsets": [2 ** 70, 2 ** 70 + 8]}}, b"\0" * 8),
    "overlapping offsets": lambda: safetensors_bytes(
        {"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12),
    "same offsets twice": lambda: safetensors_bytes({"a": F32x2, "b": F32x2}, b"\0" * 8),
    "gap between tensors": lambda: safetensors_bytes(
        {"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, b"\0" * 20),
    "gap at the start": lambda: safetensors_bytes({"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12),
    "gap at the end (bytes no tensor covers)": lambda: safetensors_bytes({"a": F32x2}, b"\0" * 24),
    "offsets run backwards": lambda: safetensors_bytes({"a": {**F32x2, "shape": [0], "data_offsets": [8, 0]}},
                                                       b"\0" * 8),
    "negative offset": lambda: safetensors_bytes({"a": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8),
    "three offsets": lambda: safetensors_bytes({"a": {**F32x2, "data_offsets": [0, 8, 9]}}, b"\0" * 8),
    "float offsets": lambda: safetensors_bytes({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, b"\0" * 8),
    "offsets missing": lambda: safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "negative shape": lambda: safetensors_bytes({"a": {**F32x2, "shape": [-2]}}, b"\0" * 8),
    "negative shape that multiplies out": lambda: safetensors_bytes({"a": {**F32x2, "shape": [-1, -2]}},
                                                                    b"\0" * 8),
    "float shape": lambda: safetensors_bytes({"a": {**F32x2, "shape": [2.0]}}, b"\0" * 8),
    "bool shape": lambda: safetensors_bytes({"a": {**F32x2, "shape": [True, 2]}}, b"\0" * 8),
    "string shape": lambda: safetensors_bytes({"a": {**F32x2, "shape": "2"}}, b"\0" * 8),
    "null shape": lambda: safetensors_bytes({"a": {**F32x2, "shape": None}}, b"\0" * 8),
    "NaN in shape": lambda: safetensors_bytes(None, b"\0" * 8,
                                              raw=b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}'),
    "huge shape": lambda: safetensors_bytes({"a": {**F32x2, "shape": [2 ** 62, 2 ** 62]}}, b"\0" * 8),
    "int with 5000 digits": lambda: safetensors_bytes(
        None, b"\0" * 8, raw=b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'),
    "JSON nested 100000 deep": _st_deep_json,
    "__metadata__ is a list": lambda: safetensors_bytes({"__metadata__": ["a"], "a": F32x2}, b"\0" * 8),
    "__metadata__ is a string": lambda: safetensors_bytes({"__metadata__": "x", "a": F32x2}, b"\0" * 8),
    "__metadata__ has an int value": lambda: safetensors_bytes({"__metadata__": {"k": 1}, "a": F32x2}, b"\0" * 8),
    "__metadata__ has a nested map": lambda: safetensors_bytes({"__metadata__": {"k": {"x": "y"}}, "a": F32x2},
                                                               b"\0" * 8),
    "__metadata__ has a null value": lambda: safetensors_bytes({"__metadata__": {"k": None}, "a": F32x2},
                                                               b"\0" * 8),
}


def test_hand_built_safetensors_is_valid(tmp_path):
    """The builder makes files the reader accepts, so each lie below is the only thing wrong."""
    p = write(tmp_path / "ok.safetensors", safetensors_bytes({"__metadata__": {"k": "v"}, "a": F32x2,
                                                             "b": {**F32x2, "data_offsets": [8, 16]}},
                                                            b"\0" * 16))
    ckpt = ckpttool.open(str(p))
    assert ckpt.format == "safetensors"
    read_every_tensor(ckpt)
    assert cli_inspect(p).exit_code == 0


@pytest.mark.parametrize("lie", list(LYING_SAFETENSORS))
def test_lying_safetensors_header(tmp_path, lie):
    """BUGS: "dtype is a list"/"dtype is an object" (TypeError: unhashable), "int with 5000 digits"
    (ValueError from int parsing), "JSON nested 100000 deep" (RecursionError), "gap at the end"
    (accepted; safetensors itself refuses it: "file not fully covered")."""
    p = write(tmp_path / "lie.safetensors", LYING_SAFETENSORS[lie]())
    assert_bad(p)


@pytest.mark.parametrize("lie", ["header length past the end", "header length 2**60", "header is a JSON list"])
def test_lying_safetensors_header_in_a_real_process(tmp_path, lie):
    p = write(tmp_path / "lie.safetensors", LYING_SAFETENSORS[lie]())
    assert_subprocess_error(p)


# ---------------------------------------------------------------------------------------------
# Sharded indexes

INDEX_NAMES = ["model.safetensors.index.json", "pytorch_model.bin.index.json"]


def _good_shard() -> bytes:
    return safetensors_bytes({"a": F32x2}, b"\0" * 8)


def _index(folder, weight_map=None, raw: Optional[bytes] = None, name: str = INDEX_NAMES[0]):
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    return p


def test_hand_built_index_is_valid(tmp_path):
    folder = tmp_path / "model"
    idx = _index(folder, {"a": "s.safetensors"})
    (folder / "s.safetensors").write_bytes(_good_shard())
    for p in (idx, folder):
        ckpt = ckpttool.open(str(p))
        assert ckpt.format == "safetensors_sharded" and list(ckpt.root) == ["a"]
        assert cli_inspect(p).exit_code == 0


def assert_refused_unread(path, secret) -> None:
    """``path`` is refused by the library and the CLI, and ``secret`` is never opened meanwhile."""
    refused = []
    with watch_opens() as opened:
        for fn in (ckpttool.open, ckpttool.inspect):
            try:
                fn(str(path))
            except CkptError:
                refused.append(fn.__name__)
        r = cli_inspect(path)
        r_stats = cli_inspect(path, "--stats")
    assert os.path.realpath(secret) not in opened, f"{secret} (outside the checkpoint's folder) was opened"
    assert refused == ["open", "inspect"], f"not refused by the library: only {refused}"
    for res in (r, r_stats):
        assert res.exit_code == 2 and res.stdout == "", _describe_result(res)
        assert res.stderr.startswith("ckpttool: error: ") and len(res.stderr.splitlines()) <= 2, res.stderr


def _escaping_index(tmp_path, index_name: str, escape: str):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(_good_shard())  # a valid shard: only the escape is wrong
    folder = tmp_path / "model"
    folder.mkdir()
    shard = {"dotdot": "../secret.safetensors", "dotdot_deep": "sub/../../secret.safetensors",
             "absolute": str(secret), "symlink": "link.safetensors"}[escape]
    if escape == "symlink":
        (folder / "link.safetensors").symlink_to(secret)
    return _index(folder, {"a": shard}, name=index_name), secret


ESCAPES = ["dotdot", "dotdot_deep", "absolute", "symlink"]


@pytest.mark.parametrize("index_name", INDEX_NAMES)
@pytest.mark.parametrize("escape", ESCAPES)
def test_index_shard_outside_its_folder_is_refused_unread(tmp_path, index_name, escape):
    """A shard name that leaves the index's folder is refused, and the outside file is never opened."""
    idx, secret = _escaping_index(tmp_path, index_name, escape)
    assert_refused_unread(idx, secret)
    assert_refused_unread(idx.parent, secret)


@pytest.mark.parametrize("escape", ESCAPES)
def test_index_shard_outside_its_folder_names_the_index(tmp_path, escape):
    """BUG (message): the error line names the folder (``sharded.inside()`` raises with the folder
    as its path), not the index file the user gave."""
    idx, _ = _escaping_index(tmp_path, INDEX_NAMES[0], escape)
    assert_bad(idx, contains="secret.safetensors" if escape != "symlink" else "link.safetensors")


@pytest.mark.parametrize("escape", ["dotdot", "absolute"])
def test_index_shard_outside_its_folder_given_the_folder(tmp_path, escape):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(_good_shard())
    folder = tmp_path / "model"
    _index(folder, {"a": "../secret.safetensors" if escape == "dotdot" else str(secret)})
    index = folder / "model.safetensors.index.json"  # the file that is wrong, found in the folder
    with watch_opens() as opened:
        assert_lib_error(folder, name=index)
        assert_cli_error(folder, name=index)
    assert os.path.realpath(secret) not in opened


def test_index_missing_shard(tmp_path):
    folder = tmp_path / "model"
    (folder / "model-00001-of-00002.safetensors").parent.mkdir(parents=True)
    (folder / "model-00001-of-00002.safetensors").write_bytes(_good_shard())
    idx = _index(folder, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    assert_bad(idx, contains="model-00002-of-00002.safetensors")
    assert_lib_error(folder, name=idx)


def test_index_shard_is_a_directory(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub.safetensors").mkdir(parents=True)
    assert_bad(_index(folder, {"a": "sub.safetensors"}))


def test_index_shard_is_malformed(tmp_path):
    folder = tmp_path / "model"
    idx = _index(folder, {"a": "s.safetensors"})
    (folder / "s.safetensors").write_bytes(_good_shard()[:-3])
    with pytest.raises(CkptError):
        ckpttool.open(str(idx))
    r = cli_inspect(idx)
    assert r.exit_code == 2 and r.stdout == "", _describe_result(r)
    assert_error_line(r.stderr, folder / "s.safetensors")


INDEX_BREAKAGES: Dict[str, bytes] = {
    "not JSON": b"{this is not json",
    "not UTF-8": b"\xff\xfe{}",
    "a JSON list": b"[]",
    "a JSON number": b"42",
    "no weight_map": b'{"metadata": {}}',
    "weight_map is a list": b'{"weight_map": ["a"]}',
    "shard name is a number": b'{"weight_map": {"a": 1}}',
    "shard name is empty": b'{"weight_map": {"a": ""}}',
    "shard name has a NUL": b'{"weight_map": {"a": "s\\u0000.safetensors"}}',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("breakage", list(INDEX_BREAKAGES))
def test_index_malformed(tmp_path, breakage):
    """BUGS: "nested 100000 deep" raises RecursionError (only JSONDecodeError/UnicodeDecodeError are
    caught); "shard name is empty"/"has a NUL" name the folder, not the index file."""
    folder = tmp_path / "model"
    idx = _index(folder, raw=INDEX_BREAKAGES[breakage])
    (folder / "s.safetensors").write_bytes(_good_shard())
    assert_bad(idx)
    assert_lib_error(folder, name=idx)


@pytest.mark.parametrize("target", ["itself", "another index"])
def test_index_whose_shard_is_an_index(tmp_path, target):
    """A shard entry naming an index (itself, or one that names the first) must not recurse forever.

    BUG: RecursionError; formats.open() detects a shard ending in .json as another index and
    reads it through the same reader, with no depth limit.
    """
    folder = tmp_path / "model"
    if target == "itself":
        idx = _index(folder, {"a": INDEX_NAMES[0]})
    else:
        idx = _index(folder, {"a": "other.index.json"})
        _index(folder, {"a": INDEX_NAMES[0]}, name="other.index.json")
    assert_bad(idx)


# ---------------------------------------------------------------------------------------------
# ONNX external data


def _onnx_model(folder, location: str, offset=None, length=None, name: str = "model.onnx"):
    """A one-initializer model (float[4], 16 bytes) whose data is external at ``location``."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    t = TensorProto()
    t.name, t.data_type = "w", TensorProto.FLOAT
    t.dims.extend([4])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            e = t.external_data.add()
            e.key, e.value = key, str(value)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(model.SerializeToString())
    return p


def test_hand_built_onnx_is_valid(tmp_path):
    folder = tmp_path / "model"
    p = _onnx_model(folder, "w.bin")
    (folder / "w.bin").write_bytes(struct.pack("<4f", 1, 2, 3, 4))
    ckpt = ckpttool.open(str(p))
    assert ckpt.root["w"].read_bytes() == struct.pack("<4f", 1, 2, 3, 4)
    assert cli_inspect(p).exit_code == 0


def _escaping_onnx(tmp_path, escape: str):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(struct.pack("<4f", 1, 2, 3, 4))  # would hold the data: only the escape is wrong
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"absolute": str(secret), "symlink": "w.bin"}.get(escape, escape)
    if escape == "symlink":
        (folder / "w.bin").symlink_to(secret)
    return _onnx_model(folder, location), secret


ONNX_ESCAPES = ["../secret.bin", "sub/../../secret.bin", "absolute", "symlink"]


@pytest.mark.parametrize("escape", ONNX_ESCAPES)
def test_onnx_external_data_outside_its_folder_is_refused_unread(tmp_path, escape):
    """An external ``location`` that leaves the model's folder is refused; that file is never opened."""
    p, secret = _escaping_onnx(tmp_path, escape)
    assert_refused_unread(p, secret)


@pytest.mark.parametrize("escape", ONNX_ESCAPES)
def test_onnx_external_data_outside_its_folder_names_the_model(tmp_path, escape):
    """BUG (message): the error line names the model's folder, not the .onnx file."""
    p, _ = _escaping_onnx(tmp_path, escape)
    assert_bad(p)


ONNX_BREAKAGES = {
    "external file missing": dict(location="nope.bin"),
    "location empty": dict(location=""),
    "offset past the end": dict(location="w.bin", offset=8),
    "offset negative": dict(location="w.bin", offset=-4),
    "offset not a number": dict(location="w.bin", offset="x"),
    "offset a float": dict(location="w.bin", offset="1.5"),
    "offset huge": dict(location="w.bin", offset=10 ** 30),
    "length too big": dict(location="w.bin", length=99),
    "length not a number": dict(location="w.bin", length="ten"),
}


@pytest.mark.parametrize("breakage", list(ONNX_BREAKAGES))
def test_onnx_external_data_malformed(tmp_path, breakage):
    folder = tmp_path / "model"
    p = _onnx_model(folder, **ONNX_BREAKAGES[breakage])
    (folder / "w.bin").write_bytes(b"\0" * 16)
    assert_bad(p)


@pytest.mark.parametrize("data", [b"\x08", b"\x08\x07\x12", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                                  b"\x3a\x7f" + b"\0" * 10], ids=repr)
def test_onnx_malformed_protobuf(tmp_path, data):
    assert_bad(write(tmp_path / "bad.onnx", data))


def test_onnx_truncated(tmp_path, make):
    src = make("onnx_external")
    data = read(src)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx.data").write_bytes(read(os.path.join(os.path.dirname(src), "model.onnx.data")))
    p = folder / "model.onnx"
    for n in _sample_offsets(len(data)):
        p.write_bytes(data[:n])
        try:
            ckpt = ckpttool.open(str(p))
            read_every_tensor(ckpt)
        except CkptError as e:
            assert check_message(e, p) is None, (n, check_message(e, p))
        # A protobuf cut between fields is a valid (smaller) message: success is allowed here.


# ---------------------------------------------------------------------------------------------
# Bare pickles and hostile pickles


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("proto", [2, 3, 4, 5])
def test_pickle_header_then_garbage(tmp_path, seed, proto):
    rng = random.Random(seed)
    p = write(tmp_path / "garbage.pkl", bytes([0x80, proto]) + rng.randbytes(rng.choice([1, 7, 64, 1000])))
    try:
        ckpttool.open(str(p))
    except CkptError as e:
        assert check_message(e, p) is None, check_message(e, p)
        assert_cli_error(p)
    else:  # a few garbage bytes can be a valid pickle (b"N." is None); then inspect must still work
        assert cli_inspect(p).exit_code == 0


@pytest.mark.parametrize("seed", range(4))
def test_pickle_header_then_garbage_fixed(tmp_path, seed):
    """Garbage that starts with an invalid opcode, so it must be refused."""
    p = write(tmp_path / "garbage.pkl", b"\x80\x04\xff" + random.Random(seed).randbytes(500))
    assert_bad(p, contains="pickle")


def test_one_byte_pickle_marker(tmp_path):
    """BUG: a file holding the single byte 0x80 raises IndexError in formats.detect (head[1])."""
    assert_bad(write(tmp_path / "x.pt", b"\x80"))


def test_pickle_error_message_stays_on_one_line(tmp_path):
    """BUG: a pickle that calls ``str(b"x", "a\\nb")`` gets LookupError("unknown encoding: a\\nb");
    the message is put in the error line as is, so the CLI prints two lines."""
    raw = b"\x80\x02cbuiltins\nstr\nq\x00C\x01xX\x03\x00\x00\x00a\nb\x86R."
    assert_bad(write(tmp_path / "nl.pkl", raw))


@pytest.mark.parametrize("raw", [
    b"\x80\x04\x8e" + (2 ** 40).to_bytes(8, "little") + b"x",       # BINBYTES8 of 1 TiB
    b"\x80\x04\x8d" + (2 ** 62).to_bytes(8, "little") + b"x",       # BINUNICODE8 of 4 EiB
    b"\x80\x04" + b"]" * 100_000 + b"\x94" * 10 + b".",            # many lists
    b"\x80\x02" + b"(" * 200_000 + b".",                            # marks and nothing
    b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00\x40\x85R.",           # bytes(2**30): refused, not allocated
    b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.",            # os.system("true"): a stub, never run
], ids=["binbytes8-huge", "binunicode8-huge", "many-lists", "marks", "bytes-count", "os-system"])
def test_hostile_pickle_fails_or_reads_inertly(tmp_path, raw):
    p = write(tmp_path / "hostile.pkl", raw)
    t0 = time.perf_counter()
    try:
        ckpttool.inspect(str(p))
    except CkptError as e:
        assert check_message(e, p) is None, check_message(e, p)
        assert_cli_error(p)
    assert time.perf_counter() - t0 < FAST


@pytest.fixture
def fake_module(monkeypatch):
    """A class ``fakepkg_nn.Net`` that pickle can name (never importable by ckpttool)."""
    mod = types.ModuleType("fakepkg_nn")

    class Net:
        pass
    Net.__module__ = "fakepkg_nn"
    Net.__qualname__ = "Net"
    mod.Net = Net
    monkeypatch.setitem(sys.modules, "fakepkg_nn", mod)

    def module(params=None, buffers=None, children=None):
        m = Net()
        m.__dict__.update({"_parameters": params or {}, "_buffers": buffers or {}, "_modules": children or {},
                           "training": True})
        return m
    return module


def test_pickled_module_that_contains_itself(tmp_path, fake_module):
    """BUG: a pickled nn.Module whose ``_modules`` holds the module itself: RecursionError in
    tree.module_state_dict (also reached from summary.describe)."""
    m = fake_module()
    m._modules["child"] = m
    p = write(tmp_path / "cycle.pkl", pickle.dumps(m, protocol=2))
    try:
        ckpttool.inspect(str(p))
    except CkptError as e:
        assert check_message(e, p) is None
        assert_cli_error(p)
    else:
        assert cli_inspect(p).exit_code == 0
    p2 = write(tmp_path / "cycle_in_dict.pkl", pickle.dumps({"model": m, "epoch": 1}, protocol=2))
    try:
        ckpttool.inspect(str(p2))
    except CkptError as e:
        assert check_message(e, p2) is None


def test_pickled_module_tree_that_doubles_at_each_level_does_not_hang(tmp_path, fake_module):
    """BUG (hang): 40 levels of a module whose two children are the same module: a 3 KB file whose
    state_dict walk (tree.module_state_dict, no visited set) takes 2**40 steps."""
    m = fake_module()
    for _ in range(40):
        m = fake_module(children={"a": m, "b": m})
    p = write(tmp_path / "bomb.pkl", pickle.dumps(m, protocol=2))
    assert p.stat().st_size < 10_000
    proc = run_subprocess(p, "--json", timeout=5.0)
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        assert proc.stdout == ""
        assert_error_line(proc.stderr, p)


@pytest.mark.parametrize("params", [5, None, 1.5, True])
def test_optimizer_state_with_malformed_params(tmp_path, params):
    """BUG: summary.describe does ``len(g.get("params", []))``: TypeError when params is not sized."""
    obj = {"optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": params}]}}
    p = write(tmp_path / "opt.pkl", pickle.dumps(obj))
    try:
        ckpttool.inspect(str(p))
    except CkptError as e:
        assert check_message(e, p) is None
    r = cli_inspect(p)
    assert r.exit_code in (0, 2), _describe_result(r)
    if r.exit_code == 2:
        assert_error_line(r.stderr, p)


def test_cyclic_plain_containers_read(tmp_path):
    a: list = []
    a.append(a)
    d: dict = {}
    d["self"] = d
    p = write(tmp_path / "cycles.pkl", pickle.dumps({"a": a, "d": d}))
    assert cli_inspect(p).exit_code == 0


# ---------------------------------------------------------------------------------------------
# Big files: refused from their first bytes, not read whole

BIG = 512 << 20


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar")


def _legacy_head(make) -> bytes:
    return read(make("legacy.pt"))[:150]


BIG_HEADS: Dict[str, Callable] = {
    "random.bin": lambda make: random.Random(0).randbytes(4096),
    "garbage.pkl": lambda make: b"\x80\x04\xff" + random.Random(1).randbytes(100),
    "legacy.pt": _legacy_head,
    "short-header.safetensors": lambda make: struct.pack("<Q", 2 * BIG) + b'{"a":',
    "bad-json.safetensors": lambda make: struct.pack("<Q", 64) + b"{" + b"x" * 63,
    "zip-head.pt": lambda make: read(make("state_dict.pt"))[:4000],
    "index.json": lambda make: b'{"weight_map": ',
    "garbage.onnx": lambda make: b"\x08\x07\x12\x03abc\x3a",
}


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("name", list(BIG_HEADS))
def test_big_bad_file_is_refused_without_reading_it(tmp_path, make, name):
    """A 512 MiB (sparse) file with a bad start: CkptError in well under a second, reading a
    small part of it.

    BUG: garbage.onnx (onnx.load reads the whole file before anything is checked).
    """
    head = BIG_HEADS[name](make)
    small = write(tmp_path / f"small_{name}", head + b"\0" * 1000)
    with contextlib.suppress(CkptError):
        ckpttool.open(str(small))  # imports what this format needs, so rchar counts file reads only
    p = tmp_path / name
    with open(p, "wb") as f:
        f.write(head)
        f.truncate(BIG)
    before, t0 = _rchar(), time.perf_counter()
    with pytest.raises(CkptError) as ei:
        ckpttool.open(str(p))
    elapsed, nread = time.perf_counter() - t0, _rchar() - before
    assert check_message(ei.value, p) is None, check_message(ei.value, p)
    assert nread < BIG // 4, f"read {nread >> 20} MiB of a {BIG >> 20} MiB file to refuse it"
    assert elapsed < FAST, f"took {elapsed:.2f}s"


# ---------------------------------------------------------------------------------------------
# Property tests: random bytes and bit flips -> CkptError or success, nothing else

PROPERTY = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_PREFIXES = [b"", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", b"\x80\x04\x95", b"\x08",
             MAGIC_PREFIX + b"." + pickle.dumps(1001, protocol=2),  # legacy magic number + version
             struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "shape": [2], ',
             ]


def exercise(path) -> None:
    """Open, inspect, render, read every tensor: success or CkptError naming ``path`` only."""
    from ckpttool.render import inspect_text, to_json
    try:
        ckpt = ckpttool.open(str(path))
        read_every_tensor(ckpt)
        r = ckpttool.inspect(str(path))
        inspect_text(r)
        to_json(r)
    except CkptError as e:
        problem = check_message(e, path)
        assert problem is None, problem


@PROPERTY
@given(prefix=st.sampled_from(_PREFIXES), body=st.binary(max_size=2048),
       suffix=st.sampled_from([".pt", ".bin", ".safetensors", ".onnx", ".json", ".pkl"]))
def test_property_random_bytes(tmp_path, prefix, body, suffix):
    p = tmp_path / f"random{suffix}"
    p.write_bytes(prefix + body)
    exercise(p)


def _flip(data: bytes, flips: Sequence) -> bytes:
    b = bytearray(data)
    for pos, bit in flips:
        b[pos % len(b)] ^= 1 << bit
    return bytes(b)


_FLIPS = st.lists(st.tuples(st.integers(min_value=0, max_value=1 << 30), st.integers(min_value=0, max_value=7)),
                  min_size=1, max_size=8)


@pytest.mark.parametrize("name", ["state_dict.pt", "legacy.pt", "model.safetensors", "torchscript.pt"])
@PROPERTY
@given(flips=_FLIPS)
def test_property_bit_flips(tmp_path, make, name, flips):
    """BUG seen here: a flipped compression method in a torch zip's central directory
    (see test_zip_record_with_unsupported_or_wrong_compression)."""
    p = tmp_path / name
    p.write_bytes(_flip(read(make(name)), flips))
    exercise(p)


@pytest.mark.parametrize("name", ["state_dict.pt", "legacy.pt", "model.safetensors"])
@PROPERTY
@given(data=st.data())
def test_property_overwritten_runs(tmp_path, make, name, data):
    """A run of random bytes pasted over a real file (a torn write, a bad sector)."""
    original = read(make(name))
    start = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
    run = data.draw(st.binary(min_size=1, max_size=64))
    p = tmp_path / name
    p.write_bytes(original[:start] + run + original[start + len(run):])
    exercise(p)


@pytest.mark.parametrize("extra", [8, -4])
def test_storage_record_of_another_size_is_refused_as_torch_refuses_it(tmp_path, extra):
    """torch.load checks a storage record's size exactly ("record size ... does not match expected size"): a
    record longer than its storage id says is refused, not shown as a tensor torch cannot load."""
    import torch
    src = tmp_path / "s.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    path = tmp_path / "resized.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data/0"):
                data = data + b"\0" * extra if extra > 0 else data[:extra]
            zout.writestr(info.filename, data)
    with pytest.raises(Exception, match="does not match"):
        torch.load(path, weights_only=True)
    assert_bad(path, contains="record holds")
