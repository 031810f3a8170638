"""The ONNX graph against transformers' GPT2LMHeadModel (the correctness oracle, when installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kolite.convert.graph import write_gpt2_graph
from kolite.engine.runtime import GPT2Runtime
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
    write_gpt2_graph(CFG, sd, folder / "model.onnx", all_logits=True)
    return hf, GPT2Runtime(folder / "model.onnx", CFG, slots=2)


def test_prefill_and_cached_decode_match_transformers(pair: tuple) -> None:
    hf, rt = pair
    ids = [4, 8, 15, 16, 23, 42, 108, 300]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
    np.testing.assert_allclose(rt.prefill(0, ids), out.logits[0].numpy(), atol=TOL, rtol=0)
    hf_past = out.past_key_values
    for step, tok in enumerate([77, 5, 250]):
        with torch.no_grad():
            out = hf(torch.tensor([[tok]]), past_key_values=hf_past, use_cache=True)
        hf_past = out.past_key_values
        logits = rt.decode([tok], [8 + step])
        np.testing.assert_allclose(logits[0], out.logits[0, -1].numpy(), atol=TOL, rtol=0)


def test_padded_batch_matches_transformers(pair: tuple) -> None:
    """transformers runs two prompts left-padded with a mask; kolite runs them in two slots."""
    hf, rt = pair
    ids = np.array([[0, 0, 0, 9, 10, 11], [1, 2, 3, 4, 5, 6]])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    nxt = np.array([[70], [71]])
    with torch.no_grad():
        out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos),
                 use_cache=True)
        step = hf(torch.from_numpy(nxt), past_key_values=out.past_key_values,
                  attention_mask=torch.from_numpy(np.concatenate([mask, [[1], [1]]], axis=1)),
                  position_ids=torch.from_numpy(pos[:, -1:] + 1), use_cache=True)
    np.testing.assert_allclose(rt.prefill(0, [9, 10, 11]), out.logits[0, 3:].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(rt.prefill(1, [1, 2, 3, 4, 5, 6]), out.logits[1].numpy(), atol=TOL, rtol=0)
    logits = rt.decode([70, 71], [3, 6])
    np.testing.assert_allclose(logits, step.logits[:, -1].numpy(), atol=TOL, rtol=0)


def test_greedy_continuation_equals_transformers_generate(pair: tuple) -> None:
    hf, rt = pair
    prompt = [17, 29, 31, 44]
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=40)
    expected = gen[0, len(prompt):].tolist()
    logits = rt.prefill(0, prompt)[-1]
    got: list[int] = []
    for _ in range(40):
        tok = int(np.argmax(logits))
        got.append(tok)
        logits = rt.decode([tok], [len(prompt) + len(got) - 1])[0]
    assert got == expected


def test_oracle_reads_our_checkpoint_layout(tmp_path: Path) -> None:
    """transformers loads the synthetic checkpoint with no missing keys: the layout is the hub's."""
    write_checkpoint(tmp_path, CFG, seed=1)
    _, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
