"""An open checkpoint file, read one tensor at a time, and the file names kolite reads weights from.

Conversion has to fit a Pi's memory, so a checkpoint is opened by its index alone (safetensors' header,
the pickle's tensor records; `kolite.models.safetensors_file`, `kolite.models.torch_file`) and a
tensor's bytes are read when that tensor is asked for: the converter holds one tensor at a time, never
the whole 500 MB model. Tensors are read with plain file reads into their own array, not through a
memory map, because a mapped file's pages count as the process's resident memory for as long as it
stays mapped (reading all of KoGPT2 through one safetensors `safe_open` left 510 MB of the file
resident; see benchmarks/bench_convert.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from kolite.errors import ModelFormatError

SAFETENSORS_NAME = "model.safetensors"
TORCH_BIN_NAME = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_NAME, TORCH_BIN_NAME)  # in the order kolite prefers them
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SHARDED_MESSAGE = "sharded checkpoints are not supported (GPT-2 models fit one file)"


# ----------------------------------------------------------------------------------------------------
# dtypes


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a 16-bit shift (numpy has no bfloat16)."""
    return (bits.astype("<u4") << 16).view("<f4").astype(np.float32, copy=False)


def as_float32(arr: np.ndarray) -> np.ndarray:
    """Half precision is stored to save disk; the converter wants float32 (ints/bools pass unchanged)."""
    # ml_dtypes' bfloat16 (registered once torch/onnx import it) is not a numpy "floating" subtype
    if arr.dtype != np.float32 and (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        return arr.astype(np.float32)
    return arr


# ----------------------------------------------------------------------------------------------------
# one tensor at a time


@dataclass(frozen=True)
class TensorInfo:
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

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], close: Callable[[], None]) -> None:
        self.path = path
        self._tensors = tensors
        self._close = close

    def __getitem__(self, key: str) -> np.ndarray:
        return as_float32(self.stored(key))

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


def weights_file(path: Path) -> Path:
    if path.is_dir():
        path = weights_in_folder(path)
    if not path.is_file():
        raise ModelFormatError(f"weights file {path} does not exist")
    if not (path.name.endswith(".safetensors") or path.suffix in TORCH_SUFFIXES):
        raise ModelFormatError(f"{path.name}: unknown weights format (expected .safetensors or .bin)")
    return path


def weights_in_folder(folder: Path) -> Path:
    """safetensors first: it loads faster and cannot carry code."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ModelFormatError(f"{folder}: {SHARDED_MESSAGE}")
    raise ModelFormatError(f"{folder} has neither {SAFETENSORS_NAME} nor {TORCH_BIN_NAME}")


def read_at(fh: IO[bytes], offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    """`count` elements from byte `offset` of an open file, read straight into a new array (no second copy)."""
    arr = np.empty(count, dtype)
    fh.seek(offset)
    got = fh.readinto(arr.view(np.uint8)) if arr.nbytes else 0
    if got != arr.nbytes:
        raise ModelFormatError(f"{getattr(fh, 'name', 'checkpoint')}: truncated ({got} of {arr.nbytes} bytes)")
    return arr
