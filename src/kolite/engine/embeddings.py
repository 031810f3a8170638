"""The token embedding table, read row by row from its file with `pread` instead of being mapped.

Why: a table inside the graph is mapped by onnxruntime, and every row a prompt touches pulls its pages
(64 KB at a time, with the kernel's fault-around) into the server's resident set for good: 13-22 MB
after a few Korean prompts, up to 39 MB for KoGPT2's int8 table (157 MB as float32). Read with
`pread`, the rows pass through the page cache, which the kernel shares and drops as it needs; the
server holds only the rows of the step it runs. A step reads at most a prompt chunk's rows (a few
hundred reads of 768 bytes), which costs well under a millisecond.

The file (written by `kolite.convert.graph`) holds `rows` x `dim` values (int8 or float32), then, for
int8, one float32 scale per row; the graph's `kolite.token_table` metadata records that layout.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import numpy as np

from kolite.errors import ModelFormatError

TOKEN_TABLE_KEY = "kolite.token_table"


class TokenTable:
    """Embedding rows by token id, dequantized to float32, from a table file beside the graph."""

    def __init__(self, path: Path, *, rows: int, dim: int, dtype: str, scales: str | None) -> None:
        self.path, self.rows, self.dim = Path(path), rows, dim
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = dim * self.dtype.itemsize
        expected = rows * self.row_bytes + (rows * 4 if scales else 0)
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise ModelFormatError(f"the graph's token table {self.path} is missing: convert the model again") from exc
        if size != expected:
            raise ModelFormatError(f"the token table {self.path} holds {size} bytes, not the {expected} its graph "
                                   "records: convert the model again")
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self.scales = None
        if scales:  # one float per row, 200 KB for KoGPT2: kept in memory
            raw = os.pread(self._fd, rows * 4, rows * self.row_bytes)
            self.scales = np.frombuffer(raw, "<f4").astype(np.float32)

    @classmethod
    def for_graph(cls, graph: Path, metadata: dict[str, str]) -> TokenTable:
        """The table a graph's metadata describes, in the graph's folder."""
        text = metadata.get(TOKEN_TABLE_KEY)
        if text is None:
            raise ModelFormatError(f"{graph} has no token table in its metadata (made by an older kolite): "
                                   "convert the model again")
        layout = json.loads(text)
        return cls(Path(graph).with_name(layout["file"]), rows=int(layout["rows"]), dim=int(layout["dim"]),
                   dtype=layout["dtype"], scales=layout.get("scales"))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows for `ids` (any shape) as float32, shaped ids.shape + (dim,)."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise ValueError(f"token ids must be in [0, {self.rows}): got {int(flat.min())}..{int(flat.max())}")
        raw = b"".join(os.pread(self._fd, self.row_bytes, int(t) * self.row_bytes) for t in flat)
        out = np.frombuffer(raw, self.dtype).reshape(flat.size, self.dim).astype(np.float32)
        if self.scales is not None:
            out *= self.scales[flat][:, None]
        return out.reshape(*ids.shape, self.dim)
