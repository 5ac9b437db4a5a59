"""GGUF (llama.cpp's format): the reader held to gguf's own GGUFReader and dequantizer on files written by
gguf's own GGUFWriter; hostile and truncated files; the CLI on a GGUF file."""
from __future__ import annotations

import json
import math
import os
import struct
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType, LlamaFileType  # noqa: E402
from gguf.quants import _type_traits  # noqa: E402  (which types gguf can dequantize)

import ckpttool  # noqa: E402
from ckpttool.errors import CkptError, FormatError, MissingDependencyError  # noqa: E402
from ckpttool.formats import gguf as reader  # noqa: E402
from clitools import js, run  # noqa: E402

QUANTIZED = sorted((t for t in T if GGML_QUANT_SIZES[t][0] > 1), key=int)
DEQUANTIZABLE = [t for t in QUANTIZED if t in _type_traits]
UNQUANTIZED = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
               T.I32: np.int32, T.I64: np.int64}


def _quantized_raw(rng, qtype, rows: int, blocks_per_row: int) -> np.ndarray:
    """Raw bytes of a (rows, blocks_per_row * block) tensor of ``qtype``: gguf's own quantizer where it has
    one, else random bytes of the right size (dequantize defines what they mean)."""
    block, size = GGML_QUANT_SIZES[qtype]
    try:
        return gguf.quants.quantize(rng.standard_normal((rows, blocks_per_row * block)).astype(np.float32), qtype)
    except NotImplementedError:  # random scale bytes may make NaNs: compared as bytes, they are equal
        return rng.integers(0, 256, (rows, blocks_per_row * size), dtype=np.uint8)


def write(path, tensors, kv=None, arch="llama", alignment=None) -> str:
    """A GGUF file by gguf.GGUFWriter: ``tensors`` [(name, array, raw_dtype or None)], ``kv(writer)`` adds keys."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if kv is not None:
        kv(w)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _rich_kv(w) -> None:
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_file_type(int(LlamaFileType.MOSTLY_Q8_0))
    w.add_quantization_version(2)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}é" for i in range(40)])
    w.add_array("tokenizer.ggml.scores", [float(i) / 4 for i in range(40)])
    w.add_array("tokenizer.ggml.token_type", list(range(40)))  # int32
    w.add_array("test.short_strings", ["a", "", "ünï"])
    w.add_array("test.short_ints", [1, -2, 3])
    w.add_key_value("test.bools", [True, False, True], GGUFValueType.ARRAY)
    for vt, v in ((GGUFValueType.UINT8, 255), (GGUFValueType.INT8, -128), (GGUFValueType.UINT16, 65535),
                  (GGUFValueType.INT16, -32768), (GGUFValueType.UINT32, 2 ** 32 - 1), (GGUFValueType.INT32, -2 ** 31),
                  (GGUFValueType.FLOAT32, 1e-5), (GGUFValueType.UINT64, 2 ** 64 - 1), (GGUFValueType.INT64, -2 ** 63),
                  (GGUFValueType.FLOAT64, math.pi), (GGUFValueType.BOOL, True)):
        w.add_key_value(f"test.{vt.name.lower()}", v, vt)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}" * 1000)  # 23,000 bytes: summarized
    w.add_array("test.long_float_array", [0.25] * 100)


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Every unquantized type, a scalar, an empty and a 3-d tensor, a quantized one; every kind of key."""
    rng = np.random.default_rng(0)
    tensors = []
    for qtype, np_type in UNQUANTIZED.items():
        if np.issubdtype(np_type, np.floating):
            arr = rng.standard_normal((3, 5)).astype(np_type)
        else:
            arr = rng.integers(-100, 100, (3, 5)).astype(np_type)
        tensors.append((f"t.{qtype.name.lower()}", arr, None))
    tensors.append(("t.bf16", gguf.quants.quantize(rng.standard_normal((2, 7)).astype(np.float32), T.BF16), T.BF16))
    tensors.append(("t.cube", rng.standard_normal((2, 3, 4)).astype(np.float32), None))
    tensors.append(("t.scalar", np.array(1.5, dtype=np.float32), None))
    tensors.append(("t.empty", np.zeros((0, 4), dtype=np.float32), None))
    tensors.append(("blk.0.attn_q.weight", _quantized_raw(rng, T.Q8_0, 4, 2), T.Q8_0))
    tensors.append(("blk.0.ffn.weight", _quantized_raw(rng, T.Q4_K, 2, 1), T.Q4_K))
    return write(tmp_path_factory.mktemp("gguf") / "rich.gguf", tensors, _rich_kv)


def _expected_kv(field):
    """A GGUFReader field as the reader's ``kv`` shows it (arrays of more than 16 summarized)."""
    main = field.types[0]

    def one(idx, vtype):
        part = field.parts[idx]
        return bytes(part).decode("utf-8") if vtype == GGUFValueType.STRING else part.tolist()[0]
    value = [one(i, field.types[-1]) for i in field.data] if main == GGUFValueType.ARRAY else one(field.data[0], main)
    if main == GGUFValueType.STRING and len(field.parts[-1]) > reader.MAX_SHOWN_STRING:
        return {"type": "string", "length": len(field.parts[-1]),
                "head": bytes(field.parts[-1][:reader.STRING_HEAD]).decode("utf-8", "replace")}
    if main == GGUFValueType.ARRAY:
        n = len(field.data)
        if n > reader.SUMMARY_OVER:
            return {"type": field.types[-1].name.lower(), "length": n, "head": value[:reader.HEAD]}
    return value


