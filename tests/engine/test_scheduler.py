"""Continuous batching: same tokens as alone, joins and leaves mid-flight, cancellation, limits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kolite.engine.generate import collect, run_sequence
from kolite.engine.sampling import SamplingParams
from kolite.engine.scheduler import Scheduler, SchedulerOptions
from kolite.engine.sequence import Finish, TokenEvent
from kolite.errors import Overloaded
from kolite.service import LoadedModel


class Collector:
    """Thread-safe sink for one request's events."""

    def __init__(self) -> None:
        self.events: list[TokenEvent | Finish] = []
        self.finished = threading.Event()

    def __call__(self, ev: TokenEvent | Finish) -> None:
        self.events.append(ev)
        if isinstance(ev, Finish):
            self.finished.set()

    @property
    def finish(self) -> Finish:
        assert self.finished.wait(30), "request never finished"
        last = self.events[-1]
        assert isinstance(last, Finish)
        return last


def _prompts(model: LoadedModel, n: int) -> list[list[int]]:
    texts = ["안녕하세요", "Hello world, this is", "라즈베리 파이에서도 빠르게", "12시 땡!", "한국어",
             "오늘 날씨가 좋네요. 문장을 만들어 봅시다", "tiny byte-level", "챗봇 서버"]
    return [model.tokenizer.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


def _params(i: int, n_new: int = 20) -> SamplingParams:
    # half greedy, half sampled with a seed; different lengths so rows leave at different steps
    if i % 2:
        return SamplingParams(max_new_tokens=n_new + i, do_sample=False)
    return SamplingParams(max_new_tokens=n_new + i, temperature=1.3, top_k=0, seed=100 + i)


def _alone(model: LoadedModel, prompt: list[int], params: SamplingParams) -> Finish:
    return collect(run_sequence(model.runtime, model.new_sequence(prompt, params)))


def test_batched_results_equal_sequential_runs(tiny_loaded: LoadedModel) -> None:
    prompts = _prompts(tiny_loaded, 16)
    expected = [_alone(tiny_loaded, p, _params(i)) for i, p in enumerate(prompts)]
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=8, max_queue=16))
    try:
        sinks = [Collector() for _ in prompts]
        for i, (p, sink) in enumerate(zip(prompts, sinks, strict=True)):
            sched.submit(tiny_loaded.new_sequence(p, _params(i)), sink)
        got = [s.finish for s in sinks]
    finally:
        sched.stop()
    for exp, res in zip(expected, got, strict=True):
        assert res.token_ids == exp.token_ids
        assert res.text == exp.text and res.reason == exp.reason
    assert sched.steps < sum(len(e.token_ids) for e in expected)  # rows really shared steps


def test_late_joiner_matches_alone(tiny_loaded: LoadedModel) -> None:
    p1, p2 = _prompts(tiny_loaded, 2)
    long = SamplingParams(max_new_tokens=60, do_sample=False)
    late = SamplingParams(max_new_tokens=10, temperature=0.9, seed=7)
    # computed first: the scheduler's thread owns the runtime (and its slot 0) while it runs
    want_a, want_b = _alone(tiny_loaded, p1, long).token_ids, _alone(tiny_loaded, p2, late).token_ids
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=4))
    try:
        a, b = Collector(), Collector()
        sched.submit(tiny_loaded.new_sequence(p1, long), a)
        while sched.steps < 5:
            time.sleep(0.001)
        sched.submit(tiny_loaded.new_sequence(p2, late), b)
        assert b.finish.token_ids == want_b
        assert a.finish.token_ids == want_a
    finally:
        sched.stop()


