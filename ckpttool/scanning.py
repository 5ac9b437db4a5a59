"""``scan``: every pickle a loader would run from a file, every global it names, and the verdict.

The file is read as its loader reads it, and each pickle the loader would unpickle runs on the one
pickle machine (``ckpttool.pickles``) with the scanning policy, which calls nothing:

- ``torch.load``: a file whose first four bytes are a zip's local header is an archive, read with
  torch's reader semantics (``formats.archive``: its ``data.pkl``, found as torch finds it), and
  every other record that is a pickle, a nested archive, a numpy array or native code is looked
  at too (``.pt2`` archives of torch.export, TorchScript's ``constants.pkl``, AOTInductor's shared
  libraries); otherwise torch tries ``tarfile`` (the format of torch < 0.4: the pickles of its
  ``storages``, ``tensors`` and ``pickle`` members), and otherwise unpickles the file from byte 0
  (the legacy format's magic number, version, sys_info, object and storage keys: a bare pickle is
  that first pickle);
- ``torch.distributed.checkpoint.load``: a folder's ``.metadata`` and the ``torch.save`` blobs of
  its bytes items;
- ``numpy.load(allow_pickle=True)``: ``.npy`` object arrays (and the members of ``.npz`` archives);
- pickles nested in bytes inside any of these.

Verdicts, per global (``pickles.allowlist`` is the table; torch is never imported):

- **safe**: what ``torch.load(weights_only=True)`` admits by default, a short list of benign data
  types, and the format's own classes (DCP's metadata, TorchScript's helpers) where the format uses
  them;
- **needs code**: a class the pickle instantiates and gives state or items (a pickled ``nn.Module``:
  loading it runs its class's code), an enum built from its value (proven from the installed
  source), or a global only referenced;
- **dangerous**: anything called that is not admitted (REDUCE, INST/OBJ, BUILD on a class, the
  implicit calls of the unpickler and of admitted functions: ``pickles.uses``), a call of a computed
  object, an extension code, a deny-listed global anywhere, native code, and an ambiguous file
  (an archive or a pickle that two readers would read differently).
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
import tarfile
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from .errors import CkptError, FileAccessError, FormatError
from .pickles.allowlist import BENIGN, SUPPORTED_OPCODES, TORCH_FORMAT_INTERNALS, advice, weights_only_admits
from .pickles.machine import Source
from .pickles.uses import COMPUTED_CALL, COMPUTED_GLOBAL, MAX_NESTED, PickleUses, scan_pickle
from .results import ScanFile, ScanGlobal, ScanResult

# The worst, named in messages (anything else called and not admitted is dangerous all the same).
DENY = {
    "os.system": "runs a shell command", "posix.system": "runs a shell command", "nt.system": "runs a shell command",
    "os.popen": "runs a shell command", "os.execv": "replaces the process", "os.execvp": "replaces the process",
    "os.spawnv": "starts a process", "os.remove": "deletes a file", "os.unlink": "deletes a file",
    "os.rmdir": "deletes a folder", "shutil.rmtree": "deletes a folder tree",
    "subprocess.Popen": "starts a process", "subprocess.call": "starts a process",
    "subprocess.check_call": "starts a process", "subprocess.check_output": "starts a process",
    "subprocess.run": "starts a process", "subprocess.getoutput": "runs a shell command",
    "builtins.eval": "evaluates Python code", "builtins.exec": "executes Python code",
    "builtins.compile": "compiles Python code", "builtins.__import__": "imports a module",
    "builtins.getattr": "reaches any attribute (e.g. os.system)", "builtins.setattr": "changes any object",
    "builtins.open": "opens a file", "builtins.input": "reads the terminal", "builtins.breakpoint": "starts a debugger",
    "importlib.import_module": "imports a module", "runpy.run_path": "runs a Python file",
    "runpy.run_module": "runs a module", "runpy._run_code": "executes Python code",
    "timeit.timeit": "executes Python code", "timeit.repeat": "executes Python code",
    "cProfile.run": "executes Python code", "cProfile.runctx": "executes Python code",
    "profile.run": "executes Python code", "pdb.run": "executes Python code",
    "pickle.loads": "unpickles more (unrestricted)", "pickle.load": "unpickles more (unrestricted)",
    "_pickle.loads": "unpickles more (unrestricted)", "dill.loads": "unpickles more (unrestricted)",
    "marshal.loads": "loads code objects", "types.CodeType": "builds code", "types.FunctionType": "builds a function",
    "socket.socket": "opens a network socket", "socket.create_connection": "opens a network connection",
    "urllib.request.urlopen": "fetches a URL", "webbrowser.open": "opens a browser",
    "ctypes.CDLL": "loads a native library", "numpy.testing._private.utils.runstring": "executes Python code",
    "torch.load": "loads another file (unrestricted by default)", "torch.jit.load": "loads TorchScript code",
    "code.InteractiveInterpreter.runcode": "executes Python code", "operator.attrgetter": "reaches any attribute",
    "operator.methodcaller": "calls any method",
    "sys.exit": "stops the process", "os.mkdir": "creates a folder", "os.makedirs": "creates folders",
    "os.rename": "moves a file", "os.replace": "moves a file", "os.chmod": "changes permissions",
    "os.kill": "signals a process", "os.fork": "forks the process", "os.environ": "reads the environment",
    "shutil.copyfile": "copies a file", "shutil.copy": "copies a file", "shutil.copy2": "copies a file",
    "shutil.move": "moves a file", "tempfile.mkdtemp": "creates a folder", "tempfile.mkstemp": "creates a file",
    "logging.FileHandler": "opens a file", "io.open": "opens a file", "_io.open": "opens a file",
    "codecs.open": "opens a file", "pty.spawn": "starts a process", "asyncio.create_subprocess_exec": "starts a process",
}
NATIVE_CODE = "<native code>"
AMBIGUOUS = "<ambiguous file>"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_PICKLE_IN_MEMORY = 256 << 20   # a record read whole to be scanned; larger ones are streamed
MAX_ARCHIVE_DEPTH = 3
_STORAGE_RECORD = re.compile(r"[^/]*/data/\d+")
_NATIVE_MAGIC = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xca\xfe\xba\xbe")
_NATIVE_SUFFIX = (".so", ".dll", ".dylib", ".pyd")
_NPY_MAGIC = b"\x93NUMPY"


class _Findings:
    """What a scan of one path collects: per global, per place, its uses; and the advice's inputs."""

    def __init__(self, path: str):
        self.path = path
        self.uses: Dict[str, Dict[str, Set[str]]] = {}
        self.pickles = 0
        self.problems: List[str] = []
        self.built_types: Set[str] = set()
        self.internals = False  # the format's own classes (DCP metadata, TorchScript helpers) are in place
        self.torch_load = False  # a torch.load input (so the add_safe_globals advice applies)
        self.unreadable: Optional[str] = None
        self.failed: Optional[str] = None  # the first thing the loader itself would fail on
        self.advice_blockers: Set[str] = set()  # why no add_safe_globals line can make weights_only read it
        self.nested_left = 256  # bytes blobs tried as pickles, in all (each level may hold more)

    def _census(self, where: str, opcodes) -> None:
        """The opcodes torch's weights_only loader refuses whatever its allow list (protocol 3+ ones)."""
        refused = sorted(set(opcodes) - SUPPORTED_OPCODES)
        if refused:
            self.advice_blockers.add(f"{where} uses opcodes torch's weights_only loader refuses: {', '.join(refused)}")

    def flag(self, name: str, where: str, how: str = "found") -> None:
        self.uses.setdefault(name, {}).setdefault(where, set()).add(how)

    def pickle(self, where: str, data=None, pos: int = 0, source: Optional[Source] = None,
               size: Optional[int] = None, depth: int = 0, loader_runs: bool = True) -> PickleUses:
        """Scan one pickle; ``loader_runs``: the loader really unpickles it (its failure is worth saying)."""
        r = scan_pickle(data, pos, source, size)
        if loader_runs or r.uses or not r.error:  # tried bytes that were no pickle are not counted
            self.pickles += 1
        for name, how in r.uses.items():
            for h in how:
                self.flag(name, where, h)
        self.built_types |= r.built_types
        if loader_runs and not r.error:
            self._census(where, r.opcodes)
        if any("filled" in how for how in r.uses.values()):
            self.advice_blockers.add("it fills an object that is not a plain list or dict (torch's weights_only "
                                     "loader allows that for no class)")
        if r.ambiguous:
            self.flag(AMBIGUOUS, where)
            self.problems.append(f"{where}: {r.error}")
        elif r.error and loader_runs:
            self.problems.append(f"{where}: the loader stops here too: {r.error}")
            self.failed = self.failed or f"malformed pickle ({where}): {r.error}"
        if depth < MAX_NESTED:
            for label, blob in r.nested:
                if self.nested_left <= 0:
                    self.problems.append(f"{where}: more bytes than scanned as possible pickles")
                    break
                self.nested_left -= 1
                self.pickle(f"{where} > {label}", blob, depth=depth + 1, loader_runs=False)
        return r


