"""int8 agrees with fp32 (both schemes), and kolite's per-token int8 does not depend on batching.

Floors and why: a random GPT-2 has nearly tied logits, so int8 rounding (about 1% of a logit's
spread) flips the top token where the best two are closer than that. Measured on this model with
the weight form `kolite.engine.cpu` picks for each CPU (min cosine / top-1 / top-5, std 0.02 and 0.1):
- AMD EPYC, AVX2 only (u8 weights): per-token 0.9998 / 0.957 / 1.0 and 0.9991 / 0.910 / 1.0;
  ort-dynamic 0.9998 / 0.977 / 1.0 and 0.9988 / 0.930 / 1.0. With s8 weights, whose u8 x s8 kernel
  saturates there, per-token fell to 0.9952 / 0.773 / 0.992 and 0.979 / 0.797 / 0.988 (the failure
  these floors must catch).
- AMD EPYC with AVX-512 VNNI (s8 weights, session 2): cosine >= 0.998, top-1 0.94-0.97, top-5 1.0.
- ARM Cortex-A72 (Pi 4) and A76 (Pi 5) under qemu (s8 weights), identical on both: per-token
  0.9998 / 0.961 / 1.0 and 0.9991 / 0.910 / 1.0; ort-dynamic 0.9998 / 0.977 / 1.0 and 0.9989 / 0.941 / 1.0.
  int4: cosine min 0.930 (A72), 0.927 (A76), mean 0.968, top-5 0.93-0.94.
- per-token-kv8 (int8 weights and the int8 KV cache, float16 cache before: session 4, AVX2): 0.9998 /
  0.969 / 1.0 and 0.9986 / 0.945 / 1.0 (float16 cache 0.9998 / 0.965 and 0.9991 / 0.941). With the KV
  scales' margin at 1.25 instead of 2, std 0.1 fell to 0.9814: clipped keys, which the floor catches.
The floors leave room between those kinds while failing a saturating kernel, a broken quantization
(per-tensor on a wrong axis, or a dropped scale, gives cosine far below 0.99). On the trained
fixture, where the top token has a clear margin, int8 must reproduce every greedy answer that fp32
and transformers give.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from kolite.convert.graph import quantize_columns, write_gpt2_graph
from kolite.convert.kvcache import calibrate_kv_cache
from kolite.convert.quantize import quantize_int8
from kolite.engine.runtime import GPT2Runtime
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import random_state_dict
from tests.conftest import fixture_path

CFG = GPT2Config(vocab_size=2000, n_positions=128, n_embd=128, n_layer=4, n_head=4)
SLOTS = 8


SCHEMES = ["per-token", "ort-dynamic", "per-token-kv8"]  # kv8: int8 weights and an int8 KV cache


def _pair(tmp_path: Path, cfg: GPT2Config, sd: dict, scheme: str = "ort-dynamic",
          tokenizer_json: Path | None = None) -> tuple[GPT2Runtime, GPT2Runtime]:
    write_gpt2_graph(cfg, sd, tmp_path / "fp32.onnx", all_logits=True)
    if scheme == "ort-dynamic":
        quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", per_channel=True)
    else:
        quant = "int4" if scheme == "int4" else "int8"
        write_gpt2_graph(cfg, sd, tmp_path / "int8.onnx", all_logits=True, quant=quant, kv_cache="fp16")
        if scheme.endswith("-kv8"):
            calibrate_kv_cache(tmp_path / "int8.onnx", cfg, tokenizer_json)
    return (GPT2Runtime(tmp_path / "fp32.onnx", cfg, slots=SLOTS),
            GPT2Runtime(tmp_path / "int8.onnx", cfg, slots=SLOTS))


@pytest.mark.parametrize("form", ["s8", "u8"])
def test_per_token_graph_is_really_int8(tmp_path: Path, form: str) -> None:
    sd = random_state_dict(CFG, seed=0)
    write_gpt2_graph(CFG, sd, tmp_path / "fp32.onnx")
    write_gpt2_graph(CFG, sd, tmp_path / "int8.onnx", quant="int8", int8_weights=form)  # type: ignore[arg-type]
    model = onnx.load(tmp_path / "int8.onnx")
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 4 * CFG.n_layer + 1
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and "weight" in "".join(n.input)]
    want = onnx.TensorProto.INT8 if form == "s8" else onnx.TensorProto.UINT8
    matmul_weights = [t for t in model.graph.initializer if t.name.endswith(".weight_q")]
    assert len(matmul_weights) == 4 * CFG.n_layer + 1 and {t.data_type for t in matmul_weights} == {want}
    assert {p.key: p.value for p in model.metadata_props}["kolite.int8_weights"] == form
    def size(name: str) -> int:  # the graph, its weights and its token table
        return sum(p.stat().st_size for p in tmp_path.glob(f"{name}.onnx*"))

    assert size("int8") < 0.5 * size("fp32")


def test_int4_graph_uses_4bit_blocks(tmp_path: Path) -> None:
    _pair(tmp_path, CFG, random_state_dict(CFG, seed=0), "int4")
    model = onnx.load(tmp_path / "int8.onnx")
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * CFG.n_layer + 1
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nbits)
    weights = {name: (tmp_path / f"{name}.onnx.data").stat().st_size for name in ("int8", "fp32")}  # int4 in "int8"
    assert weights["int8"] < 0.25 * weights["fp32"]


def test_int4_agreement_on_random_weights(tmp_path: Path) -> None:
    """int4 (blocks of 32, as Q4_0) is coarser than int8: measured cosine 0.93-0.98 (mean 0.97)
    on this random model on x86, min 0.930 / 0.927 on the A72 / A76 (mean 0.968, top-5 0.93-0.94);
    the floors catch a broken packing (a wrong nibble order gives ~0)."""
    f, q = _pair(tmp_path, CFG, random_state_dict(CFG, seed=0, std=0.1), "int4")
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 64))
    a = np.concatenate([f.prefill(0, row.tolist()) for row in ids])
    b = np.concatenate([q.prefill(0, row.tolist()) for row in ids])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    top5 = float(np.mean([a[i].argmax() in np.argsort(-b[i])[:5] for i in range(len(a))]))
    print(f"int4 cosine min {cos.min():.3f} mean {cos.mean():.3f} top5 {top5:.2f}")
    assert cos.min() > 0.9 and cos.mean() > 0.95
    assert top5 >= 0.8


def test_quantize_columns_is_symmetric_per_column() -> None:
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32) * np.arange(1, 17, dtype=np.float32)
    q, scale = quantize_columns(w)
    assert q.dtype == np.int8 and scale.shape == (16,)
    assert np.abs(q).max(axis=0).tolist() == [127] * 16  # each column uses its whole range
    np.testing.assert_allclose(q * scale, w, atol=float(scale.max()) / 2 + 1e-6)


@pytest.mark.parametrize("form", ["s8", "u8"])
def test_ort_dynamic_graph_is_really_int8(tmp_path: Path, form: str) -> None:
    write_gpt2_graph(CFG, random_state_dict(CFG, seed=0), tmp_path / "fp32.onnx", all_logits=True)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", int8_weights=form)  # type: ignore[arg-type]
    model = onnx.load(tmp_path / "int8.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}
    assert {p.key: p.value for p in model.metadata_props}["kolite.int8_weights"] == form
    want = onnx.TensorProto.INT8 if form == "s8" else onnx.TensorProto.UINT8
    int8_weights = [t for t in model.graph.initializer if t.data_type == want and len(t.dims) == 2]
    # every weight MatMul of every layer (c_attn, c_proj, c_fc, mlp.c_proj) plus the lm_head
    assert len(int8_weights) == 4 * CFG.n_layer + 1
    # the token/position embeddings (a Gather) stay float32; every MatMul weight shrinks 4x
    def size(name: str) -> int:  # the graph, its weights and its token table
        return sum(p.stat().st_size for p in tmp_path.glob(f"{name}.onnx*"))

    assert size("int8") < 0.5 * size("fp32")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("std", [0.02, 0.1])
def test_int8_agreement_on_random_weights(tmp_path: Path, std: float, scheme: str) -> None:
    f, q = _pair(tmp_path, CFG, random_state_dict(CFG, seed=0, std=std), scheme)
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 64))
    a = np.concatenate([f.prefill(0, row.tolist()) for row in ids])
    b = np.concatenate([q.prefill(0, row.tolist()) for row in ids])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    top1 = float((a.argmax(1) == b.argmax(1)).mean())
    top5 = float(np.mean([a[i].argmax() in np.argsort(-b[i])[:5] for i in range(len(a))]))
    print(f"{scheme} std {std}: cosine min {cos.min():.4f} top1 {top1:.3f} top5 {top5:.3f}")
    assert cos.min() > 0.995
    assert top1 >= 0.85
    assert top5 >= 0.98


def _greedy(rt: GPT2Runtime, prompt: list[int], eos: int, limit: int = 48) -> list[int]:
    logits = rt.prefill(0, prompt)[-1]
    out: list[int] = []
    for _ in range(limit):
        tok = int(np.argmax(logits))
        if tok == eos:
            break
        out.append(tok)
        logits = rt.decode([tok], [len(prompt) + len(out) - 1])[0]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [*SCHEMES, "int4"])
def test_int8_reproduces_trained_fixture_answers(tmp_path: Path, scheme: str) -> None:
    from safetensors.numpy import load_file

    folder = fixture_path("chatbot-tiny-ko")
    cfg = GPT2Config.from_file(folder / "config.json")
    f, q = _pair(tmp_path, cfg, load_file(folder / "model.safetensors"), scheme, folder / "tokenizer.json")
    facts = json.loads((folder / "facts.json").read_text(encoding="utf-8"))["greedy_exact_answers"]
    for fact in facts:
        assert _greedy(f, fact["prompt_ids"], cfg.eos_token_id) == fact["answer_ids"], fact["q"]
        assert _greedy(q, fact["prompt_ids"], cfg.eos_token_id) == fact["answer_ids"], fact["q"]