# --- tables ------------------------------------------------------------------------------------------------

def test_type_tables_match_gguf():
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        if int(qtype) in reader.REMOVED_GGML_TYPES:  # an older gguf package still lists them
            assert int(qtype) not in reader.GGML_TYPES
            continue
        assert int(qtype) in reader.GGML_TYPES, qtype
        name, my_block, my_size, _ = reader.GGML_TYPES[int(qtype)]
        assert (name, my_block, my_size) == (qtype.name, block, size)
    for vt in GGUFValueType:
        assert reader.VALUE_TYPES[int(vt)][0] == vt.name.lower()
    assert len(reader.VALUE_TYPES) == len(GGUFValueType)
    for ft in LlamaFileType:
        assert reader.FILE_TYPES.get(int(ft), ft.name) == ft.name
    assert {int(ft) for ft in LlamaFileType} - set(reader.FILE_TYPES) <= {33, 34, 35}  # Q4_0_4_4.. removed


def test_looks_like():
    assert reader.looks_like(b"GGUF\x03\x00\x00\x00")
    assert not reader.looks_like(b"GGML") and not reader.looks_like(b"")


# --- structure and values against gguf's own reader -------------------------------------------------------

def test_structure_equals_gguf_reader(rich):
    ck = reader.read(rich)
    ref = gguf.GGUFReader(rich)
    assert ck.format == "gguf" and ck.file_size == os.path.getsize(rich) and ck.files == (rich,)
    assert ck.globals == ()
    assert list(ck.root) == [t.name for t in ref.tensors]
    meta = ck.metadata
    assert meta["gguf_version"] == 3 and meta["alignment"] == ref.alignment == 32
    assert meta["architecture"] == "llama"
    for rt in ref.tensors:
        t = ck.root[rt.name]
        assert t.shape == tuple(int(d) for d in reversed(rt.shape.tolist())), rt.name
        assert meta["tensor_types"][rt.name] == rt.tensor_type.name
        assert t.stride == reader._contiguous(t.shape) and t.is_contiguous and t.device == "cpu"
        assert t.storage.source.offset == rt.data_offset
        assert t.storage.key == rt.name and t.storage.file == rich
        if rt.tensor_type in UNQUANTIZED or rt.tensor_type == T.BF16:
            assert t.encoding is None and t.nbytes == rt.n_bytes == t.storage.nbytes
            assert t.storage.source.size == rt.n_bytes
            if rt.tensor_type != T.BF16:
                assert t.shape == rt.data.shape
                assert t.dtype == str(np.dtype(UNQUANTIZED[rt.tensor_type]))
            else:
                assert t.dtype == "bfloat16"
        else:
            assert t.dtype == "float32" and t.kind == "dense" and t.encoding == rt.tensor_type.name
            assert t.encoded_nbytes == rt.n_bytes and t.nbytes == t.numel * 4 == t.storage.nbytes
            assert isinstance(t.storage.source, reader.DequantSpan) and t.storage.source.size == t.numel * 4
    kv = meta["kv"]
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(kv) == list(fields)
    for key, field in fields.items():
        assert kv[key] == _expected_kv(field), key
    assert kv["tokenizer.ggml.tokens"] == {"type": "string", "length": 40, "head": [f"tok{i}é" for i in range(8)]}
    assert kv["tokenizer.chat_template"]["length"] == 23000
    assert kv["test.short_strings"] == ["a", "", "ünï"] and kv["test.bools"] == [True, False, True]
    assert kv["test.uint64"] == 2 ** 64 - 1 and kv["test.bool"] is True
    json.dumps(meta, allow_nan=False)  # JSON-able, strictly


def test_details_rows(rich):
    details = reader.read(rich).metadata["details"]
    assert details == [
        ["architecture", "llama"], ["name", "tiny-llama"], ["gguf", "version 3, alignment 32, 28 key-values"],
        ["ggml types", "F32 4 tensors, BF16 1 tensor, F16 1 tensor, F64 1 tensor, I16 1 tensor, I32 1 tensor, "
                       "I64 1 tensor, I8 1 tensor, Q4_K 1 tensor, Q8_0 1 tensor"],
        ["file type", "MOSTLY_Q8_0 (7)"], ["model", "context length 256, embedding 64, blocks 2, heads 4"],
        ["tokenizer", "llama, 40 tokens"]]


def test_unquantized_bytes_equal_gguf_reader(rich):
    ck = reader.read(rich)
    for rt in gguf.GGUFReader(rich).tensors:
        t = ck.root[rt.name]
        if t.encoding is None:
            assert t.read_bytes() == rt.data.tobytes(), rt.name
            assert b"".join(t.iter_chunks(8)) == rt.data.tobytes()
    assert ck.root["t.scalar"].shape == () and ck.root["t.scalar"].numel == 1
    assert ck.root["t.empty"].shape == (0, 4) and ck.root["t.empty"].read_bytes() == b""


