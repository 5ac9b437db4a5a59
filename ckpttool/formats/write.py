"""What convert and filter share about outputs: the format OUT names (``--to`` or its extension), and the
plan of a folder of torch.save shards. The writers themselves stream from the source: ``torch_writer.py``,
``safetensors_writer.py``."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import UsageError

TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".tar")
TARGETS = {"state_dict": "state_dict", "pt": "state_dict", "torch": "state_dict", "safetensors": "safetensors",
           "onnx": "onnx", "dcp": "dcp"}
_BY_EXTENSION = {".safetensors": "safetensors", ".onnx": "onnx", **{e: "state_dict" for e in TORCH_EXTENSIONS}}


def target_format(out: str, to: Optional[str] = None,
                  allowed: Tuple[str, ...] = ("state_dict", "safetensors", "onnx", "dcp")) -> str:
    """``state_dict`` | ``safetensors`` | ``onnx`` | ``dcp``: from ``to`` when given, else OUT's extension.

    >>> target_format("m.safetensors"), target_format("m.pth"), target_format("dir", "pt")
    ('safetensors', 'state_dict', 'state_dict')
    """
    names = sorted(k for k, v in TARGETS.items() if v in allowed)
    if to:
        if TARGETS.get(to) not in allowed:
            raise UsageError(f"unknown output format {to!r} ({', '.join(names)})")
        ext = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
        named = _BY_EXTENSION.get(ext) if ext != ".bin" else None  # .bin names any bytes; the others say one
        if named is not None and named != TARGETS[to]:  # a .safetensors file holding a torch.save zip misleads
            raise UsageError(f"--to {to} writes {TARGETS[to]}, but {os.path.basename(out.rstrip('/' + os.sep))!r} "
                             f"is named for {named}: name OUT for what it holds, or leave --to out")
        return TARGETS[to]
    found = _BY_EXTENSION.get(os.path.splitext(out)[1].lower())
    read_only = {".gguf": "GGUF", ".pt2": "a torch.export archive", ".distcp": "a DCP chunk"}.get(
        os.path.splitext(out)[1].lower())
    if read_only:
        raise UsageError(f"ckpttool reads {read_only} but does not write one ({os.path.basename(out)!r})",
                         hint="write .pt, .safetensors or .onnx")
    if found not in allowed:
        exts = [e for f, e in (("state_dict", ".pt/.pth/.bin"), ("safetensors", ".safetensors"), ("onnx", ".onnx"))
                if f in allowed]
        named = exts[0] if len(exts) == 1 else ", ".join(exts[:-1]) + " or " + exts[-1]
        raise UsageError(f"cannot tell the output format from {os.path.basename(out)!r}",
                         hint=f"name it {named}, or pass --to")
    return found


def shards_to(out: str, to: Optional[str]) -> Optional[str]:
    """The --to of a sharded output: the one given, else OUT's extension decides, else (a folder named
    without one) HF's safetensors shards."""
    return to or (None if os.path.splitext(out)[1] else "safetensors")


def output_format(path: str, to: Optional[str] = None) -> str:
    """``"torch"`` or ``"safetensors"`` for a state_dict output.

    >>> output_format("out.safetensors"), output_format("out.pth"), output_format("x", "pt")
    ('safetensors', 'torch', 'torch')
    """
    found = target_format(path, to, allowed=("state_dict", "safetensors"))
    return "torch" if found == "state_dict" else found


def plan_storage_shards(items: Sequence[Tuple[str, Any, int]], max_bytes: int) -> List[List[str]]:
    """Names in order, split into shards of at most ``max_bytes`` of storage bytes; ``items`` is
    (name, storage identity, storage bytes). Tensors that share a storage stay in one shard (torch.save
    keeps them tied there); a storage bigger than ``max_bytes`` gets a shard of its own."""
    shards: List[List[str]] = [[]]
    where: Dict[Any, int] = {}
    size = 0
    for name, ident, nbytes in items:
        if ident in where:
            shards[where[ident]].append(name)
            continue
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        where[ident] = len(shards) - 1
        shards[-1].append(name)
        size += nbytes
    return shards


TORCH_INDEX = "pytorch_model.bin.index.json"


def write_torch_shard_files(folder: str, items: Sequence[Tuple[str, Any, int]], max_bytes: int,
                            save: Callable[[str, List[str]], None]) -> List[str]:
    """HF-style torch.save shards + ``pytorch_model.bin.index.json`` into ``folder``; the file names.

    ``items``: (name, storage identity, storage bytes) as :func:`plan_storage_shards` takes them;
    ``save(path, names)`` writes one shard of those tensors."""
    from .safetensors_writer import index_bytes, shard_names
    shards = plan_storage_shards(items, max_bytes)
    names = shard_names(len(shards), "pytorch_model", ".bin")
    for shard, name in zip(shards, names):
        save(os.path.join(folder, name), shard)
    total = sum({ident: nbytes for _, ident, nbytes in items}.values())  # each storage once
    with open(os.path.join(folder, TORCH_INDEX), "wb") as f:  # total_size: the storage bytes in the shards
        f.write(index_bytes({"total_size": total}, {t: name for shard, name in zip(shards, names) for t in shard}))
    return names + [TORCH_INDEX]
