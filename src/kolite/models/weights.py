"""Checkpoint weights to numpy without torch: open a `.safetensors` or `.bin` file (or a model folder)
and read it one tensor at a time (`kolite.models.checkpoint`), through the safetensors reader or the
restricted unpickler."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kolite.models.checkpoint import Checkpoint, weights_file
from kolite.models.safetensors_file import open_safetensors
from kolite.models.torch_file import open_torch


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a `.safetensors`/`.bin` file or a checkpoint folder to read tensor by tensor.

    Everything that can be checked without the tensors' bytes (format, header, pickle safety, each
    tensor's geometry against its storage) is checked here, before any weight is read.
    """
    path = weights_file(Path(path))
    return open_safetensors(path) if path.name.endswith(".safetensors") else open_torch(path)


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors`/`.bin` file or a checkpoint folder whole; floating tensors come back as float32."""
    with open_checkpoint(path) as ckpt:
        return dict(ckpt.items())