def test_cancel_frees_the_row_within_a_step(tiny_loaded: LoadedModel) -> None:
    (p,) = _prompts(tiny_loaded, 1)
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=1))
    try:
        sink = Collector()
        req = sched.submit(tiny_loaded.new_sequence(p, SamplingParams(max_new_tokens=100, do_sample=False)), sink)
        while sched.steps < 3:
            time.sleep(0.001)
        req.cancel()
        assert sink.finish.reason == "cancelled"
        steps_at_cancel = sched.steps
        assert sched.active == 0
        time.sleep(0.05)
        assert sched.steps <= steps_at_cancel + 1  # the engine stopped working on it
        tokens = [e for e in sink.events if isinstance(e, TokenEvent)]
        assert len(tokens) < 100
        # the freed row serves the next request
        nxt = Collector()
        params = SamplingParams(max_new_tokens=3, do_sample=False, ignore_eos=True)
        sched.submit(tiny_loaded.new_sequence(p, params), nxt)
        assert nxt.finish.completion_tokens == 3
    finally:
        sched.stop()


def test_cancel_while_queued(tiny_loaded: LoadedModel) -> None:
    (p,) = _prompts(tiny_loaded, 1)
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=1))
    try:
        first, queued = Collector(), Collector()
        sched.submit(tiny_loaded.new_sequence(p, SamplingParams(max_new_tokens=80, do_sample=False)), first)
        req = sched.submit(tiny_loaded.new_sequence(p, SamplingParams(max_new_tokens=5)), queued)
        req.cancel()
        assert queued.finish.reason == "cancelled" and queued.finish.completion_tokens == 0
        assert first.finish.reason in ("length", "stop")
    finally:
        sched.stop()


def test_full_queue_is_overloaded(tiny_loaded: LoadedModel) -> None:
    (p,) = _prompts(tiny_loaded, 1)
    gate = threading.Event()
    real = tiny_loaded.runtime.prefill_chunk
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=1, max_queue=2))

    def blocked(*a: object, **k: object) -> object:
        gate.wait(10)
        return real(*a, **k)

    try:
        tiny_loaded.runtime.prefill_chunk = blocked  # type: ignore[method-assign]
        sinks = [Collector() for _ in range(3)]
        params = SamplingParams(max_new_tokens=2, do_sample=False)
        sched.submit(tiny_loaded.new_sequence(p, params), sinks[0])
        while sched.waiting:  # the engine took the first one and is stuck in its prefill
            time.sleep(0.001)
        sched.submit(tiny_loaded.new_sequence(p, params), sinks[1])
        sched.submit(tiny_loaded.new_sequence(p, params), sinks[2])
        with pytest.raises(Overloaded, match="queue is full"):
            sched.submit(tiny_loaded.new_sequence(p, params), Collector())
        gate.set()
        assert all(s.finish.reason in ("length", "stop") for s in sinks)
    finally:
        gate.set()
        del tiny_loaded.runtime.prefill_chunk
        sched.stop()


def test_timeout_stops_a_request(tiny_loaded: LoadedModel) -> None:
    (p,) = _prompts(tiny_loaded, 1)
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(timeout=0.0))
    try:
        sink = Collector()
        sched.submit(tiny_loaded.new_sequence(p, SamplingParams(max_new_tokens=50)), sink)
        assert sink.finish.reason == "timeout"
    finally:
        sched.stop()


