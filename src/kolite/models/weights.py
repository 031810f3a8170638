"""Checkpoint weights to numpy without torch: safetensors, and PyTorch pickles via a locked-down unpickler.

KoGPT2 on the hub ships only `pytorch_model.bin`, a pickle. `torch.load` would need torch (gigabytes on a Pi)
and an unrestricted pickle runs arbitrary code, so `read_torch_bin` rebuilds tensors itself and refuses every
global that is not a plain tensor/storage constructor.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from kolite.errors import KoliteError, ModelFormatError, UnsafeCheckpoint
from kolite.models.gpt2config import GPT2Config

SAFETENSORS_NAME = "model.safetensors"
TORCH_BIN_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")

# ----------------------------------------------------------------------------------------------------
# dtypes


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a 16-bit shift (numpy has no bfloat16)."""
    return (bits.astype("<u4") << 16).view("<f4").astype(np.float32)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    """Half precision is stored to save disk; the converter wants float32 (ints/bools pass unchanged)."""
    # ml_dtypes' bfloat16 (registered once torch/onnx import it) is not a numpy "floating" subtype
    if arr.dtype != np.float32 and (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        return arr.astype(np.float32)
    return arr


# ----------------------------------------------------------------------------------------------------
# entry point


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors`/`.bin` file or a checkpoint folder; floating tensors come back as float32."""
    path = Path(path)
    if path.is_dir():
        path = _weights_in_folder(path)
    if not path.is_file():
        raise ModelFormatError(f"weights file {path} does not exist")
    if path.name.endswith(".safetensors"):
        sd = read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        sd = read_torch_bin(path)
    else:
        raise ModelFormatError(f"{path.name}: unknown weights format (expected .safetensors or .bin)")
    return {k: _as_float32(v) for k, v in sd.items()}


def _weights_in_folder(folder: Path) -> Path:
    """safetensors first: it loads faster and cannot carry code."""
    for name in (SAFETENSORS_NAME, TORCH_BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ModelFormatError(f"{folder}: sharded checkpoints are not supported (GPT-2 models fit one file)")
    raise ModelFormatError(f"{folder} has neither {SAFETENSORS_NAME} nor {TORCH_BIN_NAME}")


# ----------------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100_000_000  # the format's own limit: refuse absurd headers before allocating them


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """safetensors' numpy loader, or our own header walk when it cannot express a dtype (bf16)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except TypeError:  # "data type 'bfloat16' not understood": numpy has no bf16
        return _read_safetensors_raw(Path(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    """Parse the documented layout (u64 header size, JSON header, raw little-endian bytes) ourselves."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise ModelFormatError(f"{path}: too short for safetensors")
    (n,) = struct.unpack("<Q", data[:8].tobytes())
    if n > _MAX_HEADER or 8 + n > data.size:
        raise ModelFormatError(f"{path}: corrupt safetensors header size {n}")
    try:
        header = json.loads(data[8 : 8 + n].tobytes())
    except ValueError as exc:
        raise ModelFormatError(f"{path}: corrupt safetensors header: {exc}") from exc
    body = data[8 + n :]
    try:
        return {k: _st_tensor(path, k, v, body) for k, v in header.items() if k != "__metadata__"}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFormatError(f"{path}: corrupt safetensors header: {exc!r}") from exc


def _st_tensor(path: Path, key: str, info: dict, body: np.ndarray) -> np.ndarray:
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ModelFormatError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape = tuple(int(d) for d in info["shape"])
    start, end = (int(x) for x in info["data_offsets"])
    if not 0 <= start <= end <= body.size or end - start != np.dtype(dtype).itemsize * int(np.prod(shape)):
        raise ModelFormatError(f"{path}: tensor {key!r} has offsets outside the file")
    arr = np.array(body[start:end]).view(dtype).reshape(shape)
    return bf16_to_f32(arr) if info["dtype"] == "BF16" else arr


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
    """One flat buffer; several tensors may view it (tied weights, slices, transposes)."""

    kind: _StorageType
    data: np.ndarray


@dataclass
class _LazyTensor:
    """A tensor recorded during unpickling; legacy files fill storages only after the pickle ends."""

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
    """Read `torch.save` output (zip, or the pre-1.6 legacy stream) without torch or arbitrary code."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        result = _load_zip(path)
    elif tarfile.is_tarfile(path):
        raise ModelFormatError(f"{path.name}: the pre-2018 tar checkpoint format is not supported")
    else:
        result = _load_legacy(path)
    return _state_dict(result, path)


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
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
                dt = _np_dtype(kind, big)
                data = _read_member(zf, f"{prefix}data/{key}", numel * dt.itemsize, dt)
                storages[key] = _Storage(kind, data)
            return storages[key]

        return _unpickle(zf.read(pkl), load)


def _read_member(zf: zipfile.ZipFile, name: str, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """Read straight into a writable buffer: one copy of the weights in memory, not two."""
    try:
        size = zf.getinfo(name).file_size
    except KeyError:
        raise ModelFormatError(f"storage {name!r} is missing from the checkpoint") from None
    if size < nbytes:  # checked before allocating: a forged numel must not exhaust memory
        raise ModelFormatError(f"storage {name!r} is truncated ({size} of {nbytes} bytes)")
    buf = bytearray(nbytes)
    with zf.open(name) as fh:
        got = fh.readinto(buf)
    if got != nbytes:
        raise ModelFormatError(f"storage {name!r} is truncated ({got} of {nbytes} bytes)")
    return np.frombuffer(buf, dtype=dtype)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(path: Path) -> Any:
    """Layout: magic, protocol, sys_info, the state pickle, storage keys, then each storage's bytes."""
    with open(path, "rb") as f:
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
                storages[key] = _Storage(kind, np.zeros(numel, dtype=dt))
            return storages[key]

        result = _unpickle(f, load)
        keys = _unpickle(f)
        for key in keys if isinstance(keys, list) else ():
            _fill_legacy_storage(f, storages.get(str(key)), path)
        return result


def _fill_legacy_storage(f: IO[bytes], storage: _Storage | None, path: Path) -> None:
    if storage is None:
        raise ModelFormatError(f"{path.name}: storage list names an unknown storage")
    head = f.read(8)
    numel = struct.unpack("<q", head)[0] if len(head) == 8 else -1
    if numel != storage.data.size:
        raise ModelFormatError(f"{path.name}: storage is truncated or mis-sized")
    dt = storage.data.dtype
    raw = f.read(numel * dt.itemsize)
    if len(raw) != numel * dt.itemsize:
        raise ModelFormatError(f"{path.name}: storage is truncated or mis-sized")
    storage.data[:] = np.frombuffer(raw, dtype=dt)


def _unpickle(data: bytes | IO[bytes], persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Run the restricted unpickler; our own errors pass through, anything else means a corrupt file."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(file, persistent_load).load()
    except KoliteError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"corrupt checkpoint pickle: {exc!r}") from exc


def _state_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    """Materialise the top-level {name: tensor} mapping; non-tensor entries (e.g. counters) are dropped."""
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    return {str(k): _materialise(v, str(k)) for k, v in obj.items() if isinstance(v, _LazyTensor)}


def _materialise(t: _LazyTensor, key: str) -> np.ndarray:
    """Copy the strided view out of its storage, after checking it stays inside (as_strided does not)."""
    buf = t.storage.data
    if len(t.size) != len(t.stride) or min((*t.size, *t.stride, t.offset), default=0) < 0:
        raise ModelFormatError(f"tensor {key!r} has invalid size/stride")
    if 0 not in t.size:
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
        if last >= buf.size:
            raise ModelFormatError(f"tensor {key!r} reaches past the end of its storage")
        arr = _strided(buf, t)
    else:
        arr = np.zeros(t.size, dtype=buf.dtype)
    arr = arr.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else arr
    return bf16_to_f32(arr) if t.storage.kind.dtype == "bf16" else arr


def _strided(buf: np.ndarray, t: _LazyTensor) -> np.ndarray:
    """A contiguous tensor is a plain slice (no copy: a 500 MB model must fit a Pi); others are copied out."""
    numel = int(np.prod(t.size))
    if t.stride == _contiguous_strides(t.size):
        return buf[t.offset : t.offset + numel].reshape(t.size)
    strides = tuple(s * buf.itemsize for s in t.stride)
    view = np.lib.stride_tricks.as_strided(buf[t.offset :], shape=t.size, strides=strides, writeable=False)
    return view.copy()


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


def gpt2_weights(sd: dict[str, np.ndarray], cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Canonical float32 GPT-2 weights, checked against `cfg`, so the graph builder can trust every shape."""
    named = {ck: v for k, v in sd.items() if (ck := _canonical_key(k)) is not None}
    _check_tied_head(named)
    expected = gpt2_shapes(cfg)
    missing = [k for k in expected if k not in named]
    wrong = [f"{k}: {tuple(named[k].shape)} != {s}" for k, s in expected.items()
             if k in named and tuple(named[k].shape) != s]
    if missing or wrong:
        raise ModelFormatError(_shape_report(missing, wrong))
    return {k: np.ascontiguousarray(named[k], dtype=np.float32) for k in expected}


def _check_tied_head(named: dict[str, np.ndarray]) -> None:
    """The graph reuses wte as the output projection; a different lm_head would silently change the model."""
    head = named.pop("lm_head.weight", None)
    wte = named.get("transformer.wte.weight")
    if head is None or wte is None:
        return
    if head.shape != wte.shape or not np.array_equal(head.astype(np.float32), wte.astype(np.float32)):
        raise ModelFormatError(
            "lm_head.weight differs from transformer.wte.weight; untied heads are not supported"
        )


def _shape_report(missing: list[str], wrong: list[str], limit: int = 8) -> str:
    parts = []
    if missing:
        more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
        parts.append(f"missing {len(missing)} weights: {', '.join(missing[:limit])}{more}")
    if wrong:
        parts.append("wrong shapes: " + "; ".join(wrong[:limit]))
    return "checkpoint does not match config.json: " + " | ".join(parts)
