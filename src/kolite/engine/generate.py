"""The batch-1 decode loop: prefill the prompt, then one cached step per new token.

It yields `TokenEvent`s as tokens arrive and ends with a `Finish`, so callers can stream or collect.
A `should_stop` callback is polled once per step, so a caller that goes away stops the work within
one token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from kolite.engine.runtime import GPT2Runtime
from kolite.engine.sequence import Finish, Sequence, TokenEvent


def run_sequence(
    runtime: GPT2Runtime, seq: Sequence, should_stop: Callable[[], bool] | None = None
) -> Iterator[TokenEvent | Finish]:
    """Drive `seq` to its end on `runtime`, one token per step."""
    ids = np.asarray([seq.prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    past = runtime.empty_cache(1)
    while not seq.finished:
        if should_stop is not None and should_stop():
            seq.cancel()
            break
        logits, past = runtime.forward(ids, mask, positions, past)
        token = seq.next_token(logits[0, -1])
        yield seq.accept(token)
        total = mask.shape[1]
        ids = np.array([[token]], dtype=np.int64)
        mask = np.ones((1, total + 1), dtype=np.int64)
        positions = np.array([[total]], dtype=np.int64)
    yield seq.result()


def collect(events: Iterator[TokenEvent | Finish]) -> Finish:
    """Run a stream to the end and return its `Finish`."""
    finish: Finish | None = None
    for ev in events:
        if isinstance(ev, Finish):
            finish = ev
    assert finish is not None
    return finish
