"""Where a kolite server's memory goes (KoGPT2 shape, int8), and the memory formula checked against it.

Each phase runs in a fresh process, as a fresh server would:

* breakdown: resident memory after the server's imports and after loading (anon and file-backed); the
  KV cache per token, counted from the resident pages of the cache buffers (`/proc/self/pagemap`);
  the token table's resident pages (0: the table is read with pread from `model.onnx.tokens`);
  and a prefill chunk's scratch (high-water mark above the resident set, minus the chunk's own KV) for
  chunks of 64/128/256 tokens with an empty slot and after 1024-chunk tokens already in the slot;
* serve: the serving loop (kolite's `Scheduler`, as `kolite serve` runs it) with `--streams` requests
  of a `--prompt-tokens` prompt (real Korean text through KoGPT2's tokenizer when the fixture is
  there) and `--new-tokens` new tokens each, all submitted together; peak RSS (`VmHWM`, reset after
  loading), peaks of the anonymous and file-backed parts (sampled every 10 ms), and the formula's
  prediction beside it. One serve process per `--pools` value (KOLITE_MAX_KV_TOKENS);
* http (`--http`): a real `kolite serve` with `--streams` streaming `/v1/completions` clients (bench_http's
  server and client), `--prompt-tokens` prompts; the server's `VmHWM` after loading and its sampled parts.

    python benchmarks/bench_memory.py                         # breakdown + serve (pool 4096), ~1 min
    python benchmarks/bench_memory.py --pools 4096,1024 --http
    python benchmarks/bench_memory.py --pools 4096 --http --kv-cache int8   # the int8 KV cache
    python benchmarks/bench_memory.py --quick                 # 2-layer model: a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import json
import math
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core  # noqa: E402  (the shared random checkpoint, Korean text and machine description)
from kolite.config import default_threads  # noqa: E402

MB = 2**20
PAGE = mmap.PAGESIZE


# --- reading this process's (or another's) memory ---------------------------------------------------
def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile in MB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def reset_peak(pid: int | str = "self") -> None:
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def resident_bytes(start: int, nbytes: int, pid: int | str = "self") -> int:
    """Bytes of [start, start + nbytes) mapped to memory right now (pagemap's 'present' bit)."""
    first, last = start // PAGE, -(-(start + nbytes) // PAGE)
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(first * 8)
        entries = np.frombuffer(fh.read((last - first) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * PAGE


def kv_resident_mb(runtime: Any) -> float:
    return sum(resident_bytes(buf.ctypes.data, buf.nbytes) for buf in runtime.cache) / MB


def table_resident_mb(graph: Path, pid: int | str = "self") -> float:
    """Resident pages of any mapping of the token table's file (`model.onnx.tokens`, read with pread:
    none is expected)."""
    total = 0
    with open(f"/proc/{pid}/maps", encoding="ascii") as fh:
        for line in fh:
            if line.rstrip().endswith(graph.name + ".tokens"):
                lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
                total += resident_bytes(lo, hi - lo, pid)
    return round(total / MB, 1)


def trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile, read every 10 ms (VmHWM has only their sum)."""

    def __init__(self, pid: int | str = "self") -> None:
        super().__init__(daemon=True)
        self.pid, self.peak = pid, {"RssAnon": 0.0, "RssFile": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            try:
                now = status(self.pid)
            except OSError:
                return
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])


# --- phases (each in its own process) ----------------------------------------------------------------
def _settings(args: argparse.Namespace, pool: int | None = None) -> Any:
    from kolite.config import ModelSettings

    extra = {"max_kv_tokens": pool} if pool else {}
    return ModelSettings(model=str(args.model_dir), kolite_home=str(args.home), precision="int8",
                         threads=args.threads, **extra)


def _prompt_ids(args: argparse.Namespace, n: int, k: int) -> list[int]:
    """The k-th prompt: `n` ids of real Korean text (KoGPT2's tokenizer) or, without it, random ids."""
    tok = bench_core.KOGPT2_TOKENIZER
    if tok.is_file():
        from tokenizers import Tokenizer

        lines = bench_core.korean_lines()
        ids = Tokenizer.from_file(str(tok)).encode(" ".join(lines[k * 40:(k + 1) * 40])).ids
        if len(ids) >= n:
            return ids[:n]
    return np.random.default_rng(k).integers(16, 51200, n).tolist()


def phase_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    from kolite.engine import runtime as rt_module

    start = status()
    import uvicorn  # noqa: F401

    import kolite.api.app  # noqa: F401  (what `kolite serve` imports before loading)

    imported = status()
    from kolite.service import load_model

    model = load_model(_settings(args))
    rt = model.runtime
    loaded = status()
    out: dict[str, Any] = {"start": start, "imported": imported, "loaded": loaded,
                           "capacity": rt.capacity, "kv_bytes_per_token": rt.kv_bytes_per_token,
                           "kv_page_tokens": rt.kv_page_tokens}
    ids = np.random.default_rng(0).integers(16, model.prepared.config.vocab_size, rt.capacity).tolist()
    n = min(512, rt.capacity)
    rt.prefill(0, ids[:n])
    out["kv_resident_mb_512"] = round(kv_resident_mb(rt), 2)
    out["kv_kb_per_token_measured"] = round(kv_resident_mb(rt) * 1024 / n, 2)
    rt.release(0)
    out["table_mb_after_random_tokens"] = table_resident_mb(model.prepared.graph)
    out["chunks"] = [_chunk_scratch(rt, ids, chunk, past) for chunk in (64, 128, 256)
                     for past in (0, rt.capacity - chunk) if chunk <= rt.capacity]
    out["decode"] = [_decode_scratch(rt, ids, rows, args.prompt_tokens) for rows in sorted({1, args.max_batch})]
    out["attention_scratch_mb_per_layer"] = {
        c: round(model.prepared.config.n_head * c * rt.capacity * 4 / MB, 2) for c in (64, 128, 256)}
    out["prefill_chunk"] = rt_module.PREFILL_CHUNK
    return out


def _chunk_scratch(rt: Any, ids: list[int], chunk: int, past: int) -> dict[str, Any]:
    """One prefill chunk's transient: the high-water mark above the resident set, minus its new KV."""
    rt.release(0)
    if past:
        rt.prefill(0, ids[:past])
    trim()
    kv_before = kv_resident_mb(rt)
    reset_peak()
    before = status()
    started = time.perf_counter()
    rt.prefill_chunk(0, ids, past, past + chunk)
    seconds = time.perf_counter() - started
    after = status()
    new_kv = kv_resident_mb(rt) - kv_before
    rt.release(0)
    trim()
    return {"chunk": chunk, "past": past, "scratch_mb": round(after["VmHWM"] - before["VmRSS"] - new_kv, 1),
            "new_kv_mb": round(new_kv, 1), "seconds": round(seconds, 3)}


def _decode_scratch(rt: Any, ids: list[int], rows: int, context: int) -> dict[str, Any]:
    """A decode step's transient at `rows` rows of `context` tokens (after a warm-up step)."""
    rt.ensure_slots(rows)
    for slot in range(rows):
        rt.prefill(slot, ids[:context])
    rt.decode([5] * rows, [context] * rows)
    trim()
    kv_before = kv_resident_mb(rt)
    reset_peak()
    before = status()
    for step in range(1, 11):
        rt.decode([5] * rows, [context + step] * rows)
    after = status()
    new_kv = kv_resident_mb(rt) - kv_before
    for slot in range(rows):
        rt.release(slot)
    trim()
    return {"rows": rows, "context": context, "scratch_mb": round(after["VmHWM"] - before["VmRSS"] - new_kv, 1)}


def phase_serve(args: argparse.Namespace, pool: int) -> dict[str, Any]:
    import kolite.api.app  # noqa: F401  (the server's imports, so the idle figure is the server's)
    from kolite.bench import IdsOnlyTokenizer
    from kolite.engine import runtime as runtime_module
    from kolite.engine import scheduler as scheduler_module
    from kolite.engine.sampling import SamplingParams
    from kolite.engine.scheduler import Scheduler, SchedulerOptions
    from kolite.engine.sequence import Finish
    from kolite.engine.sequence import Sequence as GenSequence
    from kolite.service import load_model

    if args.trim_after is not None:
        scheduler_module.LONG_PROMPT = args.trim_after
    if args.prefill_chunk is not None:
        runtime_module.PREFILL_CHUNK = args.prefill_chunk
    model = load_model(_settings(args, pool))
    rt = model.runtime
    sched = Scheduler(rt, SchedulerOptions(max_batch=args.max_batch, max_kv_tokens=pool))
    ready = status()
    params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
    prompts = [_prompt_ids(args, args.prompt_tokens, k) for k in range(args.streams)]
    done = threading.Semaphore(0)
    most = {"rows": 0, "reserved": 0}

    def deliver(ev: object) -> None:
        most["rows"] = max(most["rows"], sched.active)
        most["reserved"] = max(most["reserved"], sched.kv_reserved)
        if isinstance(ev, Finish):
            done.release()

    table_before = table_resident_mb(model.prepared.graph)
    reset_peak()
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    for ids in prompts:
        sched.submit(GenSequence(ids, params, IdsOnlyTokenizer(), model.n_positions), deliver)
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    peak = status()
    sched.stop()
    return {"pool": pool, "trim_after": scheduler_module.LONG_PROMPT, "prefill_chunk": runtime_module.PREFILL_CHUNK,
            "ready": ready, "peak": peak, "after": status(),
            "sampled_peaks": sampler.peak,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(args.streams * args.new_tokens / wall, 1), "most_rows_together": most["rows"],
            "most_tokens_reserved": most["reserved"], "table_mb_before": table_before,
            "table_mb_after": table_resident_mb(model.prepared.graph), "kv_bytes_per_token": rt.kv_bytes_per_token,
            "kv_page_tokens": rt.kv_page_tokens, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "streams": args.streams}


def phase_http(args: argparse.Namespace, pool: int) -> dict[str, Any]:
    """A real `kolite serve` (bench_http's launcher) with `--streams` streaming clients."""
    import httpx
    from tokenizers import Tokenizer

    import bench_http

    lines = bench_core.korean_lines()
    tok = Tokenizer.from_file(str(bench_core.KOGPT2_TOKENIZER)) if bench_core.KOGPT2_TOKENIZER.is_file() else None
    prompts = []
    for k in range(args.streams):  # ~prompt_tokens tokens of Korean text per client
        words = " ".join(lines[k * 40:(k + 1) * 40]).split()
        text = " ".join(words[: max(1, args.prompt_tokens // 2)])
        while tok is not None and len(tok.encode(text).ids) > args.prompt_tokens and " " in text:
            text = text.rsplit(" ", 1)[0]
        prompts.append(text)
    os.environ["KOLITE_MAX_KV_TOKENS"] = str(pool)
    port = bench_http.free_port()
    base = f"http://127.0.0.1:{port}"
    ns = argparse.Namespace(precision="int8", threads=args.threads, max_batch=args.max_batch)
    proc = bench_http.start_server(args.model_dir, args.home, port, ns)
    try:
        bench_http.wait_ready(base, proc)
        ready = status(proc.pid)
        asyncio.run(bench_http.run_level(base, prompts, 1, 4))  # warm-up
        reset_peak(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        level = asyncio.run(bench_http.run_level(base, prompts, args.streams, args.new_tokens))
        sampler.stop.set()
        sampler.join()
        peak = status(proc.pid)
        table = table_resident_mb(_graph(args), proc.pid)
        usage = httpx.post(base + "/v1/completions", json={"model": "bench", "prompt": prompts[0], "max_tokens": 1},
                           timeout=60).json()["usage"]
    finally:
        proc.terminate()
        proc.wait(10)
    return {"pool": pool, "ready": ready, "peak": peak, "sampled_peaks": sampler.peak, "table_mb_after": table,
            "prompt_tokens_first_client": usage["prompt_tokens"], "level": level}


def _graph(args: argparse.Namespace) -> Path:
    from kolite.convert.prepare import prepare_model

    return Path(prepare_model(_settings(args), progress=lambda _m: None).graph)


# --- the formula -----------------------------------------------------------------------------------
def kv_bound_mb(tokens_per_request: list[int], bytes_per_token: int, page_tokens: int) -> float:
    """Resident KV of requests holding these many tokens: each slot's rows grow a page at a time."""
    return sum(math.ceil(t / page_tokens) * page_tokens for t in tokens_per_request) * bytes_per_token / MB


def predict(serve: dict[str, Any], breakdown: dict[str, Any]) -> dict[str, float]:
    """Peak = ready + token-table pages + KV of the requests running together + step scratch.

    The step scratch is the larger of the prefill chunk the run makes (the smallest measured chunk that
    holds min(prompt, PREFILL_CHUNK) tokens, the worse of its two measurements) and the decode step's at
    the run's batch; what the measured peak has beyond the sum is
    what the C heap keeps between steps ("held").
    """
    together = serve["most_rows_together"]
    tokens = [serve["prompt_tokens"] + serve["new_tokens"]] * together
    kv = kv_bound_mb(tokens, serve["kv_bytes_per_token"], serve["kv_page_tokens"])
    chunk = min(serve["prefill_chunk"], serve["prompt_tokens"])
    size = min((c["chunk"] for c in breakdown["chunks"] if c["chunk"] >= chunk), default=256)
    prefill = max(c["scratch_mb"] for c in breakdown["chunks"] if c["chunk"] == size)  # either past
    decode = max((d["scratch_mb"] for d in breakdown["decode"] if d["rows"] <= max(1, together)), default=0.0)
    scratch = max(prefill, decode)
    table = serve["table_mb_after"] - serve["table_mb_before"]
    ready = serve["ready"]["VmRSS"]
    predicted = round(ready + table + kv + scratch, 1)
    return {"ready_mb": ready, "table_mb": round(table, 1), "kv_mb": round(kv, 1), "scratch_mb": scratch,
            "predicted_peak_mb": predicted, "measured_peak_mb": serve["peak"]["VmHWM"],
            "held_mb": round(serve["peak"]["VmHWM"] - predicted, 1)}


# --- driver ---------------------------------------------------------------------------------------------
def _run_phase(args: argparse.Namespace, phase: str, pool: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase, "--model-dir", str(args.model_dir), "--home", str(args.home),
           "--threads", str(args.threads), "--streams", str(args.streams), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--max-batch", str(args.max_batch), "--pools", str(pool or 0),
           *(["--trim-after", str(args.trim_after)] if args.trim_after is not None else []),
           *(["--prefill-chunk", str(args.prefill_chunk)] if args.prefill_chunk is not None else [])]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prepare(args: argparse.Namespace) -> None:
    shape = bench_core.model_shape(args.quick)
    tokenizer_json = bench_core.KOGPT2_TOKENIZER
    if not tokenizer_json.is_file():
        tokenizer_json = bench_core.fallback_tokenizer(args.work_dir / "fallback-tokenizer.json", shape.vocab_size)
    bench_core.ensure_checkpoint(args.model_dir, shape, tokenizer_json)
    subprocess.run([sys.executable, "-m", "kolite.cli", "pull", str(args.model_dir), "--precision", "int8",
                    "--kolite-home", str(args.home)], check=True, capture_output=True)


def _report(result: dict[str, Any]) -> None:
    b = result["breakdown"]
    print(f"imports {b['imported']['VmRSS']} MB; loaded {b['loaded']['VmRSS']} MB "
          f"(anon {b['loaded']['RssAnon']}, file {b['loaded']['RssFile']}); KV {b['kv_kb_per_token_measured']} KB "
          f"per token (resident, {b['kv_page_tokens']}-token pages); token table after "
          f"{b['capacity']} random tokens: {b['table_mb_after_random_tokens']} MB")
    for c in b["chunks"]:
        print(f"  prefill chunk {c['chunk']:>3} after {c['past']:>4} tokens: scratch {c['scratch_mb']:>5} MB "
              f"(+{c['new_kv_mb']} MB KV), {c['seconds'] * 1000:.0f} ms")
    for d in b["decode"]:
        print(f"  decode step, {d['rows']} rows of {d['context']} tokens: scratch {d['scratch_mb']} MB")
    for s in result["serve"]:
        p = s["prediction"]
        print(f"serve, pool {s['pool']}: {s['streams']} x ({s['prompt_tokens']} + {s['new_tokens']}) tokens, "
              f"{s['most_rows_together']} together: ready {s['ready']['VmRSS']} MB -> peak {s['peak']['VmHWM']} MB "
              f"(anon {s['sampled_peaks']['RssAnon']}, file {s['sampled_peaks']['RssFile']}); predicted "
              f"{p['predicted_peak_mb']} = ready {p['ready_mb']} + table {p['table_mb']} + KV {p['kv_mb']} + scratch "
              f"{p['scratch_mb']} (held beyond: {p['held_mb']}); {s['tokens_per_s']} tok/s")
    for h in result.get("http", []):
        print(f"http, pool {h['pool']}: ready {h['ready']['VmRSS']} MB -> serving peak {h['peak']['VmHWM']} MB "
              f"(anon {h['sampled_peaks']['RssAnon']}, file {h['sampled_peaks']['RssFile']}; table "
              f"{h['table_mb_after']} MB); {h['level']['aggregate_tokens_per_s']:.1f} tok/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="4096", help="comma-separated KOLITE_MAX_KV_TOKENS values to serve with")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--trim-after", type=int, default=None,
                    help="serve: trim the C heap after prompts of at least this many tokens (the scheduler's "
                    "LONG_PROMPT; default: kolite's own)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="serve: prompt tokens prefilled per step (the runtime's PREFILL_CHUNK; default: kolite's)")
    ap.add_argument("--kv-cache", choices=["float", "int8"], default=None,
                    help="KOLITE_KV_CACHE for every phase (default: the setting's, float)")
    ap.add_argument("--http", action="store_true", help="also measure a real `kolite serve` with streaming clients")
    ap.add_argument("--quick", action="store_true", help="2-layer KoGPT2-width model: a smoke test")
    ap.add_argument("--work-dir", type=Path, default=bench_core.DEFAULT_OUT / "work")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kv_cache:  # every phase, the pull and the HTTP server read it from the environment
        os.environ["KOLITE_KV_CACHE"] = args.kv_cache
    if args.phase:  # a child: one phase, its JSON on the last line
        pool = int(args.pools) or None
        result = phase_breakdown(args) if args.phase == "breakdown" else phase_serve(args, pool or 4096)
        print(json.dumps(result))
        return 0
    args.model_dir = args.work_dir / ("kogpt2-shape-2layer-random" if args.quick else "kogpt2-shape-random")
    args.home = args.work_dir / "kolite-home"
    _prepare(args)
    pools = [int(p) for p in args.pools.split(",")]
    result: dict[str, Any] = {"benchmark": "bench_memory",
                              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "machine": bench_core.machine_info(), "page_size": PAGE,
                              "kv_cache": os.environ.get("KOLITE_KV_CACHE", "float"),
                              "breakdown": _run_phase(args, "breakdown"), "serve": []}
    for pool in pools:
        serve = _run_phase(args, "serve", pool)
        serve["prediction"] = predict(serve, result["breakdown"])
        result["serve"].append(serve)
    if args.http:
        result["http"] = [phase_http(args, pool) for pool in pools]
    _report(result)
    from kolite.bench import write_json

    write_json(result, args.json or bench_core.DEFAULT_OUT / ("bench_memory-quick.json" if args.quick
                                                              else "bench_memory.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
