"""The checkpoint model every reader produces: a :class:`Checkpoint` (the tree of entries a file holds) with
each tensor as a :class:`TensorRef` (metadata, and a way to read its bytes later from the file itself), the
storages they view, the rebuild calls torch.save wrote. Nothing here imports torch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

from .dtypes import itemsize
from .errors import FormatError


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage of the file: the bytes one or more tensors view.

    ``key`` identifies it within its file; ``device`` is the location tag the
    file carries (``cpu``, ``cuda:1``); ``source`` reads its bytes lazily.
    """

    key: str
    dtype: str
    device: str
    nbytes: int
    source: Any = None
    file: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype, "device": self.device, "nbytes": self.nbytes}


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor's metadata and a lazy handle on its bytes.

    >>> t = TensorRef(shape=(2, 3), dtype="float32", stride=(3, 1))
    >>> t.numel, t.nbytes, t.is_contiguous
    (6, 24, True)
    """

    shape: Tuple[int, ...]
    dtype: str
    stride: Tuple[int, ...] = ()
    storage_offset: int = 0
    storage: Optional[StorageRef] = None
    device: str = "cpu"
    requires_grad: bool = False
    is_parameter: bool = False
    kind: str = "dense"          # dense | quantized | meta | string | packed | sparse_coo... | nested | subclass
    subclass: Optional[str] = None  # e.g. a tensor subclass "mypkg.MyTensor"
    explicit_nbytes: Optional[int] = None
    #: The element count torch gives (``numel()``) where ``shape`` cannot say it: a nested tensor, whose rows
    #: differ in length (``shape`` holds ``"j"`` for a ragged dim, as torch prints ``j1``).
    explicit_numel: Optional[int] = None
    #: torch.save's tensor metadata (``_rebuild_tensor_v2``'s last argument), as (key, value) pairs: the conj
    #: and neg bits of a view torch has not materialised. The bytes are the un-conjugated, un-negated values.
    metadata: Tuple[Tuple[str, Any], ...] = ()
    #: A tensor made of other tensors (sparse, nested, a wrapper subclass): its components by name.
    parts: Tuple[Tuple[str, "TensorRef"], ...] = ()
    #: The call torch.save wrote for this tensor, kept where ckpttool writes it back as it was (``Rebuild``).
    rebuild: Any = None
    #: The bytes in the file are encoded (a GGUF quantized type, ``"Q4_K"``): the storage's source gives the
    #: decoded values, of ``dtype``; ``encoded_nbytes`` is what the tensor takes in the file.
    encoding: Optional[str] = None
    encoded_nbytes: Optional[int] = None

    @property
    def numel(self) -> int:
        if self.explicit_numel is not None:
            return self.explicit_numel
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype) or 1

    @property
    def nbytes(self) -> int:
        if self.explicit_nbytes is not None:
            return self.explicit_nbytes
        return self.numel * itemsize(self.dtype)

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True

    @property
    def has_data(self) -> bool:
        return self.storage is not None and self.storage.source is not None

    @property
    def bits(self) -> Tuple[str, ...]:
        """The view bits torch applies on load (``conj``, ``neg``): the values are not the bytes."""
        return tuple(k for k, v in self.metadata if v)

    @property
    def is_composite(self) -> bool:
        """Made of other tensors (``parts``), not one storage region."""
        return bool(self.parts)

    @property
    def form(self) -> str:
        """How torch holds it, in words: ``dense``, ``sparse_coo``, ``conj view``, ``subclass mypkg.T``..."""
        out = self.kind
        if self.kind == "value":
            v = getattr(self.rebuild, "value", None)
            return f"value torch.{v}" if type(v).__name__ == "TorchDtype" else f"value {v!r}"
        if self.kind == "jagged":  # torch.nested's own subclass: its long name says nothing more
            out = "jagged nested"
        elif self.kind == "quantized":
            out = _quantizer(self.rebuild)
        elif self.subclass in ("torch.Tensor", "torch.nn.parameter.Parameter") and self.kind == "dense":
            # torch's own class, saved with attributes of its own (_rebuild_from_type_v2's state)
            what = "tensor" if self.subclass == "torch.Tensor" else "parameter"
            out = f"{what} with attributes ({_attribute_names(self.rebuild)})"
        elif self.subclass:
            out = f"subclass {self.subclass}" if self.kind in ("dense", "subclass") else f"{out} {self.subclass}"
        elif isinstance(self.rebuild, Rebuild) and self.rebuild.name == "_rebuild_parameter_with_state":
            out = f"parameter with attributes ({_attribute_names(self.rebuild)})" + ("" if out == "dense" else
                                                                                     f" ({out})")
        if self.bits:
            out = " ".join(self.bits) + " view" + ("" if out == "dense" else f" ({out})")
        if self.encoding:
            out = f"{self.encoding} (read dequantized as {self.dtype})" + ("" if out == "dense" else f" ({out})")
        return out

    def attributes(self) -> Optional[Tuple["TensorRef", Any]]:
        """``(the tensor without them, the attributes)`` of a tensor saved with attributes of its own (a
        Parameter with state, torch's own Tensor/Parameter class through ``_rebuild_from_type_v2``), else
        None. The attributes are the rebuild's state argument, as torch sets them on load."""
        r = self.rebuild
        if not isinstance(r, Rebuild):
            return None
        state = r.args[3] if len(r.args) > 3 else None
        if r.name == "_rebuild_parameter_with_state" and r.args and isinstance(r.args[0], TensorRef):
            return r.args[0], state
        if r.name == "_rebuild_from_type_v2" and self.kind == "dense" and not self.parts and \
                self.subclass in ("torch.Tensor", "torch.nn.parameter.Parameter"):
            import dataclasses
            return dataclasses.replace(self, subclass=None, rebuild=None), state
        return None

    @property
    def value_form(self) -> str:
        """The form of the tensor its values make (``form`` less a file encoding): what a copy written
        elsewhere holds. A GGUF Q4_K tensor read as float32 values is a ``dense`` float32 tensor."""
        if not self.encoding:
            return self.form
        import dataclasses
        return dataclasses.replace(self, encoding=None, encoded_nbytes=None).form

    def span(self) -> Tuple[int, int]:
        """(first byte, byte length) of the storage region this tensor touches."""
        size = itemsize(self.dtype) or 1
        if self.numel == 0:
            return self.storage_offset * size, 0
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.storage_offset * size, (last - self.storage_offset + 1) * size

    def read_bytes(self) -> bytes:
        """The tensor's bytes in C order (gathered when the tensor is a strided view)."""
        if not self.has_data:
            raise FormatError(f"tensor has no data in the file (a {self.kind} tensor)", self.storage.file if self.storage else None)
        start, length = self.span()
        if self.is_contiguous or self.numel <= 1:
            return self.storage.source.read(start, self.nbytes)
        from .numbers import gather
        return gather(self.storage.source.read(start, length), self.shape, self.stride, itemsize(self.dtype))

    def iter_chunks(self, chunk_bytes: int = 1 << 26) -> Iterator[bytes]:
        """Yield the tensor's C-order bytes in bounded pieces (whole elements each)."""
        if not (self.is_contiguous or self.numel <= 1):
            yield from self._gathered_chunks(chunk_bytes)
            return
        size = itemsize(self.dtype) or 1
        step = max(size, chunk_bytes - chunk_bytes % size)
        start, _ = self.span()
        total = self.nbytes
        for off in range(0, total, step):
            yield self.storage.source.read(start + off, min(step, total - off))

    def _gathered_chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """A strided view's C-order bytes, gathered a block of leading indices at a time: an expand()ed tensor
        (stride 0) many times larger than its storage is never gathered whole."""
        from .numbers import gather
        size = itemsize(self.dtype) or 1
        lead = 0  # the leading dims iterated over; the rest (at most chunk_bytes, or one element row) per piece
        inner = self.numel * size
        while lead < len(self.shape) - 1 and inner > chunk_bytes:
            inner //= max(self.shape[lead], 1)
            lead += 1
        if inner > max(chunk_bytes, 1 << 30) or self.nbytes >= 1 << 50:
            raise FormatError(f"a strided view of shape {self.shape} ({self.nbytes} bytes, from a storage of "
                              f"{self.storage.nbytes if self.storage else 0}) is too large to gather: its rows alone "
                              f"are {inner} bytes", self.storage.file if self.storage else None)
        if lead == 0:
            yield self.read_bytes()
            return
        import itertools
        for index in itertools.product(*(range(n) for n in self.shape[:lead])):
            offset = self.storage_offset + sum(i * st for i, st in zip(index, self.stride))
            part = TensorRef(shape=self.shape[lead:], dtype=self.dtype, stride=self.stride[lead:],
                             storage_offset=offset, storage=self.storage)
            start, length = part.span()
            yield gather(self.storage.source.read(start, length), part.shape, part.stride, size) \
                if not part.is_contiguous else self.storage.source.read(start, part.nbytes)

    def to_torch(self):
        """Materialize as a contiguous CPU torch tensor (imports torch): the values torch loads, a conj or neg
        view's bits applied (and resolved).

        A strided view is read as the storage region it spans and gathered by torch.
        """
        t = self._stored_torch()
        if self.metadata:
            bits = self.bits
            if "conj" in bits:
                t = t.conj().resolve_conj()
            if "neg" in bits:
                t = t.neg()
        return t

    def _stored_torch(self):
        from .torch_bridge import tensor_from_bytes, torch_dtype
        if self.is_contiguous or self.numel <= 1:
            source = self.storage.source if self.has_data else None
            if hasattr(source, "readinto") and self.nbytes:  # read straight into the tensor: one copy in memory
                import torch
                flat = torch.empty(self.nbytes, dtype=torch.uint8)
                source.readinto(self.span()[0], memoryview(flat.numpy()))
                return flat.view(torch_dtype(self.dtype)).reshape(self.shape)
            return tensor_from_bytes(self.read_bytes(), self.dtype, self.shape)
        if not self.has_data:
            return tensor_from_bytes(self.read_bytes(), self.dtype, self.shape)  # raises the no-data error
        start, length = self.span()
        flat = tensor_from_bytes(self.storage.source.read(start, length), self.dtype, (length // itemsize(self.dtype),))
        return flat.as_strided(self.shape, self.stride).contiguous()

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "shape": list(self.shape), "dtype": self.dtype, "device": self.device,
            "nbytes": self.nbytes, "stride": list(self.stride), "storage_offset": self.storage_offset,
            "requires_grad": self.requires_grad, "is_parameter": self.is_parameter,
        }
        if self.kind != "dense":
            d["kind"] = self.kind
        if self.subclass:
            d["subclass"] = self.subclass
        if self.bits:
            d["bits"] = list(self.bits)
        if self.parts:
            d["parts"] = {name: p.to_dict() for name, p in self.parts}
        return d


# Fast makers for the records readers make once per storage or tensor (20,000 of each in some files):
# a frozen dataclass's __init__ sets each field with object.__setattr__ (2 us for a TensorRef); these
# set them in the instance's __dict__, in field order, so that it stays a compact key-sharing dict
# (0.5 us). The instance is the same as the constructor's, every field set (tests/test_records.py holds
# them to that); none of these classes has a __post_init__.
new_instance = object.__new__  # an instance with no field set: the fast makers fill its __dict__


def new_storage_ref(key: str, dtype: str, device: str, nbytes: int, source: Any, file: str) -> StorageRef:
    """``StorageRef(key=key, dtype=dtype, ...)``, made faster."""
    ref = new_instance(StorageRef)
    d = ref.__dict__
    d["key"] = key
    d["dtype"] = dtype
    d["device"] = device
    d["nbytes"] = nbytes
    d["source"] = source
    d["file"] = file
    return ref


def new_tensor_ref(shape: Tuple[int, ...], dtype: str, stride: Tuple[int, ...], storage_offset: int,
                   storage: Optional[StorageRef], device: str, requires_grad: bool, kind: str) -> TensorRef:
    """``TensorRef(shape=shape, ...)`` with the other fields at their defaults, made faster."""
    t = new_instance(TensorRef)
    d = t.__dict__
    d["shape"] = shape
    d["dtype"] = dtype
    d["stride"] = stride
    d["storage_offset"] = storage_offset
    d["storage"] = storage
    d["device"] = device
    d["requires_grad"] = requires_grad
    d["is_parameter"] = False
    d["kind"] = kind
    d["subclass"] = None
    d["explicit_nbytes"] = None
    d["explicit_numel"] = None
    d["metadata"] = ()
    d["parts"] = ()
    d["rebuild"] = None
    d["encoding"] = None
    d["encoded_nbytes"] = None
    return t


def _attribute_names(rebuild) -> str:
    """The attributes a tensor was saved with (the state, 4th argument of _rebuild_from_type_v2 and of
    _rebuild_parameter_with_state), by name: ``foo, note``; ``state`` when they are not a dict of names."""
    state = rebuild.args[3] if isinstance(rebuild, Rebuild) and len(rebuild.args) > 3 else None
    return ", ".join(sorted(map(str, state)))[:80] if isinstance(state, dict) and state else "state"


def _quantizer(rebuild) -> str:
    """``quantized per_tensor_affine scale=0.05 zero_point=3``, ``quantized per_channel_affine axis=0``."""
    params = rebuild.args[4] if isinstance(rebuild, Rebuild) and len(rebuild.args) > 4 else None
    if not isinstance(params, tuple) or not params:
        return "quantized"
    scheme = str(getattr(params[0], "stub_name", params[0]))
    if scheme == "per_tensor_affine" and len(params) == 3:
        return f"quantized {scheme} scale={params[1]:g} zero_point={params[2]}" \
            if isinstance(params[1], float) else f"quantized {scheme}"
    if scheme.startswith("per_channel") and len(params) == 4:
        return f"quantized {scheme} axis={params[3]}"
    return f"quantized {scheme}"


@dataclass(frozen=True, eq=False)
class Rebuild:
    """A call torch.save wrote to rebuild a tensor: ``module.name(*args)``, its arguments as the reader made
    them (TensorRefs, StorageRefs, stubs, plain values). A writer of torch's format writes it back as it was."""

    module: str
    name: str
    args: Tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class Value:
    """A state_dict entry that is not a tensor (a quantized Linear's ``dtype``, a conv's absent ``bias``): what
    torch's own ``state_dict()`` puts there, written back as it is."""

    value: Any


class Layout(str):
    """A torch layout a pickle names (``torch.sparse_coo``), kept as its name; how it was named (``spelling``:
    ``"get_layout"`` for ``torch.serialization._get_layout(name)``, ``"global"`` for a GLOBAL) is kept too."""

    spelling = "get_layout"


@dataclass(frozen=True)
class GlobalRef:
    """A class or function a pickle names, and what the safe reader made of it."""

    module: str
    name: str
    handling: str  # "tensor" (rebuilt as a TensorRef), "builtin" (safe value), "stub" (inert record)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a reader makes of a path: the entry tree and its metadata.

    ``root`` is the tree: dicts, lists, plain values, :class:`TensorRef` leaves
    and inert stubs for pickled objects. Tensor bytes stay in the file.
    """

    path: str
    format: str
    file_size: int
    root: Any
    metadata: Dict[str, Any] = field(default_factory=dict)
    globals: Tuple[GlobalRef, ...] = ()
    files: Tuple[str, ...] = ()