# ---------------------------------------------------------------------------------------------
# What the loaders read


def _scan_path(found: _Findings, path: str) -> str:
    """Scan ``path`` (a file or a folder) into ``found``; return its format's name."""
    if os.path.isdir(path):
        return _scan_folder(found, path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)  # enough for every header test below (safetensors' needs the most)
    except OSError as e:
        raise FileAccessError(f"cannot read: {e.strerror or e}", path) from None
    if size == 0:
        raise FormatError("file is empty", path)
    if head[:4] == b"PK\x03\x04":  # torch.load's own test (torch.serialization._is_zipfile)
        return _scan_archive(found, path, 0, size, "", 0)
    sniffed = None
    bad_gguf = None
    if head[:6] == _NPY_MAGIC:
        _scan_npy_file(found, path, size)
        sniffed = "npy"
    else:
        from .formats import safetensors  # reads no pickle: only its header is checked
        if safetensors.looks_like(head, size):
            sniffed = "safetensors"
        elif path.lower().endswith(".onnx") or (head[:1] == b"\x08" and not _starts_like_pickle(head)):
            sniffed = "onnx"
        elif head[:4] == b"GGUF":
            from .formats import gguf  # holds no code; its header is checked as every command reads it
            try:
                gguf.read(path)
                sniffed = "gguf"
            except FormatError as e:  # not a GGUF file every reader takes: scanned as torch.load reads it
                bad_gguf = e
    tar = _scan_tar(found, path)
    # Whatever the bytes look like to other readers, torch.load (which goes by neither extension nor header)
    # unpickles a file that is neither zip nor tar from byte 0: that pickle is scanned for every such file.
    found.torch_load = found.torch_load or sniffed is None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        fmt = _legacy_pickles(found, mm, 0, size, "", strict=sniffed is None and not tar)
    if bad_gguf is not None and found.unreadable and found.unreadable.startswith("not a checkpoint format"):
        found.unreadable = bad_gguf.message  # no pickle either: what is wrong is the GGUF header
    return sniffed or ("torch_tar" if tar else fmt)


