"""The service's request streams: what a client sees when the server stops under it."""

from __future__ import annotations

import asyncio

import pytest

from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import TokenEvent
from kolite.errors import ShuttingDown
from kolite.service import LoadedModel
from tests.conftest import make_service

pytestmark = pytest.mark.anyio


async def test_a_request_stopped_by_shutdown_ends_in_an_error(tiny_loaded: LoadedModel) -> None:
    """A running request that the shutdown stops raises ShuttingDown (503), never a normal finish; one the
    client cancels itself ends quietly."""
    svc = make_service(tiny_loaded, "tiny")
    svc.start_loading()
    svc.wait_loaded(10)
    params = SamplingParams(max_new_tokens=100, ignore_eos=True, do_sample=False)
    model = svc.ready_model()
    ids = model.tokenizer.encode("안녕")
    mine, stopped = svc.submit(model, ids, params), svc.submit(model, ids, params)
    assert isinstance(await anext(stopped), TokenEvent)  # running
    mine.cancel()
    await asyncio.to_thread(svc.shutdown)
    events = []
    with pytest.raises(ShuttingDown, match="shutting down"):
        async for event in stopped:
            events.append(event)
    assert all(isinstance(e, TokenEvent) for e in events) and len(events) < 99
    async for event in mine:  # cancelled by its own client: its last event is a plain Finish
        assert isinstance(event, TokenEvent) or event.reason == "cancelled"
