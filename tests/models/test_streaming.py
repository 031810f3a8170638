"""Streamed conversion: weights read one tensor at a time and written straight into model.onnx.data give
the same graph, weight for weight and logit for logit, as one built from the whole state dict in memory.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kolite.config import ModelSettings
from kolite.convert.graph import EXTERNAL_ALIGN, build_gpt2_graph, token_table_path
from kolite.convert.prepare import prepare_model
from kolite.engine.cpu import detect
from kolite.engine.runtime import GPT2Runtime
from kolite.errors import ModelFormatError
from kolite.models import checkpoint as checkpoint_mod
from kolite.models.gpt2_keys import GPT2Weights, gpt2_weights
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import config_json, random_state_dict, write_checkpoint
from kolite.models.weights import open_checkpoint

# vocab not a multiple of 32 and wide enough that quantization and writing go in several blocks
CFG = GPT2Config(vocab_size=1001, n_positions=64, n_embd=64, n_layer=2, n_head=4)
VARIANTS = [("fp32", None), ("int8", "s8"), ("int8", "u8"), ("int4", None)]
IDS = [5, 17, 250, 3, 99, 1000, 42]


def torch_or_skip():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (optional: only used to write real .bin files)")
    return torch


def write_bin(folder: Path, cfg: GPT2Config, seed: int, *, legacy: bool = False) -> Path:
    """A `pytorch_model.bin` folder as transformers saves GPT2LMHeadModel: lm_head shares wte's storage."""
    import json

    torch = torch_or_skip()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(cfg)))
    sd = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in random_state_dict(cfg, seed=seed).items())
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), CFG, seed=4)


def _initializers(model: onnx.ModelProto, folder: Path | None = None) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, base_dir=str(folder) if folder else "") for t in model.graph.initializer}