def _starts_like_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and head[1] <= 5


def _legacy_pickles(found: _Findings, buf, base: int, size: int, label: str, strict: bool = True) -> str:
    """The pickles torch.load's legacy path reads from ``buf[base:]``: the first one always, then as long as
    the magic number and protocol version are right. ``strict``: the file is nothing else, so a first pickle
    that does not read makes it unreadable (for a safetensors file it is only what torch.load would try)."""
    labels = ("magic number", "protocol version", "sys_info", "main pickle", "storage keys")
    pos = base
    for i, name in enumerate(labels):
        r = found.pickle(label + (name if i else "pickle"), buf, pos, size=size, loader_runs=strict or i > 0)
        if r.error:
            if strict and i == 0 and not r.uses and not _starts_like_pickle(buf[base:base + 2]):
                found.unreadable = f"not a checkpoint format ckpttool knows (starts with {bytes(buf[base:base + 8])!r}), " \
                                   f"and torch.load cannot unpickle it: {r.error}"
            return "pickle" if i == 0 else "torch_legacy"
        if i == 0 and r.value != MAGIC_NUMBER:
            return "pickle"  # torch.load stops here: "Invalid magic number"
        if i == 1 and r.value != PROTOCOL_VERSION:
            found.problems.append(f"{label}protocol version: not 1001, torch.load stops here")
            return "torch_legacy"
        pos = r.end
    return "torch_legacy"


def _scan_tar(found: _Findings, path: str) -> bool:
    """The tar format of torch < 0.4, which torch.load still tries first: the pickles it reads."""
    try:
        tar = tarfile.open(path, mode="r:", format=tarfile.PAX_FORMAT)
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False
    found.torch_load = True
    with tar:
        for name in ("storages", "tensors", "pickle", "sys_info"):
            data = _tar_member(tar, name)
            if data is None:
                continue
            where = f"tar member {name}"
            if name in ("pickle", "sys_info"):
                found.pickle(where, data, loader_runs=name == "pickle")
            else:
                _scan_tar_stream(found, data, where, name)
    return True


def _tar_member(tar: tarfile.TarFile, name: str) -> Optional[bytes]:
    """The bytes torch reads for member ``name``: the last member of that name, links followed, as tarfile
    itself resolves them (``extractfile``)."""
    try:
        member = tar.getmember(name)
        f = tar.extractfile(member)
    except (KeyError, tarfile.TarError, OSError, ValueError):
        return None
    if f is None:
        return None
    with f:
        return f.read(MAX_PICKLE_IN_MEMORY)


def _scan_tar_stream(found: _Findings, data: bytes, where: str, kind: str) -> None:
    """``storages`` / ``tensors`` of the tar format: a count pickle, then per item a pickle and raw data."""
    r = found.pickle(f"{where} (count)", data)
    if r.error or type(r.value) is not int or r.value < 0:
        return
    pos = r.end
    from .dtypes import STORAGE_CLASS_DTYPE, itemsize
    for i in range(min(r.value, 1 << 20)):
        item = found.pickle(f"{where} (item {i})", data, pos)
        if item.error:
            return
        pos = item.end
        if kind == "storages":  # (key, location, storage_type); then an 8-byte count and the elements
            t = item.value[2] if type(item.value) is tuple and len(item.value) == 3 else None
            name = t.name.rpartition(".")[2] if t is not None and hasattr(t, "name") else ""
            if name not in STORAGE_CLASS_DTYPE or pos + 8 > len(data):
                found.problems.append(f"{where}: storage {i} cannot be followed; later pickles not scanned")
                found.flag(AMBIGUOUS, where)
                return
            (numel,) = struct.unpack_from("<q", data, pos)
            pos += 8 + max(numel, 0) * itemsize(STORAGE_CLASS_DTYPE[name])
        else:  # (key, storage_id, type); then ndim, a magic int, sizes, strides, offset
            if pos + 8 > len(data):
                return
            (ndim,) = struct.unpack_from("<i", data, pos)
            pos += 8 + 16 * max(ndim, 0) + 8
        if pos > len(data):
            return
    if kind == "storages":
        found.pickle(f"{where} (views)", data, pos)


