"""torch.distributed.checkpoint folders, read without torch and without running their pickles.

A DCP folder holds ``.metadata`` (a plain pickle of DCP's metadata classes: which tensors and
values exist, their sizes and chunks, and where each chunk's bytes are) and ``__R_N.distcp``
files, in which every chunk and every non-tensor value is a ``torch.save`` archive at an offset.
``.metadata`` is read by the restricted unpickler and only DCP's own metadata classes may appear
in it; each chunk's archive is read in place (a window of the .distcp file) by the same readers
as any torch.save file, so tensor bytes stay where they are and are read lazily. A tensor split
into chunks along its first dimension (FSDP's sharding) is one tensor whose bytes are its chunks'
in order.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Dict, List, Optional, Tuple

from ..dtypes import itemsize
from ..errors import FileAccessError, FormatError
from ..checkpoint import Checkpoint, StorageRef, TensorRef
from ..spans import FileSpan
from .archive import STORED, AmbiguousArchive, Archive, record_span
from .safe_pickle import Stub, parse_storage_pid, safe_load, storage_nbytes

MAX_METADATA = 1 << 30
_DCP = "torch.distributed.checkpoint."
ALLOWED = {_DCP + n for n in (
    "metadata.Metadata", "metadata.MetadataIndex", "metadata.StorageMeta", "metadata.TensorProperties",
    "metadata.TensorStorageMetadata", "metadata.BytesStorageMetadata", "metadata.ChunkStorageMetadata",
    "metadata._MEM_FORMAT_ENCODING", "filesystem._StorageInfo")} | {
    "pathlib.PosixPath", "pathlib.WindowsPath", "torch.serialization._get_layout"}


def is_dcp(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ".metadata"))


def _state(obj: Any, cls: str) -> Dict[str, Any]:
    if not (isinstance(obj, Stub) and obj.qualname == _DCP + cls and isinstance(obj.state, dict)):
        raise FormatError(f"DCP metadata: expected a {cls.rpartition('.')[2]} record")
    return obj.state


_BLOBS: Dict[Tuple[str, int, int], Tuple[Any, str]] = {}


def _blob(path: str, base: int, length: int, what: str) -> Tuple[Any, str]:
    """The root object of the torch.save archive at [base, base + length) of ``path`` (parsed once per read)."""
    if type(base) is not int or type(length) is not int:
        raise FormatError(f"{what}: offset and length are not integers", path)
    key = (path, base, length)
    if key not in _BLOBS:
        _BLOBS[key] = _parse_blob(path, base, length, what)
    return _BLOBS[key]


def _parse_blob(path: str, base: int, length: int, what: str) -> Tuple[Any, str]:
    file_size = os.path.getsize(path)
    if base < 0 or length <= 0 or base + length > file_size:
        raise FormatError(f"{what}: bytes [{base}, +{length}) lie outside {os.path.basename(path)}", path)
    try:
        archive = Archive.open(path, base, length)  # the window, read as torch.load reads it there
        with archive:
            folder = archive.folder
            main = archive.find("data.pkl")
            if main is None:
                raise FormatError(f"zip archive has no {folder}data.pkl", path)
            data = archive.read(main, limit=length)
    except AmbiguousArchive as e:
        raise FormatError(f"{what}: {e.message}", path) from None
    except FormatError as e:
        raise FormatError(f"{what}: not a readable torch.save archive: {e.message}", path) from None

    def load(pid):
        stype, key, location, numel, _ = parse_storage_pid(pid, 5)
        record = archive.find("data/" + key)  # the directory stays readable after the archive is closed
        if record is None:
            raise FormatError(f"{what}: storage {key!r} missing")
        nbytes = storage_nbytes(stype, numel)
        if nbytes > record.size:
            raise FormatError(f"{what}: storage {key!r} runs past its archive")
        return StorageRef(key=f"{os.path.basename(path)}@{base}/{key}", dtype=stype.dtype, device=location,
                          nbytes=nbytes, source=_span(path, record, nbytes, what), file=path)

    root, _ = safe_load(data, load, path)
    return root, folder


def _span(path: str, record, nbytes: int, what: str):
    """The first ``nbytes`` of a storage record: in place where it is stored, inflated where it is not."""
    if record.method == STORED:
        return FileSpan(path, record.data_offset, nbytes)
    try:
        span = record_span(path, record)
    except FormatError as e:
        raise FormatError(f"{what}: {e.message}") from None
    return span if span.size == nbytes else _Prefix(span, nbytes)


class _Prefix:
    """The first ``size`` bytes of a span."""

    def __init__(self, span, size: int):
        self.span, self.size, self.path = span, size, span.path

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        return self.span.read(start, size)


class _Gathered:
    """The C-order bytes of a non-contiguous chunk, gathered when read. The last chunk gathered is kept for the
    next piece of the same read (one such chunk in memory for the whole process, not one per chunk)."""

    _last: List[Any] = [None, b""]

    def __init__(self, t: TensorRef):
        self.t = t

    def read(self, start: int, size: int) -> bytes:
        last = _Gathered._last
        if last[0] is not self:
            last[0], last[1] = None, b""  # free the previous chunk before gathering this one
            last[1] = self.t.read_bytes()
            last[0] = self
        return last[1][start:start + size]


class _Tiles:
    """A tensor's C-order bytes assembled from chunks that tile it (DCP's sharding, along any dimensions).

    Each chunk is a contiguous C-order block at ``offsets`` with ``sizes`` inside the full ``shape``.
    Within the full tensor a chunk is a set of runs: along its innermost dimensions that span the
    whole tensor it is one run of bytes (a split along dim 0 is one run per chunk); along the others
    it is one run per index. A read touches only the runs that meet it, and reads each chunk's
    bytes for them in one piece.
    """

    def __init__(self, shape: Tuple[int, ...], itemsize: int, chunks: List[Tuple[Tuple[int, ...], Tuple[int, ...],
                                                                               Any, int]], path: str):
        self.shape, self.item, self.path = shape, itemsize, path
        self.strides = _c_strides(shape)  # in elements
        self.size = _prod(shape) * itemsize
        self.chunks = []
        for offsets, sizes, source, start in chunks:  # (offsets, sizes, source, first byte in source)
            k = len(shape) - 1
            while k > 0 and sizes[k] == shape[k]:
                k -= 1  # dims k+1.. span the tensor: one run covers them
            run = sizes[k] * self.strides[k]
            self.chunks.append((offsets, sizes, k, run, source, start))

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        buf = bytearray(size)
        self.readinto(start, buf)
        return bytes(buf)

    def readinto(self, start: int, buf) -> None:
        size = len(buf)
        if start < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte tensor", self.path)
        out = buf if isinstance(buf, memoryview) else memoryview(buf)
        if out.format != "B" or out.ndim != 1:
            out = out.cast("B")
        item = self.item
        end = start + size
        lo, hi = start // item, -(-end // item)  # whole elements covering the read
        for offsets, sizes, k, run, source, first in self.chunks:
            for pos, r, n, gap in self._segments(offsets, sizes, k, run, lo, hi):
                # runs r..r+n-1 of the chunk lie at pos + j*gap; only the first and last may be cut by [lo, hi)
                src_lo = r * run + max(0, lo - pos)
                last = pos + (n - 1) * gap
                src_hi = (r + n - 1) * run + min(run, hi - last)
                data = memoryview(source.read(first + src_lo * item, (src_hi - src_lo) * item))

                def copy(j: int) -> None:  # run j, clipped to the bytes asked for
                    p = pos + j * gap
                    a, b = max(p * item, start), min((p + run) * item, end)
                    if a < b:
                        s0 = ((r + j) * run + (a // item - p)) * item - src_lo * item + a % item
                        out[a - start:b - start] = data[s0:s0 + b - a]

                copy(0)
                if n > 1:
                    copy(n - 1)
                m = n - 2  # the runs between are whole: each `run` elements, `gap` apart
                if m <= 0:
                    continue
                rb, gb = run * item, gap * item
                d0 = (pos + gap) * item - start
                s0 = ((r + 1) * run - src_lo) * item
                if rb < m:  # many short runs: one strided copy per byte of a run
                    for i in range(rb):
                        out[d0 + i:d0 + i + (m - 1) * gb + 1:gb] = data[s0 + i:s0 + i + (m - 1) * rb + 1:rb]
                else:
                    for j in range(m):
                        out[d0 + j * gb:d0 + j * gb + rb] = data[s0 + j * rb:s0 + (j + 1) * rb]

    def _segments(self, offsets, sizes, k, run, lo, hi):
        """The chunk's runs that meet elements [lo, hi), as (position of the first in the full tensor, its index
        among the chunk's runs, how many, distance between them): consecutive runs along dim k-1 are one segment."""
        strides = self.strides

        def trimmed(pos: int, r: int, n: int, gap: int):
            while n and pos + run <= lo:  # a run whose block meets [lo, hi) but which does not
                pos, r, n = pos + gap, r + 1, n - 1
            while n and pos + (n - 1) * gap >= hi:
                n -= 1
            return (pos, r, n, gap) if n else None

        if k == 0:
            seg = trimmed(offsets[0] * strides[0], 0, 1, 0)
            if seg:
                yield seg
            return
        counts = sizes[:k]  # the chunk's runs are indexed by its indices along dims 0..k-1

        def walk(d: int, base: int, index: int):
            step = strides[d]
            # indices i along d whose block [base + (o+i)*step, + step) meets [lo, hi)
            i0 = max(0, (lo - base) // step - offsets[d])
            i1 = min(sizes[d] - 1, (hi - 1 - base) // step - offsets[d])
            inner = _prod(counts[d + 1:])
            if d == k - 1:
                if i0 <= i1:
                    seg = trimmed(base + (offsets[d] + i0) * step + offsets[k] * strides[k], index + i0,
                                  i1 - i0 + 1, step)
                    if seg:
                        yield seg
                return
            for i in range(i0, i1 + 1):
                yield from walk(d + 1, base + (offsets[d] + i) * step, index + i * inner)

        yield from walk(0, 0, 0)


def _dims(values: Any, what: str, fqn: str, meta_path: str) -> Tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or any(type(v) is not int or v < 0 for v in values):
        raise FormatError(f"tensor {fqn}: {what} is not a list of non-negative ints", meta_path)
    return tuple(values)


MAX_GRID_CELLS = 1 << 24


def _check_tiling(fqn: str, size: Tuple[int, ...], boxes: List[Tuple[Tuple[int, ...], Tuple[int, ...]]],
                  meta_path: str) -> None:
    """Chunks must cover the tensor exactly once: cut it at every chunk edge into a grid of cells (one byte each)
    and mark each chunk's cells, a row of cells along the last dimension at a time."""
    cuts = [sorted({0, n} | {o[d] for o, _ in boxes} | {o[d] + s[d] for o, s in boxes}) for d, n in enumerate(size)]
    shape = [len(c) - 1 for c in cuts]
    cells = _prod(shape)
    if cells > MAX_GRID_CELLS:
        raise FormatError(f"tensor {fqn}: its {len(boxes)} chunks cut it into {cells} pieces, more than "
                          f"{MAX_GRID_CELLS}", meta_path)
    where = [{v: i for i, v in enumerate(c)} for c in cuts]
    grid = bytearray(cells)
    strides = _c_strides(shape)
    for n, (o, s) in enumerate(boxes):
        lo = [where[d][o[d]] for d in range(len(size))]
        hi = [where[d][o[d] + s[d]] for d in range(len(size))]
        if not size:
            rows, a, b = [0], 0, 1
        else:
            a, b = lo[-1], hi[-1]
            rows = [sum(i * st for i, st in zip(idx, strides)) for idx in
                    itertools.product(*[range(lo[d], hi[d]) for d in range(len(size) - 1)])]
        for row in rows:
            if grid.find(1, row + a, row + b) != -1:
                other = next(p for m, (p, q) in enumerate(boxes) if m != n and _meets(p, q, o, s))
                raise FormatError(f"tensor {fqn}: chunks at {list(other)} and {list(o)} overlap", meta_path)
            grid[row + a:row + b] = b"\x01" * (b - a)
    if grid.count(0):
        raise FormatError(f"tensor {fqn}: its chunks do not cover the whole {list(size)} tensor", meta_path)


def _meets(o1, s1, o2, s2) -> bool:
    return all(a < c + m and c < a + n for a, n, c, m in zip(o1, s1, o2, s2))


def _tensor(fqn: str, md: Stub, index: Dict[Tuple[str, Any], Dict[str, Any]], folder: str,
            meta_path: str) -> TensorRef:
    st = _state(md, "metadata.TensorStorageMetadata")
    size = _dims(st.get("size") or (), "its size", fqn, meta_path)
    chunks = []
    for c in st.get("chunks") or []:
        cs = _state(c, "metadata.ChunkStorageMetadata")
        offsets = _dims(cs.get("offsets") or (), "a chunk's offsets", fqn, meta_path)
        sizes = _dims(cs.get("sizes") or (), "a chunk's sizes", fqn, meta_path)
        if len(offsets) != len(size) or len(sizes) != len(size) or \
                any(o + n > full for o, n, full in zip(offsets, sizes, size)):
            raise FormatError(f"tensor {fqn}: chunk at {list(offsets)} of size {list(sizes)} does not fit in "
                              f"its {list(size)} tensor", meta_path)
        info = index.get((fqn, offsets))
        if info is None:
            raise FormatError(f"tensor {fqn}: chunk at {list(offsets)} has no storage record", meta_path)
        path = _inside(folder, info.get("relative_path"), meta_path)
        t, _ = _blob(path, info.get("offset"), info.get("length"), f"tensor {fqn} chunk {list(offsets)}")
        if not isinstance(t, TensorRef) or tuple(t.shape) != sizes:
            raise FormatError(f"tensor {fqn}: chunk at {list(offsets)} does not hold a {list(sizes)} tensor", path)
        chunks.append((offsets, t))
    if not chunks:
        raise FormatError(f"tensor {fqn} has no chunks", meta_path)
    dtypes = {t.dtype for _, t in chunks}
    if len(dtypes) > 1:
        raise FormatError(f"tensor {fqn}: its chunks have different dtypes ({', '.join(sorted(dtypes))})", meta_path)
    chunks.sort(key=lambda c: c[0])
    first = chunks[0][1]
    props = st.get("properties")
    declared = props.state[0] if isinstance(props, Stub) and isinstance(props.state, tuple) and props.state else None
    if isinstance(declared, str) and declared != first.dtype:
        raise FormatError(f"tensor {fqn}: .metadata says {declared} but its chunks hold {first.dtype}", meta_path)
    if len(chunks) == 1 and tuple(first.shape) == size:
        return first
    chunks = [(o, t) for o, t in chunks if t.numel]  # an empty shard (uneven split) holds nothing
    if chunks:
        _check_tiling(fqn, size, [(o, tuple(t.shape)) for o, t in chunks], meta_path)
    elif _prod(size):
        raise FormatError(f"tensor {fqn}: its chunks are all empty", meta_path)
    parts = []
    for offsets, t in chunks:
        if not t.has_data:
            raise FormatError(f"tensor {fqn}: chunk at {list(offsets)} has no data", meta_path)
        if t.is_contiguous:
            parts.append((offsets, tuple(t.shape), t.storage.source, t.span()[0]))
        else:  # a strided view saved as it was (torch.save keeps strides): its C-order bytes, gathered
            parts.append((offsets, tuple(t.shape), _Gathered(t), 0))
    source = _Tiles(size, itemsize(first.dtype) or 1, parts, meta_path)
    storage = StorageRef(key=fqn, dtype=first.dtype, device=first.device, nbytes=source.size, source=source,
                         file=meta_path)
    return TensorRef(shape=size, dtype=first.dtype, stride=source.strides, storage=storage, device=first.device)


def _c_strides(shape) -> Tuple[int, ...]:
    """A C-order (row-major) layout's strides, in elements."""
    return tuple(_prod(shape[i + 1:]) for i in range(len(shape)))


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _inside(folder: str, name: Any, referrer: str) -> str:
    from .sharded import inside
    if not isinstance(name, str):
        raise FormatError("DCP storage record without a file name", referrer)
    full = inside(folder, name, referrer)
    if not os.path.isfile(full):
        raise FileAccessError(f"DCP data file {name} is missing", referrer)
    return full


def read(folder: str) -> Checkpoint:
    """Read a torch.distributed.checkpoint folder: every tensor and value, tensors lazy."""
    try:
        return _read(folder)
    except FormatError as e:
        e.path = e.path or folder
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError) as e:
        # .metadata is the file's to choose: a field of the wrong type is a malformed file, not a crash
        raise FormatError(f"DCP metadata is malformed: {type(e).__name__}: {str(e)[:120]}", folder) from None


def _read(folder: str) -> Checkpoint:
    _BLOBS.clear()
    try:
        return _read_folder(folder)
    finally:
        _BLOBS.clear()


def _read_folder(folder: str) -> Checkpoint:
    meta_path = os.path.join(folder, ".metadata")
    if os.path.getsize(meta_path) > MAX_METADATA:
        raise FormatError(f".metadata is larger than {MAX_METADATA >> 20} MiB", meta_path)
    with open(meta_path, "rb") as f:
        data = f.read()
    root, globs = safe_load(data, None, meta_path)
    strangers = sorted(g.qualname for g in globs if g.handling == "stub" and g.qualname not in ALLOWED)
    if strangers:
        raise FormatError(f"DCP .metadata names {strangers[0]}, which is not one of DCP's metadata classes", meta_path)
    st = _state(root, "metadata.Metadata")
    sdm, storage = st.get("state_dict_metadata"), st.get("storage_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise FormatError("DCP .metadata has no state_dict_metadata / storage_data", meta_path)
    index: Dict[Tuple[str, Any], Dict[str, Any]] = {}
    for k, v in storage.items():
        ks, vs = _state(k, "metadata.MetadataIndex"), _state(v, "filesystem._StorageInfo")
        off = ks.get("offset")
        index[(ks.get("fqn"), tuple(off) if isinstance(off, (list, tuple)) else None)] = vs
    flat: Dict[str, Any] = {}
    files = {meta_path}
    for fqn, md in sdm.items():
        if not isinstance(fqn, str):
            raise FormatError("DCP .metadata has a non-string key", meta_path)
        if isinstance(md, Stub) and md.qualname == _DCP + "metadata.TensorStorageMetadata":
            flat[fqn] = _tensor(fqn, md, index, folder, meta_path)
        elif isinstance(md, Stub) and md.qualname == _DCP + "metadata.BytesStorageMetadata":
            info = index.get((fqn, None))
            if info is None:
                raise FormatError(f"value {fqn} has no storage record", meta_path)
            path = _inside(folder, info.get("relative_path"), meta_path)
            flat[fqn], _ = _blob(path, info.get("offset"), info.get("length"), f"value {fqn}")
        else:
            raise FormatError(f"entry {fqn} has unknown DCP metadata", meta_path)
    for info in index.values():
        files.add(_inside(folder, info.get("relative_path"), meta_path))
    tree = _nest(flat, st.get("planner_data"))
    total = sum(os.path.getsize(p) for p in files)
    return Checkpoint(path=folder, format="dcp", file_size=total, root=tree, globals=tuple(globs),
                      files=tuple(sorted(files)))


def _nest(flat: Dict[str, Any], planner: Any) -> Dict[str, Any]:
    """The state_dict's own nesting, from DCP's planner data (fqn -> path of keys), where it has it."""
    if not isinstance(planner, dict):
        return flat
    out: Dict[str, Any] = {}
    for fqn, value in flat.items():
        path = planner.get(fqn)
        if not (isinstance(path, (list, tuple)) and path and all(isinstance(p, (str, int)) for p in path)):
            path = (fqn,)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(str(part), {})
            if not isinstance(nxt, dict):
                return flat  # paths that collide: keep DCP's flat names
            node = nxt
        if str(path[-1]) in node:
            return flat
        node[str(path[-1])] = value
    return out
