"""The batch-1 decode loop: prefill the prompt, then one cached step per new token.

It yields `TokenEvent`s as tokens arrive and ends with a `Finish`, so callers can stream or collect.
A `should_stop` callback is polled once per step, so a caller that goes away stops the work within
one token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kolite.engine.runtime import GPT2Runtime
from kolite.engine.sequence import Finish, Sequence, TokenEvent


def run_sequence(
    runtime: GPT2Runtime, seq: Sequence, should_stop: Callable[[], bool] | None = None
) -> Iterator[TokenEvent | Finish]:
    """Drive `seq` to its end on `runtime` in cache slot 0, one token per step."""
    logits = runtime.prefill(0, seq.prompt_ids)[-1]
    length = len(seq.prompt_ids)
    while True:
        token = seq.next_token(logits)
        yield seq.accept(token)
        if seq.finished:
            break
        if should_stop is not None and should_stop():
            seq.cancel()
            break
        logits = runtime.decode([token], [length])[0]
        length += 1
    yield seq.result()


def collect(events: Iterator[TokenEvent | Finish]) -> Finish:
    """Run a stream to the end and return its `Finish`."""
    finish: Finish | None = None
    for ev in events:
        if isinstance(ev, Finish):
            finish = ev
    assert finish is not None
    return finish