def _scan_archive(found: _Findings, path: str, base: int, length: int, label: str, depth: int) -> str:
    from .formats.archive import AmbiguousArchive, Archive
    found.torch_load = True
    where0 = label or os.path.basename(path)
    try:
        archive = Archive.open(path, base, length)
    except AmbiguousArchive as e:
        found.flag(AMBIGUOUS, where0)
        found.problems.append(f"{where0}: {e.message}")
        return "zip"
    with archive:
        names = archive.names()
        lower = {n.lower() for n in names}
        script = any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in lower)
        found.internals = found.internals or script
        try:
            main = archive.find("data.pkl")
        except FormatError:  # no archive folder torch could use (an .npz): torch.load unpickles nothing
            main = None
        from .formats.pt2 import is_pt2
        pt2 = _Pt2Records(names) if is_pt2(names) else None
        for rec in archive.records:
            name = rec.name
            where = f"{label}{name}"
            if _STORAGE_RECORD.fullmatch(name) and rec != main:
                continue  # tensor bytes: torch never unpickles these
            if name.lower().endswith(_NATIVE_SUFFIX):
                found.flag(NATIVE_CODE, where)
                continue
            if rec == main:
                _scan_record_pickle(found, archive, rec, where, loader_runs=True)
                continue
            if pt2 is not None and pt2.text_only(name):
                continue  # parsed as JSON or read as a string, never unpickled (see _Pt2Records)
            head = _record_head(archive, rec, 16)
            if head is None:
                continue
            if head[:4] in _NATIVE_MAGIC or head[:2] == b"MZ":
                found.flag(NATIVE_CODE, where)
            elif pt2 is not None and pt2.compiled_on_load(name):
                found.flag(NATIVE_CODE, where)  # C++ source AOTInductor's loader compiles, with the package's command
            elif pt2 is not None and head[:4] != b"PK\x03\x04" and head[:6] != _NPY_MAGIC:
                # torch.export.load's torch.load(BytesIO(record)) (example inputs, use_pickle weights and constants
                # whatever their names, a legacy whole state_dict, load_weights_from_disk) and pickle.loads (opaque
                # objects): for bytes that are no zip, torch's legacy sequence of pickles
                _scan_record_as_torch_load(found, archive, rec, where)
            elif name.lower().endswith(".pkl") or _starts_like_pickle(head):
                _scan_record_pickle(found, archive, rec, where, loader_runs=False)
            elif not name.lower().endswith((".json", ".txt", ".py")) and head[:4] != b"PK\x03\x04" \
                    and head[:6] != _NPY_MAGIC:
                # torch.export.load unpickles weights and constants of any protocol (0 has no header): tried,
                # streamed, stopping where the bytes stop being a pickle
                with archive.open_record(rec, check_crc=False) as f:
                    found.pickle(where, source=Source.of_stream(f, limit=rec.size), size=rec.size,
                                 loader_runs=False)
            elif head[:4] == b"PK\x03\x04" and depth < MAX_ARCHIVE_DEPTH:
                if rec.method == 0:
                    _scan_archive(found, path, rec.data_offset, rec.size, f"{where} > ", depth + 1)
                else:
                    _scan_inflated_archive(found, archive, rec, f"{where} > ", depth + 1)
            elif head[:6] == _NPY_MAGIC:
                if rec.size > MAX_PICKLE_IN_MEMORY:
                    found.flag(AMBIGUOUS, where)
                    found.problems.append(f"{where}: a numpy array of {rec.size} bytes, not scanned")
                else:
                    data = archive.read(rec, limit=MAX_PICKLE_IN_MEMORY, check_crc=False)
                    _scan_npy(found, data, 0, len(data), where)
        if main is None and not script:
            if pt2 is not None:  # torch.export.load's archive: its pickles are the records scanned above
                return "pt2"
            found.problems.append(f"{where0}: no data.pkl: torch.load unpickles nothing from it")
        return "torchscript" if script else "torch_zip" if main is not None else "zip"


class _Pt2Records:
    """What the loaders of a torch.export archive (``torch.export.load``: ``torch/export/pt2_archive/_package.py``,
    ``torch/_export/serde/serialize.py``; AOTInductor's ``AOTIModelPackageLoader``) do with each record.

    Never unpickled: the records under ``models/`` (each parsed as a program's JSON) and ``extra/`` (read as
    strings): the loaders list them by name, and no name a config can give (``data/weights/`` or
    ``data/constants/`` + its ``path_name``, looked up ignoring ASCII case) reaches them. Every other record is
    scanned as torch.load reads it (configs and AOTInductor's JSON too: JSON text is no pickle, and stops it at
    its first byte). A model folder of ``data/aotinductor/`` with a ``.cpp`` and no ``.so``: the C++ loader
    compiles it with the compiler command of its ``*_compile_flags.json`` (``system()``): native code."""

    def __init__(self, names: List[str]):
        slash = names[0].find("/")
        self.folder = names[0][:slash + 1]
        self.libraries: Set[str] = set()  # AOTInductor model folders holding a shared library
        for n in names:
            rel = self._rel(n)
            if rel is not None and rel.startswith("data/aotinductor/") and rel.endswith(".so"):
                self.libraries.add(self._model(rel))

    def _rel(self, name: str) -> Optional[str]:
        return name[len(self.folder):] if name.startswith(self.folder) else None

    @staticmethod
    def _model(rel: str) -> str:
        return rel[len("data/aotinductor/"):].split("/")[0]

    def text_only(self, name: str) -> bool:
        rel = self._rel(name)
        return rel is not None and rel.startswith(("models/", "extra/"))

    def compiled_on_load(self, name: str) -> bool:
        rel = self._rel(name)
        return (rel is not None and rel.startswith("data/aotinductor/") and rel.lower().endswith(".cpp")
                and self._model(rel) not in self.libraries)


_LEGACY_STEPS = ("pickle", "protocol version", "sys_info", "main pickle", "storage keys")


