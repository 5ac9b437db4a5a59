"""Checkpoint folders: which file in a folder is the checkpoint, and what the folder says about it.

A transformers model folder (``config.json`` beside ``model.safetensors``, ``pytorch_model.bin`` or a
shard index), a PEFT adapter folder (``adapter_config.json`` beside ``adapter_model.safetensors`` or
``adapter_model.bin``), or any folder holding one checkpoint. The weights are chosen as the writing
library's loader chooses them (safetensors before ``.bin``, an index before a single file), and every
other weight file in the folder is named as ignored, with why. The config is read as JSON (bounded,
no hooks) and shown: the architecture and dtype of a model, the type, rank, alpha and targets of an
adapter. Nothing in a config changes what the weights are.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from ..checkpoint import Checkpoint
from ..errors import FileAccessError, FormatError

MAX_CONFIG = 16 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".pt2", ".index.json",
                   ".distcp", ".metadata")

# in the order the loaders look for them: transformers' from_pretrained (config.json's transformers_weights
# first, then model.safetensors, its index, pytorch_model.bin, its index: a single file before shards) and
# peft's (adapter_model.safetensors before adapter_model.bin)
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Folder:
    """What a checkpoint folder holds: the file read, the files ignored (name, why), the config shown."""

    path: str
    kind: str                        # "transformers" | "peft" | "folder"
    entry: str                       # the file read (an index, or one checkpoint file)
    ignored: List[Tuple[str, str]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    config_error: Optional[str] = None


def _listing(path: str) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise FileAccessError(f"cannot list directory: {e.strerror or e}", path) from None


def _is_weights(name: str) -> bool:
    low = name.lower()
    return low == ".metadata" or low.endswith(WEIGHT_SUFFIXES) and not low.startswith(".")


def find(path: str) -> Folder:
    """The checkpoint a folder holds, as its writing library's loader would pick it.

    Raises FormatError where the folder holds none, or several with no rule to choose between them.
    """
    names = _listing(path)
    files = {n for n in names if os.path.isfile(os.path.join(path, n))}
    if "adapter_config.json" in files:
        kind, preferred, config_name = "peft", ADAPTER_FILES, "adapter_config.json"
    elif "config.json" in files:
        kind, preferred, config_name = "transformers", MODEL_FILES, "config.json"
    else:
        kind, preferred, config_name = "folder", MODEL_FILES, None
    config: Dict[str, Any] = {}
    config_error = None
    if config_name:
        config, config_error, explicit = _config(os.path.join(path, config_name), kind)
        if explicit is not None:  # config.json's transformers_weights: what from_pretrained loads first
            from .sharded import inside
            full = inside(path, explicit, os.path.join(path, config_name))
            if not os.path.isfile(full):
                raise FileAccessError(f"config.json names transformers_weights {explicit!r}, which is missing",
                                      path)
            files.add(explicit)
            preferred = (explicit,) + tuple(n for n in preferred if n != explicit)
    chosen = next((n for n in preferred if n in files), None)
    if chosen is None:
        indexes = [n for n in names if n.endswith(".index.json")]
        singles = [n for n in names if n.endswith(".onnx")]
        if len(indexes) == 1:
            chosen = indexes[0]
        elif not indexes and len(singles) == 1:
            chosen = singles[0]
    if chosen is None:
        what = {"peft": "adapter folder has no adapter_model.safetensors or adapter_model.bin",
                "transformers": "model folder has no model.safetensors, pytorch_model.bin or shard index"}.get(
            kind, "directory holds no checkpoint (no *.index.json, model.safetensors, pytorch_model.bin or "
                  "single .onnx model)")
        raise FormatError(what, path)
    folder = Folder(path=path, kind=kind, entry=os.path.join(path, chosen))
    used = {chosen} | _indexed_shards(folder.entry)
    for n in names:
        if n in used or not _is_weights(n) or n not in files:
            continue
        if n in preferred:
            why = f"{chosen} is read first, as {'peft' if kind == 'peft' else 'transformers'} loads"
        elif n in (".metadata",) or n.endswith(".distcp"):
            why = "a torch.distributed.checkpoint beside it, which from_pretrained does not read"
        elif n.endswith(".index.json") or _looks_like_shard(n):
            why = "shards of another copy of the weights"
        else:
            why = "not a weight file the loader reads"
        folder.ignored.append((n, why))
    folder.config, folder.config_error = config, config_error
    return folder


def _looks_like_shard(name: str) -> bool:
    return "-of-" in name and (name.endswith(".safetensors") or name.endswith(".bin"))


def _indexed_shards(entry: str) -> set:
    """The shard files an index names (read by the index reader, so not 'ignored')."""
    if not entry.endswith(".index.json"):
        return set()
    try:
        with open(entry, "rb") as f:
            data = json.loads(f.read(64 << 20))
        return {v for v in data.get("weight_map", {}).values() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()  # the index reader gives the error


def _config(path: str, kind: str) -> Tuple[Dict[str, Any], Optional[str], Optional[str]]:
    """The config's fields worth showing, or why it could not be read (a note: the weights still read), and
    the weight file it names (config.json's ``transformers_weights``), if any."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG + 1)
    except OSError as e:
        return {}, f"cannot read {os.path.basename(path)}: {e.strerror or e}", None
    if len(text) > MAX_CONFIG:
        return {}, f"{os.path.basename(path)} is larger than {MAX_CONFIG >> 20} MiB: not read", None
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return {}, f"{os.path.basename(path)} is not valid JSON: {str(e)[:120]}", None
    if not isinstance(data, dict):
        return {}, f"{os.path.basename(path)} is not a JSON object", None
    keys = PEFT_KEYS if kind == "peft" else MODEL_KEYS
    explicit = data.get("transformers_weights") if kind == "transformers" else None
    if explicit is not None and not isinstance(explicit, str):
        raise FormatError("config.json's transformers_weights is not a file name", path)
    return {k: _flat(data[k]) for k in keys if k in data}, None, explicit


PEFT_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
             "target_modules", "modules_to_save", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
             "init_lora_weights", "rank_pattern", "alpha_pattern", "revision")
