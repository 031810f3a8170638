"""The int8 KV cache: the graph it makes, the runtime's buffers, and scales applied channel by channel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from kolite.convert import kvcache
from kolite.convert.graph import write_gpt2_graph
from kolite.convert.kvcache import calibrate_kv_cache
from kolite.engine.runtime import GPT2Runtime
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import random_state_dict

CFG = GPT2Config(vocab_size=500, n_positions=96, n_embd=64, n_layer=2, n_head=4)
IDS = np.random.default_rng(2).integers(0, CFG.vocab_size, 40).tolist()


@pytest.fixture()
def graphs(tmp_path: Path) -> tuple[Path, Path]:
    """The same int8-weight model with a float16 cache and with a calibrated int8 cache. Its keys' and
    values' channels span magnitudes 0.2x-4x, so a scale applied to the wrong channel is seen."""
    sd = random_state_dict(CFG, seed=7)
    e = CFG.n_embd
    spread = np.geomspace(0.2, 4.0, 2 * e).astype(np.float32)
    for i in range(CFG.n_layer):
        for key in (f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"):
            sd[key] = sd[key].copy()
            sd[key][..., e:] *= spread
    half = write_gpt2_graph(CFG, sd, tmp_path / "half" / "model.onnx", quant="int8", kv_cache="fp16")
    kv8 = write_gpt2_graph(CFG, sd, tmp_path / "kv8" / "model.onnx", quant="int8", kv_cache="fp16")
    calibrate_kv_cache(kv8, CFG, None)
    return half, kv8


def test_graph_has_int8_cache_and_no_casts_around_attention(graphs: tuple[Path, Path]) -> None:
    half, kv8 = graphs
    model = onnx.load(str(kv8), load_external_data=False)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == CFG.n_layer
    for node in attention:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["k_quant_type"].s == attrs["v_quant_type"].s == b"PER_CHANNEL"
        assert attrs["kv_cache_bit_width"].i == 8
        assert list(node.input)[12:] == [f"{node.input[12][:-8]}.k_scale", f"{node.input[12][:-8]}.v_scale"]
    assert not [n for n in model.graph.node if n.op_type == "Cast" and "attn" in "".join(n.output)]
    assert sum(n.op_type == "Cast" for n in model.graph.node) < sum(
        n.op_type == "Cast" for n in onnx.load(str(half), load_external_data=False).graph.node)
    caches = [v for v in (*model.graph.input, *model.graph.output) if "_key_" in v.name or "_value_" in v.name]
    assert len(caches) == 4 * CFG.n_layer and {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.INT8}
    assert {p.key: p.value for p in model.metadata_props}[kvcache.KV_CACHE_KEY] == "int8"


def test_runtime_buffers_are_int8_at_half_the_bytes(graphs: tuple[Path, Path]) -> None:
    half, kv8 = GPT2Runtime(graphs[0], CFG), GPT2Runtime(graphs[1], CFG)
    assert kv8.kv_dtype == np.int8 and kv8.cache[0].dtype == np.int8
    assert kv8.kv_bytes_per_token * 2 == half.kv_bytes_per_token
    assert kv8.kv_page_tokens == 2 * half.kv_page_tokens


def test_cached_values_are_the_float_ones_per_channel(graphs: tuple[Path, Path]) -> None:
    """Every layer's int8 keys and values times their channel's scale are the float16 cache's values
    to within half a step: the scales are applied on the channel (head x head_dim) they were measured on."""
    half, kv8 = GPT2Runtime(graphs[0], CFG), GPT2Runtime(graphs[1], CFG)
    half.prefill(0, IDS)
    kv8.prefill(0, IDS)
    model = onnx.load(str(graphs[1]), load_external_data=False)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
             if t.name.endswith(("k_scale", "v_scale"))}
    h, d, n = CFG.n_head, CFG.head_dim, len(IDS)
    for i in range(CFG.n_layer):
        for j, kind in enumerate(("k", "v")):
            scale = inits[f"h{i}.attn.{kind}_scale"].reshape(h, 1, d)
            got = kv8.cache[2 * i + j][0, :, :n].astype(np.float32) * scale
            want = half.cache[2 * i + j][0, :, :n].astype(np.float32)
            # half a step of rounding, and the float16 rounding of the reference; layer 0 has the same inputs
            # on both, later layers differ a little by the earlier layers' cache rounding
            tol = 0.5 * scale + (1e-3 if i == 0 else 0.05) * np.abs(want).max()
            assert (np.abs(got - want) <= tol).all(), (i, kind)
            assert np.abs(kv8.cache[2 * i + j][0, :, :n]).max() >= 32  # the range is used, not a few steps


def test_prefill_and_decode_agree_with_the_float_cache(graphs: tuple[Path, Path]) -> None:
    half, kv8 = GPT2Runtime(graphs[0], CFG), GPT2Runtime(graphs[1], CFG)
    a, b = half.prefill(0, IDS)[0], kv8.prefill(0, IDS)[0]
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
    for step in range(8):
        tok = int(np.argmax(a))
        a, b = half.decode([tok], [len(IDS) + step])[0], kv8.decode([tok], [len(IDS) + step])[0]
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_scales_and_calibration_sequences() -> None:
    s = kvcache.scales_from([np.array([0.0, 127.0, 63.5], np.float32)], margin=2.0)[0]
    np.testing.assert_array_equal(s, [1.0, 2.0, 1.0])
    seqs = kvcache.calibration_sequences(CFG.vocab_size, CFG.n_positions, list(range(200)))
    assert [len(x) for x in seqs] == [96, 96, 8, 96, 96, 96, 96]
    assert all(0 <= t < CFG.vocab_size for x in seqs for t in x)
    assert seqs == kvcache.calibration_sequences(CFG.vocab_size, CFG.n_positions, list(range(200)))  # reproducible
    with pytest.raises(ValueError, match="attention nodes"):
        kvcache.quantize_kv_cache(onnx.ModelProto(), [np.ones(4)], [np.ones(4)])