def _scan_record_as_torch_load(found: _Findings, archive, rec, where: str) -> None:
    """``torch.load(BytesIO(record))`` of a record that is no zip: torch's legacy path (``_legacy_pickles``' sequence:
    the first pickle, then, while the magic number and protocol version are right, sys_info, the main pickle and
    the storage keys), each pickle streamed from the record (never read whole). The first is only tried (raw
    tensor bytes are no pickle); ``pickle.loads`` of an opaque object is that first pickle."""
    pos = 0
    for i, step in enumerate(_LEGACY_STEPS):
        label = where if i == 0 else f"{where} ({step})"
        try:
            with archive.open_record(rec, check_crc=False) as f:
                skip = pos
                while skip > 0:
                    got = len(f.read(min(skip, 1 << 20)))
                    if not got:
                        return
                    skip -= got
                r = found.pickle(label, source=Source.of_stream(f, limit=rec.size - pos), size=rec.size - pos,
                                 loader_runs=i > 0)
        except FormatError as e:  # a record that cannot be read (its compression): torch cannot read it either
            found.problems.append(f"{label}: {e.message}")
            return
        if r.error:
            return
        if i == 0 and r.value != MAGIC_NUMBER:
            return  # torch.load stops here ("Invalid magic number"); pickle.loads read this one only
        if i == 1 and r.value != PROTOCOL_VERSION:
            found.problems.append(f"{label}: not 1001, torch.load stops here")
            return
        pos += r.end


def _record_head(archive, rec, n: int) -> Optional[bytes]:
    try:
        with archive.open_record(rec, check_crc=False) as f:
            return f.read(n)
    except FormatError:
        return None


def _scan_record_pickle(found: _Findings, archive, rec, where: str, loader_runs: bool) -> None:
    if rec.size <= MAX_PICKLE_IN_MEMORY:
        try:
            data = archive.read(rec, limit=MAX_PICKLE_IN_MEMORY, check_crc=False)
        except FormatError as e:  # the loader cannot read it either
            found.problems.append(f"{where}: {e.message}")
            if loader_runs:
                found.failed = found.failed or e.message
            return
        found.pickle(where, data, loader_runs=loader_runs)
        return
    with archive.open_record(rec, check_crc=False) as f:  # streamed: never inflated whole
        found.pickle(where, source=Source.of_stream(f, limit=rec.size), size=rec.size, loader_runs=loader_runs)


def _scan_inflated_archive(found: _Findings, archive, rec, label: str, depth: int) -> None:
    import tempfile
    if rec.size > MAX_PICKLE_IN_MEMORY:
        found.flag(AMBIGUOUS, label)
        found.problems.append(f"{label}: a compressed nested archive of {rec.size} bytes, not scanned")
        return
    data = archive.read(rec, limit=MAX_PICKLE_IN_MEMORY, check_crc=False)
    with tempfile.NamedTemporaryFile(suffix=".zip") as tmp:
        tmp.write(data)
        tmp.flush()
        _scan_archive(found, tmp.name, 0, len(data), label, depth)


def _scan_npy(found: _Findings, buf, base: int, length: int, label: str) -> None:
    """A ``.npy`` array in ``buf`` (bytes, mmap) at ``base``: numpy.load(allow_pickle=True) unpickles an
    object array's data, which follows the header."""
    head = bytes(buf[base:base + min(length, 65536 + 12)])
    if len(head) < 12:
        return
    if head[6] == 1:
        hlen, start = struct.unpack_from("<H", head, 8)[0], 10
    else:
        hlen, start = struct.unpack_from("<I", head, 8)[0], 12
    verdict = _npy_holds_objects(head[start:start + hlen].decode("latin-1", "replace"))
    if verdict is not False:  # objects, or a header only numpy knows how to read: what follows is scanned
        found.pickle(f"{label} (object array)", buf, base + start + hlen, size=length, loader_runs=bool(verdict))


# numpy type strings that hold no objects: byte order, kind, size (and datetime units)
_NPY_PLAIN = re.compile(r"[<>|=]?(?:[biufcSUVa]\d*|[mM]8(?:\[\w+\])?|\?)")


def _npy_holds_objects(header: str) -> Optional[bool]:
    """Does a ``.npy`` header's dtype hold Python objects (so numpy.load unpickles the data)? Read as numpy
    reads it (a Python literal, never evaluated otherwise); None where only numpy could tell."""
    import ast
    try:
        d = ast.literal_eval(header)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(d, dict) or "descr" not in d:
        return None

    def plain(descr, depth: int = 0) -> Optional[bool]:
        if depth > 32:
            return None
        if isinstance(descr, str):
            return True if _NPY_PLAIN.fullmatch(descr) else (False if descr.lstrip("<>|=").startswith("O") or
                                                              "object" in descr.lower() else None)
        if isinstance(descr, list):  # structured: [(name, type) or (name, type, shape)...]
            verdicts = [plain(f[1], depth + 1) if isinstance(f, tuple) and len(f) >= 2 else None for f in descr]
            if False in verdicts:
                return False
            return None if None in verdicts else True
        return None

    p = plain(d["descr"])
    return None if p is None else not p


def _scan_npy_file(found: _Findings, path: str, size: int) -> None:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _scan_npy(found, mm, 0, size, os.path.basename(path))


