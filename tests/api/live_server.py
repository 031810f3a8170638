"""A real uvicorn server on 127.0.0.1 in a background thread, and small helpers for tests that use it.

Every wait here is bounded: starting, stopping, and the polling helpers all take a timeout and fail
loudly instead of hanging the test run. Nothing ever listens on or contacts another address.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import openai
import uvicorn
from fastapi import FastAPI

from kolite.api.server import KoliteServer
from kolite.engine.runtime import GPT2Runtime
from kolite.service import ModelService

HOST = "127.0.0.1"


class LiveServer:
    """uvicorn serving `app` on a free port of 127.0.0.1, from a daemon thread."""

    def __init__(self, app: FastAPI, start_timeout: float = 10.0, stop_timeout: float = 5.0,
                 shutdown_timeout: float | None = None, **config: object) -> None:
        """`shutdown_timeout`: run kolite's own server (`kolite.api.server.KoliteServer`, its drain on
        SIGTERM) instead of plain uvicorn."""
        # log_config=None: do not reconfigure the test process's logging; port=0: the OS picks a free port.
        config = uvicorn.Config(app, host=HOST, port=0, log_level="warning", log_config=None, access_log=False,
                                timeout_graceful_shutdown=1, ws="none", **config)  # type: ignore[arg-type]
        self.server = uvicorn.Server(config) if shutdown_timeout is None else KoliteServer(config, shutdown_timeout)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-live", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's base_url."""
        return f"{self.url}/v1"

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"uvicorn did not start within {self.start_timeout}s")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Graceful stop (open connections get `timeout_graceful_shutdown`), then a forced one."""
        self.server.should_exit = True
        self._thread.join(self.stop_timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(self.stop_timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"uvicorn did not stop within {2 * self.stop_timeout}s")


@contextmanager
def serve(app: FastAPI) -> Iterator[LiveServer]:
    """Run `app` for the duration of the block."""
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


def openai_client(server: LiveServer, timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=timeout)


def async_openai_client(server: LiveServer, timeout: float = 30.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=timeout)


STEP_METHODS = ("prefill_chunk", "decode")  # every model call the runtime makes


@contextmanager
def slowed(runtime: GPT2Runtime, delay: float) -> Iterator[None]:
    """Make every model call of `runtime` (prefill and decode steps) take `delay` seconds longer.

    The runtime is shared by the whole test session, so the originals are always put back.
    """
    patched: dict[str, tuple[bool, Callable[..., object]]] = {}
    for name in STEP_METHODS:
        real = getattr(runtime, name, None)
        if not callable(real):
            continue

        def slow(*args: object, _real: Callable[..., object] = real, **kwargs: object) -> object:
            time.sleep(delay)
            return _real(*args, **kwargs)

        patched[name] = (name in vars(runtime), real)
        setattr(runtime, name, slow)
    assert patched, "the runtime has none of the step methods this helper knows"
    try:
        yield
    finally:
        for name, (had_own, real) in patched.items():
            if had_own:
                setattr(runtime, name, real)
            else:
                delattr(runtime, name)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


async def wait_until_async(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def engine_idle(svc: ModelService) -> bool:
    sched = svc.scheduler
    assert sched is not None
    return sched.active == 0 and sched.waiting == 0


def assert_engine_settles(svc: ModelService, timeout: float = 5.0, quiet: float = 0.3) -> int:
    """The engine has no request left and runs no more decode steps; returns its step count."""
    sched = svc.scheduler
    assert sched is not None
    wait_until(lambda: engine_idle(svc), timeout, "the engine to drop every request")
    steps = sched.steps
    time.sleep(quiet)
    assert sched.steps == steps, "the engine kept decoding after every request left"
    assert engine_idle(svc)
    return steps
