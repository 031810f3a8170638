"""int8 on this CPU: which MatMulInteger operand forms are exact, what each costs, and how well each agrees with fp32.

Why this script exists: on x86 without VNNI, ONNX Runtime's u8 x s8 int8 kernel sums byte pairs into
16 bits with saturation (AVX2 `vpmaddubsw`), and kolite's int8 graph (u8 activations around zero
point 128, full-range s8 weights) lost agreement with fp32 there. Three ways out, measured side by side:
- `s8`: kolite's original form (exact with VNNI, AMX and on ARM);
- `u8`: the same weight values stored as u8 with zero point 128 (ONNX Runtime's u8 x u8 kernel);
- `s8-7bit`: weights quantized to [-63, 63] (onnxruntime's `reduce_range`), which cannot saturate
  but has half the weight resolution.

Three parts:
1. kernel: one MatMulInteger per KoGPT2 weight shape, 1 row (decode) and 256 rows (a prefill chunk):
   the share of wrong outputs against numpy's exact integer product, and the time;
2. agreement: the test suite's random model (4 x 128, vocab 2000), every form against fp32 (cosine,
   top-1, top-5 over 256 positions), as tests/engine/test_quantize.py measures it;
3. speed: a KoGPT2-shaped random model per form: prefill of 512 tokens (2 chunks of 256) and batch-1
   and batch-8 decode steps, interleaved repeats, medians.

Usage: python benchmarks/bench_int8.py [--threads N] [--repeats N] [--json PATH] [--skip-speed]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kolite.bench import machine_info, write_json
from kolite.config import default_threads
from kolite.convert import graph as graph_mod
from kolite.convert.graph import build_gpt2_graph
from kolite.engine.runtime import GPT2Runtime, RuntimeOptions
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import KOGPT2_SHAPE, random_state_dict

FORMS = ("s8", "u8", "s8-7bit")
SHAPES = {"c_attn 768x2304": (768, 2304), "mlp.c_fc 768x3072": (768, 3072), "mlp.c_proj 3072x768": (3072, 768)}
SMALL = GPT2Config(vocab_size=2000, n_positions=128, n_embd=128, n_layer=4, n_head=4)


def _stored(w: np.ndarray, form: str) -> tuple[np.ndarray, int]:
    """Integer weights in [-127, 127] as the form stores them, with the zero point."""
    if form == "u8":
        return (w + 128).astype(np.uint8), 128
    if form == "s8-7bit":
        return np.clip(np.rint(w / 2), -63, 63).astype(np.int8), 0
    return w.astype(np.int8), 0


def _matmul_session(stored: np.ndarray, zero: int, threads: int) -> ort.InferenceSession:
    k, n = stored.shape
    node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])
    g = helper.make_graph([node], "mmi", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
                          initializer=[numpy_helper.from_array(stored, "b"),
                                       numpy_helper.from_array(np.array(128, np.uint8), "za"),
                                       numpy_helper.from_array(np.array(zero, stored.dtype), "zb")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_part(threads: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        w = rng.integers(-127, 128, (k, n))
        x = rng.integers(-127, 128, (256, k))
        a = (x + 128).astype(np.uint8)
        for form in FORMS:
            stored, zero = _stored(w, form)
            session = _matmul_session(stored, zero, threads)
            exact = x @ (stored.astype(np.int64) - zero)
            for m in (1, 256):
                y = session.run(None, {"a": a[:m]})[0]
                wrong = float((y != exact[:m]).mean())
                rel = float(np.abs(y - exact[:m]).max() / np.abs(exact[:m]).max())
                feed = {"a": a[:m]}
                ms = 1e3 * _time(lambda s=session, f=feed: s.run(None, f), 200 if m == 1 else 20)
                rows.append({"shape": name, "form": form, "rows": m, "wrong": round(wrong, 4),
                             "max_rel_err": round(rel, 4), "ms": round(ms, 4)})
                print(f"  {name:20s} {form:8s} m={m:3d}: wrong {wrong:6.1%}  max rel err {rel:.3f}  {ms:7.3f} ms")
    return rows


def _seven_bit_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_columns with 7-bit weights (onnxruntime's reduce_range): [-63, 63] per column."""
    scale = (np.abs(w).max(axis=0) / 63.0).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale), -63, 63).astype(np.int8), scale


def build(cfg: GPT2Config, sd: dict, form: str, *, all_logits: bool = False, kv: str = "fp16",
          external_data: Path | None = None) -> onnx.ModelProto:
    """kolite's int8 graph in `form`; the metadata is dropped so the runtime opens an s8 graph even on a
    CPU where it saturates (this script measures exactly that)."""
    original = graph_mod.quantize_columns
    if form == "s8-7bit":
        graph_mod.quantize_columns = _seven_bit_columns
    try:
        model = build_gpt2_graph(cfg, sd, all_logits=all_logits, quant="int8", kv_cache=kv,  # type: ignore[arg-type]
                                 int8_weights="u8" if form == "u8" else "s8", external_data=external_data)
    finally:
        graph_mod.quantize_columns = original
    del model.metadata_props[:]
    return model


