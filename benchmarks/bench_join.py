"""How long running streams pause while a long prompt joins the batch, with and without chunked prefill.

The scheduler prefills at most `PREFILL_CHUNK` prompt tokens per step (256), so a long prompt goes in
over several steps while the running requests keep decoding. This script measures what that buys on
a random-weight model of KoGPT2's exact shape (int8, in-process scheduler, no HTTP): 4 requests
stream greedy tokens; once each has 20, a request with a 900-token prompt joins. Reported, per
setting and repeat: the longest pause between two tokens of any running stream after the join, the
running streams' steady time per token before it, and the long prompt's time to first token. The
"whole prompt" setting sets `PREFILL_CHUNK` to the context size, i.e. the prompt in one step.

    /work/venv/bin/python benchmarks/bench_join.py              # 3 repeats of each setting
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core  # noqa: E402  (shares the checkpoint, tokenizer and machine description)
from kolite.config import default_threads  # noqa: E402


class _Stamps:
    """Token arrival times of one request."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        from kolite.engine.sequence import TokenEvent

        if isinstance(event, TokenEvent):
            self.times.append(time.perf_counter())
        else:
            self.done.set()


def _one(model: Any, chunk: int, running: int, prompt_tokens: int, seed: int) -> dict[str, float]:
    from kolite.engine import runtime
    from kolite.engine.sampling import SamplingParams
    from kolite.engine.scheduler import Scheduler, SchedulerOptions

    runtime.PREFILL_CHUNK = chunk
    rng = np.random.default_rng(seed)
    vocab = model.prepared.config.vocab_size

    def ids(n: int) -> list[int]:
        return rng.integers(10, vocab - 1, n).tolist()

    sched = Scheduler(model.runtime, SchedulerOptions(max_batch=running + 1))
    try:
        streams = [_Stamps() for _ in range(running)]
        params = SamplingParams(max_new_tokens=100, do_sample=False, ignore_eos=True)
        for s in streams:
            sched.submit(model.new_sequence(ids(16), params), s)
        while min(len(s.times) for s in streams) < 20:
            time.sleep(0.001)
        joiner, joined_at = _Stamps(), time.perf_counter()
        sched.submit(model.new_sequence(ids(prompt_tokens), SamplingParams(max_new_tokens=4, do_sample=False,
                                                                           ignore_eos=True)), joiner)
        for s in (*streams, joiner):
            s.done.wait(120)
    finally:
        sched.stop()
    pauses = [max(np.diff([t for t in s.times if t >= joined_at - 1.0])) for s in streams]
    steady = statistics.median(float(np.median(np.diff(s.times[:20]))) for s in streams)
    return {"longest_pause_s": round(float(max(pauses)), 4), "steady_s_per_token": round(steady, 4),
            "joiner_ttft_s": round(joiner.times[0] - joined_at, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--running", type=int, default=4, help="streams decoding when the long prompt joins")
    ap.add_argument("--prompt-tokens", type=int, default=900)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--work-dir", type=Path, default=bench_core.DEFAULT_OUT / "work")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from kolite.config import ModelSettings
    from kolite.engine import runtime
    from kolite.service import load_model

    shape = bench_core.model_shape(False)
    tokenizer_json = bench_core.KOGPT2_TOKENIZER
    if not tokenizer_json.is_file():
        tokenizer_json = bench_core.fallback_tokenizer(args.work_dir / "fallback-tokenizer.json", shape.vocab_size)
    model_dir = args.work_dir / "kogpt2-shape-random"
    bench_core.ensure_checkpoint(model_dir, shape, tokenizer_json)
    model = load_model(ModelSettings(model=str(model_dir), kolite_home=args.work_dir / "kolite-home",
                                     threads=args.threads))
    settings = {"chunked (256 tokens per step)": runtime.PREFILL_CHUNK, "whole prompt in one step": shape.n_positions}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for r in range(args.repeats):
        for name, chunk in settings.items():  # interleaved, so both see the same minutes of a noisy host
            results[name].append(_one(model, chunk, args.running, args.prompt_tokens, seed=r))
            print(f"{name}, repeat {r + 1}: {results[name][-1]}", file=sys.stderr)

    print(f"{args.running} running streams, a {args.prompt_tokens}-token prompt joins "
          f"(int8, KoGPT2 shape, {args.threads} threads); medians of {args.repeats}")
    print(f"{'setting':<32} {'longest pause (ms)':>19} {'steady ms/token':>16} {'long prompt TTFT (ms)':>22}")
    for name, runs in results.items():
        med = {k: 1000 * statistics.median(run[k] for run in runs) for k in runs[0]}
        print(f"{name:<32} {med['longest_pause_s']:>19.0f} {med['steady_s_per_token']:>16.1f} "
              f"{med['joiner_ttft_s']:>22.0f}")
    report = {"benchmark": "bench_join", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": bench_core.machine_info(), "running": args.running, "prompt_tokens": args.prompt_tokens,
              "threads": args.threads, "results": results}
    out = args.json or bench_core.DEFAULT_OUT / "bench_join.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
