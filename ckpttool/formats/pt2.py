"""torch.export archives (``.pt2``): ``torch.export.save`` and AOTInductor packages, read without torch.

What torch 2.14 writes (``torch/export/pt2_archive/_package.py``, ``PyTorchFileWriter``: stored records,
the archive folder is the file's stem) and what ``torch.export.load`` reads:

- ``<folder>/archive_format`` (``pt2``, the record torch's reader checks) and ``archive_version`` (``0``);
  ``byteorder``, ``.data/version``, ``.data/serialization_id`` as in every torch zip.
- per program NAME (``model`` for one ExportedProgram; ``torch.export.load`` returns ``model``):
  ``models/NAME.json`` (the serialized graph, its signature, ``torch_version``), ``data/sample_inputs/NAME.pt``
  (a ``torch.save`` of the example inputs), ``data/weights/NAME_weights_config.json`` and
  ``data/constants/NAME_constants_config.json``: ``{"config": {fqn: {path_name, is_param, use_pickle,
  tensor_meta}}}``. A tensor is raw storage bytes in ``data/weights/weight_N`` / ``data/constants/tensor_N``
  (aliases share a record: torch views the first entry's flat storage with each entry's sizes, strides and
  storage offset), or, for a tensor subclass, a ``torch.save`` of it (``use_pickle``). Constants may also be
  script objects (``custom_obj_N``) and pickled Python objects (``opaque_obj_N``). An older layout keeps a
  whole ``torch.save`` state_dict in ``data/weights/NAME.pt``.
- AOTInductor (``aoti_compile_and_package``): ``data/aotinductor/NAME/`` holds the compiled wrapper
  (``*.wrapper.so``), its C++ sources (``*.wrapper.cpp``, ``*.kernel.cpp``), GPU kernels (``*.cubin``) and
  ``*_metadata.json`` (device, platform). Its weights are, by default, bytes inside the shared library
  (the symbol ``_binary_constants_bin_start``), laid out as the wrapper source's ``constants_info_`` says;
  ``package_constants_on_disk_format`` puts them in ``*_weights.blob`` (same layout) or in
  ``data/weights/weight_N`` (``torch.save`` each) with ``data/aotinductor/NAME/weights_config.json``.

Nothing is run and torch is not imported: JSON is parsed with bounds, pickled records through ckpttool's own
pickle reader, every size, stride and offset checked against the record it views.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from typing import Any, Dict, List, Optional, Tuple

from ..checkpoint import Checkpoint, GlobalRef, StorageRef, TensorRef, new_storage_ref
from ..dtypes import itemsize
from ..errors import FormatError
from ..spans import FileSpan
from .archive import STORED, Archive, Record, record_span

ARCHIVE_FORMAT = "archive_format"
ARCHIVE_VERSION = "archive_version"
MODELS_DIR = "models/"
AOTI_DIR = "data/aotinductor/"
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"

MAX_MODEL_JSON = 64 << 20      # a serialized graph: resnet50's is 421 KiB (~2.5 KiB a node); 64 MiB is >25,000 nodes
MAX_CONFIG_JSON = 64 << 20     # a payload config: ~350 bytes a tensor (resnet50's: 95 KiB); 64 MiB is >190,000
# What one JSON record may make json.loads build (a 3-byte "[]," is an 80-byte list): arrays and objects
# ('[' and '{') and items (',' and ':'), counted in the text, strings included. resnet50's model.json has 9,549
# and 28,579; at these caps json.loads builds well under 1 GiB whatever the text.
MAX_JSON_CONTAINERS = 2 << 20
MAX_JSON_ITEMS = 8 << 20
MAX_SMALL = 1 << 20            # archive_format, archive_version, *_metadata.json
MAX_CPP = 256 << 20            # an AOTInductor wrapper source, read for its constants_info_
MAX_PICKLED_OBJECT = 64 << 20  # an opaque object's pickle
MAX_ZEROS = 16 << 30           # a weight written as an empty record: torch makes zeros of its size
MAX_DIMS = 64
MAX_ELF_TABLE = 256 << 20
MAX_ELF_SYMBOLS = 4 << 20      # symbols read in all of a library's symbol tables
MAX_INFLATED = 8 << 30         # a deflated library or blob, inflated once into a temporary file to be read

# torch._export.serde.schema.ScalarType -> torch's dtype names
SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
                8: "float64", 9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16",
                28: "uint16", 29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz",
                33: "float8_e8m0fnu", 34: "uint32", 35: "uint64"}
STRIDED = 7  # schema.Layout.Strided

# records that hold code a loader runs or compiles, by suffix: (kind, note)
_COMPILED = {".so": "shared library", ".dylib": "shared library", ".dll": "shared library",
             ".cubin": "GPU kernel", ".hsaco": "GPU kernel", ".spv": "GPU kernel", ".ptx": "GPU kernel",
             ".fatbin": "GPU kernel", ".o": "object file", ".a": "static library",
             ".cpp": "C++ source", ".cu": "CUDA source", ".h": "C++ header"}
_NATIVE_KINDS = ("shared library", "GPU kernel", "object file", "static library")


def is_pt2(names: List[str]) -> bool:
    """A torch.export / AOTInductor archive: its folder holds ``archive_format``, the record torch's
    ``PT2ArchiveReader`` (and AOTInductor's C++ loader) checks before anything else (it must say ``pt2``;
    :func:`read` checks what it says).

    >>> is_pt2(["m/models/model.json", "m/archive_format"]), is_pt2(["archive/data.pkl"])
    (True, False)
    """
    if not names:
        return False
    slash = names[0].find("/")
    if slash < 0:
        return False
    want = (names[0][:slash + 1] + ARCHIVE_FORMAT).lower()
    return any(n.lower() == want for n in names)


def read(path: str, archive: Optional[Archive] = None) -> Checkpoint:
    """Read a ``.pt2`` archive's structure: its programs' weights and constants as lazy TensorRefs, their
    inputs and outputs, the compiled code it carries (no tensor bytes read, nothing run).

    ``archive``: the archive already open on ``path`` (as format detection leaves it); it is closed here.

    >>> ckpt = read("model.pt2")  # doctest: +SKIP
    >>> ckpt.metadata["inputs"]  # doctest: +SKIP
    [{'name': 'x', 'dtype': 'float32', 'shape': [2, 8]}]
    """
    path = os.fspath(path)
    if archive is None:
        archive = Archive.open(path)
    with archive:
        return _Reader(path, archive).checkpoint()


# ---------------------------------------------------------------------------------------------


class _ZeroSpan:
    """The bytes torch gives a weight written as an empty record: zeros (``torch.zeros(size)``)."""

    def __init__(self, size: int, path: str):
        self.size, self.path = size, path

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        return bytes(size)


class _Window:
    """Bytes ``[offset, offset + size)`` of another span (a blob inside a deflated shared library)."""

    def __init__(self, base: Any, offset: int, size: int):
        self.base, self.offset, self.size, self.path = base, offset, size, base.path

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        return self.base.read(self.offset + start, size)


def _span(path: str, record: Record, offset: int = 0, size: Optional[int] = None, many: bool = False):
    """A record's bytes ``[offset, offset + size)``. A deflated record inflates as it is read, from its first
    byte again for every read before the last; ``many``: it is read in many places in any order (a library's
    constants blob, a record several tensors view), so it is inflated once, into a temporary file."""
    size = record.size - offset if size is None else size
    if record.method == STORED:
        return FileSpan(path, record.data_offset + offset, size)
    base = _Inflated(path, record) if many else record_span(path, record)
    return base if offset == 0 and size == record.size else _Window(base, offset, size)


class _Inflated:
    """A deflated record inflated once, on its first read, into an unnamed temporary file (so memory stays
    bounded and reads in any order cost a positioned read each); the file goes when the span does."""

    def __init__(self, path: str, record: Record):
        if record.size > MAX_INFLATED:
            raise FormatError(f"record {record.name} is compressed and declares {record.size} bytes, more than "
                              f"the {_human(MAX_INFLATED)} ckpttool inflates to read it", path)
        self.path, self.record, self.size = path, record, record.size
        self._lock = threading.Lock()
        self._file: Any = None

    def _fd(self) -> int:
        with self._lock:
            if self._file is None:
                import tempfile
                base = record_span(self.path, self.record)  # read in order: one inflating pass
                f = tempfile.TemporaryFile(prefix="ckpttool-")
                try:
                    for pos in range(0, self.size, 1 << 24):
                        f.write(base.read(pos, min(1 << 24, self.size - pos)))
                    f.flush()
                except BaseException:
                    f.close()
                    raise
                self._file = f
            return self._file.fileno()

    def read(self, start: int = 0, size: Optional[int] = None) -> bytes:
        if size is None:
            size = self.size - start
        if start < 0 or size < 0 or start + size > self.size:
            raise FormatError(f"read of {size} bytes at {start} is outside a {self.size}-byte record", self.path)
        fd = self._fd()
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, min(size - len(out), 1 << 26), start + len(out))
            if not chunk:
                raise FormatError(f"record {self.record.name} is truncated", self.path)
            out += chunk
        return bytes(out)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


_SYMBOL = re.compile(r"Symbol\('([^'\\]{1,200})'[^()]*\)")
_INTEGER = re.compile(r"Integer\((-?\d{1,30})\)")


def _expr_text(expr: str) -> str:
    """A symbolic size as torch prints it: ``Symbol('s77', positive=True, integer=True)`` -> ``s77``;
    an expression keeps its shape with its symbols named (``Mul(2, s77)``)."""
    return _INTEGER.sub(r"\1", _SYMBOL.sub(r"\1", expr))[:200]


class _Reader:
    def __init__(self, path: str, archive: Archive):
        self.path, self.archive = path, archive
        self.folder = archive.folder
        n = len(self.folder)
        self.records: Dict[str, Record] = {r.name[n:]: r for r in archive.records}
        self.rels = list(self.records)  # names as torch lists them (get_all_records): without the folder
        self.globals: List[GlobalRef] = []
        self.inflated = 0  # bytes of deflated records given a temporary file (see span)

    # -- helpers ---------------------------------------------------------------------------------

    def bad(self, message: str) -> FormatError:
        return FormatError(message, self.path)

    def full(self, rel: str) -> str:
        return self.folder + rel

    def find(self, rel: str) -> Optional[Record]:
        return self.archive.find(rel)  # torch's lookup: ignoring ASCII case

    def span(self, rec: Record, many: bool = False):
        """``_span`` of a whole record; a deflated one read in many places is inflated once into a temporary
        file, ``MAX_INFLATED`` bytes in all for the archive (a small file of deflated zeros is not GiBs of disk)."""
        if many and rec.method != STORED:
            self.inflated += rec.size
            if self.inflated > MAX_INFLATED:
                raise self.bad(f"record {rec.name} is compressed and read in many places: inflating it and the "
                               f"others takes {self.inflated} bytes, more than the {_human(MAX_INFLATED)} ckpttool "
                               f"inflates to read them")
        return _span(self.path, rec, many=many)

    def need(self, rel: str, why: str) -> Record:
        rec = self.find(rel)
        if rec is None:
            raise self.bad(f"pt2 archive has no record {self.full(rel)} ({why})")
        return rec

    def text(self, rec: Record, limit: int) -> str:
        if rec.size > limit:
            raise self.bad(f"record {rec.name} declares {rec.size} bytes, more than the {_human(limit)} "
                           f"ckpttool reads of it")
        data = self.archive.read(rec, limit=limit)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"record {rec.name} is not UTF-8 text") from None

    def json(self, rec: Record, limit: int) -> Any:
        """A JSON record, parsed only when what json.loads would build is bounded (``MAX_JSON_CONTAINERS``,
        ``MAX_JSON_ITEMS``): a small text of ``[],`` repeated would otherwise make it allocate GiBs."""
        text = self.text(rec, limit)
        containers = text.count("[") + text.count("{")
        items = text.count(",") + text.count(":")
        if containers > MAX_JSON_CONTAINERS or items > MAX_JSON_ITEMS:
            raise self.bad(f"record {rec.name} holds {containers} JSON arrays and objects and {items} items, more "
                           f"than the {MAX_JSON_CONTAINERS} and {MAX_JSON_ITEMS} ckpttool parses")
        try:
            return json.loads(text)
        except RecursionError:
            raise self.bad(f"record {rec.name} nests its JSON too deeply") from None
        except ValueError as e:
            raise self.bad(f"record {rec.name} is not valid JSON: {str(e)[:120]}") from None

    def field(self, obj: Any, key: str, kind: Any, where: str, optional: bool = False) -> Any:
        """``obj[key]``, checked to be of ``kind`` (int: an int, not a bool); a FormatError naming ``where``."""
        if not isinstance(obj, dict):
            raise self.bad(f"{where} is {_kind(obj)}, not a JSON object")
        if key not in obj:
            if optional:
                return None
            raise self.bad(f"{where} has no {key!r}")
        v = obj[key]
        if optional and v is None:
            return None
        ok = (type(v) is int) if kind is int else (type(v) is bool) if kind is bool else isinstance(v, kind)
        if not ok:
            want = {int: "an integer", bool: "a boolean", str: "a string", dict: "an object", list: "a list"}.get(
                kind, str(kind))
            raise self.bad(f"{where}.{key} is {_kind(v)}, not {want}")
        return v

    def ints(self, items: Any, where: str, symbolic: bool = False) -> List[Any]:
        """A list of SymInt (``{"as_int": n}``); with ``symbolic``, ``{"as_expr": ...}`` becomes its symbol's
        name. Weights have no symbolic sizes (torch's deserialize_size refuses them)."""
        if not isinstance(items, list):
            raise self.bad(f"{where} is {_kind(items)}, not a list")
        if len(items) > MAX_DIMS:
            raise self.bad(f"{where} has {len(items)} dimensions, more than {MAX_DIMS}")
        out: List[Any] = []
        for i, item in enumerate(items):
            at = f"{where}[{i}]"
            if isinstance(item, dict) and "as_int" in item:
                v = self.field(item, "as_int", int, at)
                if v < 0:
                    raise self.bad(f"{at} is {v}, negative")
                out.append(v)
            elif symbolic and isinstance(item, dict) and "as_expr" in item:
                expr = self.field(item, "as_expr", dict, at)
                out.append(_expr_text(self.field(expr, "expr_str", str, f"{at}.as_expr")))
            else:
                raise self.bad(f"{at} is not an integer size ({{'as_int': n}})")
        return out

    # -- the whole archive -----------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        fmt = self.text(self.need(ARCHIVE_FORMAT, "torch's PT2 reader checks it"), MAX_SMALL)
        if fmt != "pt2":
            raise self.bad(f"record {self.full(ARCHIVE_FORMAT)} says {fmt[:40]!r}, not 'pt2': torch's PT2 reader "
                           f"refuses it")
        version = self.text(self.need(ARCHIVE_VERSION, "torch.export.load reads it"), MAX_SMALL)
        if version != "0":
            raise self.bad(f"record {self.full(ARCHIVE_VERSION)} says {version[:40]!r}: torch.export.load of torch "
                           f"2.14 reads archive version '0' only")
        programs: Dict[str, Dict[str, Any]] = {}
        for rel in self.rels:
            if rel.startswith(MODELS_DIR):  # torch's own test, on the listed names
                if not rel.endswith(".json") or len(rel) == len(MODELS_DIR) + 5:
                    raise self.bad(f"record {self.full(rel)} is not a {MODELS_DIR}NAME.json, which "
                                   f"torch.export.load takes every record in {MODELS_DIR} for")
                name = rel[len(MODELS_DIR):-5]
                programs[name] = self.program(name, rel)
        aoti: Dict[str, Dict[str, Any]] = {}
        for rel in self.rels:
            if rel.startswith(AOTI_DIR):
                name = rel[len(AOTI_DIR):].split("/")[0]
                aoti.setdefault(name, {"files": []})["files"].append(rel)
        for name, entry in aoti.items():
            entry.update(self.aoti_model(name, entry["files"]))
        if not programs and not aoti:
            raise self.bad(f"pt2 archive holds no program (no {self.full(MODELS_DIR)}*.json, no "
                           f"{self.full(AOTI_DIR)})")
        return self.assemble(programs, aoti)

    def assemble(self, programs: Dict[str, Dict[str, Any]], aoti: Dict[str, Dict[str, Any]]) -> Checkpoint:
        names = sorted(set(programs) | set(aoti))
        main = "model" if "model" in names else names[0]  # torch.export.load returns exported_programs["model"]
        source = programs.get(main) or aoti[main]
        root: Dict[str, Any] = {"state_dict": source["state_dict"]}
        if source["constants"]:
            root["constants"] = source["constants"]
        others = {n: {k: v for k, v in (programs.get(n) or aoti[n]).items() if k in ("state_dict", "constants")}
                  for n in names if n != main}
        if others:
            root["programs"] = others
        compiled = self.compiled()
        torch_version = next((p["torch_version"] for n, p in sorted(programs.items(), key=lambda kv: kv[0] != main)
                              if p["torch_version"]), None)
        kind = ("torch.export + AOTInductor" if programs and aoti else "torch.export" if programs
                else "AOTInductor package")
        meta: Dict[str, Any] = {
            "archive_folder": self.folder.rstrip("/"), "archive_format": "pt2", "archive_version": "0",
            "kind": kind, "torch_version": torch_version or "not recorded", "models": names, "main_model": main,
            "inputs": programs[main]["inputs"] if main in programs else None,
            "outputs": programs[main]["outputs"] if main in programs else None,
            "compiled": compiled,
        }
        if main in programs:
            meta["dynamic_dims"] = programs[main]["dynamic"]
            meta["objects"] = programs[main]["objects"]
        if main in aoti:
            meta["aoti"] = {k: v for k, v in aoti[main].items() if k not in ("state_dict", "constants", "files")}
        meta["details"] = self.details(meta, source, aoti.get(main))
        globs = tuple(dict.fromkeys(self.globals))
        return Checkpoint(path=self.path, format="pt2", file_size=os.path.getsize(self.path), root=root,
                          metadata=meta, globals=globs, files=(self.path,))

    def compiled(self) -> List[Dict[str, Any]]:
        out = []
        for rel, rec in self.records.items():
            suffix = os.path.splitext(rel)[1].lower()
            kind = _COMPILED.get(suffix)
            if kind is None or (not rel.startswith(AOTI_DIR) and kind not in _NATIVE_KINDS):
                continue
            out.append({"name": rel, "size": rec.size, "kind": kind})
        return out

    def details(self, meta: Dict[str, Any], source: Dict[str, Any], aoti: Optional[Dict[str, Any]]) -> List[List[str]]:
        version = meta["torch_version"]
        written = f"written by torch {version}" if version != "not recorded" else "torch version not recorded"
        rows = [["program", f"{meta['kind']} (pt2), {written}"]]
        if meta["models"] != ["model"]:
            rows.append(["models", ", ".join(meta["models"][:20]) + (f" (listed: {meta['main_model']})"
                                                                      if len(meta["models"]) > 1 else "")])

        def io(items) -> str:
            return "; ".join(f"{i['name']}: {i['dtype']}" + (f" ({', '.join(map(str, i['shape']))}"
                                                             f"{',' if len(i['shape']) == 1 else ''})"
                                                             if i["shape"] is not None else "")
                             for i in items) or "none"
        if meta["inputs"] is not None:
            rows.append(["inputs", io(meta["inputs"])])
            rows.append(["outputs", io(meta["outputs"])])
            if meta.get("dynamic_dims"):
                rows.append(["dynamic dims", ", ".join(f"{d['name']} in [{d['min']}, "
                                                       f"{'inf' if d['max'] is None else d['max']}]"
                                                       for d in meta["dynamic_dims"])])
        else:
            rows.append(["inputs", "not recorded (an AOTInductor package without its ExportedProgram)"])
        consts = source["constants"]
        if consts:
            rows.append(["constants", f"{len(consts)} tensor(s) beside the state_dict (non-persistent buffers, "
                                      f"lifted constants): " + ", ".join(list(consts)[:8])
                         + (" ..." if len(consts) > 8 else "")])
        if meta.get("objects"):
            rows.append(["objects", f"{len(meta['objects'])} pickled object constant(s) "
                                    f"({', '.join(o['name'] for o in meta['objects'][:4])}): loading runs their code"])
        if aoti is not None:
            dev = aoti.get("device")
            if dev:
                rows.append(["compiled for", dev])
            rows.append(["weights", aoti["weights_source"]])
        first = True
        sources = [c for c in meta["compiled"] if c["kind"] in ("C++ source", "CUDA source", "C++ header")]
        for c in meta["compiled"]:
            if c in sources:
                continue
            note = "AOTInductor: runs native code on load" if c["kind"] == "shared library" else c["kind"]
            rows.append(["compiled" if first else "", f"{c['name'].rpartition('/')[2]} {_human(c['size'])} ({note})"])
            first = False
        if sources:
            rows.append(["compiled" if first else "", f"{len(sources)} source file(s), "
                                                      f"{_human(sum(c['size'] for c in sources))} (the code compiled)"])
        return rows

    # -- torch.export programs -------------------------------------------------------------------

    def program(self, name: str, rel: str) -> Dict[str, Any]:
        rec = self.records[rel]
        doc = self.json(rec, MAX_MODEL_JSON)
        where = rec.name
        self.need(f"data/sample_inputs/{name}.pt", "torch.export.load reads the example inputs")
        version = self.field(doc, "torch_version", str, where, optional=True)
        gm = self.field(doc, "graph_module", dict, where)
        graph = self.field(gm, "graph", dict, f"{where}: graph_module")
        sig = self.field(gm, "signature", dict, f"{where}: graph_module")
        values = self.field(graph, "tensor_values", dict, f"{where}: graph", optional=True) or {}
        inputs, outputs = [], []
        for key, kind, out in (("input_specs", "user_input", inputs), ("output_specs", "user_output", outputs)):
            specs = self.field(sig, key, list, f"{where}: signature")
            for i, spec in enumerate(specs):
                at = f"{where}: signature.{key}[{i}]"
                if not isinstance(spec, dict) or len(spec) != 1:
                    raise self.bad(f"{at} is not a one-key object")
                if kind in spec:
                    arg = self.field(self.field(spec, kind, dict, at), "arg", dict, f"{at}.{kind}")
                    out.append(self.argument(arg, values, f"{at}.{kind}.arg"))
        dynamic = []
        ranges = self.field(doc, "range_constraints", dict, where, optional=True) or {}
        for sym, r in list(ranges.items())[:256]:
            lo = self.field(r, "min_val", int, f"{where}: range_constraints.{sym}", optional=True)
            hi = self.field(r, "max_val", int, f"{where}: range_constraints.{sym}", optional=True)
            dynamic.append({"name": str(sym)[:200], "min": lo, "max": hi})
        del doc, gm, graph, sig, values, ranges  # the graph is done with before its configs are parsed
        legacy = f"{WEIGHTS_DIR}{name}.pt"
        if legacy in self.records:  # the older layout: one torch.save of the state_dict (torch's test: listed)
            state_dict = self.pickled_dict(legacy)
        else:
            state_dict, _ = self.payload(f"{WEIGHTS_DIR}{name}_weights_config.json", WEIGHTS_DIR, False)
        legacy = f"{CONSTANTS_DIR}{name}.pt"
        if legacy in self.records:
            constants, objects = self.pickled_dict(legacy), []
        else:
            constants, objects = self.payload(f"{CONSTANTS_DIR}{name}_constants_config.json", CONSTANTS_DIR, True)
        return {"torch_version": version, "inputs": inputs, "outputs": outputs, "dynamic": dynamic,
                "state_dict": state_dict, "constants": constants, "objects": objects}

    def argument(self, arg: Dict[str, Any], values: Dict[str, Any], at: str) -> Dict[str, Any]:
        """A user input or output: a tensor's name, dtype and shape (symbolic dims by name); anything else
        (an int, a None, a symbolic int, a script object) by its kind."""
        if len(arg) != 1:
            raise self.bad(f"{at} is not a one-key object")
        kind, value = next(iter(arg.items()))
        if kind == "as_tensor":
            name = self.field(value, "name", str, f"{at}.as_tensor")
            meta = values.get(name)
            if meta is None:
                raise self.bad(f"{at} names tensor {name[:80]!r}, which the graph's tensor_values lacks")
            code = self.field(meta, "dtype", int, f"{at}: tensor_values[{name[:80]!r}]")
            shape = self.ints(self.field(meta, "sizes", list, f"tensor_values[{name[:80]!r}]"),
                              f"{at}: tensor_values[{name[:80]!r}].sizes", symbolic=True)
            return {"name": name, "dtype": SCALAR_TYPES.get(code, f"scalar type {code}"), "shape": shape}
        label = value.get("name") if isinstance(value, dict) and isinstance(value.get("name"), str) else \
            value.get("as_name") if isinstance(value, dict) and isinstance(value.get("as_name"), str) else None
        what = str(kind)[3:] if str(kind).startswith("as_") else str(kind)
        return {"name": (label or what)[:200], "dtype": what[:40], "shape": None}

    def payload(self, config_rel: str, base: str, constants: bool) -> Tuple[Dict[str, Any], List[Dict[str, str]]]:
        """The tensors of a payload config (``{"config": {fqn: PayloadMeta}}``), as torch's ``_load_state_dict``
        / ``_load_constants`` build them; and the object constants it names."""
        if config_rel not in self.records:  # torch: "not found in PT2 archive" (its test: the listed names)
            raise self.bad(f"pt2 archive has no record {self.full(config_rel)} (torch.export.load needs it)")
        rec = self.records[config_rel]
        where = rec.name
        config = self.field(self.json(rec, MAX_CONFIG_JSON), "config", dict, where)
        storages: Dict[str, Tuple[StorageRef, str]] = {}  # path_name -> the flat storage torch makes of it
        out: Dict[str, Any] = {}
        objects: List[Dict[str, str]] = []
        shared: Dict[str, int] = {}  # path_name -> how many tensors view it
        for meta in config.values():
            if isinstance(meta, dict) and isinstance(meta.get("path_name"), str):
                shared[meta["path_name"]] = shared.get(meta["path_name"], 0) + 1
        for fqn, meta in config.items():
            at = f"{where}: config[{fqn[:80]!r}]"
            path_name = self.field(meta, "path_name", str, at)
            use_pickle = self.field(meta, "use_pickle", bool, at)
            is_param = self.field(meta, "is_param", bool, at)
            rel = base + path_name
            if constants and path_name.startswith(("custom_obj_", "opaque_obj_")):
                obj = self.need(rel, f"constant {fqn[:80]!r}")
                kind = "script object" if path_name.startswith("custom_obj_") else "pickled Python object"
                objects.append({"name": fqn, "record": obj.name, "kind": kind})
                continue
            if constants and not path_name.startswith("tensor_"):
                raise self.bad(f"{at}.path_name is {path_name[:80]!r}: torch.export.load loads constants from "
                               f"tensor_*, custom_obj_* and opaque_obj_* records only")
            if use_pickle:
                out[fqn] = self.pickled(rel, f"{fqn[:80]!r}")
                continue
            tm = self.field(meta, "tensor_meta", dict, at)
            got = storages.get(path_name)
            if got is None:
                got = storages[path_name] = self.flat_storage(rel, tm, f"{at}.tensor_meta", fqn,
                                                              shared[path_name] > 1)
            storage, dtype = got
            shape = tuple(self.ints(self.field(tm, "sizes", list, f"{at}.tensor_meta"), f"{at}.tensor_meta.sizes"))
            stride = tuple(self.ints(self.field(tm, "strides", list, f"{at}.tensor_meta"),
                                     f"{at}.tensor_meta.strides"))
            offset = self.ints([self.field(tm, "storage_offset", dict, f"{at}.tensor_meta")],
                               f"{at}.tensor_meta.storage_offset")[0]
            requires_grad = self.field(tm, "requires_grad", bool, f"{at}.tensor_meta")
            out[fqn] = self.view(storage, dtype, shape, stride, offset, f"{fqn[:80]!r}", requires_grad,
                                 is_param and not constants)
        return out, objects

    def flat_storage(self, rel: str, tm: Dict[str, Any], at: str, fqn: str,
                     many: bool = False) -> Tuple[StorageRef, str]:
        """torch's ``_build_file_map``: a record's bytes as a flat tensor of the dtype (and on the device) of the
        first entry that names it; an empty record is zeros of that entry's size."""
        rec = self.need(rel, f"the bytes of {fqn[:80]!r}")
        code = self.field(tm, "dtype", int, at)
        dtype = SCALAR_TYPES.get(code)
        if dtype is None:
            raise self.bad(f"{at}.dtype is {code}, a scalar type torch.export does not write")
        layout = self.field(tm, "layout", int, at, optional=True)
        if layout is not None and layout != STRIDED:
            raise self.bad(f"{at}.layout is {layout}, not strided (7): torch.export.load views raw bytes as "
                           f"strided tensors only")
        device = self.device(self.field(tm, "device", dict, at), f"{at}.device")
        size = itemsize(dtype)
        nbytes = rec.size
        if nbytes == 0:
            shape = self.ints(self.field(tm, "sizes", list, at), f"{at}.sizes")
            nbytes = math.prod(shape) * size
            if nbytes > MAX_ZEROS:
                raise self.bad(f"record {rec.name} is empty, so torch fills {fqn[:80]!r} with zeros of "
                               f"{nbytes} bytes: more than ckpttool makes up")
            source: Any = _ZeroSpan(nbytes, self.path)
        else:
            if nbytes % size:
                raise self.bad(f"record {rec.name} holds {nbytes} bytes, not a whole number of {dtype} elements "
                               f"(torch.export.load refuses it)")
            source = self.span(rec, many)
        return new_storage_ref(rec.name[len(self.folder):], dtype, device, nbytes, source, self.path), dtype

    def device(self, d: Dict[str, Any], at: str) -> str:
        kind = self.field(d, "type", str, at)
        index = self.field(d, "index", int, at, optional=True)
        if not re.fullmatch(r"[a-z_]{1,20}", kind) or (index is not None and not 0 <= index < 1 << 16):
            raise self.bad(f"{at} is not a device ({kind[:20]!r}, {index!r})")
        return kind if index is None else f"{kind}:{index}"

    def view(self, storage: StorageRef, dtype: str, shape: Tuple[int, ...], stride: Tuple[int, ...], offset: int,
             label: str, requires_grad: bool, is_param: bool, kind: str = "dense") -> TensorRef:
        """``torch.as_strided(flat, shape, stride, offset)``, checked to lie inside the storage."""
        if len(stride) != len(shape):
            raise self.bad(f"tensor {label}: {len(shape)} sizes but {len(stride)} strides")
        numel = storage.nbytes // itemsize(dtype)
        if math.prod(shape) == 0:
            ok = offset <= numel
        else:
            ok = offset + sum((n - 1) * s for n, s in zip(shape, stride)) < numel
        if not ok:
            raise self.bad(f"tensor {label}: sizes {list(shape)}, strides {list(stride)} and storage offset "
                           f"{offset} reach past its {numel}-element storage {storage.key}")
        return TensorRef(shape=shape, dtype=dtype, stride=stride, storage_offset=offset, storage=storage,
                         device=storage.device, requires_grad=requires_grad, is_parameter=is_param, kind=kind)

    # -- pickled records (torch.save of a tensor, or of a state_dict) ----------------------------

    def nested(self, rel: str, what: str):
        from .torch_zip import read_pickle
        rec = self.need(rel, what)
        if rec.method != STORED:
            raise self.bad(f"record {rec.name} (a torch.save archive) is compressed: ckpttool reads tensors in "
                           f"place, from stored records only")
        try:
            inner = Archive.open(self.path, rec.data_offset, rec.size)
        except FormatError as e:
            raise self.bad(f"record {rec.name}: {e.message}") from None
        with inner:
            try:
                root, globs = read_pickle(inner)
            except FormatError as e:
                raise self.bad(f"record {rec.name}: {e.message}") from None
        self.globals.extend(globs)
        return root

    def pickled(self, rel: str, label: str) -> Any:
        return self.nested(rel, f"the pickled tensor {label}")

    def pickled_dict(self, rel: str) -> Dict[str, Any]:
        root = self.nested(rel, "a state_dict saved whole")
        if not isinstance(root, dict):
            raise self.bad(f"record {self.full(rel)} holds {_kind(root)}, not a dict of tensors")
        return dict(root)

    # -- AOTInductor -------------------------------------------------------------------------------

    def aoti_model(self, name: str, files: List[str]) -> Dict[str, Any]:
        out: Dict[str, Any] = {"device": None, "platform": None, "constants_folded": 0}
        for rel in files:
            if rel.endswith("_metadata.json"):
                doc = self.json(self.records[rel], MAX_SMALL)
                if isinstance(doc, dict):
                    dev = doc.get("AOTI_DEVICE_KEY")
                    if isinstance(dev, str):
                        out["device"] = dev[:40]
                    bits = [doc.get(k) for k in ("AOTI_PLATFORM", "AOTI_MACHINE")]
                    if all(isinstance(b, str) for b in bits):
                        out["platform"] = " ".join(b[:40] for b in bits)
        if out["device"] and out["platform"]:
            out["device"] = f"{out['device']} ({out['platform']})"
        config_rel = f"{AOTI_DIR}{name}/weights_config.json"
        infos = self.constants_info(files)
        if config_rel in self.records:
            sd = self.aoti_pickled_weights(config_rel)
            out.update(state_dict=sd, constants={}, weights_in="pickled",
                       weights_source=f"{len(sd)} tensor(s) pickled in {WEIGHTS_DIR}weight_* "
                                      f"(package_constants_on_disk_format='pickle_weights')")
            return out
        if infos is None:
            out.update(state_dict={}, constants={}, weights_in=None,
                       weights_source="not listed: the package ships no wrapper source (*.wrapper.cpp) naming them")
            return out
        blob, where = self.aoti_blob(files, infos)
        state_dict: Dict[str, Any] = {}
        constants: Dict[str, Any] = {}
        pos = folded = 0
        for info in infos:
            if info["from_folded"]:
                folded += 1
                continue
            size = info["data_size"]
            label = repr(info["fqn"][:80])
            if blob is None:
                storage = None
            else:
                if pos + size > blob.size:
                    raise self.bad(f"{where}: constant {label} ends at byte {pos + size} of a {blob.size}-byte blob")
                source = _Window(blob, pos, size) if not isinstance(blob, FileSpan) else \
                    FileSpan(self.path, blob.offset + pos, size)
                storage = new_storage_ref(f"{info['name']}", info["dtype"], info["device"], size, source, self.path)
            pos += size
            if storage is None or info["layout"] != "strided":
                t = TensorRef(shape=info["shape"], dtype=info["dtype"], stride=info["stride"],
                              storage_offset=info["offset"], storage=None, device=info["device"],
                              kind="meta" if storage is None else str(info["layout"]))
            else:
                t = self.view(storage, info["dtype"], info["shape"], info["stride"], info["offset"], label, False,
                              info["type"] == "Parameter")
            (state_dict if info["type"] in ("Parameter", "Buffer") else constants)[info["fqn"]] = t
        if blob is not None and pos != blob.size:
            raise self.bad(f"{where}: the wrapper's constants_info_ lays out {pos} bytes, the blob holds {blob.size}")
        in_library = blob is not None and not where.endswith("_weights.blob")
        out.update(state_dict=state_dict, constants=constants, constants_folded=folded,
                   weights_in="library" if in_library else "blob" if blob is not None else None,
                   weights_source=(f"{len(state_dict) + len(constants)} tensor(s) in {where}" if blob is not None else
                                   f"not in the package ({where}): the loader is given them at run time"))
        if folded:
            out["weights_source"] += f"; {folded} folded constant(s) computed on load"
        return out

    def aoti_pickled_weights(self, config_rel: str) -> Dict[str, Any]:
        rec = self.records[config_rel]
        doc = self.json(rec, MAX_CONFIG_JSON)
        if not isinstance(doc, dict):
            raise self.bad(f"record {rec.name} is {_kind(doc)}, not a JSON object")
        flats: Dict[str, Any] = {}
        out: Dict[str, Any] = {}
        for fqn, entry in doc.items():
            at = f"{rec.name}: {fqn[:80]!r}"
            if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
                raise self.bad(f"{at} is not [file, sizes, strides, storage offset]")
            file, shape, stride, offset = entry
            for what, v in (("sizes", shape), ("strides", stride)):
                if not (isinstance(v, list) and len(v) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in v)):
                    raise self.bad(f"{at}: {what} is not a list of sizes")
            if type(offset) is not int or offset < 0:
                raise self.bad(f"{at}: storage offset is not a size")
            flat = flats.get(file)
            if flat is None:
                flat = flats[file] = self.pickled(WEIGHTS_DIR + file, repr(fqn[:80]))
            if not isinstance(flat, TensorRef) or flat.storage is None or flat.kind != "dense":
                raise self.bad(f"record {self.full(WEIGHTS_DIR + file)} holds no plain tensor")
            # weight.as_strided(sizes, strides, offset): a view of the pickled tensor's storage
            out[fqn] = self.view(flat.storage, flat.dtype, tuple(shape), tuple(stride), offset, repr(fqn[:80]),
                                 flat.requires_grad, flat.is_parameter)
        return out

    _INFO = re.compile(r"constants_info_\[(\d{1,9})\]\.(\w{1,40}) = (.{0,100000});")
    _INFO_KEY = "constants_info_["

    @classmethod
    def info_lines(cls, text: str):
        """``(index, field, value)`` of each line ``constants_info_[i].field = value;`` (blanks around it), in
        one pass: each occurrence of ``constants_info_[`` is looked at once, with its own line only, and the
        search goes on past that line (a run of blank lines, or one long line, is never scanned again)."""
        key = cls._INFO_KEY
        pos = text.find(key)
        line_start = scanned = 0
        while pos >= 0:
            nl = text.rfind("\n", scanned, pos)
            if nl >= 0:
                line_start = nl + 1
            end = text.find("\n", pos)
            if end < 0:
                end = len(text)
            if (pos - line_start <= 4096 and not text[line_start:pos].strip()
                    and end - pos <= 100_200):
                m = cls._INFO.fullmatch(text[pos:end].rstrip())
                if m:
                    yield int(m.group(1)), m.group(2), m.group(3)
            scanned = end
            pos = text.find(key, end)

    def constants_info(self, files: List[str]) -> Optional[List[Dict[str, Any]]]:
        """The wrapper source's ``constants_info_[i].field = value;`` lines, per constant, in index order (the
        order of their bytes in the blob); None where no source in the package has them."""
        cpps = sorted(f for f in files if f.endswith(".cpp"))
        cpps.sort(key=lambda f: not f.endswith(".wrapper.cpp"))
        for rel in cpps:
            rec = self.records[rel]
            text = self.text(rec, MAX_CPP)
            if "constants_info_[" not in text:
                continue
            fields: Dict[int, Dict[str, str]] = {}
            for index, key, value in self.info_lines(text):
                fields.setdefault(index, {})[key] = value.strip()
            if sorted(fields) != list(range(len(fields))):
                raise self.bad(f"record {rec.name}: constants_info_ indices are not 0 to {len(fields) - 1}")
            return [self.info(fields[i], f"{rec.name}: constants_info_[{i}]") for i in range(len(fields))]
        return None

    def info(self, f: Dict[str, str], at: str) -> Dict[str, Any]:
        def need(key: str) -> str:
            if key not in f:
                raise self.bad(f"{at} has no .{key}")
            return f[key]

        def string(key: str) -> str:
            v = need(key)
            m = re.fullmatch(r'"((?:[^"\\]|\\.){0,10000})"', v)
            if not m:
                raise self.bad(f"{at}.{key} is not a string literal")
            return re.sub(r"\\(.)", r"\1", m.group(1))

        def number(key: str) -> int:
            v = need(key)
            if not re.fullmatch(r"\d{1,20}", v):
                raise self.bad(f"{at}.{key} is not a number")
            return int(v)

        def dims(key: str) -> Tuple[int, ...]:
            m = re.fullmatch(r"\{([\d,\s]{0,2000})\}", need(key))
            if not m:
                raise self.bad(f"{at}.{key} is not a list of sizes")
            out = tuple(int(x) for x in m.group(1).replace(",", " ").split())
            if len(out) > MAX_DIMS:
                raise self.bad(f"{at}.{key} has more than {MAX_DIMS} dimensions")
            return out
        m = re.fullmatch(r"cached_torch_dtype_(\w+)", need("dtype"))
        dtype = m.group(1) if m else None
        if dtype is None or not itemsize(dtype):
            raise self.bad(f"{at}.dtype is {need('dtype')[:60]!r}, a dtype ckpttool does not know")
        m = re.fullmatch(r"cached_torch_device_type_(\w+)", need("device_type"))
        if not m:
            raise self.bad(f"{at}.device_type is {need('device_type')[:60]!r}")
        kind = re.search(r"ConstantType::(\w+)", f.get("type", ""))
        layout = re.search(r"cached_torch_layout_(\w+)", f.get("layout", "cached_torch_layout_strided"))
        name = string("name")
        fqn = string("original_fqn") if "original_fqn" in f else ""
        folded = need("from_folded")
        if folded not in ("true", "false"):
            raise self.bad(f"{at}.from_folded is not true or false")
        return {"name": name, "fqn": fqn or name, "dtype": dtype, "device": m.group(1)[:20],
                "offset": number("offset"), "data_size": number("data_size"), "from_folded": folded == "true",
                "type": kind.group(1) if kind else "Unknown", "shape": dims("shape"), "stride": dims("stride"),
                "layout": layout.group(1) if layout else "unknown"}

    def aoti_blob(self, files: List[str], infos: List[Dict[str, Any]]):
        """(the span of the constants blob, where it is) or (None, why not): the ``*_weights.blob`` record, or
        the bytes at the shared library's ``_binary_constants_bin_start`` (in it, or appended to it for
        weights mmap'd from the library itself)."""
        total = sum(i["data_size"] for i in infos if not i["from_folded"])
        blobs = [f for f in files if f.endswith("_weights.blob")]
        if blobs:
            rec = self.records[blobs[0]]
            return self.span(rec, many=True), rec.name.rpartition("/")[2]
        sos = [f for f in files if f.endswith(".so")]
        sos.sort(key=lambda f: not f.endswith(".wrapper.so"))
        for rel in sos:
            rec = self.records[rel]
            lib = self.span(rec, many=True)  # its ELF tables, then each constant: read in any order
            found = _elf_symbols(lib, ("_binary_constants_bin_start", "_binary_constants_bin_end"), self.bad,
                                 rec.name)
            if "_binary_constants_bin_start" not in found:
                continue
            start = found["_binary_constants_bin_start"]
            end = found.get("_binary_constants_bin_end", start + total)
            short = rec.name.rpartition("/")[2]
            if not start <= end <= lib.size:
                raise self.bad(f"record {rec.name}: its constants symbols lie outside the library")
            if end - start == total:
                return (FileSpan(self.path, lib.offset + start, total) if isinstance(lib, FileSpan)
                        else _Window(lib, start, total)), short
            if end - start == 16:  # mmap'd weights: [size + 8, magic] here, the weights appended to the library
                size, magic = struct.unpack("<QQ", lib.read(start, 16))
                at = lib.size - size
                if size >= 8 and at >= 0 and size - 8 == total and lib.read(lib.size - 8, 8) == struct.pack("<Q", magic):
                    return (FileSpan(self.path, lib.offset + at, total) if isinstance(lib, FileSpan)
                            else _Window(lib, at, total)), f"{short} (appended)"
            if end - start <= 8:  # weights kept outside the package (package_constants_in_so=False)
                return None, f"{short} holds none"
            raise self.bad(f"record {rec.name}: its constants blob holds {end - start} bytes, the wrapper's "
                           f"constants_info_ lays out {total}")
        return None, "no shared library with _binary_constants_bin_start"


