"""PyTorch pickles (`pytorch_model.bin`, zip or legacy) without torch, through a locked-down unpickler.

KoGPT2 on the hub ships only `pytorch_model.bin`, a pickle. `torch.load` would need torch (gigabytes on a
Pi) and an unrestricted pickle runs arbitrary code, so the reader rebuilds tensors itself and refuses
every global that is not a plain tensor/storage constructor. Storages are read one at a time, when a
tensor that views them is asked for.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np

from kolite.errors import KoliteError, ModelFormatError, UnsafeCheckpoint
from kolite.models import checkpoint
from kolite.models.checkpoint import Checkpoint

_READ_CHUNK = 8 * 2**20  # zip members are read in pieces: zipfile's readinto would hold a second copy


# ----------------------------------------------------------------------------------------------------
# PyTorch pickles


@dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.FloatStorage` & co.: only the element dtype matters."""

    name: str
    dtype: str  # numpy dtype string; "bf16" is read as uint16 and widened later


_STORAGE_TYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "bf16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


@dataclass
class _Storage:
    """One flat buffer in the file; several tensors may view it (tied weights, slices, transposes).

    Unpickling records only where it is: `read(first, count)` fetches a range of its elements when a
    tensor is read (legacy files place their storages after the pickle, so `read` is set later).
    """

    kind: _StorageType
    key: str
    dtype: np.dtype
    numel: int
    read: Callable[[int, int], np.ndarray] | None = None


@dataclass
class _LazyTensor:
    """A tensor recorded during unpickling: a view of a storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    """Our `torch._utils._rebuild_tensor(_v2)`: ignores requires_grad, hooks and metadata."""
    if not isinstance(storage, _Storage):
        raise ModelFormatError("tensor rebuilt from something that is not a storage")
    try:
        return _LazyTensor(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"bad tensor geometry: {exc}") from exc


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """`nn.Parameter` is just its data for inference."""
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a plain state dict needs; anything else is an attack or not a state dict."""

    def __init__(self, file: IO[bytes], persistent_load: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpoint(
                f"checkpoint refers to {module}.{name}, which is not a tensor; refusing to load it "
                "(only plain PyTorch state dicts are accepted)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise ModelFormatError("unexpected persistent id in checkpoint pickle")
        return self._persistent(pid)


def _storage_id(pid: Any) -> tuple[_StorageType, str, int, Any]:
    """Validate ('storage', type, key, location, numel[, view]) as torch writes it."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
        raise UnsafeCheckpoint(f"checkpoint has a persistent id that is not a storage: {str(pid)[:80]}")
    kind, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(kind, _StorageType) or not isinstance(numel, int) or numel < 0:
        raise ModelFormatError(f"malformed storage record {str(pid)[:80]}")
    return kind, str(key), numel, pid[5] if len(pid) == 6 else None


def _np_dtype(kind: _StorageType, big_endian: bool = False) -> np.dtype:
    dt = np.dtype("<u2" if kind.dtype == "bf16" else kind.dtype)
    return dt.newbyteorder(">") if big_endian and dt.itemsize > 1 else dt


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """Read `torch.save` output (zip, or the pre-1.6 legacy stream) whole, without torch or arbitrary code."""
    with open_torch(Path(path)) as ckpt:
        return {k: ckpt.stored(k) for k in ckpt}


def open_torch(path: Path) -> Checkpoint:
    if zipfile.is_zipfile(path):
        return _open_zip(path)
    if tarfile.is_tarfile(path):
        raise ModelFormatError(f"{path.name}: the pre-2018 tar checkpoint format is not supported")
    return _open_legacy(path)


def _open_zip(path: Path) -> Checkpoint:
    """torch's zip layout: `<prefix>/data.pkl` (the state dict) and one member per storage, `<prefix>/data/<key>`.

    Unpickling only records each storage's member; a tensor reads its range of the member when asked for.
    """
    with contextlib.ExitStack() as stack:
        zf = stack.enter_context(zipfile.ZipFile(path))
        names = zf.namelist()
        pkl = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ModelFormatError(f"{path.name}: zip without data.pkl is not a PyTorch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}

        def load(pid: Any) -> _Storage:
            kind, key, numel, _ = _storage_id(pid)
            if key not in storages:
                storages[key] = _zip_storage(zf, f"{prefix}data/{key}", kind, key, numel, big)
            return storages[key]

        tensors = _tensor_index(_unpickle(zf.read(pkl), load), path)
        stack.pop_all()
    return Checkpoint(path, tensors, zf.close)


def _zip_storage(zf: zipfile.ZipFile, name: str, kind: _StorageType, key: str, numel: int,
                 big: bool) -> _Storage:
    dt = _np_dtype(kind, big)
    try:
        size = zf.getinfo(name).file_size
    except KeyError:
        raise ModelFormatError(f"storage {name!r} is missing from the checkpoint") from None
    if size < numel * dt.itemsize:  # checked before any read: a forged numel must not exhaust memory
        raise ModelFormatError(f"storage {name!r} is truncated ({size} of {numel * dt.itemsize} bytes)")
    return _Storage(kind, key, dt, numel, partial(_read_zip_member, zf, name, dt))


def _read_zip_member(zf: zipfile.ZipFile, name: str, dtype: np.dtype, first: int, count: int) -> np.ndarray:
    """Elements [first, first + count) of a storage member, read in pieces straight into a new array."""
    arr = np.empty(count, dtype)
    view = memoryview(arr.view(np.uint8))
    got = 0
    try:
        with zf.open(name) as fh:
            fh.seek(first * dtype.itemsize)
            while got < len(view) and (n := fh.readinto(view[got : got + _READ_CHUNK])):
                got += n
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise ModelFormatError(f"storage {name!r} cannot be read: {exc}") from exc
    if got != len(view):
        raise ModelFormatError(f"storage {name!r} is truncated ({got} of {len(view)} bytes)")
    return arr


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _open_legacy(path: Path) -> Checkpoint:
    """Layout: magic, protocol, sys_info, the state pickle, storage keys, then each storage's bytes."""
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path, "rb"))
        if _unpickle(f) != _LEGACY_MAGIC:
            raise ModelFormatError(f"{path.name} is not a PyTorch checkpoint (bad magic number)")
        _unpickle(f)  # protocol version
        sys_info = _unpickle(f)
        big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        storages: dict[str, _Storage] = {}
        file_size = path.stat().st_size

        def load(pid: Any) -> _Storage:
            kind, key, numel, view = _storage_id(pid)
            if view is not None:
                raise ModelFormatError(f"{path.name}: legacy storage views are not supported")
            dt = _np_dtype(kind, big)
            if numel * dt.itemsize > file_size:  # a forged numel must not exhaust memory
                raise ModelFormatError(f"{path.name}: storage {key!r} is larger than the file")
            if key not in storages:
                storages[key] = _Storage(kind, key, dt, numel)
            return storages[key]

        result = _unpickle(f, load)
        keys = _unpickle(f)
        for key in keys if isinstance(keys, list) else ():
            _locate_legacy_storage(f, storages.get(str(key)), path, file_size)
        tensors = _tensor_index(result, path)
        stack.pop_all()
    return Checkpoint(path, tensors, f.close)