def test_engine_error_fails_requests_and_engine_survives(tiny_loaded: LoadedModel) -> None:
    (p,) = _prompts(tiny_loaded, 1)
    sched = Scheduler(tiny_loaded.runtime)
    calls = {"n": 0}
    real = tiny_loaded.runtime.prefill_chunk

    def flaky(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    try:
        tiny_loaded.runtime.prefill_chunk = flaky  # type: ignore[method-assign]
        bad = Collector()
        sched.submit(tiny_loaded.new_sequence(p, SamplingParams(max_new_tokens=3)), bad)
        assert bad.finish.reason == "error"
        good = Collector()
        sched.submit(tiny_loaded.new_sequence(p, SamplingParams(max_new_tokens=3)), good)
        assert good.finish.reason in ("length", "stop")
    finally:
        del tiny_loaded.runtime.prefill_chunk
        sched.stop()


def test_finished_rows_give_their_slots_cache_back(tiny_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request that ends frees the highest slot in use (rows stay packed in 0..n-1), and that
    slot's cache pages are released: at least one release per finished request (slots 2, 1, 0 when
    the three overlap; a prompt still being prefilled when a row leaves moves down and frees its
    old slot too)."""
    released: list[int] = []
    real = tiny_loaded.runtime.release
    monkeypatch.setattr(tiny_loaded.runtime, "release", lambda slot: (released.append(slot), real(slot))[1])
    prompts = _prompts(tiny_loaded, 3)
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=4))
    try:
        sinks = [Collector() for _ in prompts]
        for i, (p, sink) in enumerate(zip(prompts, sinks, strict=True)):
            params = SamplingParams(max_new_tokens=5 + 3 * i, do_sample=False, ignore_eos=True)
            sched.submit(tiny_loaded.new_sequence(p, params), sink)
        assert [s.finish.completion_tokens for s in sinks] == [5, 8, 11]
    finally:
        sched.stop()
    assert len(released) >= 3 and all(0 <= slot < 3 for slot in released)


def test_long_prompt_is_prefilled_between_decode_steps(tiny_loaded: LoadedModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked prefill in the scheduler: while a long prompt goes in chunk by chunk, the running
    request keeps getting tokens, and both results equal the same requests run alone."""
    from kolite.engine import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "PREFILL_CHUNK", 4)
    short, long = _prompts(tiny_loaded, 1)[0][:5], [int(i) for i in np.arange(40) * 7 % 300 + 10]  # 10 chunks
    running = SamplingParams(max_new_tokens=60, do_sample=False, ignore_eos=True)
    joining = SamplingParams(max_new_tokens=5, temperature=0.9, seed=3)
    want_running = _alone(tiny_loaded, short, running).token_ids
    want_joining = _alone(tiny_loaded, long, joining).token_ids

    a = Collector()
    tokens_of_a_at: dict[str, int] = {}

    class Joiner(Collector):
        def __call__(self, ev: TokenEvent | Finish) -> None:
            tokens_of_a_at.setdefault("first token of the long prompt", len(a.events))
            super().__call__(ev)

    b = Joiner()
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=4))
    try:
        sched.submit(tiny_loaded.new_sequence(short, running), a)
        while len(a.events) < 3:
            time.sleep(0.001)
        tokens_of_a_at["long prompt submitted"] = len(a.events)
        sched.submit(tiny_loaded.new_sequence(long, joining), b)
        assert b.finish.token_ids == want_joining
        assert a.finish.token_ids == want_running
    finally:
        sched.stop()
    # 10 chunks, one per step: the running request got a token at (nearly) every one of those steps
    assert tokens_of_a_at["first token of the long prompt"] - tokens_of_a_at["long prompt submitted"] >= 8


def test_cancel_during_a_chunked_prefill(tiny_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request cancelled while its prompt is still going in stops within a chunk, gives its slot
    back, and the next request is served normally."""
    from kolite.engine import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "PREFILL_CHUNK", 2)
    chunks = []
    real = tiny_loaded.runtime.prefill_chunk

    def slow_chunk(slot: int, ids: list[int], start: int, end: int) -> object:
        chunks.append(start)
        time.sleep(0.01)
        return real(slot, ids, start, end)

    monkeypatch.setattr(tiny_loaded.runtime, "prefill_chunk", slow_chunk)
    released: list[int] = []
    real_release = tiny_loaded.runtime.release
    monkeypatch.setattr(tiny_loaded.runtime, "release", lambda slot: (released.append(slot), real_release(slot))[1])
    long = [int(i) for i in np.arange(60) * 11 % 300 + 10]  # 30 chunks of 2
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=2))
    try:
        sink = Collector()
        req = sched.submit(tiny_loaded.new_sequence(long, SamplingParams(max_new_tokens=3)), sink)
        while len(chunks) < 3:
            time.sleep(0.001)
        req.cancel()
        finish = sink.finish
        assert finish.reason == "cancelled" and finish.completion_tokens == 0
        assert len(chunks) < 30 and released == [0]
        nxt = Collector()
        p = SamplingParams(max_new_tokens=3, do_sample=False, ignore_eos=True)
        sched.submit(tiny_loaded.new_sequence(long[:5], p), nxt)
        assert nxt.finish.completion_tokens == 3
    finally:
        sched.stop()
