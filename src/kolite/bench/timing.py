"""Timed requests through the serving Scheduler: decode rate, time to first token, context length, concurrency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kolite.engine.scheduler import Scheduler
    from kolite.engine.sequence import Sequence as GenSequence
from kolite.bench.model import BenchModel, prompt_ids


@dataclass(frozen=True)
class Timed:
    start: float
    stamps: list[float]  # perf_counter() as each token's event arrived
    end: float
    token_ids: tuple[int, ...] = ()


def time_request(scheduler: Scheduler, seq: GenSequence, timeout: float = 3600.0) -> Timed:
    """Run `seq` through the continuous-batching `Scheduler` that `kolite serve` runs, timestamping each
    token as the engine thread hands it over; it must produce all of its `max_new_tokens` (benchmarks
    compare fixed amounts of work). Alone in the scheduler this is the batch-1 figure a single user of
    the server sees, thread hand-off included."""
    from kolite.engine.sequence import Finish, TokenEvent

    new_tokens = seq.params.max_new_tokens
    stamps: list[float] = []
    finish: list[Finish] = []

    def deliver(ev: TokenEvent | Finish) -> None:
        if isinstance(ev, TokenEvent):
            stamps.append(time.perf_counter())
        else:
            finish.append(ev)

    start = time.perf_counter()
    req = scheduler.submit(seq, deliver)
    if not req.done.wait(timeout):
        req.cancel()
        raise RuntimeError(f"a request did not finish in {timeout:.0f}s")
    end = time.perf_counter()
    if not finish or finish[0].completion_tokens != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} tokens, got {len(stamps)} ({finish and finish[0]})")
    return Timed(start, stamps, end, finish[0].token_ids)


def timed_generation(model: BenchModel, prompt: list[int], new_tokens: int) -> Timed:
    """One request of `model`, greedy and `ignore_eos`, alone in its scheduler (see `time_request`)."""
    return time_request(model.scheduler, model.sequence(prompt, new_tokens))


def decode_rate(stamps: Sequence[float]) -> float:
    """Tokens/s between the first and the last token: decode steps only (the prefill is before the first)."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def fit_length(requested: int, n_positions: int, room: int) -> int:
    """A length that leaves `room` positions free in the model's window (small models have fewer)."""
    return max(1, min(requested, n_positions - room))


def distinct_lengths(requested: Sequence[int], n_positions: int, room: int) -> list[int]:
    """The requested lengths, dropping those that clip to a length already measured (small models)."""
    seen: set[int] = set()
    kept = []
    for n in requested:
        if fit_length(n, n_positions, room) not in seen:
            seen.add(fit_length(n, n_positions, room))
            kept.append(n)
    return kept


def measure_decode(model: BenchModel, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Batch-1 decode tokens/s: the speed a single user sees once text starts streaming."""
    new = max(2, min(new_tokens, model.n_positions - 1))
    prompt = prompt_ids(fit_length(prompt_tokens, model.n_positions, new), model.id_limit, seed=1)
    runs = [timed_generation(model, prompt, new) for _ in range(repeats)]
    rates = [decode_rate(r.stamps) for r in runs]
    return {"prompt_tokens": len(prompt), "new_tokens": new, "tok_s": _median(rates),
            "runs_tok_s": _rounded(rates), "seconds": round(_median([r.end - r.start for r in runs]), 4)}


def measure_ttft(model: BenchModel, prompt_tokens: int, repeats: int) -> dict[str, Any]:
    """Time to first token for a prompt: its prefill plus one sampling step, what a user waits before text."""
    n = fit_length(prompt_tokens, model.n_positions, 1)
    prompt = prompt_ids(n, model.id_limit, seed=2)
    times = [r.stamps[0] - r.start for r in (timed_generation(model, prompt, 1) for _ in range(repeats))]
    seconds = _median(times)
    return {"requested": prompt_tokens, "prompt_tokens": n, "seconds": round(seconds, 5),
            "runs_s": _rounded(times, 5), "prefill_tok_s": round(n / seconds, 1) if seconds > 0 else None}


def measure_context(model: BenchModel, context: int, steps: int, repeats: int) -> dict[str, Any]:
    """Decode tokens/s with `context` tokens already in the cache: attention reads the whole cache each
    step, so long chats decode slower than short ones."""
    n = fit_length(context, model.n_positions, steps + 1)
    prompt = prompt_ids(n, model.id_limit, seed=3)
    rates = [decode_rate(timed_generation(model, prompt, steps + 1).stamps) for _ in range(repeats)]
    return {"requested": context, "context": n, "steps": steps, "tok_s": _median(rates), "runs_tok_s": _rounded(rates)}


def measure_concurrency(model: BenchModel, levels: Sequence[int], prompt_tokens: int, new_tokens: int,
                        timeout: float = 3600.0) -> list[dict[str, Any]]:
    """Aggregate tokens/s with n requests at once through the continuous-batching `Scheduler` (no HTTP).

    Why: a decode step reads the weights once for all rows, so batching raises throughput where batch 1
    is memory-bound. Per level, n requests (each its own prompt) are submitted together; aggregate =
    all their tokens / wall time from the first submission to the last token. Per-request decode rate
    and time to first token (which grows with n: admitted requests are prefilled one after another)
    are reported too. One run per level, after an untimed warm-up of the largest level.
    """
    from kolite.engine.sequence import Finish, TokenEvent

    new = max(2, min(new_tokens, model.n_positions - 1))
    plen = fit_length(prompt_tokens, model.n_positions, new)
    top = max(levels)
    if top > model.max_batch:
        model.close()
        model.max_batch = top
    sched = model.scheduler

    def run(n: int, tokens: int) -> dict[str, Any]:
        stamps: list[list[float]] = [[] for _ in range(n)]
        finishes: list[Finish | None] = [None] * n

        def deliver(i: int, ev: TokenEvent | Finish) -> None:
            if isinstance(ev, TokenEvent):
                stamps[i].append(time.perf_counter())
            else:
                finishes[i] = ev

        seqs = [model.sequence(prompt_ids(plen, model.id_limit, seed=100 + i), tokens) for i in range(n)]
        start = time.perf_counter()
        reqs = [sched.submit(seq, lambda ev, i=i: deliver(i, ev)) for i, seq in enumerate(seqs)]
        for req in reqs:
            if not req.done.wait(timeout):
                req.cancel()
                raise RuntimeError(f"{n} concurrent requests did not finish in {timeout:.0f}s")
        for i, fin in enumerate(finishes):
            if fin is None or fin.reason != "length" or len(stamps[i]) != tokens:
                raise RuntimeError(f"request {i} of {n} ended with {fin and fin.reason}, {len(stamps[i])} tokens")
        wall = max(s[-1] for s in stamps) - start
        ttfts = [s[0] - start for s in stamps]
        per_request = [decode_rate(s) for s in stamps]
        total = sum(len(s) for s in stamps)
        return {"requests": n, "prompt_tokens": plen, "new_tokens": tokens, "tokens": total,
                "wall_s": round(wall, 4), "aggregate_tok_s": round(total / wall, 2),
                "per_request_tok_s": round(_median(per_request), 2),
                "ttft_s": {"median": round(_median(ttfts), 5), "max": round(max(ttfts), 5)}}

    run(top, min(4, new))  # warm-up: every batch size the levels will meet, allocations done
    return [run(n, new) for n in levels]


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _rounded(xs: Sequence[float], digits: int = 3) -> list[float]:
    return [round(x, digits) for x in xs]
