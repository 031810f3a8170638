"""Checkpoint weights to numpy without torch, one tensor at a time: safetensors, and PyTorch pickles via a
locked-down unpickler.

KoGPT2 on the hub ships only `pytorch_model.bin`, a pickle. `torch.load` would need torch (gigabytes on a Pi)
and an unrestricted pickle runs arbitrary code, so the reader rebuilds tensors itself and refuses every
global that is not a plain tensor/storage constructor.

Conversion has to fit a Pi's memory, so `open_checkpoint` reads only the file's index (safetensors' header,
the pickle's tensor records) and a tensor's bytes when that tensor is asked for: the converter holds one
tensor at a time, never the whole 500 MB model. Tensors are read with plain file reads into their own
array, not through a memory map, because a mapped file's pages count as the process's resident memory for
as long as it stays mapped (reading all of KoGPT2 through one safetensors `safe_open` left 510 MB of the
file resident; see benchmarks/bench_convert.py).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np

from kolite.errors import KoliteError, ModelFormatError, UnsafeCheckpoint
from kolite.models.gpt2config import GPT2Config

SAFETENSORS_NAME = "model.safetensors"
TORCH_BIN_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_READ_CHUNK = 8 * 2**20  # zip members are read in pieces: zipfile's readinto would hold a second copy

# ----------------------------------------------------------------------------------------------------
# dtypes


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a 16-bit shift (numpy has no bfloat16)."""
    return (bits.astype("<u4") << 16).view("<f4").astype(np.float32, copy=False)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    """Half precision is stored to save disk; the converter wants float32 (ints/bools pass unchanged)."""
    # ml_dtypes' bfloat16 (registered once torch/onnx import it) is not a numpy "floating" subtype
    if arr.dtype != np.float32 and (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        return arr.astype(np.float32)
    return arr


# ----------------------------------------------------------------------------------------------------
# one tensor at a time


@dataclass(frozen=True)
class _TensorInfo:
    """What a file's index says about one tensor; its bytes are read only by `read`."""

    shape: tuple[int, ...]
    identity: tuple[object, ...]  # equal identities: the same bytes of the file, hence equal tensors
    read: Callable[[], np.ndarray]  # a new array as stored (bf16 widened to float32)


class Checkpoint(Mapping[str, np.ndarray]):
    """An open weights file whose tensors are read one at a time, when asked for.

    Indexing reads the tensor from the file each time (floating tensors as float32, as `load_state_dict`
    gives them), so the caller decides how long it stays in memory; names, shapes and shared storage come
    from the index alone. Close it (or use it as a context manager) to release the file.
    """

    def __init__(self, path: Path, tensors: dict[str, _TensorInfo], close: Callable[[], None]) -> None:
        self.path = path
        self._tensors = tensors
        self._close = close

    def __getitem__(self, key: str) -> np.ndarray:
        return _as_float32(self.stored(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._tensors

    def stored(self, key: str) -> np.ndarray:
        """The tensor in its stored dtype (bf16, which numpy lacks, widened to float32)."""
        return self._tensors[key].read()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def same_data(self, a: str, b: str) -> bool:
        """Whether two names view the same bytes (a tied head saved beside its embedding), without reading."""
        return self._tensors[a].identity == self._tensors[b].identity

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a `.safetensors`/`.bin` file or a checkpoint folder to read tensor by tensor.

    Everything that can be checked without the tensors' bytes (format, header, pickle safety, each
    tensor's geometry against its storage) is checked here, before any weight is read.
    """
    path = _weights_file(Path(path))
    return _open_safetensors(path) if path.name.endswith(".safetensors") else _open_torch(path)


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors`/`.bin` file or a checkpoint folder whole; floating tensors come back as float32."""
    with open_checkpoint(path) as ckpt:
        return dict(ckpt.items())


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        path = _weights_in_folder(path)
    if not path.is_file():
        raise ModelFormatError(f"weights file {path} does not exist")
    if not (path.name.endswith(".safetensors") or path.suffix in TORCH_SUFFIXES):
        raise ModelFormatError(f"{path.name}: unknown weights format (expected .safetensors or .bin)")
    return path


def _weights_in_folder(folder: Path) -> Path:
    """safetensors first: it loads faster and cannot carry code."""
    for name in (SAFETENSORS_NAME, TORCH_BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ModelFormatError(f"{folder}: sharded checkpoints are not supported (GPT-2 models fit one file)")
    raise ModelFormatError(f"{folder} has neither {SAFETENSORS_NAME} nor {TORCH_BIN_NAME}")


def _read_at(fh: IO[bytes], offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    """`count` elements from byte `offset` of an open file, read straight into a new array (no second copy)."""
    arr = np.empty(count, dtype)
    fh.seek(offset)
    got = fh.readinto(arr.view(np.uint8)) if arr.nbytes else 0
    if got != arr.nbytes:
        raise ModelFormatError(f"{getattr(fh, 'name', 'checkpoint')}: truncated ({got} of {arr.nbytes} bytes)")
    return arr


# ----------------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100_000_000  # the format's own limit: refuse absurd headers before allocating them


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as stored (bf16, which numpy lacks, widened to float32)."""
    with _open_safetensors(Path(path)) as ckpt:
        return {k: ckpt.stored(k) for k in ckpt}


def _open_safetensors(path: Path) -> Checkpoint:
    """safetensors' own parser validates the file; tensors are then read by the offsets in its header
    (the library reads only through a map of the whole file, see the module docstring)."""
    _check_safetensors(path)
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(path, "rb"))
        header, body_start, body_size = _st_header(fh, path)
        try:
            tensors = {k: _st_info(fh, path, k, v, body_start, body_size)
                       for k, v in header.items() if k != "__metadata__"}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"{path}: corrupt safetensors header: {exc!r}") from exc
        stack.pop_all()
    return Checkpoint(path, tensors, fh.close)


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc


def _st_header(fh: IO[bytes], path: Path) -> tuple[dict, int, int]:
    """The documented layout: u64 header size, JSON header, then the tensors' little-endian bytes."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) < 8:
        raise ModelFormatError(f"{path}: too short for safetensors")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise ModelFormatError(f"{path}: corrupt safetensors header size {n}")
    try:
        header = json.loads(fh.read(n))
    except ValueError as exc:
        raise ModelFormatError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header")
    return header, 8 + n, size - 8 - n


def _st_info(fh: IO[bytes], path: Path, key: str, info: dict, body_start: int, body_size: int) -> _TensorInfo:
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ModelFormatError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape = tuple(int(d) for d in info["shape"])
    start, end = (int(x) for x in info["data_offsets"])
    if not 0 <= start <= end <= body_size or end - start != np.dtype(dtype).itemsize * int(np.prod(shape)):
        raise ModelFormatError(f"{path}: tensor {key!r} has offsets outside the file")
    read = partial(_read_st, fh, body_start + start, np.dtype(dtype), shape, info["dtype"] == "BF16")
    return _TensorInfo(shape, ("safetensors", start, end), read)


def _read_st(fh: IO[bytes], offset: int, dtype: np.dtype, shape: tuple[int, ...], bf16: bool) -> np.ndarray:
    arr = _read_at(fh, offset, int(np.prod(shape)), dtype).reshape(shape)
    return bf16_to_f32(arr) if bf16 else arr


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
    with _open_torch(Path(path)) as ckpt:
        return {k: ckpt.stored(k) for k in ckpt}


def _open_torch(path: Path) -> Checkpoint:
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
    return _read_at(f, start + first * dtype.itemsize, count, dtype)


def _unpickle(data: bytes | IO[bytes], persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Run the restricted unpickler; our own errors pass through, anything else means a corrupt file."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(file, persistent_load).load()
    except KoliteError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"corrupt checkpoint pickle: {exc!r}") from exc


def _tensor_index(obj: Any, path: Path) -> dict[str, _TensorInfo]:
    """The top-level {name: tensor} mapping, checked; non-tensor entries (e.g. counters) are dropped."""
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    return {str(k): _torch_info(v, str(k), path) for k, v in obj.items() if isinstance(v, _LazyTensor)}


def _torch_info(t: _LazyTensor, key: str, path: Path) -> _TensorInfo:
    """Check that the strided view stays inside its storage (as_strided does not) before anything is read."""
    if len(t.size) != len(t.stride) or min((*t.size, *t.stride, t.offset), default=0) < 0:
        raise ModelFormatError(f"tensor {key!r} has invalid size/stride")
    if 0 not in t.size:
        if t.offset + _span(t) > t.storage.numel:
            raise ModelFormatError(f"tensor {key!r} reaches past the end of its storage")
        if t.storage.read is None:
            raise ModelFormatError(f"{path.name}: the bytes of tensor {key!r} are not in the file")
    return _TensorInfo(t.size, ("torch", t.storage.key, t.offset, t.size, t.stride), partial(_read_tensor, t))


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
    return bf16_to_f32(arr) if t.storage.kind.dtype == "bf16" else arr


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# ----------------------------------------------------------------------------------------------------
# GPT-2 key normalisation

_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_PREFIX = "transformer."


def gpt2_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every weight a GPT-2 graph needs, by canonical transformers name, with the shape `cfg` implies."""
    e, inner = cfg.n_embd, cfg.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (cfg.vocab_size, e),
        "transformer.wpe.weight": (cfg.n_positions, e),
        "transformer.ln_f.weight": (e,),
        "transformer.ln_f.bias": (e,),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (e,), p + "ln_1.bias": (e,),
            p + "attn.c_attn.weight": (e, 3 * e), p + "attn.c_attn.bias": (3 * e,),
            p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,),
            p + "ln_2.weight": (e,), p + "ln_2.bias": (e,),
            p + "mlp.c_fc.weight": (e, inner), p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, e), p + "mlp.c_proj.bias": (e,),
        })
    return shapes


def _canonical_key(key: str) -> str | None:
    """Old gpt2/distilgpt2 checkpoints omit `transformer.`; attention-mask buffers are not weights."""
    bare = key.removeprefix(_PREFIX)
    if _BUFFER.match(bare):
        return None
    return key if key.startswith("lm_head.") else _PREFIX + bare


def gpt2_weights(sd: Mapping[str, np.ndarray], cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Canonical float32 GPT-2 weights, checked against `cfg`, so the graph builder can trust every shape."""
    return dict(GPT2Weights(sd, cfg).items())


class GPT2Weights(Mapping[str, np.ndarray]):
    """The canonical GPT-2 weights of a state dict or an open `Checkpoint`, read only when asked for.

    Names, shapes and the tied head are checked against `cfg` up front, from a checkpoint's index alone;
    each weight is fetched (as contiguous float32) when it is indexed, so over a `Checkpoint` the graph
    builder holds one tensor at a time instead of the whole model.
    """

    def __init__(self, sd: Mapping[str, np.ndarray], cfg: GPT2Config) -> None:
        self._sd = sd
        names = {ck: k for k in sd if (ck := _canonical_key(k)) is not None}
        head = names.pop("lm_head.weight", None)
        if head is not None and "transformer.wte.weight" in names:
            _check_tied_head(sd, head, names["transformer.wte.weight"])
        expected = gpt2_shapes(cfg)
        missing = [k for k in expected if k not in names]
        wrong = [f"{k}: {shape} != {s}" for k, s in expected.items()
                 if k in names and (shape := _shape_of(sd, names[k])) != s]
        if missing or wrong:
            raise ModelFormatError(_shape_report(missing, wrong))
        self._names = {k: names[k] for k in expected}

    def __getitem__(self, key: str) -> np.ndarray:
        return np.ascontiguousarray(self._sd[self._names[key]], dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the weight
        return key in self._names


def _shape_of(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    return sd.shape(key) if isinstance(sd, Checkpoint) else tuple(np.shape(sd[key]))


def _check_tied_head(sd: Mapping[str, np.ndarray], head: str, wte: str) -> None:
    """The graph reuses wte as the output projection; a different lm_head would silently change the model.

    A checkpoint that saved the tied head as a view of wte's storage is known equal without reading it.
    """
    if _shape_of(sd, head) == _shape_of(sd, wte):
        if isinstance(sd, Checkpoint) and sd.same_data(head, wte):
            return
        if np.array_equal(np.asarray(sd[head], np.float32), np.asarray(sd[wte], np.float32)):
            return
    raise ModelFormatError("lm_head.weight differs from transformer.wte.weight; untied heads are not supported")


def _shape_report(missing: list[str], wrong: list[str], limit: int = 8) -> str:
    parts = []
    if missing:
        more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
        parts.append(f"missing {len(missing)} weights: {', '.join(missing[:limit])}{more}")
    if wrong:
        parts.append("wrong shapes: " + "; ".join(wrong[:limit]))
    return "checkpoint does not match config.json: " + " | ".join(parts)