def _streamed(path: Path, out: Path, quant: str, form: str | None) -> Path:
    """The graph as conversion builds it: read from the file, weights written to model.onnx.data."""
    out.mkdir(parents=True, exist_ok=True)
    with open_checkpoint(path) as ckpt:
        model = build_gpt2_graph(CFG, GPT2Weights(ckpt, CFG), all_logits=True, quant=quant,  # type: ignore[arg-type]
                                 int8_weights=form, external_data=out / "model.onnx.data",  # type: ignore[arg-type]
                                 token_table=token_table_path(out / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"))
    return out / "model.onnx"


@pytest.mark.parametrize(("quant", "form"), VARIANTS)
def test_streamed_graph_equals_the_in_memory_one(checkpoint: Path, tmp_path: Path, quant: str,
                                                 form: str | None) -> None:
    """Same nodes, same initializers bit for bit (quantized ones too), same metadata, same logits."""
    memory = tmp_path / "memory" / "model.onnx"
    memory.parent.mkdir()
    in_memory = build_gpt2_graph(CFG, gpt2_weights(random_state_dict(CFG, seed=4), CFG), all_logits=True,
                                 quant=quant, int8_weights=form, token_table=token_table_path(memory))  # type: ignore[arg-type]
    onnx.save(in_memory, memory)
    path = _streamed(checkpoint, tmp_path / "streamed", quant, form)
    streamed = onnx.load(str(path), load_external_data=False)

    assert [n.SerializeToString() for n in streamed.graph.node] == [n.SerializeToString() for n in in_memory.graph.node]
    assert list(streamed.metadata_props) == list(in_memory.metadata_props)
    want, got = _initializers(in_memory), _initializers(streamed, path.parent)
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    if form == "s8" and not detect().exact_u8s8:
        return  # the runtime refuses s8 graphs on this CPU (its u8 x s8 kernel saturates); weights compared above
    assert token_table_path(memory).read_bytes() == token_table_path(path).read_bytes()
    a = GPT2Runtime(memory, CFG).prefill(0, IDS)
    b = GPT2Runtime(path, CFG).prefill(0, IDS)
    np.testing.assert_array_equal(b, a)


def test_the_graph_holds_only_references_to_aligned_weights(checkpoint: Path, tmp_path: Path) -> None:
    """Every weight of 1 KB or more is in model.onnx.data, page-aligned, and the data file is nothing more."""
    path = _streamed(checkpoint, tmp_path, "fp32", None)
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert {t.name for t in external} >= {"wpe", "lm_head.weight", "h0.attn.c_attn.weight"}
    assert "wte" not in {t.name for t in model.graph.initializer}  # the token table is a file of its own
    assert token_table_path(path).stat().st_size == CFG.vocab_size * CFG.n_embd * 4
    assert all(len(t.raw_data) < 1024 for t in inline)
    places = [{e.key: e.value for e in t.external_data} for t in external]
    assert {p["location"] for p in places} == {"model.onnx.data"}
    assert all(int(p["offset"]) % EXTERNAL_ALIGN == 0 for p in places)
    end = max(int(p["offset"]) + int(p["length"]) for p in places)
    assert end == (tmp_path / "model.onnx.data").stat().st_size
    assert path.stat().st_size < 64 * 1024  # the graph itself: nodes and small constants


def test_weights_are_checked_before_any_is_read(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening and checking a checkpoint reads only its index; a weight is read when it is asked for."""
    reads: list[int] = []
    real = checkpoint_mod.read_at
    monkeypatch.setattr(checkpoint_mod, "read_at", lambda *a: (reads.append(1), real(*a))[1])
    with open_checkpoint(checkpoint) as ckpt:
        weights = GPT2Weights(ckpt, CFG)
        assert "transformer.wte.weight" in weights and len(weights) == len(ckpt)
        assert reads == []
        wte = weights["transformer.wte.weight"]
        assert len(reads) == 1 and wte.dtype == np.float32 and wte.flags.c_contiguous
    with open_checkpoint(checkpoint) as ckpt, pytest.raises(ModelFormatError, match="does not match"):
        GPT2Weights(ckpt, GPT2Config(**{**CFG.to_dict(), "n_layer": 3}))
    assert len(reads) == 1


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_bin_checkpoint_streams_to_the_same_graph(checkpoint: Path, tmp_path: Path, legacy: bool) -> None:
    """KoGPT2 ships only pytorch_model.bin: read storage by storage, it converts to the graph the
    safetensors file gives, and its tied head is recognised as wte's storage without being read."""
    folder = write_bin(tmp_path / "bin", CFG, seed=4, legacy=legacy)
    with open_checkpoint(folder) as ckpt:
        assert ckpt.same_data("lm_head.weight", "transformer.wte.weight")
    home = tmp_path / "home"
    from_bin = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int8"))
    from_st = prepare_model(ModelSettings(model=str(checkpoint), kolite_home=home, precision="int8"))
    assert from_bin.graph != from_st.graph
    a = GPT2Runtime(from_bin.graph, CFG).prefill(0, IDS)
    b = GPT2Runtime(from_st.graph, CFG).prefill(0, IDS)
    np.testing.assert_array_equal(a, b)
    data = from_bin.graph.with_name("model.onnx.data")
    assert data.read_bytes() == from_st.graph.with_name("model.onnx.data").read_bytes()


def test_an_untied_head_in_a_bin_is_still_refused(tmp_path: Path) -> None:
    torch = torch_or_skip()
    folder = write_bin(tmp_path, CFG, seed=1)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone() + 1.0  # its own storage, other values
    torch.save(sd, folder / "pytorch_model.bin")
    with open_checkpoint(folder) as ckpt, pytest.raises(ModelFormatError, match="lm_head"):
        GPT2Weights(ckpt, CFG)


def test_ort_dynamic_leaves_only_the_graph_and_its_data(checkpoint: Path, tmp_path: Path) -> None:
    """quantize_dynamic works on a streamed fp32 graph and writes its own external data; the entry ends
    with model.onnx, model.onnx.data and the token table only (no fp32 leftovers counted in the manifest),
    and the graph still records its table."""
    prepared = prepare_model(ModelSettings(model=str(checkpoint), kolite_home=tmp_path, precision="int8",
                                           int8_scheme="ort-dynamic"))
    assert set(prepared.manifest["files"]) == {"model.onnx", "model.onnx.data", "model.onnx.tokens"}
    model = onnx.load(str(prepared.graph), load_external_data=False)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)
    assert prepared.graph.stat().st_size < prepared.graph.with_name("model.onnx.data").stat().st_size
    logits = GPT2Runtime(prepared.graph, CFG).prefill(0, IDS)
    assert logits.shape == (1, CFG.vocab_size) and np.isfinite(logits).all()
