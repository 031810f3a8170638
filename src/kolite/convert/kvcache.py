"""An int8 KV cache: half the bytes of float16 per token, for boards where memory, not speed, is short.

onnxruntime's CPU `GroupQueryAttention` stores keys and values as int8 with one fixed scale per
channel (`k_quant_type`/`v_quant_type` "PER_CHANNEL", `k_scale`/`v_scale` inputs) and dequantizes
them as it reads. The scales must be known before the first token is cached, so they are calibrated
once, at conversion: the float16-cache graph runs a few sequences (a mixed Korean/English text
through the model's tokenizer, and random token ids), and each channel's scale covers the largest
magnitude seen there, with a margin, in 127 steps. A value beyond that later is clipped to it.

What it costs (measured on KoGPT2's shape, benchmarks/RESULTS.md): attention reads half the bytes, so
decoding many long sequences together is faster; onnxruntime's int8 path computes a prompt's attention
about 4x slower than its float16 one, so prompts prefill slower. It is a setting (`--kv-cache int8`),
not the default.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kolite.engine.runtime import GPT2Runtime
from kolite.models.gpt2config import GPT2Config

if TYPE_CHECKING:
    import onnx

KV_CACHE_KEY = "kolite.kv_cache"
MARGIN = 2.0  # headroom: random-weight models met magnitudes 1.4-1.8x the calibrated ones (benchmarks/RESULTS.md)

# Calibration prose, written for kolite: everyday Korean and English of the kinds a chatbot meets.
CALIBRATION_TEXT = """\
안녕하세요. 오늘은 날씨가 맑고 바람이 조금 불어요. 점심으로 김치찌개를 먹었는데 생각보다 맵지 않았어요.
요즘 회사 일이 많아서 주말에는 집에서 푹 쉬고 싶어요. 친구가 새로 생긴 카페에 같이 가자고 했지만 아직 대답을 못 했어요.
기차표는 미리 예매하는 게 좋아요. 명절에는 표가 금방 매진되거든요. 부산까지는 KTX로 두 시간 반쯤 걸려요.
감기에 걸렸을 때는 따뜻한 물을 자주 마시고 잠을 충분히 자는 것이 중요합니다. 열이 계속 나면 병원에 가 보세요.
라즈베리 파이는 작은 컴퓨터입니다. 메모리가 1GB인 보드에서도 간단한 챗봇을 돌릴 수 있습니다.
"공부가 너무 하기 싫어요." "잠깐 산책을 하고 오면 머리가 맑아질 거예요."
"헤어진 지 한 달이 지났어요." "시간이 조금 더 필요할 거예요."
1월 1일, 2024년, 3시 45분, 100만 원, 010-1234-5678, 서울특별시 종로구, ㅋㅋㅋ ㅎㅎ ㅠㅠ!!! ??? ...
The weather was clear this morning, so we walked along the river before work. The train was late again,
and the coffee shop on the corner had already sold out of bagels. "Could you send me the report by Friday?"
she asked. Prices rose 3.2% in March; the bank expects them to fall to 2% by the end of next year.
def main(): print("hello, world")  # code, numbers and symbols too: {"id": 42, "ok": true} <a href="/">home</a>
"""


def calibrate_kv_cache(graph: Path, cfg: GPT2Config, tokenizer_json: Path | None) -> None:
    """Make the float-cache graph at `graph` an int8-cache one, with scales measured by running it on the
    calibration text (through `tokenizer_json`, when the model has one) and random ids."""
    import onnx

    text_ids = None
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        text_ids = Tokenizer.from_file(str(tokenizer_json)).encode(CALIBRATION_TEXT).ids
    runtime = GPT2Runtime(graph, cfg)
    k_max, v_max = calibrate(runtime, calibration_sequences(cfg.vocab_size, cfg.n_positions, text_ids))
    del runtime
    gc.collect()
    model = onnx.load(str(graph), load_external_data=False)
    quantize_kv_cache(model, scales_from(k_max), scales_from(v_max))
    onnx.save_model(model, str(graph))


def calibrate(runtime: GPT2Runtime, sequences: Iterable[Sequence[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The largest |key| and |value| of each channel (head x head_dim, flattened) of each layer, over
    `sequences` prefilled one after another in slot 0 of a float-cache `runtime`."""
    layers = runtime.cfg.n_layer
    k_max = [np.zeros(runtime.cfg.n_embd, np.float32) for _ in range(layers)]
    v_max = [np.zeros(runtime.cfg.n_embd, np.float32) for _ in range(layers)]
    for seq in sequences:
        n = min(len(seq), runtime.capacity)
        if n == 0:
            continue
        runtime.prefill(0, list(seq)[:n])
        for i in range(layers):
            for out, buf in ((k_max[i], runtime.cache[2 * i]), (v_max[i], runtime.cache[2 * i + 1])):
                seen = np.abs(buf[0, :, :n, :].astype(np.float32)).max(axis=1)  # [heads, head_dim]
                np.maximum(out, seen.reshape(-1), out=out)
        runtime.release(0)
    return k_max, v_max


def calibration_sequences(vocab_size: int, n_positions: int, text_ids: Sequence[int] | None) -> list[list[int]]:
    """What `calibrate` runs: the calibration text's ids (when a tokenizer gave them), cut to the
    context window, and random ids over the whole vocabulary; reproducible."""
    length = min(n_positions, 512)
    out = [list(text_ids[start:start + length]) for start in range(0, len(text_ids or ()), length)] if text_ids else []
    rng = np.random.default_rng(0)
    out += [rng.integers(0, vocab_size, length).tolist() for _ in range(4)]
    return out


def scales_from(magnitudes: Sequence[np.ndarray], margin: float = MARGIN) -> list[np.ndarray]:
    """Per-channel scales (magnitude x margin / 127); a channel never seen non-zero gets scale 1."""
    out = []
    for m in magnitudes:
        s = (np.asarray(m, np.float32) * margin / 127.0).astype(np.float32)
        s[s <= 0] = 1.0
        out.append(s)
    return out


def quantize_kv_cache(model: onnx.ModelProto, k_scales: Sequence[np.ndarray], v_scales: Sequence[np.ndarray]) -> None:
    """Turn a kolite graph's KV cache into int8 in place: every `GroupQueryAttention` gets float32 q, k and
    v (the float16 casts around it are dropped: its int8 path takes float32), per-channel scales, and
    int8 `past_*`/`present_*`; the graph's metadata records `kolite.kv_cache` = "int8"."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if len(attention) != len(k_scales) or len(attention) != len(v_scales):
        raise ValueError(f"{len(attention)} attention nodes, {len(k_scales)} key and {len(v_scales)} value scales")
    dropped: list[onnx.NodeProto] = []
    for i, node in enumerate(attention):
        for k in range(3):  # q, k, v: skip a float16 cast
            cast = producers.get(node.input[k])
            if cast is not None and cast.op_type == "Cast":
                node.input[k] = cast.input[0]
                dropped.append(cast)
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Cast":  # the context back to float32
            node.output[0] = after[0].output[0]
            dropped.append(after[0])
        names = [f"h{i}.attn.k_scale", f"h{i}.attn.v_scale"]
        graph.initializer.extend(numpy_helper.from_array(np.asarray(s, np.float32), name)
                                 for s, name in zip((k_scales[i], v_scales[i]), names, strict=True))
        inputs = list(node.input)[:7] + [""] * 5 + names
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    for cast in dropped:
        graph.node.remove(cast)
    for value in (*graph.input, *graph.output):
        if value.name.startswith(("past_key_", "past_value_", "present_key_", "present_value_")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, KV_CACHE_KEY: "int8"})
