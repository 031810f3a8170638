"""The KV cache types side by side: float16 (`--kv-cache float`) against int8 (`--kv-cache int8`).

Why: the int8 cache halves the memory per token of context, which is what lets eight streams fit a
small board (bench_memory.py measures that), but onnxruntime's int8 attention path is slower for
prompts; this script measures what it costs and what it changes in the answers:
1. speed, on a KoGPT2-shaped random model converted both ways (as `kolite pull` converts it): prefill
   of 128 / 512 / 900 tokens, and decode steps of 1 row at 100 and 900 tokens of context and 8 rows at
   228 and 900, interleaved repeats (best of each, the host is noisy);
2. quality: the trained fixture `chatbot-tiny-ko` (when KOLITE_FIXTURES has it): its 30 greedy answers
   with each cache, and the logits of every answer step against fp32 (cosine, top-1).

    python benchmarks/bench_kv.py [--threads N] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core  # noqa: E402  (the shared random checkpoint and machine description)
from kolite.bench import write_json  # noqa: E402
from kolite.config import ModelSettings, default_threads  # noqa: E402
from kolite.convert.prepare import prepare_model  # noqa: E402
from kolite.engine.runtime import GPT2Runtime, RuntimeOptions  # noqa: E402

PROMPTS = (128, 512, 900)
DECODES = ((1, 100), (1, 900), (8, 228), (8, 900))  # (rows, tokens of context)


def _runtime(model: Path, home: Path, precision: str, kv_cache: str, threads: int, slots: int = 8) -> GPT2Runtime:
    settings = ModelSettings(model=str(model), kolite_home=home, precision=precision, kv_cache=kv_cache,
                             threads=threads)
    prepared = prepare_model(settings, progress=lambda _m: None)
    return GPT2Runtime(prepared.graph, prepared.config, RuntimeOptions(threads=threads), slots=slots)


def speed(home: Path, threads: int, repeats: int) -> dict[str, Any]:
    work = bench_core.DEFAULT_OUT / "work"
    folder, shape = work / "kogpt2-shape-random", bench_core.model_shape(False)
    tokenizer = bench_core.KOGPT2_TOKENIZER
    if not tokenizer.is_file():
        tokenizer = bench_core.fallback_tokenizer(work / "fallback-tokenizer.json", shape.vocab_size)
    bench_core.ensure_checkpoint(folder, shape, tokenizer)
    runtimes = {kv: _runtime(folder, home, "int8", kv, threads) for kv in ("float", "int8")}
    ids = np.random.default_rng(0).integers(100, 50000, max(PROMPTS)).tolist()
    runs: dict[str, dict[str, list[float]]] = {kv: {} for kv in runtimes}
    for _ in range(repeats):
        for kv, rt in runtimes.items():
            for n in PROMPTS:
                started = time.perf_counter()
                rt.prefill(0, ids[:n])
                runs[kv].setdefault(f"prefill_{n}_ms", []).append((time.perf_counter() - started) * 1000)
                rt.release(0)
            for rows, context in DECODES:
                started = time.perf_counter()
                for step in range(16):
                    rt.decode([5] * rows, [context + step] * rows)
                runs[kv].setdefault(f"decode_{rows}x{context}_tok_s", []).append(
                    16 * rows / (time.perf_counter() - started))
    best = {kv: {k: round(min(v) if k.endswith("_ms") else max(v), 1) for k, v in r.items()} for kv, r in runs.items()}
    per_token = {kv: rt.kv_bytes_per_token for kv, rt in runtimes.items()}
    return {"best": best, "runs": runs, "kv_bytes_per_token": per_token}


def quality(home: Path, threads: int) -> dict[str, Any] | None:
    folder = bench_core.FIXTURES / "chatbot-tiny-ko"
    if not (folder / "facts.json").is_file():
        return None
    facts = json.loads((folder / "facts.json").read_text(encoding="utf-8"))["greedy_exact_answers"]
    ref = _runtime(folder, home, "fp32", "float", threads, slots=1)
    out: dict[str, Any] = {}
    for kv in ("float", "int8"):
        rt = _runtime(folder, home, "int8", kv, threads, slots=1)
        exact, cos, top1 = 0, [], []
        for fact in facts:
            prompt, answer = fact["prompt_ids"], fact["answer_ids"]
            a, b = ref.prefill(0, prompt)[-1], rt.prefill(0, prompt)[-1]
            got: list[int] = []
            for k in range(len(answer) + 1):  # teacher-forced along the reference answer
                cos.append(float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))
                top1.append(float(a.argmax() == b.argmax()))
                if k == len(answer):
                    break
                a = ref.decode([answer[k]], [len(prompt) + k])[0].copy()
                b = rt.decode([answer[k]], [len(prompt) + k])[0].copy()
            ref.release(0)
            rt.release(0)
            logits = rt.prefill(0, prompt)[-1]  # greedy, free-running
            while len(got) < 48 and int(logits.argmax()) != rt.cfg.eos_token_id:
                got.append(int(logits.argmax()))
                logits = rt.decode([got[-1]], [len(prompt) + len(got) - 1])[0]
            rt.release(0)
            exact += got == answer
        out[kv] = {"exact_answers": exact, "of": len(facts), "cosine_min": round(min(cos), 5),
                   "cosine_mean": round(float(np.mean(cos)), 5), "top1": round(float(np.mean(top1)), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=bench_core.DEFAULT_OUT / "bench_kv.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        result = {"benchmark": "bench_kv", "machine": bench_core.machine_info(), "threads": args.threads,
                  "quality": quality(home, args.threads), "speed": speed(home, args.threads, args.repeats)}
    for kv, best in result["speed"]["best"].items():
        print(f"{kv:5} cache: " + ", ".join(f"{k} {v}" for k, v in best.items()))
    if result["quality"]:
        for kv, q in result["quality"].items():
            print(f"{kv:5} cache, trained fixture: {q['exact_answers']}/{q['of']} answers exact; logits vs fp32 "
                  f"cosine min {q['cosine_min']} mean {q['cosine_mean']}, top-1 {q['top1']}")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
