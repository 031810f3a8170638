"""Limits that hold under hostile input: oversized bodies are refused before they are read, and a long
prompt is tokenized off the event loop, so the server keeps answering."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kolite.api.app import create_app
from kolite.config import ServerSettings
from kolite.service import LoadedModel, State
from tests.api.conftest import make_client
from tests.api.live_server import serve
from tests.conftest import make_service

pytestmark = pytest.mark.anyio
MB = 2**20


async def test_a_declared_oversized_body_is_413_before_it_is_read(tiny_loaded: LoadedModel,
                                                                    tiny_model_dir: Path) -> None:
    svc = make_service(tiny_loaded, tiny_model_dir)
    async with make_client(svc, max_body_bytes=64 * 1024) as c:
        svc.wait_loaded(10)
        big = b'{"prompt": "' + b"a" * (10 * MB) + b'"}'
        r = await c.post("/generate", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and "65536" in err["message"]
        ok = await c.post("/generate", json={"prompt": "안녕", "max_new_tokens": 2})
        assert ok.status_code == 200


async def test_a_chunked_oversized_body_is_413_after_the_limit(tiny_loaded: LoadedModel,
                                                                tiny_model_dir: Path) -> None:
    """No Content-Length: the body is counted as it comes and refused once past the limit; bodies under
    it (chunked too) are served."""
    svc = make_service(tiny_loaded, tiny_model_dir)
    sent = []

    async def chunks(total: int, piece: bytes = b"a" * 4096) -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(total // len(piece)):
            sent.append(len(piece))
            yield piece
        yield b'", "max_new_tokens": 2}'

    async with make_client(svc, max_body_bytes=64 * 1024) as c:
        svc.wait_loaded(10)
        r = await c.post("/generate", content=chunks(1 * MB), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert sum(sent) < 1 * MB  # refused once past the limit, not after reading it all
        sent.clear()
        r = await c.post("/generate", content=chunks(30, "안녕 ".encode()),
                         headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_a_10_mb_body_is_refused_at_once_while_health_answers(tiny_loaded: LoadedModel,
                                                               tiny_model_dir: Path) -> None:
    """Over real HTTP (uvicorn): a 10 MB prompt gets 413 in well under a second, and /health keeps
    answering while it is being sent (measured 2-10 ms a probe, the first up to ~100 ms on a loaded
    2-core host; client and server share this process's GIL, so the bound is 250 ms: a blocked event
    loop, the bug this guards against, stalled /health for 11.7 s)."""
    svc = make_service(tiny_loaded, tiny_model_dir)
    app = create_app(server_settings=ServerSettings(), service=svc)
    with serve(app) as server:
        assert svc.wait_loaded(10) is State.READY
        base = server.base_url.removesuffix("/v1")
        httpx.get(base + "/health", timeout=5)  # warm: the first connection's setup is not the point
        result: dict = {}

        def post_big() -> None:
            started = time.perf_counter()
            r = httpx.post(base + "/generate", content=b'{"prompt": "' + b"x" * (10 * MB) + b'"}',
                           headers={"content-type": "application/json"}, timeout=30)
            result.update(status=r.status_code, seconds=time.perf_counter() - started)

        worker = threading.Thread(target=post_big)
        worker.start()
        health = []
        while worker.is_alive() or not health:
            started = time.perf_counter()
            assert httpx.get(base + "/health", timeout=5).status_code == 200
            health.append(time.perf_counter() - started)
            time.sleep(0.01)
        worker.join()
    assert result["status"] == 413 and result["seconds"] < 1.0, result
    assert max(health) < 0.25, health


async def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny_loaded: LoadedModel, tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While a prompt is being tokenized (made slow here), /health answers: the event loop is free."""
    svc = make_service(tiny_loaded, tiny_model_dir)
    real = tiny_loaded.tokenizer.encode
    loop_thread = threading.get_ident()
    seen_threads = []

    def slow_encode(text: str) -> list[int]:
        seen_threads.append(threading.get_ident())
        time.sleep(0.5)
        return real(text)

    monkeypatch.setattr(tiny_loaded.tokenizer, "encode", slow_encode)
    async with make_client(svc) as c:
        svc.wait_loaded(10)
        gen = asyncio.create_task(c.post("/generate", json={"prompt": "안녕하세요", "max_new_tokens": 2}))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        health = await c.get("/health")
        latency = time.perf_counter() - started
        assert health.status_code == 200 and latency < 0.3
        assert (await gen).status_code == 200
    assert seen_threads and loop_thread not in seen_threads
