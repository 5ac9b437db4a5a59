"""ckpttool.pickles.allowlist against the installed torch and numpy, and advice that works.

The allow list is ckpttool's own copy of torch's (scan does not import torch); these tests are
what keeps it honest: the table equals torch's, the admission rule agrees with torch's unpickler
name by name, numpy's dtype classes are the ones numpy builds, and every advised
``add_safe_globals`` line, run in a fresh interpreter, makes ``torch.load(weights_only=True)``
load a file it refused before. Fresh interpreters matter: ``add_safe_globals`` is process-global.
"""
from __future__ import annotations

import argparse
import ast
import collections
import datetime
import io
import json
import os
import pathlib
import pickle
import pickletools
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch._weights_only_unpickler as wo

from ckpttool.pickles import allowlist as al

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code: str, *args: str, paths=(), stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -c code args...`` in a fresh interpreter with the repository (and ``paths``) importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), REPO, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def fresh_json(code: str, stdin=None):
    done = run_py(code, stdin=None if stdin is None else json.dumps(stdin))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(mine, theirs) -> str:
    mine, theirs = set(mine), set(theirs)
    return f"only in ckpttool's table: {sorted(mine - theirs)}; only in torch's: {sorted(theirs - mine)}"


# --------------------------------------------------------------------------------------------
# (a) the table and the rule, against the installed torch


def test_weights_only_is_torchs_default_table():
    theirs = {f"{k}" for k in wo._get_allowed_globals()}
    assert al.WEIGHTS_ONLY == theirs, differences(al.WEIGHTS_ONLY, theirs)


def test_at_import_is_what_a_fresh_import_torch_allows():
    theirs = fresh_json("""
        import json, torch, torch._weights_only_unpickler as wo
        print(json.dumps(sorted(f"{k}" for k in wo._get_user_allowed_globals())))
    """)
    assert al.WEIGHTS_ONLY_AT_IMPORT == set(theirs), differences(al.WEIGHTS_ONLY_AT_IMPORT, theirs)


@pytest.mark.parametrize("module", sorted(al.WEIGHTS_ONLY_ONCE_IMPORTED))
def test_once_imported_is_what_each_module_adds(module):
    # one interpreter per module: importing one (torch._dynamo) may import another
    theirs = fresh_json("""
        import importlib, json, sys, torch, torch._weights_only_unpickler as wo
        before = set(wo._get_user_allowed_globals())
        importlib.import_module(sys.stdin.read().strip('"'))
        print(json.dumps(sorted(set(wo._get_user_allowed_globals()) - before)))
    """, stdin=module)
    names = al.WEIGHTS_ONLY_ONCE_IMPORTED[module]
    assert names == set(theirs), f"{module}: {differences(names, theirs)}"


def test_mappings_and_blocklist_are_torchs():
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    assert dict(al.IMPORT_MAPPING) == IMPORT_MAPPING
    assert dict(al.NAME_MAPPING) == NAME_MAPPING, differences(al.NAME_MAPPING, NAME_MAPPING)
    assert al.BLOCKED_MODULES == set(wo._blocklisted_modules)


