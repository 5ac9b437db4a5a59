"""scan of torch.export archives (.pt2): every record torch.export.load (or AOTInductor's loader) would unpickle
or compile is found, whatever its name and whatever layout torch.load reads it in.

The hostile archives are a real ``torch.export.save`` file with records replaced; the payloads are pickles
assembled by hand (``payloads``) that would ``touch`` a marker file if a stock unpickler ran them. Nothing here
unpickles them: the tests assert that scan flags them and that no marker appears.
"""
from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch

import payloads as P
from clitools import js
from ckpttool.scanning import MAGIC_NUMBER, PROTOCOL_VERSION


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("b", torch.ones(3))
        self.const = torch.randn(3)

    def forward(self, x):
        return self.lin(x) + self.b + self.const


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "base.pt2"
    torch.manual_seed(0)
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(2, 4),)), str(path))
    return str(path)


def rewrite(src: str, dst, changes: dict, compress: int = zipfile.ZIP_STORED) -> str:
    """Copy ``src`` with records replaced (bytes), dropped (None) or added, names relative to its folder."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        folder = zi.namelist()[0].split("/")[0] + "/"
        for info in zi.infolist():
            rel = info.filename[len(folder):]
            if rel not in changes:
                zo.writestr(info.filename, zi.read(info), compress_type=compress)
            elif changes[rel] is not None:
                zo.writestr(info.filename, changes[rel], compress_type=compress)
        for rel, data in changes.items():
            if data is not None and folder + rel not in zi.namelist():
                zo.writestr(folder + rel, data, compress_type=compress)
    return str(dst)


def config(path: str, which: str = "weights") -> dict:
    with zipfile.ZipFile(path) as z:
        folder = z.namelist()[0].split("/")[0]
        return json.loads(z.read(f"{folder}/data/{which}/model_{which}_config.json"))


def system(ctx) -> bytes:
    """A protocol-2 pickle: posix.system('touch MARKER')."""
    return P.pk(P.call(P.glob("posix", "system"), P.u(ctx.cmd)))


def system0(ctx) -> bytes:
    """The same as a protocol-0 pickle: text, no \\x80 header (what a record named .json may hold)."""
    return b"cposix\nsystem\n(V" + ctx.cmd.encode() + b"\ntR."


def legacy(main: bytes, sys_info: dict = None) -> bytes:
    """torch.load's legacy (non-zip) layout: magic number, protocol version, sys_info, the main pickle, storage
    keys (the ints and dicts dumped by the stock pickler; nothing is loaded)."""
    sys_info = sys_info or {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + main + pickle.dumps([], protocol=2))


def flagged(path, tmp_path) -> dict:
    """scan --json of ``path``: it is dangerous, and posix.system is among its dangerous globals; name -> where."""
    d = js("scan", path, code=1)
    f = d["files"][0]
    assert f["verdict"] == "dangerous", f
    assert P.markers_in(tmp_path) == []
    return {g["name"]: g["where"] for g in f["details"] if g["verdict"] == "dangerous"}


def test_a_real_archive_is_safe(base):
    f = js("scan", base)["files"][0]
    assert (f["format"], f["verdict"], f["problems"]) == ("pt2", "safe", [])


# ---------------------------------------------------------------------------------------------
# finding 1: a record torch.load reads in its legacy layout: every pickle of the sequence


def test_example_inputs_in_the_legacy_layout(base, tmp_path):
    """data/sample_inputs/model.pt: torch.export.load's deserialize_torch_artifact torch.loads it (weights_only,
    then weights_only=False); a non-zip record is read as magic, protocol, sys_info, then the main pickle."""
    ctx = P.make_ctx(tmp_path)
    path = rewrite(base, tmp_path / "x.pt2", {"data/sample_inputs/model.pt": legacy(system(ctx))})
    where = flagged(path, tmp_path)
    assert where["posix.system"] == ["base/data/sample_inputs/model.pt (main pickle)"]


def test_a_pickled_weight_in_the_legacy_layout(base, tmp_path):
    ctx = P.make_ctx(tmp_path)
    cfg = config(base)
    entry = cfg["config"]["lin.bias"]
    entry["use_pickle"] = True  # torch.load(BytesIO(record), weights_only=False)
    path = rewrite(base, tmp_path / "x.pt2", {"data/weights/model_weights_config.json": json.dumps(cfg).encode(),
                                              f"data/weights/{entry['path_name']}": legacy(system(ctx))})
    assert flagged(path, tmp_path)["posix.system"] == [f"base/data/weights/{entry['path_name']} (main pickle)"]


def test_a_whole_state_dict_in_the_old_layout(base, tmp_path):
    """data/weights/model.pt (the older layout torch.export.load still reads): a legacy stream."""
    ctx = P.make_ctx(tmp_path)
    path = rewrite(base, tmp_path / "x.pt2", {"data/weights/model.pt": legacy(system(ctx))})
    assert flagged(path, tmp_path)["posix.system"] == ["base/data/weights/model.pt (main pickle)"]


def test_a_deflated_legacy_record_with_a_big_sys_info_is_streamed(base, tmp_path):
    """The main pickle past 3 MiB of sys_info, the record deflated: read as a stream, skipped to, found."""
    ctx = P.make_ctx(tmp_path)
    record = legacy(system(ctx), {"pad": b"\0" * (3 << 20)})
    path = rewrite(base, tmp_path / "x.pt2", {"data/sample_inputs/model.pt": record}, compress=zipfile.ZIP_DEFLATED)
    assert flagged(path, tmp_path)["posix.system"] == ["base/data/sample_inputs/model.pt (main pickle)"]


def test_the_storage_keys_pickle_is_scanned_too(base, tmp_path):
    ctx = P.make_ctx(tmp_path)
    record = legacy(pickle.dumps({}, protocol=2))[:-len(pickle.dumps([], protocol=2))] + system(ctx)
    path = rewrite(base, tmp_path / "x.pt2", {"data/sample_inputs/model.pt": record})
    assert flagged(path, tmp_path)["posix.system"] == ["base/data/sample_inputs/model.pt (storage keys)"]


# ---------------------------------------------------------------------------------------------
# finding 2: whatever a config names is unpickled, whatever its name


@pytest.mark.parametrize("name", ["w.json", "w.txt", "w.py", "W.JSON"])
def test_a_pickled_weight_named_like_text(base, tmp_path, name):
    ctx = P.make_ctx(tmp_path)
    cfg = config(base)
    cfg["config"]["lin.bias"].update(use_pickle=True, path_name=name)
    path = rewrite(base, tmp_path / "x.pt2", {"data/weights/model_weights_config.json": json.dumps(cfg).encode(),
                                              f"data/weights/{name}": system0(ctx)})
    assert flagged(path, tmp_path)["posix.system"] == [f"base/data/weights/{name}"]


@pytest.mark.parametrize("record", ["tensor_0.json", "opaque_obj_0", "custom_obj_0.txt"])
def test_constants_named_like_text(base, tmp_path, record):
    """Pickled tensor constants (torch.load), opaque objects (pickle.loads), script objects: any name."""
    ctx = P.make_ctx(tmp_path)
    cfg = {"config": {"c": {"path_name": record, "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    path = rewrite(base, tmp_path / "x.pt2", {"data/constants/model_constants_config.json": json.dumps(cfg).encode(),
                                              f"data/constants/{record}": system0(ctx)})
    assert flagged(path, tmp_path)["posix.system"] == [f"base/data/constants/{record}"]


def test_a_record_no_config_names_is_scanned_all_the_same(base, tmp_path):
    """Conservative: every record but the ones the loaders only parse as JSON or read as strings."""
    ctx = P.make_ctx(tmp_path)
    path = rewrite(base, tmp_path / "x.pt2", {"data/notes.txt": system0(ctx)})
    assert flagged(path, tmp_path)["posix.system"] == ["base/data/notes.txt"]


def test_records_read_only_as_json_or_strings_are_not_taken_for_pickles(base, tmp_path):
    """extra/ records (read_string) and models/ (json.loads) are never unpickled: text in them that starts like
    a protocol-0 GLOBAL names nothing."""
    path = rewrite(base, tmp_path / "x.pt2", {"extra/notes": b"cos\nsystem\n(Vhello\ntR."})
    f = js("scan", path)["files"][0]
    assert (f["verdict"], f["globals"]) == ("safe", js("scan", base)["files"][0]["globals"])


# ---------------------------------------------------------------------------------------------
# finding 3: C++ source AOTInductor compiles on load, with the compiler command the package gives


def _flags(compiler: str) -> bytes:
    return json.dumps({"compiler": compiler, "compile_only": True, "cflags": [], "definitions": [],
                       "include_dirs": [], "ldflags": [], "libraries_dirs": [], "libraries": [],
                       "passthrough_args": []}).encode()


def test_an_aoti_package_of_source_and_no_library_is_native_code(base, tmp_path):
    d = "data/aotinductor/model/"
    marker = tmp_path / "MARKER"
    path = rewrite(base, tmp_path / "x.pt2", {
        d + "model.wrapper.cpp": b"int x;\n",
        d + "model.wrapper_metadata.json": b'{"AOTI_DEVICE_KEY": "cpu"}',
        d + "model.wrapper_compile_flags.json": _flags(f"touch {marker}; true"),
        d + "model.wrapper_linker_flags.json": _flags("true"),
    })
    d_ = js("scan", path, code=1)["files"][0]
    native = next(g for g in d_["details"] if g["name"] == "<native code>")
    assert native["verdict"] == "dangerous" and native["where"] == [f"base/{d}model.wrapper.cpp"]
    assert P.markers_in(tmp_path) == []


def test_source_beside_its_library_is_not_flagged_again(base, tmp_path):
    d = "data/aotinductor/model/"
    path = rewrite(base, tmp_path / "x.pt2", {d + "model.wrapper.cpp": b"int x;\n",
                                              d + "model.wrapper.so": b"\x7fELF" + bytes(60)})
    native = next(g for g in js("scan", path, code=1)["files"][0]["details"] if g["name"] == "<native code>")
    assert native["where"] == [f"base/{d}model.wrapper.so"]


def test_source_in_another_model_folder_than_the_library_is_flagged(base, tmp_path):
    path = rewrite(base, tmp_path / "x.pt2", {"data/aotinductor/a/a.wrapper.cpp": b"int x;\n",
                                              "data/aotinductor/b/b.wrapper.so": b"\x7fELF" + bytes(60)})
    native = next(g for g in js("scan", path, code=1)["files"][0]["details"] if g["name"] == "<native code>")
    assert sorted(native["where"]) == ["base/data/aotinductor/a/a.wrapper.cpp", "base/data/aotinductor/b/b.wrapper.so"]
