"""The tests' one reference decode: the plain batch-1 loop (prefill, then one cached step per new
token), no scheduler, no HTTP, to compare what the scheduler and the server give against.

It yields `TokenEvent`s as tokens arrive and ends with a `Finish`; `reference(model, prompt, params)`
collects it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kolite.engine.runtime import GPT2Runtime
from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import Finish, Sequence, TokenEvent
from kolite.service import LoadedModel


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
            seq.stop()
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


def reference(model: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> Finish:
    """What a request gives alone: the reference loop over a new sequence of `model`."""
    return collect(run_sequence(model.runtime, model.new_sequence(prompt_ids, params)))
