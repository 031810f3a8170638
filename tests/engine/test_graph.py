"""The ONNX graph against an independent numpy forward pass: prefill, cached decode, mixed batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from kolite.engine.graph import build_gpt2_graph, input_names, output_names
from kolite.engine.runtime import GPT2Runtime, positions_from_mask
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import random_state_dict
from tests.engine.numpy_reference import forward

TOL = 1e-4
CFG = GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=3, n_head=4)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_state_dict(CFG, seed=3, std=0.15)  # large enough that attention is far from uniform


def _runtime(tmp_path: Path, cfg: GPT2Config, sd: dict, all_logits: bool) -> GPT2Runtime:
    model = build_gpt2_graph(cfg, sd, all_logits=all_logits)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / ("all.onnx" if all_logits else "last.onnx")
    onnx.save(model, path)
    return GPT2Runtime(path, cfg)


def test_io_names_follow_layers(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    assert [i.name for i in rt.session.get_inputs()] == input_names(CFG.n_layer)
    assert [o.name for o in rt.session.get_outputs()] == output_names(CFG.n_layer)


def test_prefill_logits_match_reference(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=True)
    ids = np.array([[5, 17, 250, 3, 99, 42, 7]])
    mask = np.ones_like(ids)
    logits, present = rt.forward(ids, mask, positions_from_mask(mask, ids.shape[1]), rt.empty_cache(1))
    ref, ref_cache = forward(CFG, weights, ids)
    assert logits.shape == (1, 7, CFG.vocab_size)
    np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(present[0], ref_cache[0][0], atol=TOL, rtol=0)  # layer-0 keys


def test_last_only_graph_equals_last_position(tmp_path: Path, weights: dict) -> None:
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    ids = np.array([[5, 17, 250, 3]])
    mask = np.ones_like(ids)
    logits, _ = rt.forward(ids, mask, positions_from_mask(mask, 4), rt.empty_cache(1))
    ref, _ = forward(CFG, weights, ids)
    assert logits.shape == (1, 1, CFG.vocab_size)
    np.testing.assert_allclose(logits[:, -1], ref[:, -1], atol=TOL, rtol=0)


def test_cached_decode_step_by_step(tmp_path: Path, weights: dict) -> None:
    """Feeding one token at a time through the cache gives the full-sequence logits at each step."""
    rt = _runtime(tmp_path, CFG, weights, all_logits=False)
    seq = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111]
    full_ref, _ = forward(CFG, weights, np.array([seq]))
    prompt = 3
    ids = np.array([seq[:prompt]])
    mask = np.ones_like(ids)
    past = rt.empty_cache(1)
    logits, past = rt.forward(ids, mask, positions_from_mask(mask, prompt), past)
    np.testing.assert_allclose(logits[0, -1], full_ref[0, prompt - 1], atol=TOL, rtol=0)
    for t in range(prompt, len(seq)):
        mask = np.ones((1, t + 1), np.int64)
        logits, past = rt.forward(np.array([[seq[t]]]), mask, positions_from_mask(mask, 1), past)
        assert past[0].shape[2] == t + 1
        np.testing.assert_allclose(logits[0, -1], full_ref[0, t], atol=TOL, rtol=0)


def test_left_padded_batch_of_different_lengths(tmp_path: Path, weights: dict) -> None:
    """Rows of different lengths share a batch through the mask and positions, in prefill and decode."""
    rt = _runtime(tmp_path, CFG, weights, all_logits=True)
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6], [250], [40, 41, 42, 43]]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    logits, past = rt.forward(ids, mask, positions_from_mask(mask, width), rt.empty_cache(len(prompts)))
    for row, p in enumerate(prompts):
        ref, _ = forward(CFG, weights, np.array([p]))
        np.testing.assert_allclose(logits[row, width - len(p):], ref[0], atol=TOL, rtol=0)
    # two decode steps for the whole batch
    nxt = [[101, 102], [103, 104], [105, 106], [107, 108]]
    for step in range(2):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        tokens = np.array([[n[step]] for n in nxt])
        logits, past = rt.forward(tokens, mask, positions_from_mask(mask, 1), past)
        for row, p in enumerate(prompts):
            ref, _ = forward(CFG, weights, np.array([p + nxt[row][: step + 1]]))
            np.testing.assert_allclose(logits[row, -1], ref[0, -1], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", [
    {"activation_function": "gelu"},
    {"scale_attn_by_inverse_layer_idx": True},
    {"n_inner": 80},
])
def test_config_variants(tmp_path: Path, variant: dict) -> None:
    cfg = GPT2Config(**{**CFG.to_dict(), **variant})
    sd = random_state_dict(cfg, seed=5, std=0.15)
    rt = _runtime(tmp_path, cfg, sd, all_logits=True)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    mask = np.ones_like(ids)
    logits, _ = rt.forward(ids, mask, positions_from_mask(mask, 8), rt.empty_cache(1))
    ref, _ = forward(cfg, sd, ids)
    np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)


def test_positions_from_mask() -> None:
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask, 4), [[0, 0, 0, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(positions_from_mask(mask, 1), [[1], [3]])
