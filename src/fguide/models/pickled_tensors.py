"""Tensor storages and views inside a pickle, read within a safe_pickle :class:`Budget`.

Python's pickle of a tensor (what NVlabs' network pickles hold) is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` around
``torch.storage._load_from_bytes(blob)``, the blob a legacy ``torch.save`` of one storage.
``torch.load`` would allocate whatever element count the blob declares; here
(:func:`read_storage_blob`) the blob is parsed without it: its pickles may name a storage class
and nothing else, the element count must equal the bytes actually present, and all storages
together may hold no more bytes than the file, all checked before anything is allocated.
:func:`rebuild_tensor` checks that a view lies inside its storage; all views together may span
at most twice the file's size.
"""

from __future__ import annotations

import io
import math
import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fguide.models.safe_pickle import BoundedUnpickler, Budget, UnsafePickleError, kind

__all__ = ["STORAGE_DTYPES", "Storage", "read_storage_blob", "rebuild_tensor"]


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


class Storage:
    """One storage read from a blob: a flat tensor of its dtype (``torch``'s typed storages are
    deprecated)."""

    def __init__(self, flat: Tensor):
        self.flat = flat


class _StorageType:
    """A storage class named in a blob's persistent id, as inert data."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _BlobUnpickler(BoundedUnpickler):
    """The header pickles of a legacy ``torch.save`` of one storage: storage classes only."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"a tensor storage blob references the global {module}.{name} (a storage blob "
            "holds a storage class and raw bytes, nothing else)"
        )

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _blob_header(data: bytes, budget: Budget) -> tuple[torch.dtype, int, int]:
    """(dtype, element count, offset of the raw bytes) of a legacy one-storage ``torch.save``."""
    f = io.BytesIO(data)
    parts = []
    for _ in range(5):  # magic number, protocol, system info, the storage's id, storage keys
        parts.append(_BlobUnpickler(f, len(data) - f.tell(), budget).load())
    magic, proto, info, pid, keys = parts
    if magic != _LEGACY_MAGIC or proto != _LEGACY_PROTOCOL or not isinstance(info, dict):
        raise UnsafePickleError("a tensor storage blob is not a legacy torch.save of a storage")
    if info.get("little_endian") is not (sys.byteorder == "little"):
        raise UnsafePickleError("a tensor storage blob of the other byte order")
    if not (
        isinstance(pid, tuple)
        and len(pid) == 6
        and pid[0] == "storage"
        and isinstance(pid[1], _StorageType)
        and isinstance(pid[2], str)
        and isinstance(pid[3], str)
        and type(pid[4]) is int
        and pid[4] >= 0
        and pid[5] is None
        and keys == [pid[2]]
    ):
        raise UnsafePickleError("a tensor storage blob with a malformed storage record")
    return pid[1].dtype, pid[4], f.tell()


def read_storage_blob(budget: Budget, data: Any) -> Storage:
    """The storage in ``data`` (what ``torch.storage._load_from_bytes`` receives), on the CPU.

    The element count is checked against the bytes present, and charged to ``budget``, before
    the storage is allocated; the blob's pickles may name a storage class and nothing else.
    """
    if not isinstance(data, bytes):
        raise UnsafePickleError(f"a tensor storage blob is a {kind(data)}, not bytes")
    dtype, numel, at = _blob_header(data, budget)
    itemsize = torch.empty((), dtype=dtype).element_size()
    present = len(data) - at - 8
    if present < 0 or int.from_bytes(data[at : at + 8], "little", signed=True) != numel:
        raise UnsafePickleError("a tensor storage blob whose element count is cut or differs")
    if numel * itemsize != present:
        raise UnsafePickleError(
            f"a tensor storage blob declares {numel} elements of {itemsize} bytes but holds "
            f"{present} bytes"
        )
    raw = np.frombuffer(data, dtype=np.uint8, offset=at + 8)
    if dtype == torch.bool and bool((raw > 1).any()):
        raise UnsafePickleError("a bool tensor storage holds bytes other than 0 and 1")
    budget.charge_storage(present)
    flat = torch.empty(numel, dtype=dtype)
    if present:
        flat.view(torch.uint8).numpy()[:] = raw
    return Storage(flat)


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not (
        isinstance(value, tuple)
        and len(value) <= 64
        and all(type(v) is int and 0 <= v < 2**62 for v in value)
    ):
        raise UnsafePickleError(f"a tensor's {what} is not a tuple of non-negative integers")
    return value


def rebuild_tensor(
    budget: Budget, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any
) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` for a view that lies inside its storage."""
    if not isinstance(storage, Storage):
        raise UnsafePickleError(f"a tensor rebuilt from a {kind(storage)}, not a storage")
    n = storage.flat.numel()
    if type(offset) is not int or not 0 <= offset <= n:
        raise UnsafePickleError(f"a tensor with storage offset outside [0, {n}]")
    shape, strides = _dims(size, "size"), _dims(stride, "stride")
    if len(shape) != len(strides) or len(rest) > 3:
        raise UnsafePickleError("a tensor record with mismatched size and stride")
    if any(not (r is None or (type(r) in (dict, OrderedDict) and not r)) for r in rest[1:]):
        raise UnsafePickleError("a tensor with backward hooks or metadata")
    numel = math.prod(shape)
    end = offset + sum((k - 1) * s for k, s in zip(shape, strides, strict=True)) + 1
    if numel and end > n:
        raise UnsafePickleError(
            f"a tensor view reaches element {end - 1} of a storage of {n} elements"
        )
    budget.charge_view(numel * storage.flat.element_size())
    return storage.flat.as_strided(shape, strides, offset)
