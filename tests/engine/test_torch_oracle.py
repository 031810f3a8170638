"""The ONNX graph against transformers' GPT2LMHeadModel (the correctness oracle, when installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from kolite.engine.graph import build_gpt2_graph
from kolite.engine.runtime import GPT2Runtime, positions_from_mask
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import write_checkpoint

torch = pytest.importorskip("torch", reason="torch is the optional oracle (pip install '.[oracle]')")
transformers = pytest.importorskip("transformers")

CFG = GPT2Config(vocab_size=320, n_positions=96, n_embd=64, n_layer=3, n_head=4, eos_token_id=1, bos_token_id=1)
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, GPT2Runtime]:
    from safetensors.numpy import load_file

    folder = tmp_path_factory.mktemp("oracle")
    write_checkpoint(folder, CFG, seed=11)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    sd = load_file(folder / "model.safetensors")
    onnx.save(build_gpt2_graph(CFG, sd, all_logits=True), folder / "model.onnx")
    return hf, GPT2Runtime(folder / "model.onnx", CFG)


def test_prefill_and_cached_decode_match_transformers(pair: tuple) -> None:
    hf, rt = pair
    ids = np.array([[4, 8, 15, 16, 23, 42, 108, 300]])
    with torch.no_grad():
        out = hf(torch.from_numpy(ids), use_cache=True)
    mask = np.ones_like(ids)
    logits, past = rt.forward(ids, mask, positions_from_mask(mask, 8), rt.empty_cache(1))
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=TOL, rtol=0)
    hf_past = out.past_key_values
    for step, tok in enumerate([77, 5, 250]):
        with torch.no_grad():
            out = hf(torch.tensor([[tok]]), past_key_values=hf_past, use_cache=True)
        hf_past = out.past_key_values
        mask = np.ones((1, 9 + step), np.int64)
        logits, past = rt.forward(np.array([[tok]]), mask, positions_from_mask(mask, 1), past)
        np.testing.assert_allclose(logits[0, -1], out.logits[0, -1].numpy(), atol=TOL, rtol=0)


def test_padded_batch_matches_transformers(pair: tuple) -> None:
    hf, rt = pair
    ids = np.array([[0, 0, 0, 9, 10, 11], [1, 2, 3, 4, 5, 6]])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = positions_from_mask(mask, 6)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(pos)).logits.numpy()
    logits, _ = rt.forward(ids, mask, pos, rt.empty_cache(2))
    np.testing.assert_allclose(logits[0, 3:], ref[0, 3:], atol=TOL, rtol=0)  # pad rows differ by design
    np.testing.assert_allclose(logits[1], ref[1], atol=TOL, rtol=0)


def test_greedy_continuation_equals_transformers_generate(pair: tuple) -> None:
    hf, rt = pair
    prompt = [17, 29, 31, 44]
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=40)
    expected = gen[0, len(prompt):].tolist()
    ids = np.array([prompt])
    mask = np.ones_like(ids)
    past = rt.empty_cache(1)
    got: list[int] = []
    for _ in range(40):
        logits, past = rt.forward(ids, mask, positions_from_mask(mask, ids.shape[1]), past)
        tok = int(np.argmax(logits[0, -1]))
        got.append(tok)
        ids = np.array([[tok]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    assert got == expected


def test_oracle_reads_our_checkpoint_layout(tmp_path: Path) -> None:
    """transformers loads the synthetic checkpoint with no missing keys: the layout is the hub's."""
    write_checkpoint(tmp_path, CFG, seed=1)
    _, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
