"""Continuous batching: same tokens as alone, joins and leaves mid-flight, cancellation, limits, the KV pool."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kolite.engine.sampling import SamplingParams
from kolite.engine.scheduler import Scheduler, SchedulerOptions
from kolite.engine.sequence import Finish, TokenEvent
from kolite.errors import ContextTooLong, KVPoolExceeded, Overloaded
from kolite.service import LoadedModel
from tests.reference_decode import reference


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
    return reference(model, prompt, params)


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


# --- the KV pool -------------------------------------------------------------------------------------
def _greedy(n_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n_new, do_sample=False, ignore_eos=True)


def _record_decodes(runtime: object, sched: list[Scheduler], monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(rows, tokens reserved) at every decode step, read on the engine thread (no race)."""
    seen: list[tuple[int, int]] = []
    real = runtime.decode  # type: ignore[attr-defined]

    def decode(tokens: list[int], lengths: list[int]) -> object:
        seen.append((len(tokens), sched[0].kv_reserved))
        return real(tokens, lengths)

    monkeypatch.setattr(runtime, "decode", decode)
    return seen


def test_kv_pool_admits_requests_in_turn(tiny_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool with room for two requests: five submitted together run two at a time (the others wait
    in the queue although batch rows are free), each is admitted as another leaves, every one ends
    with the tokens it gets alone, and the pool is empty again at the end."""
    (p,) = _prompts(tiny_loaded, 1)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.1, seed=5, ignore_eos=True)
    params = [_greedy(10), sampled] * 2 + [_greedy(10)]
    need = len(p) + 10
    pool = 2 * need + need // 2  # two fit, three do not
    expected = [_alone(tiny_loaded, p, q).token_ids for q in params]
    holder: list[Scheduler] = []
    seen = _record_decodes(tiny_loaded.runtime, holder, monkeypatch)
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=8, max_kv_tokens=pool))
    holder.append(sched)
    try:
        sinks = [Collector() for _ in params]
        for q, sink in zip(params, sinks, strict=True):
            sched.submit(tiny_loaded.new_sequence(p, q), sink)
        got = [s.finish for s in sinks]
    finally:
        sched.stop()
    assert [f.token_ids for f in got] == expected and all(f.reason == "length" for f in got)
    assert max(rows for rows, _ in seen) == 2  # two together, never three
    assert all(reserved <= pool for _, reserved in seen)
    assert sched.kv_reserved == 0


def test_request_larger_than_the_pool_is_refused_at_once(tiny_loaded: LoadedModel) -> None:
    """One token more than the whole pool is a KVPoolExceeded (a ContextTooLong: HTTP 400) raised by
    `submit`, never a request left waiting forever; a request of exactly the pool runs, and the one
    queued behind the refusal is not lost."""
    (p,) = _prompts(tiny_loaded, 1)
    pool = len(p) + 12
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=4, max_kv_tokens=pool))
    try:
        with pytest.raises(KVPoolExceeded, match=f"KV cache pool of {pool} tokens") as info:
            sched.submit(tiny_loaded.new_sequence(p, _greedy(13)), Collector())
        assert isinstance(info.value, ContextTooLong) and info.value.param == "max_new_tokens"
        assert sched.waiting == 0
        whole, after = Collector(), Collector()
        sched.submit(tiny_loaded.new_sequence(p, _greedy(12)), whole)
        sched.submit(tiny_loaded.new_sequence(p, _greedy(3)), after)
        assert whole.finish.completion_tokens == 12 and after.finish.completion_tokens == 3
    finally:
        sched.stop()
    assert sched.kv_reserved == 0


def test_full_pool_queues_then_full_queue_is_overloaded(tiny_loaded: LoadedModel,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """While the pool is full a request waits in the queue even with batch rows free; one more than the
    queue holds is Overloaded (HTTP 429); cancelling the running request gives its reservation back
    and the waiting one runs to the end."""
    (p,) = _prompts(tiny_loaded, 1)
    real = tiny_loaded.runtime.decode

    def slow(*a: object, **k: object) -> object:
        time.sleep(0.005)
        return real(*a, **k)

    monkeypatch.setattr(tiny_loaded.runtime, "decode", slow)
    sched = Scheduler(tiny_loaded.runtime, SchedulerOptions(max_batch=4, max_queue=1, max_kv_tokens=len(p) + 100))
    try:
        running, queued = Collector(), Collector()
        req = sched.submit(tiny_loaded.new_sequence(p, _greedy(100)), running)
        while sched.active == 0:
            time.sleep(0.001)
        sched.submit(tiny_loaded.new_sequence(p, _greedy(5)), queued)
        steps = sched.steps
        while sched.steps < steps + 3:
            time.sleep(0.001)
        assert sched.active == 1 and sched.waiting == 1  # rows are free: the pool holds it back
        with pytest.raises(Overloaded, match="queue is full"):
            sched.submit(tiny_loaded.new_sequence(p, _greedy(1)), Collector())
        req.cancel()
        assert running.finish.reason == "cancelled"
        assert queued.finish.reason == "length" and queued.finish.completion_tokens == 5
    finally:
        sched.stop()
    assert sched.kv_reserved == 0


def test_a_row_moved_into_a_freed_slot_leaves_no_stale_cache(tiny_loaded: LoadedModel,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """When a long request ends, the last row moves into its slot: afterwards that slot holds only the
    moved row's tokens (the long request's pages are dropped, not left resident past the shorter row,
    where the pool would no longer bound them) and the old slot is all zeros (given back)."""
    runtime = tiny_loaded.runtime
    long_prompt = [int(i) for i in np.arange(70) * 7 % 300 + 10]
    short = _prompts(tiny_loaded, 1)[0][:4]
    after_moves: list[tuple[float, float]] = []
    real = runtime.move

    def move(src: int, dst: int, length: int) -> None:
        real(src, dst, length)
        after_moves.append((max(float(np.abs(buf[dst, :, length:]).max()) for buf in runtime.cache),
                            max(float(np.abs(buf[src]).max()) for buf in runtime.cache)))

    monkeypatch.setattr(runtime, "move", move)
    sched = Scheduler(runtime, SchedulerOptions(max_batch=2))
    try:
        first, second = Collector(), Collector()
        sched.submit(tiny_loaded.new_sequence(long_prompt, _greedy(4)), first)  # slot 0, 73 tokens at the end
        sched.submit(tiny_loaded.new_sequence(short, _greedy(30)), second)  # slot 1, moves to slot 0
        assert first.finish.completion_tokens == 4 and second.finish.completion_tokens == 30
    finally:
        sched.stop()
    assert after_moves and all(stale == 0.0 and left == 0.0 for stale, left in after_moves), after_moves
