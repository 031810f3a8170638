"""The bytes a decode step must read (weights from the graph, the KV cache), for the decode ceiling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kolite.engine.embeddings import TOKEN_TABLE_KEY
from kolite.models.gpt2config import GPT2Config

if TYPE_CHECKING:
    pass


def weight_bytes_per_token(graph: Path | str) -> dict[str, Any]:
    """Bytes of weights one decode step reads, from the ONNX graph's initializers.

    Why: batch-1 decode is memory-bound, so bandwidth / these bytes is the fastest it could go. Every
    initializer is read once per step (the int8/int4/fp32 matrices of each layer and of lm_head, and
    the small biases, scales and norms), except the embedding tables (wte, wpe and their int8 scales:
    initializers used only as the data of a `Gather`): a step reads one row of each, so each counts
    as one row. kolite's graphs keep lm_head as its own initializer (quantized, or a transposed fp32
    copy), so the tied wte is not counted twice; a table that another node also reads in full (a
    lm_head sharing it) counts in full. The token table kolite keeps in a file beside the graph (see
    `kolite.engine.embeddings`) counts as one of those tables, "token_table", with one row (and its
    scale) per step. The KV cache, read too, grows with the context: see `kv_bytes_per_token`.
    Initializer sizes come from their shapes; the weights are not loaded.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits}
    read_whole = {name for n in model.graph.node for k, name in enumerate(n.input)
                  if name in gathered and not (n.op_type == "Gather" and k == 0)}
    gathered -= read_whole
    matrices = small = tables = table_rows = 0
    by_dtype: dict[str, int] = {}
    for name, t in inits.items():
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        nbytes = math.prod(t.dims) * dtype.itemsize
        if name in gathered:
            tables += nbytes
            table_rows += nbytes // max(1, t.dims[0]) if t.dims else nbytes
            continue
        if len(t.dims) >= 2:
            matrices += nbytes
            by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + nbytes
        else:
            small += nbytes
    names = sorted(gathered)
    layout = {p.key: p.value for p in model.metadata_props}.get(TOKEN_TABLE_KEY)
    if layout:
        table = json.loads(layout)
        row = table["dim"] * np.dtype(table["dtype"]).itemsize + (4 if table.get("scales") else 0)
        tables, table_rows, names = tables + row * table["rows"], table_rows + row, sorted([*names, "token_table"])
    return {"bytes_per_token": matrices + small + table_rows, "matrix_bytes": matrices, "other_bytes": small,
            "embedding_table_bytes": tables, "embedding_row_bytes": table_rows,
            "embedding_tables": names, "matrix_bytes_by_dtype": by_dtype,
            "graph_file_bytes": sum(p.stat().st_size for p in Path(graph).parent.glob(Path(graph).name + "*"))}


def kv_bytes_per_token(cfg: GPT2Config, context: int, itemsize: int = 4) -> int:
    """KV cache bytes a decode step reads at `context` tokens: keys and values of every layer
    (`itemsize` 4 for a float32 cache, 2 for float16)."""
    return 2 * cfg.n_layer * context * cfg.n_embd * itemsize


def parameter_count(cfg: GPT2Config) -> int:
    e = cfg.n_embd
    return (cfg.vocab_size + cfg.n_positions) * e + cfg.n_layer * (2 * e * cfg.inner_dim + 4 * e * e
                                                                    + 9 * e + cfg.inner_dim) + 2 * e
