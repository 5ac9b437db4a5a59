"""Writing a state_dict of torch tensors as a torch.save file or a safetensors file."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import UsageError
from ..writing import atomic_output, folder_output, writing

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


def write_state_dict(tensors: Mapping[str, Any], out: str, fmt: str,
                     metadata: Optional[Dict[str, str]] = None, check: Optional[Callable[[str], None]] = None) -> None:
    """Write ``tensors`` (name -> torch.Tensor) to ``out`` atomically.

    torch: ``torch.save`` of a plain dict (loadable with ``weights_only=True``);
    tensors that are the same object stay shared. safetensors: every tensor
    stored contiguously, each on its own (safetensors holds no shared storage).
    """
    import torch
    if fmt == "safetensors":
        from .safetensors_writer import dtype_code
        for name, t in tensors.items():
            dtype_code(str(t.dtype).replace("torch.", ""))  # a UsageError naming the dtype safetensors lacks
    with writing(out), atomic_output(out) as tmp:
        if fmt == "torch":
            torch.save(dict(tensors), tmp)
        else:
            from safetensors.torch import save_file
            ties = tied_names(tensors)
            seen: Dict[int, Any] = {}
            flat = {}
            for name, t in tensors.items():
                if name in ties:  # stored once, under the kept name; the header says which
                    continue
                t = t.contiguous()
                if id(t) in seen or t.untyped_storage().data_ptr() in seen:
                    t = t.clone()
                seen[id(t)] = seen[t.untyped_storage().data_ptr()] = True
                flat[name] = t
            save_file(flat, tmp, metadata={**({"format": "pt"} if ties else {}), **ties, **(metadata or {})}
                      or None)
        if check is not None:
            check(tmp)


def tied_names(tensors: Mapping[str, Any]) -> Dict[str, str]:
    """``{dropped name: kept name}`` for torch tensors that are the same view of one storage, as convert's
    writer and ``safetensors.torch.save_model`` do it: of the names over the same bytes, the first (sorted) that
    covers its whole storage is kept; ``load_model`` (and ckpttool's readers) tie the others again."""
    groups: Dict[Any, list] = {}
    for name, t in tensors.items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.device), []).append(name)
    out: Dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        def whole(n: str) -> bool:
            t = tensors[n]
            return t.storage_offset() == 0 and t.is_contiguous() and \
                t.numel() * t.element_size() == t.untyped_storage().nbytes()
        complete = sorted(n for n in names if whole(n))
        if complete:
            keep = tensors[complete[0]]
            for n in names:
                t = tensors[n]
                if n != complete[0] and (t.shape, t.dtype, t.storage_offset(), t.stride()) == \
                        (keep.shape, keep.dtype, keep.storage_offset(), keep.stride()):
                    out[n] = complete[0]
    return out


def write_safetensors_shards(tensors: Mapping[str, Any], out: str, max_bytes: int,
                             check: Optional[Callable[[str], None]] = None) -> None:
    """Write ``tensors`` as HF-style shards + ``model.safetensors.index.json`` into the folder ``out``.

    Built in a temporary folder beside ``out``; ``check(tmp_folder)`` runs before it is renamed into place.
    """
    import torch
    from .safetensors_writer import EntryOut, dtype_code, write_shards
    entries = []
    for name, t in tensors.items():
        dtype = str(t.dtype).replace("torch.", "")
        dtype_code(dtype)  # a UsageError naming a dtype safetensors lacks
        entries.append(EntryOut(name, dtype, tuple(t.shape),
                                lambda t=t: iter([t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                                  if t.numel() else b""])))
    with writing(out), folder_output(out) as tmpdir:
        write_shards(tmpdir, entries, max_bytes, {"format": "pt"})
        if check is not None:
            check(tmpdir)


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


def write_torch_shards(tensors: Mapping[str, Any], out: str, max_bytes: int,
                       check: Optional[Callable[[str], None]] = None) -> None:
    """Write ``tensors`` (name -> torch.Tensor) as torch.save shards + ``pytorch_model.bin.index.json`` in ``out``.

    Built in a temporary folder beside ``out``; ``check(tmp_folder)`` runs before it is renamed into place.
    """
    import torch
    items = [(n, t.untyped_storage().data_ptr() or id(t), t.untyped_storage().nbytes()) for n, t in tensors.items()]
    with writing(out), folder_output(out) as tmpdir:
        write_torch_shard_files(tmpdir, items, max_bytes, lambda p, shard: torch.save({n: tensors[n] for n in shard}, p))
        if check is not None:
            check(tmpdir)
