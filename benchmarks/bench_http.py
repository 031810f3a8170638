"""Aggregate tokens/s through HTTP for 1, 4 and 8 concurrent streaming clients (continuous batching).

A real `kolite serve` process (int8, random weights of KoGPT2's exact shape: vocab 51200, 12 layers,
768 wide, 1024 positions) on 127.0.0.1; each client streams `/v1/completions` with its own Korean
prompt, `max_tokens` new tokens and `ignore_eos` (a random model may end early otherwise). For each
level of concurrency all clients start together; aggregate tokens/s = completion tokens of all
clients / wall time from the first request to the last `[DONE]`. Per-client tokens/s and time to
first token are reported too, and the server's memory: RSS when ready, the start's peak, and the
serving peak (the high-water mark reset once the server is ready).

    /work/venv/bin/python benchmarks/bench_http.py                 # 1, 4, 8 clients, 128 tokens each
    /work/venv/bin/python benchmarks/bench_http.py --quick         # 2-layer model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core  # noqa: E402  (shares the checkpoint, tokenizer and machine description)
from kolite.bench import peak_rss_mb, reset_peak_rss, rss_mb, write_json  # noqa: E402  (any process's memory, by pid)
from kolite.config import default_threads  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, home: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "KOLITE_MODEL": str(model_dir), "KOLITE_KOLITE_HOME": str(home),
           "KOLITE_PRECISION": args.precision, "KOLITE_THREADS": str(args.threads),
           "KOLITE_MAX_BATCH": str(args.max_batch), "KOLITE_HOST": "127.0.0.1", "KOLITE_PORT": str(port),
           "KOLITE_SERVED_MODEL_NAME": "bench", "KOLITE_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "kolite.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _cpu_seconds(server: psutil.Process) -> tuple[float, float]:
    """CPU seconds used so far by the server (all its threads) and by this client process."""
    t = server.cpu_times()
    me = resource.getrusage(resource.RUSAGE_SELF)
    return t.user + t.system, me.ru_utime + me.ru_stime


def wait_ready(base: str, proc: subprocess.Popen, limit: float = 900.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            status = httpx.get(base + "/", timeout=2).json()
            if status["service_status"] == "READY":
                return
            if status["service_status"] == "ERROR":
                raise SystemExit(f"server failed to load: {status.get('error')}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


async def _client(http: httpx.AsyncClient, prompt: str, new_tokens: int) -> dict[str, Any]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    usage = None
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {"tokens": tokens, "ttft": (first or ended) - started, "seconds": ended - started,
            "tokens_per_s": tokens / (ended - started)}


async def run_level(base: str, prompts: list[str], clients: int, new_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        runs = await asyncio.gather(*[_client(http, prompts[i % len(prompts)], new_tokens) for i in range(clients)])
        wall = time.perf_counter() - started
    total = sum(r["tokens"] for r in runs)
    if any(r["tokens"] != new_tokens for r in runs):
        raise SystemExit(f"a client got fewer than {new_tokens} tokens: {[r['tokens'] for r in runs]}")
    return {"clients": clients, "total_tokens": total, "wall_s": wall, "aggregate_tokens_per_s": total / wall,
            "per_client_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "ttft_median_s": statistics.median(r["ttft"] for r in runs),
            "ttft_max_s": max(r["ttft"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per level; the best is reported")
    ap.add_argument("--quick", action="store_true", help="2-layer KoGPT2-width model: a smoke test")
    ap.add_argument("--work-dir", type=Path, default=bench_core.DEFAULT_OUT / "work")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]

    shape = bench_core.model_shape(args.quick)
    tokenizer_json = bench_core.KOGPT2_TOKENIZER
    if not tokenizer_json.is_file():
        tokenizer_json = bench_core.fallback_tokenizer(args.work_dir / "fallback-tokenizer.json", shape.vocab_size)
    model_dir = args.work_dir / ("kogpt2-shape-2layer-random" if args.quick else "kogpt2-shape-random")
    bench_core.ensure_checkpoint(model_dir, shape, tokenizer_json)
    lines = bench_core.korean_lines()
    prompts = [" ".join(lines[i * 3:(i + 1) * 3]) for i in range(max(levels))]  # ~30-token Korean prompts

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model_dir, args.work_dir / "kolite-home", port, args)
    peak_rss = 0
    try:
        wait_ready(base, proc)
        server = psutil.Process(proc.pid)
        # RSS when READY, and the start's peak (a first start also converts); then VmHWM starts afresh,
        # so the serving peak excludes loading
        ready = {"VmRSS": rss_mb(proc.pid), "VmHWM": peak_rss_mb(proc.pid)}
        if not reset_peak_rss(proc.pid):
            print("note: cannot reset the server's peak RSS; it includes loading", file=sys.stderr)
        asyncio.run(run_level(base, prompts, 1, 16))  # warm-up
        results = []
        for clients in levels:
            best = None
            for _ in range(args.repeats):
                cpu = _cpu_seconds(server)
                res = asyncio.run(run_level(base, prompts, clients, args.new_tokens))
                # Where the two cores went: the server (engine + event loop) and this client process
                res.update({k: round(after - before, 3) for k, before, after
                            in zip(("server_cpu_s", "client_cpu_s"), cpu, _cpu_seconds(server), strict=True)})
                if best is None or res["aggregate_tokens_per_s"] > best["aggregate_tokens_per_s"]:
                    best = res
                peak_rss = max(peak_rss, server.memory_info().rss)
            results.append(best)
            print(f"{clients} clients: {best['aggregate_tokens_per_s']:.1f} tok/s aggregate", file=sys.stderr)
        hwm = peak_rss_mb(proc.pid) or 0.0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    one = results[0]["aggregate_tokens_per_s"] if results and results[0]["clients"] == 1 else None
    report = {"benchmark": "bench_http", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": bench_core.machine_info(), "model": shape.to_dict(), "precision": args.precision,
              "threads": args.threads, "max_batch": args.max_batch, "new_tokens": args.new_tokens,
              "server_rss_ready_mb": ready["VmRSS"], "server_start_peak_mb": ready["VmHWM"],
              "server_peak_rss_mb": round(max(hwm, peak_rss / 2**20), 1), "levels": results}
    header = (f"{'clients':>7} {'aggregate tok/s':>16} {'per-client tok/s':>17} {'TTFT p50 (s)':>13} "
              f"{'vs 1 client':>12} {'server CPU':>11} {'client CPU':>11}")
    print(header)
    for r in results:
        ratio = f"{r['aggregate_tokens_per_s'] / one:.2f}x" if one else "-"
        busy = [f"{100 * r[k] / r['wall_s']:.0f}%" for k in ("server_cpu_s", "client_cpu_s")]  # of one core
        print(f"{r['clients']:>7} {r['aggregate_tokens_per_s']:>16.1f} {r['per_client_tokens_per_s']:>17.1f} "
              f"{r['ttft_median_s']:>13.3f} {ratio:>12} {busy[0]:>11} {busy[1]:>11}")
    print("CPU columns: CPU time over wall time, in % of one core (this machine has "
          f"{os.cpu_count()}); the client runs on the same cores as the server.")
    print(f"server RSS when ready: {ready['VmRSS']} MB (start peak {ready['VmHWM']} MB); serving peak RSS: "
          f"{report['server_peak_rss_mb']} MB; threads {args.threads}; max batch {args.max_batch}")
    name = "bench_http-quick.json" if args.quick else "bench_http.json"
    write_json(report, args.json or bench_core.DEFAULT_OUT / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