MODEL_KEYS = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "transformers_weights",
              "tie_word_embeddings", "hidden_size", "num_hidden_layers", "vocab_size", "quantization_config")


def _flat(v: Any, depth: int = 0) -> Any:
    """A JSON value kept small: long lists and deep objects cut (the config is someone else's file)."""
    if isinstance(v, list):
        if depth > 2:
            return f"[{len(v)} items]"
        out = [_flat(x, depth + 1) for x in v[:32]]
        return out + [f"... {len(v) - 32} more"] if len(v) > 32 else out
    if isinstance(v, dict):
        if depth > 2:
            return f"{{{len(v)} keys}}"
        return {str(k)[:200]: _flat(x, depth + 1) for k, x in list(v.items())[:32]}
    if isinstance(v, str):
        return v[:500]
    return v


def _text(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items()) or "{}"
    return str(v)


def details(folder: Folder) -> List[List[str]]:
    """inspect's rows for a folder: what it is, its config, the files read and ignored."""
    c = folder.config
    rows: List[List[str]] = []
    if folder.kind == "peft":
        bits = [str(c.get("peft_type", "adapter"))]
        if "r" in c:
            bits.append(f"r={c['r']}")
        if "lora_alpha" in c:
            bits.append(f"alpha={c['lora_alpha']}")
        if c.get("use_dora"):
            bits.append("DoRA")
        if "task_type" in c and c["task_type"]:
            bits.append(f"task {c['task_type']}")
        rows.append(["adapter", " ".join(bits[:1]) + (f" ({', '.join(bits[1:])})" if bits[1:] else "")
                     + " (adapter_config.json)"])
        if "target_modules" in c:
            rows.append(["targets", _text(c["target_modules"])])
        if c.get("modules_to_save"):
            rows.append(["also saved", _text(c["modules_to_save"])])
        if c.get("base_model_name_or_path"):
            rows.append(["base model", str(c["base_model_name_or_path"])])
    elif folder.kind == "transformers":
        arch = _text(c["architectures"]) if c.get("architectures") else "not named"
        dtype = c.get("dtype", c.get("torch_dtype"))
        model = f" (model_type {c['model_type']})" if c.get("model_type") else ""
        rows.append(["model", f"{arch}{model}, config dtype {dtype if dtype is not None else 'not set'} "
                              f"(config.json)"])
        if c.get("quantization_config"):
            q = c["quantization_config"]
            rows.append(["quantization", _text(q.get("quant_method", q) if isinstance(q, dict) else q)])
        if c.get("transformers_version"):
            rows.append(["written by", f"transformers {c['transformers_version']}"])
    if folder.config_error:
        rows.append(["config", folder.config_error])
    rows.append(["read", os.path.basename(folder.entry)])
    for i, (n, why) in enumerate(folder.ignored[:8]):
        rows.append(["ignored" if i == 0 else "", f"{n} ({why})"])
    if len(folder.ignored) > 8:
        rows.append(["", f"... and {len(folder.ignored) - 8} more"])
    return rows


def annotate(ckpt: Checkpoint, folder: Folder) -> Checkpoint:
    """``ckpt`` (the folder's weights) with what the folder says: its kind, config, files read and ignored."""
    meta = dict(ckpt.metadata)
    meta["folder"] = {"path": folder.path, "kind": folder.kind, "read": os.path.basename(folder.entry),
                      "ignored": [{"file": n, "why": why} for n, why in folder.ignored]}
    if folder.config:
        meta["adapter_config" if folder.kind == "peft" else "config"] = folder.config
    if folder.config_error:
        meta["folder"]["config_error"] = folder.config_error
    meta["details"] = details(folder) + list(meta.get("details") or [])
    return replace(ckpt, metadata=meta)