def _scan_folder(found: _Findings, path: str) -> str:
    meta = os.path.join(path, ".metadata")
    if os.path.isfile(meta):  # torch.distributed.checkpoint: dcp.load unpickles .metadata and bytes items
        found.internals = True
        with open(meta, "rb") as f:
            found.pickle(".metadata", f.read(MAX_PICKLE_IN_MEMORY))
        done = _scan_dcp_bytes_items(found, path, meta)
        for n in sorted(os.listdir(path)):
            if n.endswith(".distcp"):
                _scan_distcp(found, os.path.join(path, n), n, done)
        return "dcp"
    scanned = False
    for n in sorted(os.listdir(path)):
        p = os.path.join(path, n)
        if os.path.isfile(p) and n.lower().endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt", ".pt2", ".npy", ".npz")):
            scanned = True
            sub = _Findings(p)
            _scan_path(sub, p)
            for g, places in sub.uses.items():
                for where, how in places.items():
                    for h in how:
                        found.flag(g, f"{n}: {where}", h)
            found.pickles += sub.pickles
            found.problems += [f"{n}: {p}" for p in sub.problems]
            found.built_types |= sub.built_types
            found.torch_load = found.torch_load or sub.torch_load
    if not scanned:
        from .formats import detect
        return detect(path)  # a safetensors / ONNX folder has no pickles; anything else is an error
    return "folder"


def _dcp_state(obj) -> dict:
    """The attributes BUILD gives a DCP metadata record: a dict, or a (dict, slot dict) pair, as C takes it."""
    from .formats.safe_pickle import Stub
    state = obj.state if isinstance(obj, Stub) else None
    if isinstance(state, dict):
        return state
    if isinstance(state, tuple) and len(state) == 2:
        return {**(state[0] if isinstance(state[0], dict) else {}), **(state[1] if isinstance(state[1], dict) else {})}
    return {}


