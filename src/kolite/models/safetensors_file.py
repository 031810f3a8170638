"""safetensors files, read by their header's offsets one tensor at a time (no memory map, no library)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np

from kolite.errors import ModelFormatError
from kolite.models import checkpoint
from kolite.models.checkpoint import Checkpoint

# ----------------------------------------------------------------------------------------------------
# safetensors

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100_000_000  # the format's own limit: refuse absurd headers before allocating them


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as stored (bf16, which numpy lacks, widened to float32)."""
    with open_safetensors(Path(path)) as ckpt:
        return {k: ckpt.stored(k) for k in ckpt}


def open_safetensors(path: Path) -> Checkpoint:
    """safetensors' own parser validates the file; tensors are then read by the offsets in its header
    (the library reads only through a map of the whole file, see `kolite.models.checkpoint`)."""
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


def _st_info(fh: IO[bytes], path: Path, key: str, info: dict, body_start: int, body_size: int) -> checkpoint.TensorInfo:
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ModelFormatError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape = tuple(int(d) for d in info["shape"])
    start, end = (int(x) for x in info["data_offsets"])
    if not 0 <= start <= end <= body_size or end - start != np.dtype(dtype).itemsize * int(np.prod(shape)):
        raise ModelFormatError(f"{path}: tensor {key!r} has offsets outside the file")
    read = partial(_read_st, fh, body_start + start, np.dtype(dtype), shape, info["dtype"] == "BF16")
    return checkpoint.TensorInfo(shape, ("safetensors", start, end), read)


def _read_st(fh: IO[bytes], offset: int, dtype: np.dtype, shape: tuple[int, ...], bf16: bool) -> np.ndarray:
    arr = checkpoint.read_at(fh, offset, int(np.prod(shape)), dtype).reshape(shape)
    return checkpoint.bf16_to_f32(arr) if bf16 else arr
