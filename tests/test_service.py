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


def test_an_unreachable_hub_is_retried_with_backoff(tiny_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the hub cannot be reached, GET / says ERROR and why (with the retry), then the model loads."""
    import kolite.service as service_mod
    from kolite.errors import HubUnreachable
    from kolite.service import State

    monkeypatch.setattr(service_mod, "RETRY_FIRST_S", 0.05)
    failures = [HubUnreachable("the hub could not be reached (timed out)"), HubUnreachable("still down")]
    errors: list[str | None] = []

    def loader(_settings: object) -> LoadedModel:
        if failures:
            raise failures.pop(0)
        return tiny_loaded

    svc = make_service(None, "skt/kogpt2-base-v2", loader=loader)
    fatal: list[bool] = []
    svc.on_fatal = lambda: fatal.append(True)
    real_wait = svc._stopped.wait

    def watching_wait(delay: float) -> bool:
        errors.append(svc.error)
        return real_wait(delay)

    monkeypatch.setattr(svc._stopped, "wait", watching_wait)
    svc.start_loading()
    assert svc.wait_loaded(10) is State.READY and svc.error is None and not fatal
    assert len(errors) == 2 and all(e and "HubUnreachable" in e and "retrying in" in e for e in errors)
    assert "0.05s" in errors[0] and "0.1s" in errors[1]  # the wait doubles


def test_a_load_failure_a_retry_cannot_fix_is_final_and_logged_in_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kolite.errors import ModelFormatError
    from kolite.service import State

    def broken(_settings: object) -> LoadedModel:
        raise ModelFormatError("/models/x has no config.json; it is not a transformers model folder")

    svc = make_service(None, "x", loader=broken)
    fatal: list[bool] = []
    svc.on_fatal = lambda: fatal.append(True)
    with caplog.at_level(logging.INFO, logger="kolite"):
        svc.start_loading()
        assert svc.wait_loaded(10) is State.ERROR
    assert fatal == [True]
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].exc_info is None and "has no config.json" in errors[0].getMessage()