def _dcp_bytes_items(folder: str, meta: str) -> Tuple[List[Tuple[str, int, int, str]], int]:
    """((file, offset, length, fqn) of each bytes item .metadata records (what dcp.load torch.loads), and how
    many storage records could not be placed), read by the reading policy."""
    from .formats.safe_pickle import Stub, safe_load
    try:
        with open(meta, "rb") as f:
            root, _ = safe_load(f.read(MAX_PICKLE_IN_MEMORY), None, meta)
    except CkptError:  # not metadata dcp.load could use: it stops after unpickling it (scanned already)
        return [], 0
    st = _dcp_state(root)
    sdm, storage = st.get("state_dict_metadata"), st.get("storage_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        return [], 0
    out, unplaced = [], 0
    for key, info in storage.items():
        ks, vs = _dcp_state(key), _dcp_state(info)
        fqn, rel, off, length = ks.get("fqn"), vs.get("relative_path"), vs.get("offset"), vs.get("length")
        md = sdm.get(fqn) if isinstance(fqn, str) else None
        if isinstance(md, Stub) and md.qualname.endswith("TensorStorageMetadata"):
            continue  # tensor bytes: never unpickled
        if type(rel) is str and type(off) is int and type(length) is int and off >= 0 and length > 0:
            target = os.path.realpath(os.path.join(folder, rel))
            if os.path.dirname(target) == os.path.realpath(folder) and os.path.isfile(target):
                out.append((target, off, length, str(fqn)))
                continue
        unplaced += 1
    return out, unplaced


def _scan_dcp_bytes_items(found: _Findings, folder: str, meta: str) -> Set[Tuple[str, int]]:
    """dcp.load hands each bytes item to torch.load (weights_only=False): a zip archive, or pickles."""
    done: Set[Tuple[str, int]] = set()
    items, unplaced = _dcp_bytes_items(folder, meta)
    if unplaced:  # dcp.load may still find them: nothing here can say what it would unpickle
        found.flag(AMBIGUOUS, ".metadata")
        found.problems.append(f".metadata: {unplaced} storage record(s) whose bytes cannot be placed in the folder")
    for path, off, length, fqn in items:
        size = os.path.getsize(path)
        if off + length > size:
            continue
        label = f"{os.path.basename(path)} @ {off} (bytes item {fqn}): "
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[off:off + 4] == b"PK\x03\x04":
                _scan_archive(found, path, off, length, label, 1)
            else:
                _legacy_pickles(found, mm[off:off + min(length, MAX_PICKLE_IN_MEMORY)], 0, length, label)
        done.add((path, off))
    return done


def _scan_distcp(found: _Findings, path: str, label: str, done: Set[Tuple[str, int]] = frozenset()) -> None:
    """A .distcp file: tensor bytes, and the torch.save archives DCP writes for bytes items (found by their
    signatures too, in case .metadata does not say where they are)."""
    size = os.path.getsize(path)
    if size == 0:
        return
    real = os.path.realpath(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = mm.find(b"PK\x03\x04")
        while pos >= 0:
            end = mm.find(b"PK\x05\x06", pos)
            if end < 0 or end + 22 > size:
                break
            stop = end + 22 + int.from_bytes(mm[end + 20:end + 22], "little")
            if (real, pos) not in done:
                _scan_archive(found, path, pos, stop - pos, f"{label} @ {pos}: ", 1)
            pos = mm.find(b"PK\x03\x04", stop)


# ---------------------------------------------------------------------------------------------
# Verdicts


def classify(name: str, uses: Set[str], internals: bool = False) -> str:
    """``safe`` | ``needs code`` | ``dangerous`` for one global and how the pickles use it.

    >>> classify("os.system", {"referenced"}), classify("mypkg.Net", {"instantiated", "built"})
    ('dangerous', 'needs code')
    >>> classify("collections.OrderedDict", {"called"}), classify("mypkg.make", {"called"})
    ('safe', 'dangerous')
    """
    if name in (NATIVE_CODE, AMBIGUOUS, COMPUTED_CALL) or not _NAME.fullmatch(name) or _denied(name):
        return "dangerous"  # incl. <extension code N> and names that are no Python path
    if weights_only_admits(name) or name in BENIGN or name in _MODELED or \
            (internals and name in TORCH_FORMAT_INTERNALS):
        return "safe"
    if "called" in uses:
        return "dangerous"
    return "needs code"


def _denied(name: str) -> str:
    """The deny-list note for ``name`` (``posix.system`` and ``nt.system`` are ``os.system``), or ""."""
    for alias in ("posix.", "nt."):
        if name.startswith(alias):
            return DENY.get("os." + name[len(alias):], DENY.get(name, ""))
    return DENY.get(name, "")


# Admitted here because what they call is modelled by the scanner (pickles.uses): copyreg's helpers call or
# instantiate their arguments, which are judged on their own; a partial calls nothing until it is called.
_MODELED = {"copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__", "functools.partial"}

_NOTES = {COMPUTED_GLOBAL: "a global whose name the pickle computes", NATIVE_CODE: "compiled code the loader can run", AMBIGUOUS: "readers disagree on what the file holds",
          COMPUTED_CALL: "calls an object the pickle computed"}


def scan_file(path: str) -> ScanFile:
    """Scan one path; see the module doc."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileAccessError("no such file or directory", path)
    found = _Findings(path)
    fmt = _scan_path(found, path)
    if found.unreadable and not found.uses:
        raise FormatError(found.unreadable, path)
    globals_: List[ScanGlobal] = []
    for g in sorted(found.uses):
        how = set().union(*found.uses[g].values())
        verdict = classify(g, how, found.internals)
        if len(how) > 1:
            how.discard("referenced")  # every global is referenced; say the stronger use
            how.discard("found")
        globals_.append(ScanGlobal(name=g, verdict=verdict, uses=tuple(sorted(how)), where=tuple(sorted(found.uses[g])),
                                   note=_denied(g) or _NOTES.get(g, "")))
    if found.failed and not any(g.verdict == "dangerous" for g in globals_):
        # nothing dangerous ran before the loader would fail: the file is unreadable, not clean
        raise FormatError(found.failed, path)
    line = None
    torch_load = found.torch_load and fmt not in ("torchscript", "dcp")  # DCP and TorchScript load otherwise
    if torch_load and not any(g.verdict == "dangerous" for g in globals_):
        try:
            line = advice([g.name for g in globals_ if not g.name.startswith("<")], sorted(found.built_types))
        except ValueError:
            line = None
        if found.advice_blockers:  # what weights_only refuses whatever its allow list (needed line or none)
            found.problems.extend(f"no add_safe_globals line helps: {b}" for b in sorted(found.advice_blockers))
            line = None
    weights_only = None
    if torch_load:
        weights_only = not found.advice_blockers and not any(
            g.name.startswith("<") or not weights_only_admits(g.name) for g in globals_)
    return ScanFile(path=path, pickles=found.pickles, globals=tuple(globals_), format=fmt, advice=line,
                    problems=tuple(found.problems), weights_only=weights_only)


# What a folder's walk scans. A file is scanned when its name ends with one of these (then a file that cannot be
# read is reported as unreadable: it was meant to be a checkpoint), or else when its first bytes are those of
# something a loader reads (see _loader_reads): torch.load goes by neither name nor extension.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt2", ".ptl", ".bin", ".ckpt", ".tar", ".pkl", ".pickle", ".joblib",
                       ".npy", ".npz", ".safetensors", ".onnx", ".gguf")

ProgressFn = Callable[[int, int], None]


def _loader_reads(path: str, head: bytes, size: int) -> bool:
    """Would a loader read this file of no checkpoint name? Its magic bytes (zip, tar, numpy, pickle protocol 2+,
    safetensors, GGUF), or else, for pickles of protocol 0 and 1 (which have none), a pickle read from byte 0
    that ends where it should, or that calls something on the way (text that merely starts like an opcode is
    neither)."""
    if head[:4] == b"PK\x03\x04" or head[:6] == _NPY_MAGIC or head[:4] == b"GGUF" or _starts_like_pickle(head):
        return True
    if len(head) > 262 and head[257:262] == b"ustar":
        return True
    from .formats import safetensors
    if safetensors.looks_like(head, size):
        return True
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = scan_pickle(mm, 0, size=size)  # stops at the first byte that is no pickle: text ends at once
    # a call counts, of a name a pickle could import (text that merely starts with "c" names no such module)
    return not r.error or any((name.startswith("<") or _NAME.fullmatch(name)) and classify(name, how) == "dangerous"
                              for name, how in r.uses.items())


def _skip_reason(path: str, name: str, onnx_folder: bool) -> Optional[str]:
    """Why a file met in a folder's walk is not scanned, or None to scan it."""
    known = name.lower().endswith(CHECKPOINT_SUFFIXES)
    try:
        st = os.stat(path)
    except OSError:
        # reported as unreadable, but for a broken symbolic link of no checkpoint name (nothing a loader can read)
        return "broken symbolic link" if os.path.islink(path) and not known else None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"  # a FIFO or a device: opening it could block or never end
    if known and not (onnx_folder and not name.lower().endswith(".onnx")):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None  # reported as unreadable: nothing proves it is not a checkpoint
    if st.st_size == 0:
        return "empty"
    try:
        if _loader_reads(path, head, st.st_size):
            return None
    except (OSError, ValueError):
        return None
    return "external data of an .onnx model" if known else "not a checkpoint format"


def _walk(top: str, units: List[Tuple[str, Optional[CkptError]]], skipped: List[Tuple[str, str]]) -> None:
    """Append what folder ``top`` holds, to any depth and in name order, to ``units`` ((path, None) to scan, or
    (path, why it cannot be)) and ``skipped``. A folder with ``.metadata`` is a torch.distributed.checkpoint,
    scanned as one (its ``.distcp`` files with it); symbolic links to folders are not followed (no loops, nothing
    outside the tree)."""
    before = len(units)

    def unlistable(e: OSError) -> None:
        where = e.filename or top
        units.append((where, FileAccessError(f"cannot list the folder: {e.strerror or e}", where)))

    for folder, dirs, files in os.walk(top, onerror=unlistable):
        dirs.sort()
        for d in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            skipped.append((os.path.join(folder, d), "symbolic link to a folder, not followed"))
            dirs.remove(d)
        dcp = ".metadata" in files and os.path.isfile(os.path.join(folder, ".metadata"))
        if dcp:
            units.append((folder, None))
        onnx_folder = any(n.lower().endswith(".onnx") for n in files)
        for n in sorted(files):
            if dcp and (n == ".metadata" or n.endswith(".distcp")):
                continue
            p = os.path.join(folder, n)
            why = _skip_reason(p, n, onnx_folder)
            if why is None:
                units.append((p, None))
            else:
                skipped.append((p, why))
    if len(units) == before:
        units.append((top, FormatError("no checkpoint file in this folder", top)))


def scan(paths: Sequence[str], *, walk: bool = False, keep_going: bool = False,
         progress: Optional[ProgressFn] = None) -> ScanResult:
    """Scan each path; the result is dangerous when any file is.

    ``walk``: a folder (other than a DCP checkpoint, always one entry) is walked to any depth and each
    checkpoint file in it is an entry of its own (see ``CHECKPOINT_SUFFIXES``; other files are scanned when
    their bytes are a loader's, else listed in ``skipped``); symbolic links to folders are not followed.
    Without it a folder is one entry (an HF folder's pickles together). ``keep_going``: a file that cannot be
    read is an entry with ``error`` and the scan goes on (exit code 2 unless another is dangerous); a scan of
    one path that is itself unreadable still raises, as with nothing else to report. ``progress(done, total)``
    is called as files are done.

    >>> r = scan(["fixtures/seed_checkpoint.tar"])   # a pickled module: it needs its code, calls nothing
    >>> r.dangerous, r.files[0].verdict, r.exit_code
    (False, 'needs code', 0)
    >>> r = scan(["downloads/"], walk=True, keep_going=True)   # doctest: +SKIP
    >>> [(f.path, f.verdict) for f in r.files]   # doctest: +SKIP
    [('downloads/a.pt', 'safe'), ('downloads/evil.pkl', 'dangerous'), ('downloads/cut.pt', 'unreadable')]
    """
    paths = [os.fspath(p) for p in paths]
    units: List[Tuple[str, Optional[CkptError]]] = []
    skipped: List[Tuple[str, str]] = []
    for p in paths:
        if walk and os.path.isdir(p):
            _walk(p, units, skipped)
        else:
            units.append((p, None))
    # one path named and nothing else: its error is the command's (the one-line error every command gives)
    strict = not keep_going or (len(paths) == 1 and len(units) == 1 and units[0][0] == paths[0])
    files: List[ScanFile] = []
    for done, (path, error) in enumerate(units):
        if progress is not None:
            progress(done, len(units))
        if error is None:
            try:
                files.append(scan_file(path))
                continue
            except CkptError as e:
                error = e
            except OSError as e:  # gone or failing mid-scan (an I/O error): a line of its own, not a traceback
                error = FileAccessError(f"cannot read: {e.strerror or e}", path)
        if strict:
            raise error
        files.append(ScanFile(path=path, pickles=0, globals=(), format=_format_guess(path), error=error.message))
    if progress is not None:
        progress(len(units), len(units))
    dangerous = any(f.dangerous_names for f in files)
    return ScanResult(files=tuple(files), dangerous=dangerous, skipped=tuple(skipped))


def _format_guess(path: str) -> str:
    """The format an unreadable file's first bytes claim ("" when none): what it was meant to be."""
    try:
        if os.path.isdir(path):
            return "dcp" if os.path.isfile(os.path.join(path, ".metadata")) else ""
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    from .formats import safetensors
    for ok, name in ((head[:4] == b"PK\x03\x04", "zip"), (_starts_like_pickle(head), "pickle"),
                     (head[:6] == _NPY_MAGIC, "npy"), (safetensors.looks_like(head, len(head) + 1), "safetensors"),
                     (len(head) > 262 and head[257:262] == b"ustar", "tar"), (head[:4] == b"GGUF", "gguf"),
                     (path.lower().endswith(".onnx"), "onnx")):
        if ok:
            return name
    return ""


def safe_globals_line(f: ScanFile) -> Optional[str]:
    """The ``add_safe_globals`` line that lets torch.load(weights_only=True) read a file with no dangerous globals."""
    return f.advice


__all__ = ["DENY", "classify", "safe_globals_line", "scan", "scan_file", "CkptError"]
