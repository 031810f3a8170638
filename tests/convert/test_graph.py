"""The ONNX graph against an independent numpy forward pass: prefill, cached decode, mixed batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kolite.convert.graph import build_gpt2_graph, input_names, output_names, token_table_path, write_gpt2_graph
from kolite.engine.runtime import GPT2Runtime
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import random_state_dict
from tests.engine.numpy_reference import forward

TOL = 1e-4
CFG = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_state_dict(CFG, seed=3, std=0.15)  # large enough that attention is far from uniform


def _runtime(tmp_path: Path, cfg: GPT2Config, sd: dict, all_logits: bool, slots: int = 1) -> GPT2Runtime:
    path = tmp_path / ("all.onnx" if all_logits else "last.onnx")
    model = build_gpt2_graph(cfg, sd, all_logits=all_logits, token_table=token_table_path(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return GPT2Runtime(path, cfg, slots=slots)


def test_io_names_follow_layers(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    assert [i.name for i in rt.session.get_inputs()] == input_names(CFG.n_layer)
    assert [o.name for o in rt.session.get_outputs()] == output_names(CFG.n_layer)


def test_prefill_logits_and_cache_match_reference(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=True)
    ids = [5, 17, 250, 3, 99, 42, 7]
    logits = rt.prefill(0, ids)
    ref, ref_cache = forward(CFG, weights, np.array([ids]))
    assert logits.shape == (7, CFG.vocab_size)
    np.testing.assert_allclose(logits, ref[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(rt.cache[0][0, :, :7], ref_cache[0][0][0], atol=TOL, rtol=0)  # layer-0 keys, in place


def test_last_only_graph_equals_last_position(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    ids = [5, 17, 250, 3]
    logits = rt.prefill(0, ids)
    ref, _ = forward(CFG, weights, np.array([ids]))
    assert logits.shape == (1, CFG.vocab_size)
    np.testing.assert_allclose(logits[0], ref[0, -1], atol=TOL, rtol=0)


def test_cached_decode_step_by_step(tmp_path: Path, weights: dict) -> None:
    """Feeding one token at a time through the in-place cache gives the full-sequence logits."""
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    seq = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111]
    full_ref, _ = forward(CFG, weights, np.array([seq]))
    prompt = 3
    np.testing.assert_allclose(rt.prefill(0, seq[:prompt])[-1], full_ref[0, prompt - 1], atol=TOL, rtol=0)
    for t in range(prompt, len(seq)):
        logits = rt.decode([seq[t]], [t])
        np.testing.assert_allclose(logits[0], full_ref[0, t], atol=TOL, rtol=0)


def test_batch_of_different_lengths(tmp_path: Path, weights: dict) -> None:
    """Prompts of different lengths, each in its slot, decode together with their own lengths."""
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6], [250], [40, 41, 42, 43]]
    rt = _runtime(tmp_path, CFG, weights, all_logits=False, slots=len(prompts))
    for slot, p in enumerate(prompts):
        ref, _ = forward(CFG, weights, np.array([p]))
        np.testing.assert_allclose(rt.prefill(slot, p)[-1], ref[0, -1], atol=TOL, rtol=0)
    nxt = [[101, 102], [103, 104], [105, 106], [107, 108]]
    for step in range(2):
        logits = rt.decode([n[step] for n in nxt], [len(p) + step for p in prompts])
        for row, p in enumerate(prompts):
            ref, _ = forward(CFG, weights, np.array([p + nxt[row][: step + 1]]))
            np.testing.assert_allclose(logits[row], ref[0, -1], atol=TOL, rtol=0)


def test_move_carries_a_sequence_to_another_slot(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=False, slots=3)
    rt.prefill(2, [9, 8, 7, 6])
    rt.move(2, 0, 4)
    ref, _ = forward(CFG, weights, np.array([[9, 8, 7, 6, 5]]))
    np.testing.assert_allclose(rt.decode([5], [4])[0], ref[0, -1], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", [
    {"activation_function": "gelu"},
    {"scale_attn_by_inverse_layer_idx": True},
    {"n_inner": 80},
])
def test_config_variants(tmp_path: Path, variant: dict) -> None:
    cfg = GPT2Config(**{**CFG.to_dict(), **variant})
    sd = random_state_dict(cfg, seed=5, std=0.15)
    rt = _runtime(tmp_path, cfg, sd, all_logits=True)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref, _ = forward(cfg, sd, np.array([ids]))
    np.testing.assert_allclose(rt.prefill(0, ids), ref[0], atol=TOL, rtol=0)


def test_prompt_longer_than_a_slot_is_refused(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    with pytest.raises(ValueError, match="does not fit"):
        rt.prefill(0, list(range(CFG.n_positions + 1)))


@pytest.mark.parametrize("all_logits", [True, False])
def test_long_prompts_are_prefilled_in_chunks_with_the_same_result(
    tmp_path: Path, weights: dict, monkeypatch: pytest.MonkeyPatch, all_logits: bool
) -> None:
    """A prompt longer than PREFILL_CHUNK goes in several calls, each attending to what the earlier
    ones cached: logits (all positions, or the last) and the cache equal the reference."""
    from kolite.engine import runtime

    monkeypatch.setattr(runtime, "PREFILL_CHUNK", 4)
    rt = _runtime(tmp_path, CFG, weights, all_logits=all_logits)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, CFG.vocab_size, 11)]  # chunks 4 + 4 + 3
    calls = []
    real_run = rt.session.run_with_iobinding
    monkeypatch.setattr(rt.session, "run_with_iobinding", lambda io: (calls.append(1), real_run(io))[1])
    logits = rt.prefill(0, ids)
    assert len(calls) == 3
    ref, ref_cache = forward(CFG, weights, np.array([ids]))
    want = ref[0] if all_logits else ref[0, -1:]
    assert logits.shape == want.shape
    np.testing.assert_allclose(logits, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(rt.cache[1][0, :, :11], ref_cache[0][1][0], atol=TOL, rtol=0)  # layer-0 values
    np.testing.assert_allclose(rt.decode([9], [11])[0], forward(CFG, weights, np.array([[*ids, 9]]))[0][0, -1],
                               atol=TOL, rtol=0)


def test_fp16_cache_graph_stays_close_to_fp32(tmp_path: Path, weights: dict) -> None:
    """`kv_cache="fp16"`: the runtime allocates float16 buffers from the graph's input types, and
    logits stay within float16 rounding of the fp32 graph's, through prefill and cached decode."""
    path = tmp_path / "kv16.onnx"
    write_gpt2_graph(CFG, weights, path, kv_cache="fp16")
    rt16 = GPT2Runtime(path, CFG)
    rt32 = _runtime(tmp_path, CFG, weights, all_logits=False)
    assert rt16.kv_dtype == np.float16 and rt16.cache[0].dtype == np.float16 and rt32.kv_dtype == np.float32
    seq = [11, 22, 33, 44, 55, 66, 77, 88]
    a, b = rt16.prefill(0, seq[:5]), rt32.prefill(0, seq[:5])
    diffs = [np.abs(a - b).max()]
    for t in range(5, len(seq)):
        diffs.append(np.abs(rt16.decode([seq[t]], [t]) - rt32.decode([seq[t]], [t])).max())
    spread = np.abs(b).max()
    assert 0 < max(diffs) < 1e-2 * spread, (diffs, spread)  # not identical (it is float16), but close