def _locate_legacy_storage(f: IO[bytes], storage: _Storage | None, path: Path, file_size: int) -> None:
    """Note where a storage's bytes are (after its 8-byte element count) and skip over them."""
    if storage is None:
        raise ModelFormatError(f"{path.name}: storage list names an unknown storage")
    head = f.read(8)
    numel = struct.unpack("<q", head)[0] if len(head) == 8 else -1
    start = f.tell()
    nbytes = numel * storage.dtype.itemsize
    if numel != storage.numel or start + nbytes > file_size:
        raise ModelFormatError(f"{path.name}: storage is truncated or mis-sized")
    f.seek(nbytes, os.SEEK_CUR)
    storage.read = partial(_read_legacy_storage, f, start, storage.dtype)


def _read_legacy_storage(f: IO[bytes], start: int, dtype: np.dtype, first: int, count: int) -> np.ndarray:
    return checkpoint.read_at(f, start + first * dtype.itemsize, count, dtype)


def _unpickle(data: bytes | IO[bytes], persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Run the restricted unpickler; our own errors pass through, anything else means a corrupt file."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(file, persistent_load).load()
    except KoliteError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"corrupt checkpoint pickle: {exc!r}") from exc


def _tensor_index(obj: Any, path: Path) -> dict[str, checkpoint.TensorInfo]:
    """The top-level {name: tensor} mapping, checked; non-tensor entries (e.g. counters) are dropped."""
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    return {str(k): _torch_info(v, str(k), path) for k, v in obj.items() if isinstance(v, _LazyTensor)}


def _torch_info(t: _LazyTensor, key: str, path: Path) -> checkpoint.TensorInfo:
    """Check that the strided view stays inside its storage (as_strided does not) before anything is read."""
    if len(t.size) != len(t.stride) or min((*t.size, *t.stride, t.offset), default=0) < 0:
        raise ModelFormatError(f"tensor {key!r} has invalid size/stride")
    if 0 not in t.size:
        if t.offset + _span(t) > t.storage.numel:
            raise ModelFormatError(f"tensor {key!r} reaches past the end of its storage")
        if t.storage.read is None:
            raise ModelFormatError(f"{path.name}: the bytes of tensor {key!r} are not in the file")
    return checkpoint.TensorInfo(t.size, ("torch", t.storage.key, t.offset, t.size, t.stride), partial(_read_tensor, t))


def _span(t: _LazyTensor) -> int:
    """Storage elements from the tensor's first to its last."""
    return 1 + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))


def _read_tensor(t: _LazyTensor) -> np.ndarray:
    """Read just the storage range the tensor covers; a contiguous tensor is that range, others are copied out."""
    if 0 in t.size:
        arr = np.zeros(t.size, dtype=t.storage.dtype)
    else:
        assert t.storage.read is not None  # checked by _torch_info
        flat = t.storage.read(t.offset, _span(t))
        if t.stride == _contiguous_strides(t.size):
            arr = flat.reshape(t.size)
        else:
            strides = tuple(s * flat.itemsize for s in t.stride)
            arr = np.lib.stride_tricks.as_strided(flat, shape=t.size, strides=strides, writeable=False).copy()
    arr = arr.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else arr
    return checkpoint.bf16_to_f32(arr) if t.storage.kind.dtype == "bf16" else arr


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))