def _elf_symbols(lib, wanted: Tuple[str, ...], bad, name: str) -> Dict[str, int]:
    """File offsets of the ``wanted`` symbols of a 64-bit little-endian ELF shared library (``lib``: a span),
    from its symbol tables (.symtab, .dynsym), each mapped through its section to a place in the file."""
    if lib.size < 64:
        return {}
    head = lib.read(0, 64)
    if head[:4] != b"\x7fELF":
        return {}
    if head[4] != 2 or head[5] != 1:
        raise bad(f"record {name} is not a 64-bit little-endian ELF library: ckpttool cannot find its weights")
    shoff, = struct.unpack_from("<Q", head, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
    if shentsize != 64 or shoff + shnum * 64 > lib.size:
        raise bad(f"record {name}: its ELF section headers lie outside it")
    raw = lib.read(shoff, shnum * 64)
    sections = [struct.unpack_from("<IIQQQQIIQQ", raw, i * 64) for i in range(shnum)]
    found: Dict[str, int] = {}
    names = {w.encode(): w for w in wanted}
    longest = max(len(w) for w in names)
    budget = MAX_ELF_SYMBOLS
    for sec in sections:
        _, stype, _, _, off, size, link, _, _, entsize = sec
        if stype not in (2, 11) or entsize != 24 or link >= shnum:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[link]
        if off + size > lib.size or strtab[4] + strtab[5] > lib.size or size > MAX_ELF_TABLE or \
                strtab[5] > MAX_ELF_TABLE:
            raise bad(f"record {name}: an ELF symbol table lies outside it")
        budget -= size // 24
        if budget < 0:
            raise bad(f"record {name}: its ELF symbol tables hold more than the {MAX_ELF_SYMBOLS} symbols "
                      f"ckpttool reads")
        syms, strs = lib.read(off, size - size % 24), lib.read(strtab[4], strtab[5])
        nstrs = len(strs)
        for st_name, _, _, shndx, value, _ in struct.iter_unpack("<IBBHQQ", syms):
            if st_name >= nstrs:
                continue
            # only names as long as a wanted one matter: the NUL is looked for that far (a string table with
            # no NUL is not read to its end for every symbol)
            stop = strs.find(b"\0", st_name, st_name + longest + 1)
            if stop < 0:
                if nstrs - st_name > longest:
                    continue
                stop = nstrs
            sym = names.get(strs[st_name:stop])
            if sym is None or sym in found or not 0 < shndx < shnum:
                continue
            home = sections[shndx]
            addr, hoff, hsize = home[3], home[4], home[5]
            if not addr <= value <= addr + hsize or hoff + hsize > lib.size:
                raise bad(f"record {name}: symbol {sym} lies outside its section")
            found[sym] = hoff + value - addr
        if all(w in found for w in wanted):
            break
    return found
