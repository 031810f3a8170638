"""Core benchmark: kolite (int8, fp32) against the transformers pipeline the original app used.

One run measures, for each engine, on a random-weight model of KoGPT2's exact shape (vocab 51200,
12 layers, 768 wide, 12 heads, 1024 positions) at batch 1:

* decode tokens/s  = (new_tokens - 1) / (time of the last token - time of the first token),
  from per-token timestamps of one generation of `--new-tokens` tokens after a `--prompt-tokens` prompt;
* TTFT             = wall time of a separate call that generates 1 token from the same prompt;
* end-to-end       = wall time of the whole `--new-tokens` generation call (prompt included);
* peak RSS         = the engine process's high-water resident set (`VmHWM`), each engine in its own
  fresh subprocess; `ru_maxrss` is reported beside it as a cross-check (see the note in
  `memory`: on Linux `ru_maxrss` survives fork+exec, so it can show the *parent's* peak);
* import and load times, and the first (cold) call, separately. Before the timed repeats each engine
  also makes one untimed full call, so the repeats measure a warm server (medians are reported).

Greedy decoding, and nothing stops early: kolite runs its real serving loop
(the serving `Scheduler`, alone in it, with its sampler and streaming detokenizer) with `ignore_eos`
(a random model may emit `</s>` or `<usr>` at any step); the pipeline gets
`min_new_tokens == max_new_tokens`. Every timed call is checked to have produced exactly the
requested number of tokens.

The random checkpoint and kolite's converted graphs are cached in `--work-dir` between runs;
conversion runs (and is timed) in a warm-up subprocess before the timed ones, so those load from cache.

    /work/venv/bin/python benchmarks/bench_core.py            # full run, a few minutes on 2 cores
    /work/venv/bin/python benchmarks/bench_core.py --quick    # 2-layer smoke test, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from kolite.config import default_threads

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURES = Path(os.environ.get("KOLITE_FIXTURES", REPO.parent / "shared" / "fixtures"))
KOGPT2_TOKENIZER = FIXTURES / "kogpt2-base-v2-tokenizer" / "tokenizer.json"
CHATBOT_CSV = FIXTURES / "chatbot-data" / "ChatbotData.csv"
DEFAULT_OUT = HERE / "out"

ENGINES = ("kolite-int8", "kolite-fp32", "pipeline")
ALIASES = {"int8": "kolite-int8", "fp32": "kolite-fp32", "hf": "pipeline", "transformers": "pipeline"}
# KoGPT2's control tokens in KoGPT2's id order (for the fallback tokenizer).
KOGPT2_SPECIALS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
FALLBACK_TEXT = [
    "안녕하세요 반갑습니다. 오늘 날씨가 좋네요.",
    "한국어 GPT-2 모델로 문장을 만들어 봅시다.",
    "라즈베리 파이에서도 빠르게 돌아가는 챗봇 서버입니다.",
    "12시 땡! 하루가 또 가네요. 푹 쉬세요.",
    "1지망 학교 떨어졌어. 위로해 드립니다.",
    "주말에는 친구들과 바다에 가서 맛있는 회를 먹고 싶어요.",
]
SEED = 0


# ====================================================================================================
# helpers shared by the orchestrator and the workers (stdlib only: the orchestrator stays small)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory() -> dict[str, float | None]:
    """Resident memory of this process, MB (1 MB = 2**20 bytes).

    `vmhwm_mb` (the kernel's high-water mark of this address space) is the peak RSS we report.
    `ru_maxrss_mb` is getrusage's peak: on Linux it is kept across execve (the kernel folds the old
    mm's high-water mark into it), so a child spawned by a big parent starts with the parent's peak;
    the orchestrator therefore does all heavy work in subprocesses and stays small.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out: dict[str, float | None] = {"ru_maxrss_mb": round(ru, 1)}
    # RssFile: pages of mapped files (e.g. mmap-ed safetensors); RssAnon: the process's own heap.
    for key, field in (("vmhwm_mb", "VmHWM"), ("rss_mb", "VmRSS"), ("rss_anon_mb", "RssAnon"),
                       ("rss_file_mb", "RssFile")):
        kb = status_kb(field)
        out[key] = None if kb is None else round(kb / 1024, 1)
    with contextlib.suppress(Exception):
        import psutil

        out["uss_mb"] = round(psutil.Process().memory_full_info().uss / 2**20, 1)
    return out


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def kolite_source() -> dict[str, Any]:
    """Which kolite was measured: a hash of its sources (the repo is edited while benchmarks run)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("kolite")
        root = Path(next(iter(spec.submodule_search_locations))) if spec else REPO / "src" / "kolite"
    except (ImportError, StopIteration):
        root = REPO / "src" / "kolite"
    files = sorted(root.rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    newest = max((f.stat().st_mtime for f in files), default=0)
    return {"path": str(root), "files": len(files), "sha256": h.hexdigest()[:16],
            "newest_mtime": dt.datetime.fromtimestamp(newest, dt.UTC).isoformat(timespec="seconds")}


def machine_info() -> dict[str, Any]:
    """`kolite bench`'s description of the machine (CPU and its features, cores, memory, versions), plus
    the versions of the other engines these scripts compare and the load average at the start."""
    from kolite.bench import machine_info as kolite_machine

    info = kolite_machine(default_threads())
    info.update({name: version(name) for name in ("onnx", "torch", "transformers", "tokenizers")})
    info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summary(xs: list[float]) -> dict[str, float | list[float]]:
    return {"median": round(median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "all": [round(x, 4) for x in xs]}


def decode_rate(stamps: list[float]) -> float:
    """As `kolite.bench.decode_rate`, kept here so the reference engines' processes never import kolite."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


# ====================================================================================================
# worker: prepare (checkpoint + tokenizer + prompt)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def korean_lines() -> list[str]:
    """Real Korean text: ChatbotData's question/answer rows in file order, else a built-in sample."""
    if CHATBOT_CSV.is_file():
        with open(CHATBOT_CSV, encoding="utf-8", newline="") as fh:
            return [f"{row['Q']} {row['A']}" for row in csv.DictReader(fh)]
    return FALLBACK_TEXT * 200


def fallback_tokenizer(path: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on Korean text with KoGPT2's specials at ids 0-6 (as tests/conftest.py)."""
    from kolite.models.synthetic import train_byte_level_bpe

    return train_byte_level_bpe(path, korean_lines()[:3000], min(vocab_size, 8000), KOGPT2_SPECIALS)


def model_shape(quick: bool):
    from dataclasses import replace

    from kolite.models.synthetic import KOGPT2_SHAPE

    # --quick keeps KoGPT2's vocab and width (same code paths, same tokenizer) with 2 of its 12 layers.
    return replace(KOGPT2_SHAPE, n_layer=2) if quick else KOGPT2_SHAPE


def ensure_checkpoint(folder: Path, shape, tokenizer_json: Path) -> tuple[bool, float]:
    """Write the random checkpoint once; reuse it while shape, seed and tokenizer are unchanged."""
    from kolite.models.synthetic import ensure_checkpoint

    stamp = {"shape": shape.to_dict(), "seed": SEED, "tokenizer_sha256": sha256(tokenizer_json)}
    started = time.perf_counter()
    written = ensure_checkpoint(folder, shape, seed=SEED, stamp=stamp, tokenizer_json=tokenizer_json)
    return written, (time.perf_counter() - started if written else 0.0)


def build_prompt(tokenizer_json: Path, n_tokens: int) -> dict[str, Any]:
    """`n_tokens` ids of real Korean text whose decoded text encodes back to exactly the same ids.

    kolite is given the ids; the pipeline is given the text (as the original app was), so the window
    is chosen where the round trip is exact. Windows start at successive token offsets until one is.
    """
    import unicodedata

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    lines = korean_lines()
    text = ""
    ids: list[int] = []
    take = 64
    while len(ids) < n_tokens + 400 and take <= len(lines) * 2:
        text = " ".join((lines * (1 + take // max(1, len(lines))))[:take])
        ids = tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids
        take *= 2
    if len(ids) < n_tokens:
        raise SystemExit(f"cannot build a {n_tokens}-token prompt from the available text")
    for start in range(0, len(ids) - n_tokens + 1):
        window = ids[start:start + n_tokens]
        decoded = tok.decode(window, skip_special_tokens=False)
        again = tok.encode(unicodedata.normalize("NFC", decoded), add_special_tokens=False).ids
        if again == window and decoded.strip():
            return {"ids": window, "text": decoded, "offset": start, "source": str(CHATBOT_CSV)
                    if CHATBOT_CSV.is_file() else "built-in Korean sample", "exact_round_trip": True}
    window = ids[:n_tokens]
    return {"ids": window, "text": tok.decode(window, skip_special_tokens=False), "offset": 0,
            "source": "first window (no exact round trip found)", "exact_round_trip": False}


def worker_prepare(spec: dict) -> dict:
    work = Path(spec["work_dir"])
    tokenizer_json = KOGPT2_TOKENIZER
    tokenizer_kind = "KoGPT2 tokenizer.json (fixture)"
    shape = model_shape(spec["quick"])
    if not tokenizer_json.is_file():
        tokenizer_json = work / "fallback-tokenizer" / "tokenizer.json"
        tokenizer_kind = "fallback byte-level BPE (KoGPT2 fixture absent)"
        if not tokenizer_json.is_file():
            fallback_tokenizer(tokenizer_json, shape.vocab_size)
    folder = work / ("kogpt2-shape-2layer-random" if spec["quick"] else "kogpt2-shape-random")
    log(f"checkpoint {folder} ...")
    written, seconds = ensure_checkpoint(folder, shape, tokenizer_json)
    log(("wrote" if written else "reusing") + f" random checkpoint ({seconds:.1f}s)")
    prompt = build_prompt(folder / "tokenizer.json", spec["prompt_tokens"])
    n_params = (shape.vocab_size + shape.n_positions) * shape.n_embd + shape.n_layer * (
        12 * shape.n_embd * shape.n_embd + 13 * shape.n_embd) + 2 * shape.n_embd
    return {"model_dir": str(folder), "tokenizer_json": str(folder / "tokenizer.json"),
            "tokenizer_kind": tokenizer_kind, "shape": shape.to_dict(), "parameters": n_params,
            "checkpoint_written": written, "checkpoint_write_s": round(seconds, 2), "prompt": prompt,
            "memory": memory()}


# ====================================================================================================
# worker: convert (kolite warm-up: fills the converted-graph cache)


def kolite_settings(spec: dict, precision: str):
    """kolite's settings for a worker: the spec's model, threads and kolite home (default: the work dir's)."""
    from kolite.config import ModelSettings

    home = spec.get("kolite_home") or Path(spec["work_dir"]) / "kolite-home"
    return ModelSettings(model=spec["model_dir"], precision=precision, kolite_home=home, threads=spec["threads"],
                         local_files_only=True)


def manifest_of(lm) -> dict:
    """The converted graph's manifest without the bulky parts (config, source fingerprint)."""
    return {k: v for k, v in lm.prepared.manifest.items() if k not in ("config", "source")}


def worker_convert(spec: dict) -> dict:
    from kolite.service import load_model

    precision = spec["precision"]
    started = time.perf_counter()
    lm = load_model(kolite_settings(spec, precision), progress=lambda m: log(f"kolite {precision}: {m}"))
    seconds = time.perf_counter() - started
    graph = lm.prepared.graph
    size = sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())
    return {"precision": precision, "converted": lm.prepared.converted, "seconds": round(seconds, 2),
            "graph": str(graph), "graph_mb": round(size / 2**20, 1), "manifest": manifest_of(lm), "memory": memory()}


# ====================================================================================================
# worker: one engine, timed


def timed_runs(engine_call, prompt: Any, new_tokens: int, repeats: int) -> dict:
    """Cold first call (1 token), one untimed full call (warms the decode path, e.g. growing-cache
    shapes and allocator), then `repeats` x (TTFT call with 1 new token, full call with `new_tokens`)."""
    cold = engine_call(prompt, 1)
    warm = engine_call(prompt, new_tokens)
    ttft, ttft_stream, e2e, rate = [], [], [], []
    first_ids: list[int] = []
    for r in range(repeats):
        one = engine_call(prompt, 1)
        ttft.append(one["end"] - one["start"])
        full = engine_call(prompt, new_tokens)
        stamps = full["stamps"]
        if len(stamps) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} tokens, got {len(stamps)}")
        e2e.append(full["end"] - full["start"])
        ttft_stream.append(stamps[0] - full["start"])
        rate.append(decode_rate(stamps))
        if r == 0:
            first_ids = list(full["ids"])
        log(f"  repeat {r + 1}/{repeats}: ttft {ttft[-1]:.3f}s, decode {rate[-1]:.1f} tok/s, "
             f"e2e {e2e[-1]:.2f}s")
    return {"cold_first_call_s": round(cold["end"] - cold["start"], 4),
            "warmup_full_call_s": round(warm["end"] - warm["start"], 4), "ttft_s": summary(ttft),
            "ttft_in_stream_s": summary(ttft_stream), "e2e_s": summary(e2e),
            "decode_tok_s": summary(rate), "generated_ids": first_ids}


def worker_kolite(spec: dict) -> dict:
    t0 = time.perf_counter()
    from kolite.bench import time_request
    from kolite.engine.sampling import SamplingParams
    from kolite.engine.scheduler import Scheduler, SchedulerOptions
    from kolite.service import load_model

    t_import = time.perf_counter()
    mem_import = memory()
    precision = spec["precision"]
    lm = load_model(kolite_settings(spec, precision))
    t_load = time.perf_counter()
    mem_load = memory()
    if lm.prepared.converted:
        log(f"WARNING: kolite {precision} converted during the timed load (the warm-up should have)")

    sched = Scheduler(lm.runtime, SchedulerOptions(timeout=None))  # what `kolite serve` runs

    def call(prompt_ids: list[int], n: int) -> dict:
        # ignore_eos: a random model may emit </s> or <usr> at any step; generate exactly n tokens
        seq = lm.new_sequence(prompt_ids, SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True))
        t = time_request(sched, seq)
        return {"start": t.start, "end": t.end, "stamps": t.stamps, "ids": t.token_ids}

    runs = timed_runs(call, spec["prompt"]["ids"], spec["new_tokens"], spec["repeats"])
    sched.stop()
    so = lm.runtime.session.get_session_options()
    return {
        "engine": f"kolite-{precision}", "import_s": round(t_import - t0, 3), "load_s": round(t_load - t_import, 3),
        "loaded_from_cache": not lm.prepared.converted, "prompt_tokens": len(spec["prompt"]["ids"]),
        "new_tokens": spec["new_tokens"], "threads": so.intra_op_num_threads,
        "graph": str(lm.prepared.graph), "manifest": manifest_of(lm), "torch_imported": "torch" in sys.modules,
        **runs, "memory_after_import": mem_import, "memory_after_load": mem_load, "memory_end": memory(),
    }


def token_stamper() -> Any:
    """A transformers streamer that timestamps each new token as `generate()` emits it (the first
    `put()` is the prompt): `.times` and `.ids`. Imports transformers, so call it in its worker only."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False
            self.times: list[float] = []
            self.ids: list[int] = []

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            now = time.perf_counter()
            for tid in value.reshape(-1).tolist():
                self.times.append(now)
                self.ids.append(int(tid))

        def end(self) -> None:
            pass

    return Stamps()


def worker_pipeline(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    from transformers import PreTrainedTokenizerFast, pipeline

    t_import = time.perf_counter()
    mem_import = memory()
    torch.set_num_threads(spec["threads"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=spec["tokenizer_json"], bos_token="</s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>",
    )
    generator = pipeline("text-generation", model=spec["model_dir"], tokenizer=tokenizer, device="cpu")
    t_load = time.perf_counter()
    mem_load = memory()

    text = spec["prompt"]["text"]
    # The pipeline encodes without special tokens (add_special_tokens=False in its preprocess).
    pipe_ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def call(prompt_text: str, n: int) -> dict:
        streamer = token_stamper()
        start = time.perf_counter()
        generator(prompt_text, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        end = time.perf_counter()
        return {"start": start, "end": end, "stamps": streamer.times, "ids": streamer.ids}

    with torch.inference_mode():
        runs = timed_runs(call, text, spec["new_tokens"], spec["repeats"])
    return {
        "engine": "pipeline", "import_s": round(t_import - t0, 3), "load_s": round(t_load - t_import, 3),
        "prompt_tokens": len(pipe_ids), "prompt_ids_identical": pipe_ids == spec["prompt"]["ids"],
        "new_tokens": spec["new_tokens"], "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "dtype": str(generator.model.dtype), "model_class": type(generator.model).__name__,
        **runs, "memory_after_import": mem_import, "memory_after_load": mem_load, "memory_end": memory(),
    }


def worker_probe(spec: dict) -> dict:
    """A fixed numpy workload run just before each engine, to tell a slow engine from a slow machine.

    The host is shared (VMs, other people's tests): the same engine has been seen to run 3x slower for
    minutes at a time. gemm is compute-bound (like prefill); gemv over a 96 MB matrix is memory-bound
    (like batch-1 decode). numpy's BLAS runs with `--threads` threads (set through the environment).
    """
    import numpy as np

    def best(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return median(times)

    a = np.ones((512, 768), np.float32)
    b = np.ones((768, 3072), np.float32)
    gemm = best(lambda: a @ b, 20)
    m = np.ones((8192, 3072), np.float32)
    v = np.ones(3072, np.float32)
    gemv = best(lambda: m @ v, 20)
    return {"gemm_gflops": round(2 * 512 * 768 * 3072 / gemm / 1e9, 1),
            "gemv_gbps": round(m.nbytes / gemv / 1e9, 1)}


WORKERS = {"prepare": worker_prepare, "convert": worker_convert, "kolite": worker_kolite,
           "pipeline": worker_pipeline, "probe": worker_probe}


def worker_main(argv: list[str], workers: dict | None = None) -> int:
    """One worker in this process (`KIND SPEC.json OUT.json`): its result, the kolite it ran, peak memory."""
    kind, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sha = kolite_source()["sha256"]  # kolite is edited while benchmarks run: record what this process ran
    result = (workers or WORKERS)[kind](spec)
    result["kolite_sha"] = sha
    peak = memory()
    result["memory_peak"] = {k: peak[k] for k in ("vmhwm_mb", "ru_maxrss_mb")}
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(out_path).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    return 0


# ====================================================================================================
# orchestrator


def run_worker(kind: str, spec: dict, scratch: Path, extra_env: dict[str, str] | None = None, *,
                name: str | None = None, script: Path | None = None) -> dict:
    """Run one worker of `script` (default: this file) in a fresh interpreter; its result comes back
    through a JSON file. compare.py uses it for its own workers."""
    name = name or f"{kind}-{spec.get('precision', '')}".rstrip("-")
    spec_path, out_path = scratch / f"{name}.spec.json", scratch / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str((script or Path(__file__)).resolve()), "_worker", kind,
                           str(spec_path), str(out_path)], env=env, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode})")
    result = json.loads(out_path.read_text(encoding="utf-8"))
    result["process_wall_s"] = round(wall, 2)
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2-layer KoGPT2-width model, 64-token prompt, 16 new tokens, 1 repeat")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated subset of {', '.join(ENGINES)} (aliases: int8, fp32, hf)")
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads for every engine (default: CPUs)")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_OUT / "work",
                    help="cache for the random checkpoint and kolite's converted graphs")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per generation (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length in tokens (default 512)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per engine; medians reported (3)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the results here (always written to benchmarks/out/bench_core[-quick].json)")
    args = ap.parse_args(argv)
    engines = []
    for raw in args.engines.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if name not in ENGINES:
            ap.error(f"unknown engine {raw!r}; choose from {', '.join(ENGINES)}")
        if name not in engines:
            engines.append(name)
    args.engines = engines
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    args.prompt_tokens = args.prompt_tokens or (64 if args.quick else 512)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.threads < 1 or args.repeats < 1:
        ap.error("--new-tokens must be >= 2, --prompt-tokens, --threads and --repeats >= 1")
    if args.new_tokens + args.prompt_tokens > 1024:
        ap.error("prompt + new tokens must fit KoGPT2's 1024 positions")
    return args


ROWS: list[tuple[str, str, str]] = [
    # (label, key path, format)
    ("decode tok/s (batch 1)", "decode_tok_s.median", "{:.1f}"),
    ("TTFT, {p}-token prompt (s)", "ttft_s.median", "{:.3f}"),
    ("end-to-end {p}+{n} tokens (s)", "e2e_s.median", "{:.2f}"),
    ("peak RSS, VmHWM (MB)", "memory_peak.vmhwm_mb", "{:.0f}"),
    ("peak RSS, ru_maxrss (MB)", "memory_peak.ru_maxrss_mb", "{:.0f}"),
    ("RSS after load (MB)", "memory_after_load.rss_mb", "{:.0f}"),
    ("RSS at end: anon + file-mapped (MB)", "memory_end", "split"),
    ("load time (s)", "load_s", "{:.2f}"),
    ("import time (s)", "import_s", "{:.2f}"),
    ("cold first call, 1 token (s)", "cold_first_call_s", "{:.3f}"),
    ("first token inside the full call (s)", "ttft_in_stream_s.median", "{:.3f}"),
    ("decode tok/s min..max", "decode_tok_s", "range"),
    ("machine probe before: gemm GFLOP/s, gemv GB/s", "probe_before", "probe"),
]


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "split":
        return f"{value['rss_anon_mb']:.0f} + {value['rss_file_mb']:.0f}" if value.get("rss_anon_mb") else "-"
    if fmt == "probe":
        return f"{value['gemm_gflops']:.0f}, {value['gemv_gbps']:.1f}"
    if fmt == "range":
        return f"{value['min']:.1f}..{value['max']:.1f}"
    return fmt.format(value)


def render_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    names = [e for e in ENGINES if e in results and "error" not in results[e]]
    kolites = [e for e in names if e.startswith("kolite")]
    ratio_cols = [e for e in kolites if "pipeline" in names]
    header = ["metric", *names, *[f"{e.removeprefix('kolite-')}/pipeline" for e in ratio_cols]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
    for label, path, fmt in ROWS:
        cells = [label.format(p=args.prompt_tokens, n=args.new_tokens)]
        cells += [_cell(_get(results[e], path), fmt) for e in names]
        for e in ratio_cols:
            a, b = _get(results[e], path), _get(results["pipeline"], path)
            ok = isinstance(a, int | float) and isinstance(b, int | float) and b
            cells.append(f"{a / b:.2f}x" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="bench-core-", dir=work))
    base = {"work_dir": str(work), "quick": args.quick, "threads": args.threads, "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens, "repeats": args.repeats}
    report: dict[str, Any] = {
        "benchmark": "bench_core", "machine": machine, "kolite_source_at_start": kolite_source(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_core.py", *(argv or sys.argv[1:])]),
    }
    status = 0
    try:
        log("prepare: random checkpoint, tokenizer, prompt")
        prep = run_worker("prepare", base, scratch)
        spec = {**base, "model_dir": prep["model_dir"], "tokenizer_json": prep["tokenizer_json"],
                "prompt": prep["prompt"]}
        report["model"] = {k: prep[k] for k in ("model_dir", "tokenizer_kind", "shape", "parameters",
                                                "checkpoint_written", "checkpoint_write_s")}
        report["prompt"] = {"tokens": len(prep["prompt"]["ids"]), "offset": prep["prompt"]["offset"],
                            "source": prep["prompt"]["source"],
                            "exact_round_trip": prep["prompt"]["exact_round_trip"],
                            "text_head": prep["prompt"]["text"][:80]}

        report["warmup_conversion"] = {}
        for engine in args.engines:
            if engine.startswith("kolite"):
                precision = engine.removeprefix("kolite-")
                log(f"warm-up: kolite {precision} conversion (or cache check)")
                conv = run_worker("convert", {**spec, "precision": precision}, scratch)
                report["warmup_conversion"][precision] = conv
                log(f"  {'converted' if conv['converted'] else 'cached'} in {conv['seconds']:.1f}s, "
                     f"graph {conv['graph_mb']:.0f} MB, peak RSS {conv['memory_peak']['vmhwm_mb']:.0f} MB")

        results: dict[str, dict] = {}
        for engine in args.engines:
            log(f"engine {engine}: fresh process, {args.threads} threads")
            kind = "pipeline" if engine == "pipeline" else "kolite"
            threads = str(args.threads)
            probe = run_worker("probe", spec, scratch, {"OMP_NUM_THREADS": threads,
                                                         "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
            log(f"  machine probe: gemm {probe['gemm_gflops']} GFLOP/s, gemv {probe['gemv_gbps']} GB/s")
            try:
                results[engine] = run_worker(kind, {**spec, "precision": engine.removeprefix("kolite-")}, scratch)
                results[engine]["probe_before"] = probe
            except RuntimeError as exc:
                log(f"  {exc}")
                results[engine] = {"error": str(exc)}
                status = 1
        report["results"] = results

        ref = results.get("pipeline", {}).get("generated_ids")
        report["greedy_agreement_with_pipeline"] = {
            e: agreement(r["generated_ids"], ref) for e, r in results.items()
            if ref and e != "pipeline" and "generated_ids" in r
        }
        machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report["kolite_source_at_end"] = kolite_source()
        if report["kolite_source_at_end"]["sha256"] != report["kolite_source_at_start"]["sha256"]:
            log("WARNING: kolite's sources changed during the run; engines may have measured different code")
        table = render_table(results, args)
        report["table_markdown"] = table
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    header = [
        f"bench_core  {machine['date']}",
        f"machine: {machine['cpu']} | {machine['usable_cores']} usable CPUs of {machine['cores']} | "
        f"{machine['memory_gb']} GB | {machine['os']} | {' '.join(machine['cpu_features']['features'])}",
        f"versions: python {machine['python']}, onnxruntime {machine['onnxruntime']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, kolite {machine['kolite']} "
        f"(sources {report['kolite_source_at_start']['sha256']}, newest file "
        f"{report['kolite_source_at_start']['newest_mtime']})",
        f"model: random weights, shape {report['model']['shape']['n_layer']} layers x "
        f"{report['model']['shape']['n_embd']} wide, vocab {report['model']['shape']['vocab_size']} "
        f"({report['model']['parameters'] / 1e6:.0f}M params); tokenizer: {report['model']['tokenizer_kind']}",
        f"run: batch 1, greedy, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
        f"{args.threads} threads, {args.repeats} repeats (medians); load average {machine['loadavg_at_start']}"
        f" -> {machine['loadavg_at_end']}",
    ]
    pipe = results.get("pipeline", {})
    if "prompt_tokens" in pipe:
        header.append(f"pipeline prompt: {pipe['prompt_tokens']} tokens from the text "
                      f"(ids identical to kolite's: {pipe['prompt_ids_identical']})")
    if report["greedy_agreement_with_pipeline"]:
        header.append("greedy tokens equal to the pipeline's (leading run): " + ", ".join(
            f"{e} {n}/{args.new_tokens}" for e, n in report["greedy_agreement_with_pipeline"].items()))
    report["header"] = header
    print("\n".join(header))
    print()
    print(table)
    print("\nratios are kolite/pipeline: above 1 is better for tok/s, below 1 is better for times and memory.")

    out = DEFAULT_OUT / ("bench_core-quick.json" if args.quick else "bench_core.json")
    for path in {out, *([args.json] if args.json else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log(f"wrote {path}")
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