def agreement_part(tmp: Path, threads: int) -> list[dict[str, Any]]:
    rows = []
    opts = RuntimeOptions(threads=threads)
    ids = np.random.default_rng(1).integers(0, SMALL.vocab_size, (4, 64))
    for std in (0.02, 0.1):
        sd = random_state_dict(SMALL, seed=0, std=std)
        onnx.save(build_gpt2_graph(SMALL, sd, all_logits=True), tmp / "fp32.onnx")
        f = GPT2Runtime(tmp / "fp32.onnx", SMALL, opts)
        a = np.concatenate([f.prefill(0, r.tolist()) for r in ids])
        for form in FORMS:
            onnx.save(build(SMALL, sd, form, all_logits=True, kv="fp32"), tmp / f"{form}.onnx")
            q = GPT2Runtime(tmp / f"{form}.onnx", SMALL, opts)
            b = np.concatenate([q.prefill(0, r.tolist()) for r in ids])
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            top1 = float((a.argmax(1) == b.argmax(1)).mean())
            top5 = float(np.mean([a[i].argmax() in np.argsort(-b[i])[:5] for i in range(len(a))]))
            rows.append({"std": std, "form": form, "cosine_min": round(float(cos.min()), 5),
                         "cosine_mean": round(float(cos.mean()), 5), "top1": round(top1, 3), "top5": round(top5, 3)})
            print(f"  std {std:4}: {form:8s} cosine min {cos.min():.4f} mean {cos.mean():.4f} "
                  f"top1 {top1:.3f} top5 {top5:.3f}")
    return rows


def speed_part(tmp: Path, threads: int, repeats: int) -> list[dict[str, Any]]:
    cfg = KOGPT2_SHAPE
    sd = random_state_dict(cfg, seed=0)
    runtimes = {}
    for form in FORMS:
        path = tmp / f"kogpt2-{form}" / "model.onnx"
        path.parent.mkdir()
        onnx.save_model(build(cfg, sd, form, external_data=path.with_name("model.onnx.data")), str(path))
        runtimes[form] = GPT2Runtime(path, cfg, RuntimeOptions(threads=threads), slots=8)
    del sd
    prompt = np.random.default_rng(2).integers(16, cfg.vocab_size, 512).tolist()
    samples: dict[str, dict[str, list[float]]] = {f: {"prefill_512_ms": [], "decode_b1_tok_s": [],
                                                      "decode_b8_tok_s": []} for f in FORMS}
    for _ in range(repeats):  # interleaved: the host's drift hits every form alike
        for form, rt in runtimes.items():
            t = time.perf_counter()
            rt.prefill(0, prompt)
            samples[form]["prefill_512_ms"].append(1e3 * (time.perf_counter() - t))
            for slot in range(1, 8):  # seven more rows of 100 tokens for the batch-8 steps
                rt.prefill(slot, prompt[:100])
            steps = 32
            t = time.perf_counter()
            for s in range(steps):
                rt.decode([100], [512 + s])
            samples[form]["decode_b1_tok_s"].append(steps / (time.perf_counter() - t))
            t = time.perf_counter()
            for s in range(steps):
                rt.decode([100] * 8, [512 + s] + [100 + s] * 7)
            samples[form]["decode_b8_tok_s"].append(8 * steps / (time.perf_counter() - t))
    rows = []
    for form, d in samples.items():
        row = {"form": form, **{k: round(statistics.median(v), 2) for k, v in d.items()},
               "runs": {k: [round(x, 2) for x in v] for k, v in d.items()}}
        rows.append(row)
        print(f"  {form:8s} prefill 512: {row['prefill_512_ms']:7.1f} ms | decode b1 "
              f"{row['decode_b1_tok_s']:6.1f} tok/s | decode b8 {row['decode_b8_tok_s']:6.1f} tok/s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-speed", action="store_true", help="only the kernel and agreement parts (fast)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": machine_info(args.threads)}
    cpu = report["machine"]["cpu_features"]
    print(f"CPU {report['machine']['cpu']} ({' '.join(cpu['features'])}); kolite picks {cpu['int8_weights']} "
          f"weights ({cpu['int8_kernel']}); {args.threads} threads")
    print("1. MatMulInteger against the exact integer product")
    report["kernel"] = kernel_part(args.threads)
    with tempfile.TemporaryDirectory() as d:
        print("2. agreement with fp32 (random 4 x 128 model, 256 positions)")
        report["agreement"] = agreement_part(Path(d), args.threads)
        if not args.skip_speed:
            print(f"3. speed, KoGPT2 shape, {args.repeats} interleaved repeats (medians)")
            report["speed"] = speed_part(Path(d), args.threads, args.repeats)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
