"""The token table file: exact rows, clear refusals, and never mapped into the server's memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kolite.convert.graph import quantize_columns, token_table_path, write_gpt2_graph
from kolite.engine.embeddings import TokenTable
from kolite.engine.runtime import GPT2Runtime
from kolite.errors import ModelFormatError
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import random_state_dict

CFG = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_state_dict(CFG, seed=5)


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_rows_are_the_tables_rows(tmp_path: Path, weights: dict, quant: str) -> None:
    """fp32 rows are wte's bit for bit; int8 rows are wte quantized per row, dequantized."""
    rt = GPT2Runtime(write_gpt2_graph(CFG, weights, tmp_path / "model.onnx", quant=quant), CFG)
    ids = np.array([[0, 7, 299, 7], [3, 3, 150, 42]])
    got = rt.tokens.lookup(ids)
    wte = weights["transformer.wte.weight"]
    if quant == "fp32":
        want = wte[ids]
    else:
        q, scale = quantize_columns(wte.T)
        want = (q.T.astype(np.float32) * scale[:, None])[ids]
    assert got.shape == (2, 4, CFG.n_embd) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert rt.tokens.lookup(np.zeros((1, 0), np.int64)).shape == (1, 0, CFG.n_embd)


def test_out_of_range_ids_are_refused(tmp_path: Path, weights: dict) -> None:
    rt = GPT2Runtime(write_gpt2_graph(CFG, weights, tmp_path / "model.onnx", quant="int8"), CFG)
    for bad in ([300], [-1]):
        with pytest.raises(ValueError, match="token ids"):
            rt.tokens.lookup(np.array(bad))


def test_a_missing_or_cut_table_is_a_clear_error(tmp_path: Path, weights: dict) -> None:
    path = write_gpt2_graph(CFG, weights, tmp_path / "model.onnx", quant="int8")
    table = token_table_path(path)
    table.write_bytes(table.read_bytes()[:-4])
    with pytest.raises(ModelFormatError, match="convert the model again"):
        GPT2Runtime(path, CFG)
    table.unlink()
    with pytest.raises(ModelFormatError, match="missing"):
        GPT2Runtime(path, CFG)
    with pytest.raises(ModelFormatError, match="no token table"):
        TokenTable.for_graph(path, {})


def test_the_table_is_never_mapped(tmp_path: Path, weights: dict) -> None:
    """After a prefill and a decode step, no mapping of the table file exists in this process (its rows
    were read with pread), while the weights file may be mapped by onnxruntime."""
    path = write_gpt2_graph(CFG, weights, tmp_path / "model.onnx", quant="int8")
    rt = GPT2Runtime(path, CFG)
    rt.prefill(0, list(range(0, 300, 7)))
    rt.decode([5], [len(range(0, 300, 7))])
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("no /proc/self/maps on this system")
    assert str(token_table_path(path)) not in maps.read_text()
