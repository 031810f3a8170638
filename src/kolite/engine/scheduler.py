"""Continuous batching: one engine thread owns the session and runs every request in one batch.

Requests wait in a bounded queue. At every step the engine thread
1. drops requests that were cancelled (their client went away) or ran past their deadline,
2. admits waiting requests up to `max_batch`, prefills them together and merges their KV cache
   into the running batch (rows are left-padded; the attention mask and position ids keep each
   row's numbers its own),
3. runs one decode step for every row and hands each row's token to its request.
A finished row leaves at once and the cache is trimmed, so the freed slot is reused at the next
step. Sampling is per request (its own seeded generator) and int8 activations are quantized per
token, so a request gives the same tokens alone and in a full batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kolite.engine.runtime import GPT2Runtime, KVCache, positions_from_mask
from kolite.engine.sequence import Finish, Sequence, TokenEvent
from kolite.errors import Overloaded

log = logging.getLogger(__name__)

Event = TokenEvent | Finish
Deliver = Callable[[Event], None]


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; one more is refused (HTTP 429)
    timeout: float | None = 600.0  # seconds from submission until a request is stopped


@dataclass
class Request:
    """A sequence in the scheduler, and how its events get back to the caller."""

    seq: Sequence
    deliver: Deliver
    deadline: float | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    pending: int = -1  # the sampled token the next decode step feeds

    def cancel(self) -> None:
        """Ask the engine to stop this request; it leaves within one step."""
        self.cancelled.set()


@dataclass
class _Batch:
    """The running rows and their shared, left-padded cache."""

    rows: list[Request] = field(default_factory=list)
    past: KVCache = field(default_factory=list)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))


def _pad_left(arr: np.ndarray, width: int, axis: int) -> np.ndarray:
    extra = width - arr.shape[axis]
    if extra == 0:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (extra, 0)
    return np.pad(arr, pad)


class Scheduler:
    """Owns a runtime and the thread that drives it."""

    def __init__(self, runtime: GPT2Runtime, options: SchedulerOptions | None = None) -> None:
        self.runtime = runtime
        self.options = options or SchedulerOptions()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._batch = _Batch()
        self._admitting: list[Request] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kolite-engine", daemon=True)
        self.steps = 0  # decode steps run (for tests and metrics)
        self.tokens = 0  # tokens generated
        self._thread.start()

    # --- caller side (any thread) ------------------------------------------------------------
    def submit(self, seq: Sequence, deliver: Deliver) -> Request:
        """Queue a sequence; raises Overloaded when the queue is full."""
        timeout = self.options.timeout
        req = Request(seq, deliver, None if timeout is None else time.monotonic() + timeout)
        with self._cond:
            if self._stopping:
                raise Overloaded("the engine is shutting down")
            if len(self._waiting) >= self.options.max_queue:
                raise Overloaded(f"the request queue is full ({self.options.max_queue} waiting); retry shortly")
            self._waiting.append(req)
            self._cond.notify()
        return req

    @property
    def active(self) -> int:
        return len(self._batch.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._batch.rows:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception:  # a broken step must not kill the engine: fail its requests, go on
                log.exception("engine step failed")
                self._fail_all()
        for req in [*self._batch.rows, *self._waiting]:
            self._finish(req, "cancelled")

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._batch.rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        now = time.monotonic()

        def gone(req: Request) -> bool:
            return req.cancelled.is_set() or (req.deadline is not None and now > req.deadline)

        with self._cond:
            stale = [r for r in self._waiting if gone(r)]
            for r in stale:
                self._waiting.remove(r)
        for r in stale:
            self._finish(r, "timeout" if not r.cancelled.is_set() else "cancelled")
        leaving = [i for i, r in enumerate(self._batch.rows) if gone(r)]
        for i in leaving:
            r = self._batch.rows[i]
            self._finish(r, "timeout" if not r.cancelled.is_set() else "cancelled")
        self._remove_rows(leaving)

    def _admit(self) -> None:
        free = self.options.max_batch - len(self._batch.rows)
        if free <= 0:
            return
        with self._cond:
            new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        if not new:
            return
        self._admitting = new  # so a failing prefill fails these too
        prompts = [r.seq.prompt_ids for r in new]
        width = max(map(len, prompts))
        ids = np.array([[0] * (width - len(p)) + p for p in prompts], dtype=np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        logits, past = self.runtime.forward(ids, mask, positions_from_mask(mask, width),
                                            self.runtime.empty_cache(len(new)))
        keep = [i for i, r in enumerate(new) if self._emit(r, logits[i, -1])]
        if keep:
            self._merge([new[i] for i in keep], [p[keep] for p in past], mask[keep])
        self._admitting = []

    def _decode(self) -> None:
        b = self._batch
        ids = np.array([[r.pending] for r in b.rows], dtype=np.int64)
        mask = np.concatenate([b.mask, np.ones((len(b.rows), 1), np.int64)], axis=1)
        logits, b.past = self.runtime.forward(ids, mask, positions_from_mask(mask, 1), b.past)
        b.mask = mask
        self.steps += 1
        done = [i for i, r in enumerate(b.rows) if not self._emit(r, logits[i, -1])]
        self._remove_rows(done)

    def _emit(self, req: Request, logits: np.ndarray) -> bool:
        """Sample, hand the event over, and say whether the request goes on."""
        token = req.seq.next_token(logits)
        self.tokens += 1
        self._deliver(req, req.seq.accept(token))
        if req.seq.finished:
            self._deliver(req, req.seq.result())
            req.done.set()
            return False
        req.pending = token
        return True

    def _merge(self, rows: list[Request], past: KVCache, mask: np.ndarray) -> None:
        b = self._batch
        if not b.rows:
            b.rows, b.past, b.mask = rows, past, mask
            return
        width = max(b.mask.shape[1], mask.shape[1])
        b.past = [np.concatenate([_pad_left(old, width, 2), _pad_left(new, width, 2)], axis=0)
                  for old, new in zip(b.past, past, strict=True)]
        b.mask = np.concatenate([_pad_left(b.mask, width, 1), _pad_left(mask, width, 1)], axis=0)
        b.rows = b.rows + rows

    def _remove_rows(self, indices: list[int]) -> None:
        if not indices:
            return
        b = self._batch
        keep = [i for i in range(len(b.rows)) if i not in set(indices)]
        b.rows = [b.rows[i] for i in keep]
        if not keep:
            b.past, b.mask = [], np.zeros((0, 0), np.int64)
            return
        b.mask = b.mask[keep]
        start = int(np.argmax(b.mask.any(axis=0)))  # columns that are padding in every row go
        b.mask = b.mask[:, start:]
        b.past = [np.ascontiguousarray(p[keep, :, start:]) for p in b.past]

    def _finish(self, req: Request, reason: str) -> None:
        if req.done.is_set():
            return
        req.seq.finish_reason = reason  # type: ignore[assignment]
        self._deliver(req, req.seq.result())
        req.done.set()

    def _fail_all(self) -> None:
        rows, self._batch = self._batch.rows + self._admitting, _Batch()
        self._admitting = []
        for r in rows:
            self._finish(r, "error")

    @staticmethod
    def _deliver(req: Request, event: Event) -> None:
        try:
            req.deliver(event)
        except Exception:  # the consumer's loop may be closed; the engine must go on
            log.debug("could not deliver an event", exc_info=True)
