"""HF-style sharded checkpoints: ``*.safetensors.index.json`` / ``pytorch_model.bin.index.json``.

The index maps each tensor name to a shard file in the same folder. Shard
names are checked to stay inside that folder (no absolute paths, no ``..``,
no symlink escaping it); each shard is read by its own reader, lazily.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

from ..errors import FileAccessError, FormatError
from ..checkpoint import Checkpoint, TensorRef
from ..tree import as_entry  # a state_dict value as one entry: a tensor, a quantized module's dtype / packed
from .safetensors import parse_json

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_INDEX = 64 << 20


def inside(folder: str, name: str, referrer: str) -> str:
    """Resolve ``name`` relative to ``folder``; refuse anything that leaves it (errors name ``referrer``)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        raise FormatError(f"refers to {name!r:.300}, which is not a relative file name", referrer)
    root = os.path.realpath(folder)
    full = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root:
        raise FormatError(f"refers to {name!r:.300}, outside its folder", referrer)
    return full


def read(path: str, open_file: Callable[[str], Checkpoint]) -> Checkpoint:
    """Read a shard index and every shard's metadata into one flat state_dict."""
    with open(path, "rb") as f:
        text = f.read(MAX_INDEX + 1)
    if len(text) > MAX_INDEX:
        raise FormatError(f"shard index is larger than {MAX_INDEX >> 20} MiB", path)
    index = parse_json(text, "shard index", path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError("shard index has no weight_map of tensor name -> shard file", path)
    folder = os.path.dirname(os.path.abspath(path))
    shards: Dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        full = inside(folder, shard, path)
        if not os.path.isfile(full):
            raise FileAccessError(f"shard {shard} named by the index is missing", path)
        if shard.endswith(".json"):
            raise FormatError(f"shard {shard} is itself an index, not a checkpoint file", path)
        shards[shard] = open_file(full)
    tensors: Dict[str, TensorRef] = {}
    for name, shard in weight_map.items():
        ckpt = shards[shard]
        flat = ckpt.root if isinstance(ckpt.root, dict) else {}
        t = flat.get(name) if name in flat else ()
        t = t if isinstance(t, TensorRef) or t == () else as_entry(t)
        if not isinstance(t, TensorRef):
            raise FormatError(f"tensor {name!r} is indexed in {shard} but that shard does not hold it", path)
        tensors[name] = t
    for shard, ckpt in shards.items():
        ties = ckpt.metadata.get("_ties", {})
        extra = [k for k, v in (ckpt.root.items() if isinstance(ckpt.root, dict) else ())
                 if (isinstance(v, TensorRef) or as_entry(v) is not None) and weight_map.get(k) != shard
                 and k not in ties]
        if extra:
            raise FormatError(f"shard {shard} holds {extra[0]!r}, which the index does not map to it", path)
    # tied names save_model dropped, recorded in a shard's header, whose twin is in another shard
    from .safetensors import restore_ties
    for ckpt in shards.values():
        restore_ties(tensors, ckpt.metadata.get("metadata") or {})
    kinds = {c.format for c in shards.values()}
    raw_meta = index.get("metadata")
    # only flat values are kept: the index is someone else's JSON, shown back to the user
    meta = {"shards": list(shards), "index_metadata": {
        str(k): v for k, v in (raw_meta.items() if isinstance(raw_meta, dict) else ())
        if isinstance(v, (str, int, float, bool)) or v is None}}
    declared = meta["index_metadata"].get("total_size")
    fmt = "safetensors_sharded" if kinds == {"safetensors"} else "torch_sharded"
    total = os.path.getsize(path) + sum(c.file_size for c in shards.values())
    globs = tuple(g for c in shards.values() for g in c.globals)
    files = (path,) + tuple(f for c in shards.values() for f in c.files)
    if declared is not None:
        meta["declared_total_size"] = declared
    return Checkpoint(path=path, format=fmt, file_size=total, root=tensors, metadata=meta,
                      globals=tuple(dict.fromkeys(globs)), files=files)
