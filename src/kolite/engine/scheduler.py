"""Continuous batching: one engine thread owns the session and runs every request in one batch.

Requests wait in a bounded queue. At every step the engine thread
1. drops requests that were cancelled (their client went away) or ran past their deadline,
2. admits waiting requests, first come first served, up to `max_batch` rows and while the KV pool
   has room: each request reserves its prompt + max new tokens of the `max_kv_tokens` pool for as
   long as it runs, so the cache memory of everything running is bounded before any of it is
   written (a request larger than the whole pool is refused at submission, never left waiting).
   Each admitted request is prefilled into the next free cache slot, at most `runtime.chunk_tokens`
   prompt tokens per step, so a long prompt is prefilled over several steps while the running rows keep
   decoding (chunked prefill: nobody's stream stalls for a whole prompt),
3. runs one decode step for every running row (each row has its own length; no padding) and hands
   each row's token to its request.
A finished row leaves at once: the last row's cache moves into its slot, so running rows always
occupy slots 0..n-1, and its slot and its reservation in the pool serve the next request at the
next step. Sampling is
per request (its own seeded generator), attention is per row and int8 activations are quantized
per token, so a request gives the same tokens alone and in a full batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kolite.engine.runtime import GPT2Runtime, release_free_memory
from kolite.engine.sequence import Finish, FinishReason, Sequence, TokenEvent
from kolite.errors import ContextTooLong, KVPoolExceeded, Overloaded

# Prompts this long leave megabytes of freed activations in the C heap: trimmed after their prefill
# (~1 ms after a 100-token prompt; measured with 8 streams of 100 + 128 tokens: peak 374 -> 358 MB).
LONG_PROMPT = 64

log = logging.getLogger(__name__)

Event = TokenEvent | Finish
Deliver = Callable[[Event], None]


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; one more is refused (HTTP 429)
    timeout: float | None = 600.0  # seconds from submission until a request is stopped
    max_kv_tokens: int | None = None  # KV pool: tokens all running requests may reserve; None: every slot full


def kv_tokens_needed(seq: Sequence) -> int:
    """KV cache tokens a request may come to hold: its prompt and every token it may generate."""
    return len(seq.prompt_ids) + seq.params.max_new_tokens


@dataclass
class EngineRequest:
    """A sequence in the scheduler, and how its events get back to the caller."""

    seq: Sequence
    deliver: Deliver
    deadline: float | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    pending: int = -1  # the sampled token the next decode step feeds
    kv_tokens: int = 0  # its reservation in the KV pool while it is prefilled or decoded
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when its prefill began: submitted_at to this is its time in the queue

    def cancel(self) -> None:
        """Ask the engine to stop this request; it leaves within one step."""
        self.cancelled.set()


@dataclass
class _Prefill:
    """A request whose prompt is going into cache slot `slot`; `done` tokens of it are in so far."""

    req: EngineRequest
    slot: int
    done: int = 0


@dataclass
class _Batch:
    """The running rows: row i lives in cache slot i and holds lengths[i] tokens."""

    rows: list[EngineRequest] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


class Scheduler:
    """Owns a runtime and the thread that drives it."""

    def __init__(self, runtime: GPT2Runtime, options: SchedulerOptions | None = None) -> None:
        self.runtime = runtime
        self.options = options or SchedulerOptions()
        runtime.ensure_slots(self.options.max_batch)
        every_slot = runtime.capacity * self.options.max_batch  # the most the cache buffers can hold
        self.kv_pool = min(self.options.max_kv_tokens or every_slot, every_slot)
        self.kv_reserved = 0  # tokens reserved by the running and prefilling requests (engine thread only)
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._cond = threading.Condition()
        self._batch = _Batch()
        self._prefilling: _Prefill | None = None  # the prompt being prefilled, one chunk per step
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kolite-engine", daemon=True)
        self.steps = 0  # decode steps run (for tests and metrics)
        self._thread.start()

    # --- caller side (any thread) ------------------------------------------------------------
    def submit(self, seq: Sequence, deliver: Deliver) -> EngineRequest:
        """Queue a sequence; raises Overloaded when the queue is full, KVPoolExceeded (or ContextTooLong,
        beyond one slot) when it could never be admitted."""
        self._check_fits(seq)
        timeout = self.options.timeout
        req = EngineRequest(seq, deliver, None if timeout is None else time.monotonic() + timeout,
                      kv_tokens=kv_tokens_needed(seq))
        with self._cond:
            if self._stopping:
                raise Overloaded("the engine is shutting down")
            if len(self._waiting) >= self.options.max_queue:
                raise Overloaded(f"the request queue is full ({self.options.max_queue} waiting); retry shortly")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def _check_fits(self, seq: Sequence) -> None:
        """Refuse at once what could never run: more than the whole pool, or more than a slot holds."""
        need, capacity = kv_tokens_needed(seq), self.runtime.capacity
        if need > self.kv_pool:
            raise KVPoolExceeded(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_new_tokens ({seq.params.max_new_tokens}) = {need} "
                f"tokens exceed the server's KV cache pool of {self.kv_pool} tokens (max_kv_tokens); shorten the "
                "prompt or ask for fewer tokens", param="max_new_tokens")
        if need > capacity:
            raise ContextTooLong(f"prompt + max_new_tokens = {need} tokens exceed a cache slot of {capacity} tokens",
                                 param="max_new_tokens")

    @property
    def active(self) -> int:
        return len(self._batch.rows)

    @property
    def running(self) -> int:
        """Requests being decoded or prefilled now (a snapshot, from any thread)."""
        return len(self._batch.rows) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        """Requests queued for a row or for room in the KV pool (a snapshot)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        """Whether a request is running, being prefilled or waiting (read from any thread: a snapshot)."""
        return bool(self._batch.rows or self._prefilling is not None or self._waiting)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._batch.rows and not self._prefilling:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception:  # a broken step must not kill the engine: fail its requests, go on
                log.exception("engine step failed")
                self._fail_all()
        with self._cond:
            leftover = [*self._batch.rows, *self._waiting, *([self._prefilling.req] if self._prefilling else [])]
            self._batch = _Batch()
            self._waiting.clear()
            self._prefilling = None
        for req in leftover:
            self._finish(req, "cancelled")

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._batch.rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        now = time.monotonic()

        def gone(req: EngineRequest) -> bool:
            return req.cancelled.is_set() or (req.deadline is not None and now > req.deadline)

        with self._cond:
            stale = [r for r in self._waiting if gone(r)]
            for r in stale:
                self._waiting.remove(r)
        for r in stale:
            self._finish(r, "timeout" if not r.cancelled.is_set() else "cancelled")
        p = self._prefilling
        if p is not None and gone(p.req):
            self._prefilling = None
            self._finish(p.req, "timeout" if not p.req.cancelled.is_set() else "cancelled")
            self.runtime.release(p.slot)
            self.kv_reserved -= p.req.kv_tokens
        leaving = [i for i, r in enumerate(self._batch.rows) if gone(r)]
        for i in leaving:
            r = self._batch.rows[i]
            self._finish(r, "timeout" if not r.cancelled.is_set() else "cancelled")
        self._remove_rows(leaving)

    def _admit(self) -> None:
        """Prefill waiting prompts, `runtime.chunk_tokens` per step at most; each joins the batch as
        soon as its whole prompt is in (short prompts: several in one step)."""
        b = self._batch
        budget = self.runtime.chunk_tokens
        admitted_long = False
        while budget > 0:
            p = self._prefilling
            if p is None:
                p = self._next_prefill()
                if p is None:
                    break
            elif p.slot != len(b.rows):  # rows left while it was prefilled: keep the slots packed
                self.runtime.move(p.slot, len(b.rows), p.done)
                self.runtime.release(p.slot)
                p.slot = len(b.rows)
            ids = p.req.seq.prompt_ids
            end = min(len(ids), p.done + budget)
            logits = self.runtime.prefill_chunk(p.slot, ids, p.done, end)
            budget -= end - p.done
            p.done = end
            if p.done < len(ids):
                continue
            admitted_long |= len(ids) >= LONG_PROMPT
            if self._emit(p.req, logits[-1]):
                b.rows.append(p.req)
                b.lengths.append(len(ids))
            else:  # done at its first token: the slot it was prefilled into is free again
                self.runtime.release(p.slot)
                self.kv_reserved -= p.req.kv_tokens
            self._prefilling = None
        if admitted_long:
            release_free_memory()  # after the first tokens went out, so time to first token is unchanged

    def _next_prefill(self) -> _Prefill | None:
        """Take the first waiting request if a row is free and the KV pool has room for all it may
        hold; it stays first in line otherwise (first come, first served: a long request is never
        overtaken forever by short ones), and is admitted as soon as running requests leave."""
        if len(self._batch.rows) >= self.options.max_batch:
            return None
        with self._cond:
            if not self._waiting or self.kv_reserved + self._waiting[0].kv_tokens > self.kv_pool:
                return None
            req = self._waiting.popleft()
        self.kv_reserved += req.kv_tokens
        req.started_at = time.monotonic()
        self._prefilling = _Prefill(req, slot=len(self._batch.rows))
        return self._prefilling

    def _decode(self) -> None:
        b = self._batch
        logits = self.runtime.decode([r.pending for r in b.rows], b.lengths)
        self.steps += 1
        done = []
        for i, req in enumerate(b.rows):
            b.lengths[i] += 1
            if not self._emit(req, logits[i]):
                done.append(i)
        self._remove_rows(done)

    def _emit(self, req: EngineRequest, logits: np.ndarray) -> bool:
        """Sample, hand the event over, and say whether the request goes on."""
        token = req.seq.next_token(logits)
        self._deliver(req, req.seq.accept(token))
        if req.seq.finished:
            self._deliver(req, req.seq.result())
            req.done.set()
            return False
        req.pending = token
        return True

    def _remove_rows(self, indices: list[int]) -> None:
        """Fill each freed slot with the last row, so running rows stay in slots 0..n-1."""
        b = self._batch
        for i in sorted(indices, reverse=True):
            self.kv_reserved -= b.rows[i].kv_tokens
            last = len(b.rows) - 1
            if i != last:
                self.runtime.move(last, i, b.lengths[last])
                b.rows[i], b.lengths[i] = b.rows[last], b.lengths[last]
            b.rows.pop()
            b.lengths.pop()
            self.runtime.release(last)  # the last slot is free now: its cache pages go back

    def _finish(self, req: EngineRequest, reason: FinishReason) -> None:
        if req.done.is_set():
            return
        req.seq.stop(reason)
        self._deliver(req, req.seq.result())
        req.done.set()

    def _fail_all(self) -> None:
        """Fail every admitted request; their slots' cache goes back and the pool is empty again."""
        rows, self._batch = self._batch.rows + ([self._prefilling.req] if self._prefilling else []), _Batch()
        self._prefilling = None
        self.kv_reserved = 0
        for slot in range(self.runtime.slots):  # a prefill may sit above the rows: every slot
            self.runtime.release(slot)
        for r in rows:
            self._finish(r, "error")

    @staticmethod
    def _deliver(req: EngineRequest, event: Event) -> None:
        try:
            req.deliver(event)
        except Exception:  # the consumer's loop may be closed; the engine must go on
            log.debug("could not deliver an event", exc_info=True)