def test_released_slot_gives_its_pages_back_and_is_reusable(tmp_path: Path, weights: dict) -> None:
    """`release(slot)` drops the slot's cache pages (they read back as zeros: the memory went back to
    the system), leaves the other slots alone, and a new prompt in the slot computes as before."""
    cfg = GPT2Config(vocab_size=300, n_positions=1024, n_embd=64, n_layer=3, n_head=4)  # 64 KB per slot
    sd = random_state_dict(cfg, seed=3, std=0.15)
    rt = _runtime(tmp_path, cfg, sd, all_logits=False, slots=2)
    ids = [5, 17, 250, 3, 99]
    first = rt.prefill(1, ids).copy()
    rt.prefill(0, ids)
    assert all(np.abs(buf[1, :, :5]).max() > 0 for buf in rt.cache)
    rt.release(1)
    assert all(not buf[1].any() for buf in rt.cache)  # zero pages: given back
    assert all(np.abs(buf[0, :, :5]).max() > 0 for buf in rt.cache)  # slot 0 untouched
    np.testing.assert_array_equal(rt.prefill(1, ids), first)


@pytest.mark.parametrize("shape", [(96, 70), (100, 7), (33, 500)])
def test_quantizing_in_blocks_gives_the_bytes_of_one_pass(monkeypatch: pytest.MonkeyPatch, shape: tuple) -> None:
    """int8 columns and int4 blocks are made a block of rows / a band of columns at a time (small
    temporaries for a 157 MB lm_head); the result must be exactly that of one whole-matrix pass, for
    contiguous matrices and for the transposed view the lm_head is."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from kolite.convert import graph

    rng = np.random.default_rng(2)
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column gets scale 1

    def int8_one_pass(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = (np.abs(m).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        return np.clip(np.rint(m / scale), -127, 127).astype(np.int8), scale

    def int4_one_pass(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, n = m.shape
        blocks = -(-k // graph.INT4_BLOCK)
        padded = np.zeros((blocks * graph.INT4_BLOCK, n), np.float32)
        padded[:k] = m
        packed, scales = np.zeros((n, blocks, graph.INT4_BLOCK // 2), np.uint8), np.zeros((n, blocks), np.float32)
        zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
        quantize_matmul_4bits(packed, padded, scales, zero_points, graph.INT4_BLOCK, n, blocks * graph.INT4_BLOCK, True)
        return packed, scales

    monkeypatch.setattr(graph, "QUANT_BLOCK", 200)  # several blocks even for these small matrices
    for m in (w, w.T):
        for got, want in ((graph.quantize_columns(m), int8_one_pass(np.ascontiguousarray(m))),
                          (graph.quantize_int4_blocks(m), int4_one_pass(np.ascontiguousarray(m)))):
            for g, x in zip(got, want, strict=True):
                assert g.dtype == x.dtype and g.shape == x.shape
                np.testing.assert_array_equal(g, x)


def test_external_data_writes_a_transposed_view_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lm_head (wte.T, a view) goes to the file a block of rows at a time, page-aligned, never copied whole."""
    from kolite.convert import graph

    monkeypatch.setattr(graph, "QUANT_BLOCK", 100)
    data = graph.ExternalData(tmp_path / "w.data")
    a = np.arange(12 * 37, dtype=np.float32).reshape(12, 37)
    first, second = data.add("a", a[:1, :1].copy()), data.add("t", a.T)
    assert [(e.key, e.value) for e in second.external_data][1:] == [("offset", "4096"), ("length", str(a.nbytes))]
    np.testing.assert_array_equal(numpy_helper.to_array(second, base_dir=str(tmp_path)), a.T)
    np.testing.assert_array_equal(numpy_helper.to_array(first, base_dir=str(tmp_path)), a[:1, :1])