# Names torch admits or refuses by a rule rather than by the table's plain keys: Python 2
# spellings, blocked modules, aliases that are not keys, storage and tensor spellings, layouts
# and memory formats, names that need an import, and the builtins omegaconf pickles.
PROBES = [
    ("__builtin__", "set"), ("__builtin__", "bytearray"), ("__builtin__", "complex"),
    ("__builtin__", "long"), ("__builtin__", "dict"), ("__builtin__", "list"),
    ("__builtin__", "unicode"), ("__builtin__", "intern"), ("__builtin__", "reduce"),
    ("exceptions", "ValueError"), ("exceptions", "StandardError"), ("exceptions", "IOError"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("UserDict", "UserDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "tuple"), ("builtins", "getattr"), ("builtins", "eval"), ("builtins", "set"),
    ("builtins", "ValueError"), ("builtins", "BaseExceptionGroup"), ("builtins", "EnvironmentError"),
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("sys", "modules"), ("os.path", "join"),
    ("torch", "float"), ("torch", "half"), ("torch", "cfloat"), ("torch", "long"),
    ("torch", "strided"), ("torch", "sparse_coo"), ("torch", "contiguous_format"),
    ("torch", "channels_last"), ("torch", "dtype"), ("torch", "layout"), ("torch", "qscheme"),
    ("torch", "UntypedStorage"), ("torch", "TypedStorage"), ("torch", "ComplexFloatStorage"),
    ("torch.cuda", "QInt8Storage"), ("torch.cuda", "ComplexFloatStorage"),
    ("torch.sparse", "BoolTensor"), ("torch.cuda.sparse", "FloatTensor"),
    ("torch.nn", "Parameter"), ("torch.nn.parameter", "Parameter"), ("torch.tensor", "Tensor"),
    ("torch._tensor", "Tensor"), ("torch._utils", "_rebuild_xla_tensor"),
    ("torch.nn.modules.linear", "Linear"), ("collections", "defaultdict"),
    ("collections", "deque"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
    ("traceback", "FrameSummary"), ("traceback", "StackSummary"),
    ("torch.nested._internal.nested_tensor", "NestedTensor"),
    ("torch.distributed.tensor", "DTensor"), ("torch._dynamo.decorators", "_DimRange"),
    ("torch.distributed.checkpoint.metadata", "Metadata"), ("torch.jit._pickle", "build_intlist"),
]


def test_admits_agrees_with_torchs_unpickler():
    """Pickle a GLOBAL of each name; torch's weights_only unpickler (fresh `import torch`) decides."""
    names = sorted({tuple(n.rsplit(".", 1)) for n in al.WEIGHTS_ONLY | al.WEIGHTS_ONLY_AT_IMPORT}
                   | set(PROBES))
    verdicts = fresh_json("""
        import io, json, pickle, sys, torch, torch._weights_only_unpickler as wo
        out = []
        for module, name in json.loads(sys.stdin.read()):
            data = b"\\x80\\x02c" + f"{module}\\n{name}\\n".encode() + b"."
            try:
                wo.load(io.BytesIO(data))
                out.append("admitted")
            except pickle.UnpicklingError as e:
                refused = ("Unsupported global", "is blocked", "must be imported")
                out.append("refused" if any(r in str(e) for r in refused) else f"error: {e}")
        print(json.dumps(out))
    """, stdin=names)
    wrong = [(m, n, v) for (m, n), v in zip(names, verdicts)
             if v != ("admitted" if al.weights_only_admits((m, n)) else "refused")]
    assert not wrong, f"weights_only_admits disagrees with torch on {wrong}"
    # The string form splits at the last dot and agrees for every probe.
    assert all(al.weights_only_admits(f"{m}.{n}") == al.weights_only_admits((m, n)) for m, n in names)


def test_supported_opcodes_are_the_ones_the_unpickler_runs():
    runs = set()
    for op in pickletools.opcodes:
        try:
            wo.load(io.BytesIO(op.code.encode("latin-1")))
        except pickle.UnpicklingError as e:
            if "Unsupported operand" in str(e):
                continue
        except Exception:
            pass
        runs.add(op.name)
    assert runs == al.SUPPORTED_OPCODES, differences(al.SUPPORTED_OPCODES, runs)


def test_setitem_and_append_rules_no_allow_list_extends():
    """What BENIGN's CARE notes say: a non-empty defaultdict or deque never loads; empty ones do."""
    allowed = [collections.defaultdict, collections.deque, list, dict]
    with torch.serialization.safe_globals(allowed):
        for obj in (collections.defaultdict(list), collections.deque()):
            assert wo.load(io.BytesIO(pickle.dumps(obj, protocol=2))) == obj
        with pytest.raises(pickle.UnpicklingError, match="Can only SETITEM"):
            wo.load(io.BytesIO(pickle.dumps(collections.defaultdict(list, a=[1]), protocol=2)))
        with pytest.raises(pickle.UnpicklingError, match="Can only append to lists"):
            wo.load(io.BytesIO(pickle.dumps(collections.deque([1]), protocol=2)))
    setitem_types = (dict, collections.OrderedDict, collections.Counter)
    assert {f"{t.__module__}.{t.__qualname__}" for t in setitem_types} == al.SETITEM_TYPES


def test_module_imports_neither_torch_nor_numpy():
    found = fresh_json("""
        import json, sys
        import ckpttool.pickles.allowlist
        print(json.dumps(sorted(m for m in ("torch", "numpy") if m in sys.modules)))
    """)
    assert found == []


def _resolve(name: str):
    import importlib
    module, _, attr = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_extra_lists_name_real_objects_torch_does_not_admit():
    assert not (al.BENIGN | al.TORCH_FORMAT_INTERNALS) & (al.WEIGHTS_ONLY | al.WEIGHTS_ONLY_AT_IMPORT)
    for name in sorted(al.TORCH_FORMAT_INTERNALS):
        assert callable(_resolve(name)), name
    for name in sorted(al.BENIGN):
        if name.startswith(("numpy.core.", "pathlib._local.")) or name == "numpy.dtypes.StringDType":
            continue  # old/new spellings of what the others name, absent here
        assert callable(_resolve(name)), name
    import numpy.dtypes
    here = {f"numpy.dtypes.{getattr(numpy.dtypes, n).__qualname__}" for n in numpy.dtypes.__all__}
    assert al.NUMPY_DTYPE_CLASSES == here, differences(al.NUMPY_DTYPE_CLASSES, here)


# --------------------------------------------------------------------------------------------
# (b) numpy's dtype classes


def qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def pickled_codes():
    """Every dtype code numpy pickles (``numpy.dtype(code, align, copy)``'s first argument)."""
    dtypes = [np.dtype(c) for c in np.typecodes["All"]]
    dtypes += [np.dtype(c).newbyteorder(">") for c in np.typecodes["All"] if c not in "SUVO?bB"]
    dtypes += [np.dtype(s) for s in ("S0", "S1", "S7", "U1", "<U5", ">U3", "V1", "V16", "M8[ns]",
                                     "m8[D]", ">M8[s]", [("a", "<i4"), ("b", ">f8")], "(2,3)f4")]
    codes = set()
    for dt in dtypes:
        func, args = dt.__reduce__()[:2]
        assert func is np.dtype, dt
        codes.add(args[0])
    return sorted(codes)


@pytest.mark.parametrize("code", pickled_codes())
def test_numpy_dtype_class_is_what_numpy_builds(code):
    built = pickle.loads(pickle.dumps(np.dtype(code), protocol=2))
    assert al.numpy_dtype_class(code) == qualified(type(np.dtype(code))) == qualified(type(built))


def test_numpy_dtype_class_agrees_on_every_sized_code_numpy_accepts():
    for order in ("", "<", ">", "|", "=", "!"):
        for kind in "biufcOSUVMm":
            for size in ("", "0", "1", "2", "3", "4", "8", "12", "16", "24", "32"):
                code = f"{order}{kind}{size}"
                if size == "" and kind in "biufc":
                    continue  # one-letter type characters, not pickle codes: None by design
                try:
                    expected = qualified(type(np.dtype(code)))
                except TypeError:
                    continue  # platform-dependent sizes (f12, O4...) may still be in the table
                assert al.numpy_dtype_class(code) == expected, code
    for code in ("<U5", "O8", "V16", "M8", "m8", "c16", "b1", "u4", "f8"):
        assert al.numpy_dtype_class(code) == qualified(type(np.dtype(code))), code
    for bad in ("", "u3", "b2", "f3", "x8", "f8junk", "d", "u4[ns]", "float64"):
        assert al.numpy_dtype_class(bad) is None, bad


# --------------------------------------------------------------------------------------------
# (c) the advice works


HELPER_MODULE = "allowlist_case_types"
HELPER_SOURCE = '''
import dataclasses
import enum


class Color(enum.Enum):
    RED = 1
    GREEN = 2


@dataclasses.dataclass
class TrainConfig:
    lr: float
    name: str
    layers: list
'''


@pytest.fixture
def helper(tmp_path, monkeypatch):
    folder = tmp_path / "helper"
    folder.mkdir()
    (folder / f"{HELPER_MODULE}.py").write_text(HELPER_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(HELPER_MODULE, None)
    import importlib
    yield folder, importlib.import_module(HELPER_MODULE)
    sys.modules.pop(HELPER_MODULE, None)


def numpy_arrays():
    return {
        "u4": np.arange(6, dtype=np.uint32).reshape(2, 3), "f8": np.linspace(0, 1, 5),
        "b1": np.array([True, False]), "i1": np.array([-1, 2], dtype=np.int8),
        "c16": np.array([1 + 2j, -3j]), "U": np.array(["ab", "c"]),
        "M8": np.array(["2024-01-02", "2024-03-04"], dtype="M8[D]"),
        "big_endian": np.arange(3, dtype=">u4"),
        "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
    }


def numpy_scalars():
    return {"f4": np.float32(1.5), "i8": np.int64(3), "b1": np.bool_(True), "c8": np.complex64(1j)}


def when():
    tz = datetime.timezone(datetime.timedelta(hours=2), "CEST")
    return {"at": datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
            "local": datetime.datetime(2024, 6, 1, 12, tzinfo=tz), "day": datetime.date(2024, 1, 2),
            "clock": datetime.time(3, 4, 5), "span": datetime.timedelta(days=1, seconds=2)}


def omegaconf_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"lr": 0.1, "layers": [1, 2], "name": "x",
                                      "opt": {"betas": [0.9, 0.99], "eps": None}})
    return {"cfg": cfg}


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18()


# name -> (make(helper module) -> object, whether torch refuses it by default)
CASES = {
    "numpy_arrays": (lambda h: numpy_arrays(), True),
    "numpy_scalars": (lambda h: numpy_scalars(), True),
    "namespace": (lambda h: argparse.Namespace(lr=0.1, layers=[1, 2], name="run"), True),
    "enum": (lambda h: {"color": h.Color.GREEN, "all": [h.Color.RED, h.Color.GREEN]}, True),
    "counter": (lambda h: collections.Counter("abracadabra"), False),
    "dataclass": (lambda h: h.TrainConfig(0.1, "x", [1, 2]), True),
    "datetime": (lambda h: when(), True),
    "purepath": (lambda h: {"path": pathlib.PurePosixPath("/data/run1/ckpt.pt")}, True),
    "everything": (lambda h: {"arrays": numpy_arrays(), "scalars": numpy_scalars(),
                              "args": argparse.Namespace(lr=0.1), "color": h.Color.RED,
                              "counts": collections.Counter("aab"), "cfg": h.TrainConfig(1.0, "y", []),
                              "when": when(), "path": pathlib.PurePosixPath("a/b"),
                              "weights": {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(7)}},
                   True),
    "omegaconf": (lambda h: omegaconf_config(), True),
    "resnet18_pickled_module": (lambda h: resnet18(), True),
}


def data_pickle(path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(name)


_STRINGS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}


def referenced_and_built(data: bytes):
    """The globals a pickle names (GLOBAL; STACK_GLOBAL's two strings) and the numpy dtype
    classes it builds (the code string pushed right after the ``numpy.dtype`` global)."""
    referenced, built = [], set()
    memo, previous, last = {}, None, None
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        if op.name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        pushed = None
        if op.name == "GLOBAL":
            pushed = ("global", tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            pushed = ("global", (previous[1], last[1]))
        elif op.name in _STRINGS:
            pushed = ("str", arg)
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(arg)
        if op.name in ("GLOBAL", "STACK_GLOBAL"):
            referenced.append(pushed[1])
        if pushed and pushed[0] == "str" and last and last[0] == "global" \
                and al.global_name(*last[1]) == "numpy.dtype":
            cls = al.numpy_dtype_class(pushed[1])
            assert cls is not None, f"numpy.dtype({pushed[1]!r}) not in the table"
            built.add(cls)
        previous, last = last, pushed
    return referenced, sorted(built)


LOAD_AFTER_ADVICE = """
import pickle, sys, torch
path, out, line = sys.argv[1:4]
try:
    torch.load(path, weights_only=True)
    print("PLAIN: loaded")
except pickle.UnpicklingError as e:
    print("PLAIN: refused", str(e).splitlines()[-3:])
if line:
    exec(line)
obj = torch.load(path, weights_only=True)
torch.save(obj, out)
print("ADVISED: loaded")
"""


def same(a, b, byteorder=True) -> bool:
    """Equal values of equal types, arrays and tensors element by element, modules by state_dict.

    ``byteorder=False``: a numpy array's dtype may differ in byte order only (numpy's own pickle
    brings a '>u4' array back as native 'u4', values intact, with weights_only or not).
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        da, db = (a.dtype, b.dtype) if byteorder else (a.dtype.newbyteorder("="), b.dtype.newbyteorder("="))
        return da == db and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return list(sa) == list(sb) and all(same(sa[k], sb[k]) for k in sa)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], byteorder) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, byteorder) for x, y in zip(a, b))
    if isinstance(a, argparse.Namespace):
        return same(vars(a), vars(b), byteorder)
    return bool(a == b)


def advised_names(line: str) -> set:
    """The full names a line's ``from M import A, B as C`` statements bind."""
    out = set()
    for stmt in line.split("; "):
        if stmt.startswith("from "):
            module, _, names = stmt[len("from "):].partition(" import ")
            out |= {f"{module}.{n.split(' as ')[0]}" for n in names.split(", ")}
    return out


def check_advice_works(path, original, helper_folder, refused_by_default=True, expect=()):
    referenced, built = referenced_and_built(data_pickle(path))
    line = al.advice(referenced, built)
    for name in expect:
        assert name in (line or "") or name in advised_names(line or ""), f"{name} not in {line}"
    if not refused_by_default:
        assert line is None, line
    else:
        assert line, f"no advice for {referenced} {built}"
    out = os.path.join(os.path.dirname(path), "reloaded.pt")
    done = run_py(LOAD_AFTER_ADVICE, str(path), out, line or "", paths=[helper_folder])
    assert done.returncode == 0, f"advice {line!r} did not work:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert ("PLAIN: refused" if refused_by_default else "PLAIN: loaded") in done.stdout, done.stdout
    loaded = torch.load(out, weights_only=False)
    # exactly what the full-trust loader reads from the same file, and the original's values
    assert same(loaded, torch.load(path, weights_only=False))
    assert same(loaded, original, byteorder=False)
    return line


@pytest.mark.parametrize("case", sorted(CASES))
def test_advice_makes_weights_only_load_work(case, helper, tmp_path):
    folder, module = helper
    make, refused = CASES[case]
    original = make(module)
    path = tmp_path / f"{case}.pt"
    torch.save(original, path)
    expect = {"numpy_arrays": ["numpy.dtypes.UInt32DType", "numpy.dtypes.DateTime64DType",
                               "numpy.dtypes.VoidDType", "numpy.dtypes.StrDType"],
              "omegaconf": ["dict", "list", "int"]}.get(case, ())
    check_advice_works(path, original, folder, refused, expect)


def test_advice_for_numpy1_names_uses_the_tuple_form(helper, tmp_path):
    """numpy 1 wrote numpy.core.multiarray.*; under numpy 2 the objects are numpy._core's."""
    folder, _ = helper
    original = {"a": np.arange(4, dtype=np.uint8), "s": np.float64(2.5)}
    written = tmp_path / "numpy2.pt"
    torch.save(original, written)
    path = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(written) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"cnumpy._core.multiarray\n" in data
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            zout.writestr(info.filename, data)
    line = check_advice_works(path, original, folder, expect=[
        '(_reconstruct, "numpy.core.multiarray._reconstruct")',
        '(scalar, "numpy.core.multiarray.scalar")'])
    assert "from numpy._core.multiarray import _reconstruct, scalar" in line and "numpy.core import" not in line


def test_advice_none_blocked_and_builtins():
    assert al.advice([]) is None
    assert al.advice([("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
                      ("collections", "OrderedDict"), ("__builtin__", "set")]) is None
    # builtins the default list lacks are advised too, by their Python 3 names
    assert al.advice([("__builtin__", "long"), ("__builtin__", "dict")]) == \
        "torch.serialization.add_safe_globals([dict, int])"
    with pytest.raises(ValueError, match="os.system"):
        al.advice(["os.system"])
    with pytest.raises(ValueError, match="sys.intern"):
        al.advice([("__builtin__", "intern")])
    # an import path that is not an identifier goes through importlib
    line = al.advice([("my-pkg.mod", "Thing")])
    assert "importlib.import_module('my-pkg.mod')" in line
    # a name that could break out of the line stays a string literal
    line = al.advice([("x", 'y"); import os; print("'), ("numpy.core.multiarray", "scalar")])
    assert [type(s).__name__ for s in ast.parse(line).body] == ["Import", "ImportFrom", "Expr"], line
    assert all(not (isinstance(s, ast.Import) and any(a.name == "os" for a in s.names)) for s in ast.parse(line).body)


def test_advice_reaches_a_class_under_a_package_its_parent_hides(tmp_path, monkeypatch):
    """torchao.quantization.quantize_ is a package and, in its parent, a function: `import a.b; a.b.C` would
    reach the function; the advice's `from a.b import C` reaches the module's class."""
    pkg = tmp_path / "shadowpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub.mod import Thing as _T\n\ndef sub():\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = al.advice(["shadowpkg.sub.mod.Thing"])
    imports, _, call = line.rpartition("; ")
    ns: dict = {}
    exec(imports, ns)
    import shadowpkg
    assert callable(shadowpkg.sub) and ns["Thing"] is shadowpkg._T
    assert call == "torch.serialization.add_safe_globals([Thing])"
