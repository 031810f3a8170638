"""Head to head: kolite (int8, fp32, int4) against llama.cpp (Q8_0, Q4_0) and transformers, same weights.

For each model shape (`--models kogpt2,distilgpt2`; random weights, KoGPT2's exact shape: vocab 51200,
12 layers, 768 wide, 12 heads, 1024 positions; distilgpt2's: vocab 50257, 6 layers) one run:

1. writes GGUF files of the SAME random checkpoint that kolite converts: F32 with gguf-py (tensor
   names, transposes and keys as llama.cpp's `convert_hf_to_gguf.py` writes GPT-2; a `gpt2` tokenizer
   section built from the checkpoint's `tokenizer.json`), then Q8_0 and Q4_0 with llama.cpp's own
   quantizer (`llama_model_quantize`, the library call behind `llama-quantize`);
2. checks correctness before timing anything: llama.cpp F32 (F32 KV cache, flash attention off:
   its most exact path) against kolite fp32 on the same ids: max abs diff of the logits at every
   step of a 64-token greedy run (teacher-forced with kolite's tokens) and after a 512-token prompt,
   top-1 agreement, and both against an independent float64 numpy forward. If they disagree
   (`--tolerance`), nothing is timed. The default llama.cpp context and Q8_0/Q4_0 are reported too;
3. times each engine in its own fresh subprocess (peak RSS = that process's `VmHWM`), batch 1:
   decode tok/s (128 new tokens after a 16-token prompt), TTFT for a 512-token prompt, decode tok/s
   at ~900 tokens of context (64 new tokens after an 868-token prompt); the same thread count for all.
   A fixed numpy workload runs before and after each engine; when it shows the shared host slowed
   down, the engine is run again (`--retries`);
4. times batched decoding: 8 sequences decoding together, one token each per step (kolite: slots
   0..7 of its runtime; llama.cpp: one `llama_batch` with 8 seq_ids, as llama-batched-bench does);
5. reports greedy agreement with kolite fp32 (leading run of equal tokens of a 64-token greedy
   continuation) and prints tables with ratios against llama.cpp Q8_0 and transformers.

Every engine gets token ids (KoGPT2's tokenizer is not byte-level BPE, so llama.cpp's tokenizer is
never used) and does the same work per token: one forward step, then `argmax` of the logits in
numpy. kolite runs `GPT2Runtime.prefill/decode`, llama.cpp `llama_decode` through llama-cpp-python's
low-level binding (context defaults otherwise: F16 KV cache, flash attention "auto"), transformers
the pipeline's model through `generate` (greedy, `min_new_tokens == max_new_tokens`).

    /work/venv/bin/python benchmarks/compare.py                     # both shapes, a few minutes on 2 cores
    /work/venv/bin/python benchmarks/compare.py --quick             # 2-layer shapes, short prompts
    /work/venv/bin/python benchmarks/compare.py --models kogpt2 --threads 2 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core as core  # noqa: E402  (checkpoints, prompts text, machine description, memory)
from compare_engines import (  # noqa: E402
    BATCHED,
    ENGINES,
    KoliteEngine,
    LlamaEngine,
    TransformersEngine,
    argmax,
    greedy_run,
    open_engine,
    run_lengths,
)
from compare_gguf import GGUF_KINDS, ensure_gguf, llama_log_lines  # noqa: E402
from compare_report import check_summary, get, render_tables  # noqa: E402
from kolite.config import default_threads  # noqa: E402

MODELS = ("kogpt2", "distilgpt2")
GPT2_TOKENIZER = core.FIXTURES / "gpt2-tokenizer" / "tokenizer.json"
AGREE_TOKENS = 64


# ====================================================================================================
# shapes, checkpoints, prompts


def _shape(model: str, quick: bool):
    from dataclasses import replace

    from kolite.models.synthetic import DISTILGPT2_SHAPE, KOGPT2_SHAPE

    shape = {"kogpt2": KOGPT2_SHAPE, "distilgpt2": DISTILGPT2_SHAPE}[model]
    return replace(shape, n_layer=2) if quick else shape


def _folder_name(model: str, quick: bool) -> str:
    # kogpt2's names are bench_core's, so both benchmarks share one checkpoint and its converted graphs
    return f"{model}-shape-2layer-random" if quick else f"{model}-shape-random"


def _tokenizer_json(model: str, work: Path, vocab_size: int) -> tuple[Path, str]:
    if model == "kogpt2" and core.KOGPT2_TOKENIZER.is_file():
        return core.KOGPT2_TOKENIZER, "KoGPT2 tokenizer.json (fixture)"
    if model == "distilgpt2" and GPT2_TOKENIZER.is_file():
        return GPT2_TOKENIZER, "GPT-2 tokenizer.json (fixture; distilgpt2 uses it unchanged)"
    path = work / "fallback-tokenizer" / "tokenizer.json"
    if not path.is_file():
        core.fallback_tokenizer(path, vocab_size)
    return path, "fallback byte-level BPE (fixture absent)"


def _text_ids(tokenizer_json: Path, n: int) -> list[int]:
    """At least `n` ids of real Korean text (ChatbotData rows, else bench_core's built-in sample)."""
    import unicodedata

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    lines = core.korean_lines()
    take = 64
    while True:
        text = " ".join((lines * (1 + take // max(1, len(lines))))[:take])
        ids = tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids
        if len(ids) >= n:
            return ids[:n]
        take *= 2




# ====================================================================================================
# workers: prepare, int4 probe, kolite conversion


def worker_prepare(spec: dict) -> dict:
    work = Path(spec["work_dir"])
    model = spec["model"]
    shape = _shape(model, spec["quick"])
    tokenizer_json, tokenizer_kind = _tokenizer_json(model, work, shape.vocab_size)
    folder = work / _folder_name(model, spec["quick"])
    written, seconds = core.ensure_checkpoint(folder, shape, tokenizer_json)
    core.log(("wrote" if written else "reusing") + f" random checkpoint {folder.name} ({seconds:.1f}s)")
    gguf_info = ensure_gguf(folder, work / "gguf" / folder.name, spec["threads"])
    n = run_lengths(spec)
    batch = spec["batch"]
    ids = _text_ids(folder / "tokenizer.json", max(n["long"], n["short"] * batch))
    prompts = {"short": ids[:n["short"]], "ttft": ids[:n["ttft"]], "long": ids[:n["long"]],
               "batch": [ids[i * n["short"]:(i + 1) * n["short"]] for i in range(batch)]}

    from kolite.models.profiles import profile_for

    profile = profile_for(folder.name, folder / "tokenizer.json")
    n_params = (shape.vocab_size + shape.n_positions) * shape.n_embd + shape.n_layer * (
        12 * shape.n_embd * shape.n_embd + 13 * shape.n_embd) + 2 * shape.n_embd
    return {"model": model, "model_dir": str(folder), "tokenizer_json": str(folder / "tokenizer.json"),
            "tokenizer_kind": tokenizer_kind, "shape": shape.to_dict(), "parameters": n_params,
            "checkpoint_written": written, "gguf": gguf_info, "prompts": prompts,
            "hf_special": {k: getattr(profile, f"{k}_token") for k in ("bos", "eos", "unk", "pad", "mask")},
            "llama_log": llama_log_lines(("quantiz", "size", "llama_model_quantize", "Q6_K")),
            "memory": core.memory()}


def worker_int4_probe(spec: dict) -> dict:
    """Does this kolite accept precision="int4"? (It may be added while the benchmark is being written.)"""
    from kolite.config import ModelSettings

    try:
        ModelSettings(model=spec["model_dir"], precision="int4", local_files_only=True)
    except Exception as exc:
        return {"int4": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {"int4": True}


# ====================================================================================================
# worker: correctness (llama.cpp against kolite fp32 on the same ids)


STRICT = "F32 GGUF, F32 KV cache, flash-attn off"
CHECK_VARIANTS = {  # label: (GGUF, F32 KV cache, flash_attn_type or None for llama.cpp's default)
    STRICT: ("F32", True, 0),
    "F32 GGUF, defaults (F16 KV cache, flash-attn auto)": ("F32", False, None),
    "Q8_0, defaults": ("Q8_0", False, None),
    "Q4_0, defaults": ("Q4_0", False, None),
}


def _reference_logits(model_dir: Path, ids: list[int]):
    """The tests' independent float64 numpy GPT-2 forward (tests/engine/numpy_reference.py): the last
    position's logits."""
    import numpy as np

    from kolite.models.gpt2_keys import gpt2_weights
    from kolite.models.gpt2config import GPT2Config
    from kolite.models.weights import load_state_dict

    sys.path.insert(0, str(core.REPO))
    from tests.engine.numpy_reference import forward

    cfg = GPT2Config.from_file(model_dir / "config.json")
    logits, _ = forward(cfg, gpt2_weights(load_state_dict(model_dir), cfg), np.array([ids]))
    return logits[0, -1]


def worker_check(spec: dict) -> dict:
    import gguf
    import numpy as np

    n = spec["agree_tokens"]
    prompts = spec["prompts"]
    kolite = KoliteEngine(spec, "fp32")
    ref = greedy_run(kolite, prompts["short"], n, keep_logits=True)
    ref_logits = np.stack(ref["logits"])
    ref_ttft = kolite.prefill(prompts["ttft"]).copy()
    ref64 = _reference_logits(Path(spec["model_dir"]), prompts["ttft"])
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    report: dict[str, Any] = {
        "tokens": n, "kolite_fp32_ids": ref["ids"],
        "kolite_logits_std": round(float(ref_logits[0].std()), 4),
        "kolite_max_abs_diff_vs_fp64_reference": round(float(np.abs(ref_ttft - ref64).max()), 7),
        "kolite_top1_top2_margin_min": round(float(margins.min()), 5),
        "kolite_top1_top2_margin_median": round(float(np.median(margins)), 5),
        "variants": {},
    }
    for label, (kind, kv_f32, fa) in CHECK_VARIANTS.items():
        eng = LlamaEngine(spec["gguf"]["paths"][kind], spec["threads"], n_ctx=spec["shape"]["n_positions"],
                          kv_f32=kv_f32, flash_attn=fa)
        # teacher-forced: feed kolite's greedy tokens, compare the logits at every step
        diffs, top1 = [], 0
        logits = eng.prefill(prompts["short"])
        pos = len(prompts["short"])
        for i in range(n):
            diffs.append(float(np.abs(logits - ref_logits[i]).max()))
            top1 += int(argmax(logits) == ref["ids"][i])
            if i < n - 1:
                logits = eng.step(ref["ids"][i], pos)
                pos += 1
        free = greedy_run(eng, prompts["short"], n)
        ttft_diff = float(np.abs(eng.prefill(prompts["ttft"]) - ref_ttft).max())
        report["variants"][label] = {
            "gguf": kind, "kv_cache": "F32" if kv_f32 else "F16", "flash_attn_type": fa,
            "max_abs_diff_vs_fp64_reference": round(float(np.abs(eng.prefill(prompts["ttft"]) - ref64).max()), 6),
            "first_step_max_abs_diff": round(diffs[0], 6), "max_abs_diff_all_steps": round(max(diffs), 6),
            "median_step_max_abs_diff": round(float(np.median(diffs)), 6),
            f"max_abs_diff_after_{len(prompts['ttft'])}_token_prompt": round(ttft_diff, 6),
            "teacher_forced_top1_agreement": top1,
            "free_greedy_leading_agreement": core.agreement(free["ids"], ref["ids"]),
            "free_greedy_equal_positions": sum(int(a == b) for a, b in zip(free["ids"], ref["ids"], strict=False)),
            "flash_attn": llama_log_lines(("flash_attn",))[-1:] or None,
        }
        eng.close()
        core.log(f"  {label}: first-step max|diff| {diffs[0]:.2e}, all steps {max(diffs):.2e}, "
                  f"{len(prompts['ttft'])}-token prompt {ttft_diff:.2e}, top-1 teacher-forced {top1}/{n}, "
                  f"free greedy {report['variants'][label]['free_greedy_leading_agreement']}/{n}")

    # Did llama.cpp's quantizer produce the blocks we expect? Compare one Q8_0 tensor with gguf-py's reference.
    reader = gguf.GGUFReader(spec["gguf"]["paths"]["Q8_0"])
    f32 = gguf.GGUFReader(spec["gguf"]["paths"]["F32"])
    name = "blk.0.ffn_up.weight"
    q_ll = next(t for t in reader.tensors if t.name == name)
    w = np.array(next(t for t in f32.tensors if t.name == name).data, dtype=np.float32)
    q_py = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    report["q8_0_blocks_equal_gguf_py"] = bool(np.array_equal(np.asarray(q_ll.data).reshape(-1), q_py.reshape(-1)))

    strict = report["variants"][STRICT]
    tol = spec["tolerance"]
    long_key = f"max_abs_diff_after_{len(prompts['ttft'])}_token_prompt"
    report["passed"] = bool(strict["max_abs_diff_all_steps"] <= tol and strict[long_key] <= tol
                            and strict["teacher_forced_top1_agreement"] >= n - 1)
    report["tolerance"] = tol
    return report


# ====================================================================================================
# worker: one engine, batch 1


def worker_engine(spec: dict) -> dict:
    t0 = time.perf_counter()
    engine = open_engine(spec)
    load_s = time.perf_counter() - t0
    mem_load = core.memory()
    greedy = engine.greedy if isinstance(engine, TransformersEngine) else (lambda ids, n: greedy_run(engine, ids, n))
    prompts, n, reps = spec["prompts"], spec["new_tokens"], spec["repeats"]
    n_long = run_lengths(spec)["long_new"]

    def check(run: dict, want: int) -> dict:
        if len(run["stamps"]) != want:
            raise RuntimeError(f"expected {want} tokens, got {len(run['stamps'])}")
        return run

    cold = check(greedy(prompts["ttft"], 1), 1)
    check(greedy(prompts["short"], n), n)  # warm-up (allocations, graph reservation, caches)
    check(greedy(prompts["long"], 4), 4)
    ttft, rate, rate_long, ttft_long, ids = [], [], [], [], []
    perf = None
    for r in range(reps):
        one = check(greedy(prompts["ttft"], 1), 1)
        ttft.append(one["stamps"][0] - one["start"])
        if isinstance(engine, LlamaEngine) and r == 0:
            engine.perf_reset()
        full = check(greedy(prompts["short"], n), n)
        if isinstance(engine, LlamaEngine) and r == 0:
            perf = engine.perf()
            wall = full["stamps"][-1] - full["stamps"][0]
            perf["wall_ms_per_decode_step"] = round(1000 * wall / (n - 1), 3)
            perf["llama_ms_per_decode_step"] = round(perf["t_eval_ms"] / max(1, perf["n_eval"]), 3)
        rate.append(core.decode_rate(full["stamps"]))
        if r == 0:
            ids = full["ids"]
        lng = check(greedy(prompts["long"], n_long), n_long)
        rate_long.append(core.decode_rate(lng["stamps"]))
        ttft_long.append(lng["stamps"][0] - lng["start"])
        core.log(f"  {spec['engine']} repeat {r + 1}/{reps}: decode {rate[-1]:.1f} tok/s, TTFT {ttft[-1]:.3f}s, "
                  f"decode@{len(prompts['long'])} {rate_long[-1]:.1f} tok/s")
    result = {
        "engine": spec["engine"], "load_s": round(load_s, 3), **engine.info(),
        "cold_ttft_s": round(cold["stamps"][0] - cold["start"], 4),
        "decode_tok_s": core.summary(rate), "ttft_s": core.summary(ttft),
        "decode_long_tok_s": core.summary(rate_long), "ttft_long_s": core.summary(ttft_long),
        "generated_ids": ids, "memory_after_load": mem_load, "memory_end": core.memory(),
    }
    if perf is not None:
        result["llama_perf_first_repeat"] = perf
    if isinstance(engine, LlamaEngine):
        result["llama_log"] = llama_log_lines(("flash_attn", "n_ctx", "buffer size", "REPACK", "repack", "type_k",
                                                "file type", "n_seq_max", "causal", "graph"))
    return result


def worker_batched(spec: dict) -> dict:
    engine = open_engine({**spec, "batched": True})
    prompts, n, reps = spec["prompts"]["batch"], spec["new_tokens"], spec["repeats"]
    rows = len(prompts)
    engine.batched(prompts, 8)  # warm-up
    agg, agg_total, prefill = [], [], []
    ids: list[list[int]] = []
    perf = None
    for r in range(reps):
        run = engine.batched(prompts, n)
        if isinstance(engine, LlamaEngine) and r == 0:
            # llama_perf counts multi-token batches as "prompt eval"; batched() resets it after the prefill
            perf = engine.perf()
            perf["wall_ms_per_decode_step"] = round(1000 * (run["end"] - run["prefilled"]) / (n - 1), 3)
            perf["llama_ms_per_decode_step"] = round(perf["t_p_eval_ms"] / (n - 1), 3)
        if any(len(row) != n for row in run["ids"]):
            raise RuntimeError("a row produced the wrong number of tokens")
        agg.append(rows * (n - 1) / (run["end"] - run["prefilled"]))
        agg_total.append(rows * n / (run["end"] - run["start"]))
        prefill.append(run["prefilled"] - run["start"])
        if r == 0:
            ids = run["ids"]
        core.log(f"  {spec['engine']} x{rows} repeat {r + 1}/{reps}: {agg[-1]:.1f} tok/s aggregate decode")
    result = {"engine": spec["engine"], "rows": rows, "new_tokens": n, "aggregate_decode_tok_s": core.summary(agg),
              "aggregate_with_prefill_tok_s": core.summary(agg_total), "prefill_all_rows_s": core.summary(prefill),
              "generated_ids": ids, **engine.info(), "memory_end": core.memory()}
    if isinstance(engine, LlamaEngine):
        result["llama_perf_first_repeat"] = perf
        result["llama_log"] = llama_log_lines(("flash_attn", "n_ctx", "n_seq_max", "kv_unified"))
    return result


WORKERS = {"prepare": worker_prepare, "int4_probe": worker_int4_probe, "convert": core.worker_convert,
           "check": worker_check, "engine": worker_engine, "batched": worker_batched, "probe": core.worker_probe}


def worker_main(argv: list[str]) -> int:
    return core.worker_main(argv, WORKERS)


# ====================================================================================================
# orchestrator (standard library only: the heavy work runs in subprocesses)


def _kolite_home(work: Path) -> Path:
    """kolite's converted-graph cache for this benchmark (kolite's cache key includes a digest of its
    converter's code, so a converter change rebuilds the graphs here too)."""
    return work / "compare-kolite-home"


def _run_worker(kind: str, spec: dict, scratch: Path, name: str) -> dict:
    """bench_core's worker runner, on this script's workers, with every BLAS pinned to the same threads."""
    threads = str(spec["threads"])
    pinned = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return core.run_worker(kind, spec, scratch, pinned, name=name, script=Path(__file__))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2-layer shapes, prompts 16/128/224 tokens, 32 new tokens, 1 repeat")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads for every engine (default: CPUs)")
    ap.add_argument("--work-dir", type=Path, default=core.DEFAULT_OUT / "work",
                    help="checkpoints, GGUFs and kolite's converted graphs (shared with bench_core)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per generation (default 128)")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together in the batched test")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per engine; medians reported (3)")
    ap.add_argument("--tolerance", type=float, default=5e-3,
                    help="max |logit difference| allowed between llama.cpp F32 (F32 KV) and kolite fp32")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-runs of an engine whose machine probes show a slowed-down host (default 2)")
    ap.add_argument("--contention", type=float, default=0.7,
                    help="a probe below this fraction of the run's best probe counts as contention (0.7)")
    ap.add_argument("--check-only", action="store_true", help="write the GGUFs and run the correctness check only")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the results here (always written to benchmarks/out/compare[-quick].json)")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for e in args.engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.new_tokens < AGREE_TOKENS and not args.quick:
        ap.error(f"--new-tokens must be >= {AGREE_TOKENS} (the greedy agreement length)")
    if args.new_tokens < 2 or args.threads < 1 or args.repeats < 1 or args.batch < 1:
        ap.error("--new-tokens must be >= 2; --threads, --repeats and --batch >= 1")
    return args


_BEST_PROBE = {"gemm_gflops": 0.0, "gemv_gbps": 0.0}


def _timed(args: argparse.Namespace, kind: str, spec: dict, scratch: Path, name: str) -> dict:
    """Run a timing worker between two machine probes; when either probe shows the shared host slowed
    down (below `--contention` of the best probe seen in this run), run it again (up to `--retries`)."""
    discarded = []
    for attempt in range(args.retries + 1):
        before = _run_worker("probe", spec, scratch, f"probe-{name}")
        result = _run_worker(kind, spec, scratch, name)
        after = _run_worker("probe", spec, scratch, f"probe-{name}-after")
        for p in (before, after):
            for k in _BEST_PROBE:
                _BEST_PROBE[k] = max(_BEST_PROBE[k], p[k])
        slow = [f"{k} {p[k]} < {args.contention:.0%} of {_BEST_PROBE[k]}" for p in (before, after) for k in _BEST_PROBE
                if p[k] < args.contention * _BEST_PROBE[k]]
        result.update(probe_before=before, probe_after=after, contended=bool(slow), attempt=attempt + 1)
        core.log(f"  probes: gemm {before['gemm_gflops']} -> {after['gemm_gflops']} GFLOP/s, gemv "
                  f"{before['gemv_gbps']} -> {after['gemv_gbps']} GB/s" + (f"; CONTENDED ({'; '.join(slow)})"
                                                                          if slow else ""))
        if not slow:
            break
        discarded.append({k: result.get(k) for k in ("decode_tok_s", "ttft_s", "decode_long_tok_s",
                                                     "aggregate_decode_tok_s", "probe_before", "probe_after")})
        if attempt < args.retries:
            core.log(f"  re-running {name} (attempt {attempt + 2}/{args.retries + 1})")
            time.sleep(5)
    result["discarded_contended_attempts"] = discarded
    return result


def run_model(model: str, args: argparse.Namespace, base: dict, scratch: Path, int4: bool) -> dict:
    core.log(f"=== {model}: checkpoint, GGUFs, prompts")
    prep = _run_worker("prepare", {**base, "model": model}, scratch, f"prepare-{model}")
    lengths = run_lengths(base)
    spec = {**base, "model": model, "model_dir": prep["model_dir"], "tokenizer_json": prep["tokenizer_json"],
            "shape": prep["shape"], "gguf": prep["gguf"], "prompts": prep["prompts"], "hf_special": prep["hf_special"],
            "agree_tokens": min(AGREE_TOKENS, args.new_tokens), "tolerance": args.tolerance}
    mres: dict[str, Any] = {
        "model": {k: prep[k] for k in ("model_dir", "tokenizer_kind", "shape", "parameters", "checkpoint_written")},
        "gguf": prep["gguf"], "lengths": lengths, "agree_tokens": spec["agree_tokens"],
        "prompt_source": "ChatbotData.csv" if core.CHATBOT_CSV.is_file() else "built-in Korean sample",
    }
    engines = [e for e in args.engines if int4 or e != "kolite-int4"]
    precisions = [e.removeprefix("kolite-") for e in engines if e.startswith("kolite-")]
    if "fp32" not in precisions:
        precisions.append("fp32")  # the reference for the check and for greedy agreement
    mres["warmup_conversion"] = {}
    failed: dict[str, str] = {}
    for precision in precisions:
        core.log(f"kolite {precision}: conversion (or cache check)")
        try:
            conv = _run_worker("convert", {**spec, "precision": precision}, scratch, f"convert-{model}-{precision}")
        except RuntimeError as exc:
            failed[f"kolite-{precision}"] = f"conversion failed: {exc}"
            core.log(f"  {exc}")
            continue
        mres["warmup_conversion"][precision] = conv
        core.log(f"  {'converted' if conv['converted'] else 'cached'} in {conv['seconds']:.1f}s, "
                  f"graph {conv['graph_mb']:.0f} MB")
    if "kolite-fp32" in failed:
        raise RuntimeError(f"{model}: kolite fp32 (the reference) is unavailable: {failed['kolite-fp32']}")

    core.log("correctness: llama.cpp GGUFs against kolite fp32 on the same ids")
    check = _run_worker("check", spec, scratch, f"check-{model}")
    mres["check"] = check
    for line in check_summary(check):
        core.log(line)
    if not check["passed"]:
        raise RuntimeError(f"{model}: llama.cpp F32 disagrees with kolite fp32: the GGUF is wrong; nothing timed")
    results: dict[str, dict] = {e: {"error": failed[e]} for e in engines if e in failed}
    mres["results"] = results
    if args.check_only:
        return mres

    for engine in engines:
        if engine in failed:
            continue
        core.log(f"engine {engine} ({model}): fresh process, {args.threads} threads")
        try:
            results[engine] = _timed(args, "engine", {**spec, "engine": engine}, scratch, f"engine-{model}-{engine}")
        except RuntimeError as exc:
            core.log(f"  {exc}")
            results[engine] = {"error": str(exc)}
    for engine in engines:
        if engine not in BATCHED or "error" in results.get(engine, {}):
            continue
        core.log(f"batched {engine} ({model}): {args.batch} sequences x {args.new_tokens} tokens")
        try:
            results[engine]["batched"] = _timed(args, "batched", {**spec, "engine": engine}, scratch,
                                                f"batched-{model}-{engine}")
        except RuntimeError as exc:
            core.log(f"  {exc}")
            results[engine]["batched"] = {"error": str(exc)}

    n = spec["agree_tokens"]
    ref = check["kolite_fp32_ids"]
    mres["greedy_agreement"] = {e: core.agreement(r["generated_ids"][:n], ref)
                                for e, r in results.items() if "generated_ids" in r}
    mres["greedy_agreement"]["llama-F32 (check, strict)"] = check["variants"][STRICT]["free_greedy_leading_agreement"]
    # batch invariance: row 0 of the batched run has the same prompt as the batch-1 run
    mres["batch_row0_equals_batch1"] = {
        e: core.agreement(r["batched"]["generated_ids"][0][:n], r["generated_ids"][:n])
        for e, r in results.items() if "generated_ids" in r and "generated_ids" in r.get("batched", {})}
    mres["table_markdown"] = render_tables(mres, args)
    return mres


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = core.machine_info()
    machine["llama_cpp_python"] = core.version("llama_cpp_python")
    machine["gguf"] = core.version("gguf")
    scratch = Path(tempfile.mkdtemp(prefix="compare-", dir=work))
    base = {"work_dir": str(work), "kolite_home": str(_kolite_home(work)), "quick": args.quick,
            "threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats, "batch": args.batch}
    report: dict[str, Any] = {
        "benchmark": "compare", "machine": machine, "kolite_source_at_start": core.kolite_source(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, "benchmarks/compare.py", *(argv or sys.argv[1:])]),
        "models": {},
    }
    status = 0
    try:
        probe_spec = {**base, "model_dir": str(work)}
        int4 = _run_worker("int4_probe", probe_spec, scratch, "int4-probe") if "kolite-int4" in args.engines else {}
        report["kolite_int4"] = int4
        if int4 and not int4["int4"]:
            core.log(f"kolite int4: not available ({int4['reason']}); skipped")
        for model in args.models:
            try:
                report["models"][model] = run_model(model, args, base, scratch, bool(int4.get("int4")))
            except RuntimeError as exc:
                core.log(f"ERROR {exc}")
                report["models"].setdefault(model, {})["error"] = str(exc)
                status = 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["kolite_source_at_end"] = core.kolite_source()
    if report["kolite_source_at_end"]["sha256"] != report["kolite_source_at_start"]["sha256"]:
        core.log("WARNING: kolite's sources changed during the run; engines may have measured different code")

    lengths = run_lengths(base)
    header = [
        f"compare  {machine['date']}",
        f"machine: {machine['cpu']} | {machine['usable_cores']} usable CPUs of {machine['cores']} | "
        f"{machine['memory_gb']} GB | {machine['os']} | {' '.join(machine['cpu_features']['features'])}",
        f"versions: python {machine['python']}, onnxruntime {machine['onnxruntime']}, llama-cpp-python "
        f"{machine['llama_cpp_python']}, gguf {machine['gguf']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, kolite {machine['kolite']} (sources {report['kolite_source_at_start']['sha256']}"
        f" -> {report['kolite_source_at_end']['sha256']})",
        f"run: {args.threads} threads for every engine, greedy, {args.new_tokens} new tokens after "
        f"{lengths['short']}; TTFT {lengths['ttft']}-token prompt; long context {lengths['long']} + "
        f"{lengths['long_new']} new; batch {args.batch} x {args.new_tokens}; {args.repeats} repeats (medians); "
        f"load average {machine['loadavg_at_start']} -> {machine['loadavg_at_end']}",
    ]
    if report.get("kolite_int4") and not report["kolite_int4"].get("int4"):
        header.append(f"kolite int4: unavailable ({report['kolite_int4']['reason']})")
    report["header"] = header
    print("\n".join(header))
    for model, mres in report["models"].items():
        print()
        if "model" in mres:
            s = mres["model"]["shape"]
            print(f"## {model}: random weights, {s['n_layer']} layers x {s['n_embd']} wide, vocab {s['vocab_size']} "
                  f"({mres['model']['parameters'] / 1e6:.0f}M params); tokenizer: {mres['model']['tokenizer_kind']}")
            g = mres["gguf"]
            print("GGUF: " + ", ".join(f"{k} {g['mb'][k]:.0f} MB {g['types'][k]['counts']}" for k in GGUF_KINDS))
        if "check" in mres:
            print("correctness (before timing):")
            print("\n".join(check_summary(mres["check"])))
        if "table_markdown" in mres:
            print()
            print(mres["table_markdown"])
            print()
            print("greedy agreement with kolite fp32 (leading equal tokens): " + ", ".join(
                f"{e} {n}/{mres['agree_tokens']}" for e, n in mres["greedy_agreement"].items()))
            perf = {e: r["llama_perf_first_repeat"] for e, r in mres["results"].items()
                    if "llama_perf_first_repeat" in r}
            for e, r in mres["results"].items():
                if (get(r, "batched.llama_perf_first_repeat") or {}).get("llama_ms_per_decode_step") is not None:
                    perf[f"{e} batch-{args.batch}"] = r["batched"]["llama_perf_first_repeat"]
            if perf:
                print("llama.cpp time per decode step, inside llama_decode (llama_perf) / wall clock incl. Python: "
                      + ", ".join(f"{e} {p['llama_ms_per_decode_step']:.2f} / {p['wall_ms_per_decode_step']:.2f} ms"
                                  for e, p in perf.items()))
            shas = sorted({s for r in mres["results"].values()
                           for s in (r.get("kolite_sha"), get(r, "batched.kolite_sha")) if s}
                          | {mres["check"].get("kolite_sha")} - {None})
            print("kolite sources measured (hash per worker process): " + ", ".join(shas)
                  + (" -- CHANGED during the run" if len(shas) > 1 else ""))
            if any(r.get("contended") or get(r, "batched.contended") for r in mres["results"].values()):
                print("(c): the machine probes still showed a slowed-down host after the retries")
            print("batched row 0 equal to the batch-1 run (leading tokens): " + ", ".join(
                f"{e} {n}/{mres['agree_tokens']}" for e, n in mres["batch_row0_equals_batch1"].items()))
        if "error" in mres:
            print(f"ERROR: {mres['error']}")

    out = core.DEFAULT_OUT / ("compare-quick.json" if args.quick else "compare.json")
    for path in {out, *([args.json] if args.json else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        core.log(f"wrote {path}")
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