@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_dequantized_equals_gguf(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    raw = _quantized_raw(rng, qtype, 3, 2)
    path = write(tmp_path / "q.gguf", [("pad", np.ones(3, dtype=np.float32), None), ("w", raw, qtype)])
    rt = gguf.GGUFReader(path).tensors[1]
    assert np.array_equal(rt.data, raw)
    expected = gguf.quants.dequantize(rt.data, qtype).astype("<f4")
    want = expected.tobytes()
    t = reader.read(path).root["w"]
    assert t.shape == expected.shape and t.encoding == qtype.name
    span = t.storage.source
    assert span.read() == want
    assert t.read_bytes() == want
    assert t.to_torch().numpy().tobytes() == want  # through readinto
    assert b"".join(t.iter_chunks(100)) == want  # chunks of 25 values: across block and row boundaries
    n = len(want)
    cuts = [(0, 1), (1, 2), (3, 9), (n - 1, 1), (n - 7, 7), (0, n), (n, 0), (n // 3 + 1, n // 3 + 5)]
    cuts += [(int(a), int(b)) for a, b in zip(rng.integers(0, n, 20), rng.integers(0, 300, 20))]
    for start, size in cuts:
        size = min(size, n - start)
        assert span.read(start, size) == want[start:start + size], (start, size)
    buf = bytearray(10)
    span.readinto(5, buf)
    assert bytes(buf) == want[5:15]
    with pytest.raises(FormatError):
        span.read(n - 3, 4)


def test_a_chunk_decodes_only_its_blocks(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    raw = _quantized_raw(rng, T.Q8_0, 64, 8)  # 64 rows of 256 values, 8 blocks a row
    path = write(tmp_path / "q.gguf", [("w", raw, T.Q8_0)])
    span = reader.read(path).root["w"].storage.source
    whole = span.read()
    sizes = []
    real = gguf.quants.dequantize

    def counting(data, qtype):
        sizes.append(data.size)
        return real(data, qtype)
    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    assert span.read(4 * 33, 32) == whole[4 * 33:4 * 41]  # values 33..40: blocks 1 (32..63) only
    assert sizes == [34]
    del sizes[:]
    assert span.read(4 * 30, 12) == whole[4 * 30:4 * 33]  # values 30..32: blocks 0 and 1
    assert sizes == [68]


def test_types_gguf_cannot_dequantize_read_but_refuse_values(tmp_path):
    rng = np.random.default_rng(2)
    missing = [t for t in QUANTIZED if t not in _type_traits]
    assert missing  # Q8_1, Q8_K... (intermediate types llama.cpp does not write into files)
    tensors = [(f"w.{t.name}", _quantized_raw(rng, t, 1, 1), t) for t in missing]
    ck = reader.read(write(tmp_path / "q.gguf", tensors))
    for t in missing:
        ref = ck.root[f"w.{t.name}"]
        assert ref.encoding == t.name and ref.shape == (1, GGML_QUANT_SIZES[t][0])
        with pytest.raises(FormatError, match=f"cannot dequantize GGML type {t.name}"):
            ref.read_bytes()


def test_without_gguf_structure_reads_and_values_say_what_to_install(rich, monkeypatch):
    for mod in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "gguf", None)
    ck = reader.read(rich)
    assert ck.root["t.f32"].read_bytes()
    with pytest.raises(MissingDependencyError) as e:
        ck.root["blk.0.attn_q.weight"].read_bytes()
    assert e.value.message == "reading GGUF quantized tensors needs the gguf package: pip install 'ckpttool[gguf]'"
    assert e.value.path == rich


def test_alignment_and_many_tensors_and_a_big_vocabulary(tmp_path):
    rng = np.random.default_rng(3)
    tensors = [(f"blk.{i}.w", rng.standard_normal(3).astype(np.float16), None) for i in range(3000)]

    def kv(w):
        w.add_array("tokenizer.ggml.tokens", [f"<token {i}>" for i in range(32000)])
        w.add_array("tokenizer.ggml.scores", [0.5] * 32000)
    path = write(tmp_path / "big.gguf", tensors, kv, alignment=64)
    ck = reader.read(path)
    ref = gguf.GGUFReader(path)
    assert ck.metadata["alignment"] == 64
    assert len(ck.root) == 3000
    for rt in ref.tensors[::97]:
        assert ck.root[rt.name].storage.source.offset == rt.data_offset
        assert ck.root[rt.name].read_bytes() == rt.data.tobytes()
    assert ck.metadata["kv"]["tokenizer.ggml.tokens"] == {"type": "string", "length": 32000,
                                                          "head": [f"<token {i}>" for i in range(8)]}
    assert ck.metadata["kv"]["general.alignment"] == 64


def test_version_2_reads(tmp_path):
    path = write(tmp_path / "a.gguf", [("w", np.arange(4, dtype=np.float32), None)])
    data = bytearray(open(path, "rb").read())
    data[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(bytes(data))
    ck = reader.read(str(tmp_path / "v2.gguf"))
    assert ck.metadata["gguf_version"] == 2
    assert ck.root["w"].read_bytes() == np.arange(4, dtype=np.float32).tobytes()


# --- the header window: every field read where the window moves ------------------------------------------

# each scalar value type with distinct values (a value read from the wrong bytes shows)
SCALAR_VALUES = ((GGUFValueType.UINT8, [255, 0, 7]), (GGUFValueType.INT8, [-128, 127, 3]),
                 (GGUFValueType.UINT16, [65535, 1, 300]), (GGUFValueType.INT16, [-32768, 32767, -5]),
                 (GGUFValueType.UINT32, [2 ** 32 - 1, 1003, 70000]), (GGUFValueType.INT32, [-2 ** 31, 9, 2 ** 31 - 1]),
                 (GGUFValueType.FLOAT32, [1e-5, -2.5, 3.0]), (GGUFValueType.UINT64, [2 ** 64 - 1, 5, 2 ** 40 + 1]),
                 (GGUFValueType.INT64, [-2 ** 63, 2 ** 63 - 1, -7]), (GGUFValueType.FLOAT64, [math.pi, -1e300, 0.5]),
                 (GGUFValueType.BOOL, [True, False, True]))


def _every_field_kv(w) -> None:
    """A key-value of every kind: scalars of every type, strings short, empty and summarized, arrays of every
    type short and summarized, a vocabulary of strings 0 to 20 bytes long (skipped by _skip_strings)."""
    for vt, values in SCALAR_VALUES:
        name = vt.name.lower()
        w.add_key_value(f"s.{name}", values[0], vt)
        w.add_key_value(f"a.{name}", values, GGUFValueType.ARRAY, sub_type=vt)
        w.add_key_value(f"long.{name}", values * 7, GGUFValueType.ARRAY, sub_type=vt)
        w.add_key_value(f"s.{name}.2", values[1], vt)
    w.add_string("s.str", "héllo wörld")
    w.add_string("s.empty", "")
    w.add_string("s.long", "ab" * 9000)  # over MAX_SHOWN_STRING: its head only
    w.add_array("a.strings", ["x", "", "yzé"])
    w.add_array("tokenizer.ggml.tokens", [f"<{i}>" * (i % 5) for i in range(300)])


def _every_field_tensors(rng):
    """Tensors of 0 to 4 dims, a zero dim, unquantized and quantized types, names of 1 to 40 bytes."""
    return [("s", np.array(2.0, dtype=np.float32), None),
            ("v", rng.standard_normal(7).astype(np.float16), None),
            ("m" * 40, rng.standard_normal((3, 5)).astype(np.float32), None),
            ("blk.0.cube", rng.integers(-9, 9, (2, 3, 4)).astype(np.int32), None),
            ("blk.0.four", rng.standard_normal((2, 1, 3, 2)).astype(np.float64), None),
            ("e", np.zeros((0, 4), dtype=np.float32), None),
            ("blk.1.q", _quantized_raw(rng, T.Q8_0, 2, 2), T.Q8_0),
            ("blk.1.k", _quantized_raw(rng, T.Q4_K, 1, 1), T.Q4_K)]


def _gguf_reader_view(path):
    """Every key-value (as the reader shows it) and tensor info (name, shape, type, data offset, bytes in the
    file) that gguf.GGUFReader reads."""
    ref = gguf.GGUFReader(path)
    kv = {k: _expected_kv(f) for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    tensors = [(rt.name, tuple(int(d) for d in reversed(rt.shape.tolist())), rt.tensor_type.name, int(rt.data_offset),
                int(rt.n_bytes)) for rt in ref.tensors]
    return kv, tensors


def _reader_view(path):
    ck = reader.read(path)
    tensors = [(name, t.shape, ck.metadata["tensor_types"][name], t.storage.source.offset,
                t.nbytes if t.encoding is None else t.encoded_nbytes) for name, t in ck.root.items()]
    return ck.metadata["kv"], tensors


def test_a_tiny_window_reads_every_field_as_gguf_reader(rich, tmp_path, monkeypatch):
    """_Header's window shrunk to 1..96 bytes: the window moves inside every field of every kind, at many
    alignments (a read that takes the old window's bytes at a move gives a wrong value, or an error)."""
    rng = np.random.default_rng(7)
    every = write(tmp_path / "every.gguf", _every_field_tensors(rng), _every_field_kv, alignment=64)
    _seed(tmp_path)
    nested = tmp_path / "nested.gguf"
    inner = U32(8) + U64(3) + s("a") + s("") + s("bcd")
    nested.write_bytes(build([kv_("n", 9, U32(9) + U64(20) + (U32(4) + U64(2) + U32(1) + U32(2)) * 20),
                              kv_("m", 9, U32(9) + U64(2) + inner + inner), kv_("x", 4, U32(1003))]))
    for path in (rich, every, str(tmp_path / "seed.gguf"), str(nested)):
        whole = reader.read(path).metadata
        want = _gguf_reader_view(path) if path != str(nested) else None  # gguf's reader shows no nested array
        if want is not None:
            assert _reader_view(path) == want, path
        for window in range(1, 97):
            monkeypatch.setattr(reader, "_WINDOW", window)
            got = _reader_view(path)
            if want is not None:
                assert got == want, (path, window)
            assert reader.read(path).metadata == whole, (path, window)
            monkeypatch.undo()
    assert whole["kv"] == {"n": {"type": "array", "length": 20, "head": [[1, 2]] * 8},
                           "m": [["a", "", "bcd"]] * 2, "x": 1003}


def test_the_1_mib_window_edge_at_every_byte_of_every_field(tmp_path):
    """Files by gguf.GGUFWriter, a padding string sized so that the real 1 MiB window edge falls at each byte
    of what follows it in turn: keys, scalar values of every type, string and array lengths, array
    elements, tensor names, n_dims, dims, types and offsets."""
    def tensors():
        return [("t", np.arange(3, dtype=np.float32), None), ("u", np.ones((2, 3), dtype=np.float16), None),
                ("w", np.zeros((1, 2, 2, 1), dtype=np.int8), None)]

    def kv(pad):
        def add(w):
            w.add_string("p", "x" * pad)  # over MAX_SHOWN_STRING: skipped, so the next read is past the edge
            for vt, values in SCALAR_VALUES:
                w.add_key_value(vt.name[:2].lower() + vt.name[-1], values[1], vt)
            w.add_string("s", "abc")
            w.add_key_value("a", [7, 8, 9], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT16)
            w.add_array("z", ["de", "f"])
        return add
    pad0 = (1 << 20) - 4096
    probe = write(tmp_path / "probe.gguf", tensors(), kv(pad0))
    ref = gguf.GGUFReader(probe)
    first = [f for k, f in ref.fields.items() if not k.startswith("GGUF.")][2]  # after the architecture, "p"
    start, end = int(first.offset), int(ref.data_offset)  # the bytes after the padding string
    assert 300 < end - start < 600 and start < 1 << 20
    for k in range(end - start):  # byte k of them is the first byte past the 1 MiB edge
        path = write(tmp_path / "edge.gguf", tensors(), kv(pad0 + (1 << 20) - start - k))
        assert _reader_view(path) == _gguf_reader_view(path), k


# --- hostile files, built by hand ---------------------------------------------------------------------------

def s(b) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv_(key, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def info(name, dims, ggml_type=0, offset=0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", ggml_type, offset)


def build(kvs=(), infos=None, data=None, version=3, n_tensors=None, n_kv=None, alignment=32, magic=b"GGUF"):
    """A GGUF file's bytes; by default one F32 tensor "w" of 4 values."""
    if infos is None:
        infos = [info("w", [4])]
        data = np.arange(4, dtype=np.float32).tobytes() if data is None else data
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + (data or b"")


def opened(tmp_path, data: bytes):
    p = tmp_path / "h.gguf"
    p.write_bytes(data)
    return reader.read(str(p))


def refused(tmp_path, data: bytes, match: str):
    with pytest.raises(FormatError, match=match) as e:
        opened(tmp_path, data)
    assert "\n" not in str(e.value) and e.value.path == str(tmp_path / "h.gguf")
    return e.value


def test_hand_built_baseline_reads_as_gguf_reads_it(tmp_path):
    data = build([kv_("general.architecture", 8, s("llama")), kv_("x", 4, struct.pack("<I", 7))])
    ck = opened(tmp_path, data)
    assert ck.metadata["kv"] == {"general.architecture": "llama", "x": 7}
    ref = gguf.GGUFReader(str(tmp_path / "h.gguf"))
    assert ck.root["w"].read_bytes() == ref.tensors[0].data.tobytes()


U32 = lambda v: struct.pack("<I", v)  # noqa: E731
U64 = lambda v: struct.pack("<Q", v)  # noqa: E731


@pytest.mark.parametrize("data, match", [
    (b"GGUF\x03\x00\x00\x00", "file too short for a GGUF header"),
    (build(magic=b"GGML"), "not a GGUF file"),
    (build(version=1), "GGUF version 1 is not supported"),
    (build(version=4), "GGUF version 4 is not supported"),
    (build(version=0x03000000), "big-endian GGUF files are not supported"),
    (build(n_tensors=2 ** 40), "claims 1099511627776 tensors"),
    (build(n_kv=2 ** 64 - 1), "more than the .*-byte file can hold"),
    (build(n_tensors=3), "claims 3 tensors and 0 key-values, more than the 80-byte file can hold"),
    (build(n_tensors=2), "truncated: the dims, type and offset of tensor '' at byte 69"),  # the padding read as an info
    (build([U64(2 ** 62) + b"abc"]), "key 0 at byte 24 claims"),
    (build([U64(500) + b"abc" + U32(4) + U32(1)]), "truncated: key 0 at byte 32"),
    (build([kv_("k", 8, U64(2 ** 63) + b"x")]), "key 'k': a string of 9223372036854775808 bytes"),
    (build([kv_("k", 9, U32(4) + U64(2 ** 61))]), "an array of 2305843009213693952 uint32 values"),
    (build([kv_("k", 9, U32(8) + U64(10 ** 6))]), "an array of 1000000 string values"),
    (build([kv_("k", 9, U32(8) + U64(3) + s("a") + U64(10 ** 9))]), "a string of 1000000000 bytes at byte 58"),
    (build([kv_("k", 9, U32(8) + U64(30) + s("a") * 29 + U64(10 ** 9))]), "a string runs past the end"),
    (build([kv_("k", 9, U32(9) + U64(1) + U32(9) + U64(1) + U32(9) + U64(1) + U32(4) + U64(1) + U32(0))]),
     "arrays nested more than 3 deep"),
    (build([kv_("k", 13, U32(0))]), "key 'k' has unknown value type 13"),
    (build([kv_("k", 9, U32(77) + U64(1) + U32(0))]), "array of unknown value type 77"),
    (build([kv_("k", 4, U32(1)), kv_("k", 4, U32(2))]), "key 'k' appears twice"),
    (build([kv_(b"\xff\xfe", 4, U32(1))]), "key 0 at byte 24 is not valid UTF-8"),
    (build(infos=[info(b"w\xff", [4])], data=bytes(16)), "the name of tensor 0 at byte 24 is not valid UTF-8"),
    (build(infos=[info("w", [1] * 9)], data=bytes(4)), "tensor 'w' has 9 dims"),
    (build(infos=[info("w", [2 ** 32, 2 ** 32])], data=bytes(4)), "dims \\[4294967296, 4294967296\\] overflow"),
    (build(infos=[info("w", [2 ** 64 - 1])], data=bytes(4)), "overflow int64"),
    (build(infos=[info("z", [2 ** 62, 0, 2 ** 62, 2 ** 62])], data=bytes(4)),
     "tensor 'z' dims \\[4611686018427387904, 0, 4611686018427387904, 4611686018427387904\\] overflow int64"),
    (build(infos=[info("z", [0, 2 ** 63])], data=bytes(4)), "tensor 'z' dims \\[0, 9223372036854775808\\] overflow"),
    (build(infos=[info("z", [2 ** 32, 0, 2 ** 31])], data=bytes(4)), "tensor 'z' dims .* overflow int64"),
    (build(infos=[info("z", [256 * 2 ** 50, 0, 2 ** 62], ggml_type=12)], data=bytes(4)),
     "tensor 'z' dims .* overflow int64"),
    (build(infos=[info("w", [4], ggml_type=31)], data=bytes(16)),
     "tensor 'w' has GGML type 31 \\(Q4_0_4_4\\), which llama.cpp no longer reads: quantize the model again"),
    (build(infos=[info("w", [4], ggml_type=42)], data=bytes(16)), "tensor 'w' has unknown GGML type 42"),
    (build(infos=[info("w", [4], ggml_type=99)], data=bytes(16)), "tensor 'w' has unknown GGML type 99"),
    (build(infos=[info("w", [48, 2], ggml_type=8)], data=bytes(128)),
     "tensor 'w': its rows of 48 values are not whole Q8_0 blocks of 32"),
    (build(infos=[info("w", [], ggml_type=12)], data=bytes(144)), "rows of 1 values are not whole Q4_K"),
    (build([kv_("general.alignment", 4, U32(0))]), "general.alignment 0 is not a power of two"),
    (build([kv_("general.alignment", 4, U32(48))], alignment=48), "general.alignment 48 is not a power of two"),
    (build([kv_("general.alignment", 5, struct.pack("<i", 32))]), "general.alignment has type int32, not uint32"),
    (build(infos=[info("w", [4], offset=16)], data=bytes(64)), "offset 16, not a multiple of the alignment 32"),
    (build(infos=[info("w", [4], offset=2 ** 63)], data=bytes(64)), "ends at byte"),
    (build(infos=[info("w", [5])], data=bytes(16)), "tensor 'w' ends at byte .* \\(truncated\\?\\)"),
    (build(infos=[info("w", [4]), info("w", [4], offset=32)], data=bytes(48)), "tensor 'w' appears twice"),
    (build(infos=[info("a", [16]), info("b", [4], offset=32)], data=bytes(64)), "tensor 'b' overlaps tensor 'a'"),
    (build(infos=[info("a", [4], offset=32), info("b", [16])], data=bytes(64)), "tensor 'a' overlaps tensor 'b'"),
], ids=lambda v: v[:60] if isinstance(v, str) else "gguf")
def test_hostile_header_is_a_format_error(tmp_path, data, match):
    refused(tmp_path, data, match)


def test_decisions_on_odd_but_harmless_files(tmp_path):
    # two zero-size tensors at one offset do not overlap; a gap between tensors is allowed (gguf reads it)
    ck = opened(tmp_path, build(infos=[info("a", [0, 3]), info("b", [0]), info("c", [4], offset=64)],
                                data=bytes(80)))
    assert [t.shape for t in ck.root.values()] == [(3, 0), (0,), (4,)]
    # a zero dim: the other dims' product (a 0 taken as 1) fits int64, as torch needs it to
    ck = opened(tmp_path, build(infos=[info("z", [2 ** 31, 0, 2 ** 32 - 1]), info("y", [2 ** 63 - 1, 0])]))
    assert [t.shape for t in ck.root.values()] == [(2 ** 32 - 1, 0, 2 ** 31), (0, 2 ** 63 - 1)]
    assert [t.numel for t in ck.root.values()] == [0, 0]
    # string values that are not UTF-8 are shown with U+FFFD; non-finite floats as text (JSON has none)
    ck = opened(tmp_path, build([kv_("s", 8, s(b"a\xffb")), kv_("f", 6, struct.pack("<f", math.inf)),
                                 kv_("d", 12, struct.pack("<d", math.nan)),
                                 kv_("a", 9, U32(6) + U64(2) + struct.pack("<2f", -math.inf, 1.0)),
                                 kv_("n", 9, U32(9) + U64(2) + U32(0) + U64(1) + b"\x07" + U32(8) + U64(1) + s("x")),
                                 kv_("b", 7, b"\x02")]))
    assert ck.metadata["kv"] == {"s": "a\ufffdb", "f": "inf", "d": "nan", "a": ["-inf", 1.0], "n": [[7], ["x"]],
                                 "b": True}
    json.dumps(ck.metadata, allow_nan=False)
    # no tensors: nothing after the header is needed
    ck = opened(tmp_path, build(infos=[]))
    assert ck.root == {} and ck.metadata["tensor_types"] == {} and ck.metadata["architecture"] is None


def test_nested_array_summaries(tmp_path):
    inner = U32(0) + U64(2) + b"\x01\x02"
    data = build([kv_("n", 9, U32(9) + U64(20) + inner * 20)])
    assert opened(tmp_path, data).metadata["kv"]["n"] == {"type": "array", "length": 20, "head": [[1, 2]] * 8}
    big = U32(4) + U64(40) + b"".join(U32(i) for i in range(40))
    data = build([kv_("n", 9, U32(9) + U64(2) + big + big)])
    summary = {"type": "uint32", "length": 40, "head": list(range(8))}
    assert opened(tmp_path, data).metadata["kv"]["n"] == [summary, summary]


def _seed(tmp_path) -> bytes:
    rng = np.random.default_rng(4)
    path = write(tmp_path / "seed.gguf", [("a", rng.standard_normal((2, 3)).astype(np.float32), None),
                                         ("q", _quantized_raw(rng, T.Q8_0, 2, 1), T.Q8_0),
                                         ("i", np.arange(5, dtype=np.int64), None)],
                 lambda w: (w.add_name("seed"), w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(20)]),
                            w.add_array("small", [1, 2, 3]), w.add_float32("f", 0.5)))
    return open(path, "rb").read()


def test_truncated_at_every_byte_is_a_format_error(tmp_path):
    data = _seed(tmp_path)
    ref = gguf.GGUFReader(str(tmp_path / "seed.gguf"))
    end = max(t.data_offset + t.n_bytes for t in ref.tensors)  # the file may end here: the rest is padding
    for cut in range(end):
        with pytest.raises(FormatError):
            opened(tmp_path, data[:cut])
    assert opened(tmp_path, data[:end]).root["i"].read_bytes() == np.arange(5, dtype=np.int64).tobytes()


def test_random_damage_is_a_ckpt_error_or_a_checkpoint(tmp_path):
    data = _seed(tmp_path)
    rng = np.random.default_rng(5)
    header_end = gguf.GGUFReader(str(tmp_path / "seed.gguf")).data_offset
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, header_end))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                b[pos] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1:
                width = int(rng.choice([1, 4, 8]))
                b[pos:pos + width] = int(rng.choice([0, 1, 7, 255, 2 ** 31, 2 ** 32 - 1, 2 ** 63])).to_bytes(
                    8, "little")[:width]
            else:
                del b[pos:pos + int(rng.integers(1, 9))]
        try:
            ck = opened(tmp_path, bytes(b))
            for t in ck.root.values():
                t.read_bytes()
            json.dumps(ck.metadata, allow_nan=False)
            outcomes["ok"] += 1
        except CkptError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 10, outcomes


# --- through ckpttool's front door and the CLI ---------------------------------------------------------------

def test_detected_and_opened_as_gguf(rich):
    from ckpttool import formats
    assert formats.detect(rich) == "gguf"
    ck = ckpttool.open(rich)
    assert ck.format == "gguf" and list(ck.root) == list(reader.read(rich).root)


def test_cli_inspect(rich):
    r = run("inspect", rich)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.split() == ["architecture", "llama"] for line in lines), r.stdout
    assert any(line.split()[:2] == ["ggml", "types"] and "Q8_0" in line and "Q4_K" in line for line in lines)
    row = next(line for line in lines if line.startswith("blk.0.attn_q.weight "))
    assert "Q8_0" in row and "(4, 64)" in row
    d = js("inspect", rich)
    assert d["format"] == "gguf"
    by_name = {t["name"]: t for t in d["tensors"]}
    ref = gguf.GGUFReader(rich)
    assert list(by_name) == [t.name for t in ref.tensors]
    assert by_name["blk.0.attn_q.weight"]["shape"] == [4, 64] and by_name["blk.0.attn_q.weight"]["dtype"] == "float32"
    assert by_name["blk.0.attn_q.weight"]["nbytes"] == ref.tensors[-2].n_bytes  # what it takes in the file
    assert by_name["t.f16"]["dtype"] == "float16" and by_name["t.bf16"]["dtype"] == "bfloat16"
    assert d["metadata"]["architecture"] == "llama"
    assert d["metadata"]["kv"]["tokenizer.ggml.tokens"]["length"] == 40


def test_cli_scan_finds_no_code(rich):
    r = run("scan", rich)
    assert r.exit_code == 0, r.output
    d = js("scan", rich)
    assert d["dangerous"] is False and d["files"][0]["globals"] == []


def test_cli_scan_checks_the_header_bounds(rich, tmp_path):
    """scan reads a GGUF's header as every command does: a header cut short is unreadable (exit 2), not safe."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(rich, "rb").read()[:200])
    with pytest.raises(FormatError):
        reader.read(str(cut))
    r = run("scan", cut)
    assert r.exit_code == 2, r.output
    assert r.stdout == "" and r.stderr.startswith("ckpttool: error: GGUF ") and r.stderr.count("\n") == 1


def _reference_values(path):
    """name -> the values gguf's own reader gives (dequantized where quantized; bfloat16 as its bits)."""
    out = {}
    for rt in gguf.GGUFReader(path).tensors:
        shape = tuple(int(x) for x in reversed(rt.shape.tolist()))
        if rt.tensor_type in UNQUANTIZED:
            out[rt.name] = np.asarray(rt.data).reshape(shape)
        elif rt.tensor_type == T.BF16:
            out[rt.name] = np.asarray(rt.data).view(np.uint16).reshape(shape)
        else:
            out[rt.name] = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(shape)
    return out


def _mixed(tmp_path) -> str:
    rng = np.random.default_rng(6)
    tensors = [("f32", rng.standard_normal((3, 4)).astype(np.float32), None),
               ("f16", rng.standard_normal(5).astype(np.float16), None),
               ("i32", np.arange(6, dtype=np.int32).reshape(2, 3), None),
               ("q8", _quantized_raw(rng, T.Q8_0, 3, 2), T.Q8_0),
               ("q5", _quantized_raw(rng, T.Q5_0, 2, 1), T.Q5_0),
               ("q4k", _quantized_raw(rng, T.Q4_K, 2, 1), T.Q4_K)]
    return write(tmp_path / "m.gguf", tensors)


def test_cli_diff_against_the_values_gguf_reads(tmp_path):
    from safetensors.numpy import save_file
    src = _mixed(tmp_path)
    want = _reference_values(src)
    same = tmp_path / "same.safetensors"
    save_file(want, str(same))
    d = js("diff", src, same)
    assert d["equal"] is True, d
    want["q4k"] = want["q4k"].copy()
    want["q4k"][1, 7] += 1
    other = tmp_path / "other.safetensors"
    save_file(want, str(other))
    d = js("diff", src, other, code=1)
    assert d["equal"] is False
    assert [v["name"] if isinstance(v, dict) else v for v in d["value_mismatch"]] == ["q4k"]


def test_cli_convert_to_safetensors_and_diff(tmp_path):
    src = _mixed(tmp_path)
    out = tmp_path / "out.safetensors"
    r = run("convert", src, "-o", out)
    assert r.exit_code == 0, r.output
    from safetensors.numpy import load_file
    got = load_file(str(out))
    want = _reference_values(src)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        assert got[name].tobytes() == value.tobytes(), name
    r = run("diff", src, out)
    assert r.exit_code == 0, r.output
    assert js("diff", src, out)["equal"] is True


def test_cli_convert_every_kind_read_back(rich, tmp_path):
    out = tmp_path / "out.safetensors"
    r = run("convert", rich, "-o", out)
    assert r.exit_code == 0, r.output
    ck = ckpttool.open(str(out))  # numpy has no bfloat16: the output read through ckpttool's safetensors reader
    want = _reference_values(rich)
    assert sorted(ck.root) == sorted(want)
    for name, value in want.items():
        t = ck.root[name]
        assert t.shape == value.shape, name
        assert t.dtype == ("bfloat16" if name == "t.bf16" else str(value.dtype)), name
        assert t.read_bytes() == value.tobytes(), name
    assert js("diff", rich, out)["equal"] is True


def test_convert_to_gguf_is_refused_in_one_line(rich, tmp_path):
    r = run("convert", rich, "-o", tmp_path / "x.gguf")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["ckpttool: error: ckpttool reads GGUF but does not write one ('x.gguf')",
                                     "hint: write .pt, .safetensors or .onnx"]
    assert not (tmp_path / "x.gguf").exists()


def test_sort_size_orders_by_the_size_shown(rich):
    """A quantized tensor is shown (and sorted) by the bytes it takes in the file, not its float32 values."""
    rows = js("inspect", rich, "--sort", "size")["tensors"]
    sizes = [t["nbytes"] for t in rows]
    assert sizes == sorted(sizes, reverse=True)
