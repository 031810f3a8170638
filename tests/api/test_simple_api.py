"""The original API: status, health, /generate, and every error status it can answer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kolite.config import ModelSettings
from kolite.engine.scheduler import SchedulerOptions
from kolite.service import LoadedModel, ModelService
from tests.api.conftest import make_client
from tests.api.live_server import slowed, wait_until_async
from tests.conftest import TINY, make_service

pytestmark = pytest.mark.anyio


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


async def test_status_loading_then_ready(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    gate = threading.Event()

    def slow_loader(_: ModelSettings) -> LoadedModel:
        gate.wait(10)
        return tiny_loaded

    svc = make_service(None, tiny_model_dir, loader=slow_loader)
    async with make_client(svc) as c:
        r = await c.get("/")
        assert r.status_code == 200
        # a local folder is shown by its name, never its absolute path
        assert r.json() == {"service_status": "LOADING", "model": tiny_model_dir.name}
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/generate", json={"prompt": "안녕"})
        assert r.status_code == 503
        assert r.headers["retry-after"]
        assert "loading" in _error(r)["message"]
        gate.set()
        svc.wait_loaded(10)
        assert (await c.get("/")).json()["service_status"] == "READY"
        r = await c.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_status_error_carries_reason(tiny_model_dir: Path) -> None:
    def broken(_: ModelSettings) -> LoadedModel:
        raise FileNotFoundError("no weights in /nowhere")

    svc = make_service(None, "missing/model", loader=broken)
    async with make_client(svc) as c:
        svc.wait_loaded(10)
        body = (await c.get("/")).json()
        assert body["service_status"] == "ERROR"
        assert "no weights in /nowhere" in body["error"]
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and "failed to load" in _error(r)["message"]


async def test_generate_returns_only_new_text_and_usage(client: httpx.AsyncClient, tiny_loaded: LoadedModel) -> None:
    prompt = "안녕하세요 반갑습니다."
    r = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": 12, "do_sample": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input_prompt"] == prompt
    n_prompt = len(tiny_loaded.tokenizer.encode(prompt))
    usage = body["usage"]
    assert usage["prompt_tokens"] == n_prompt
    assert usage["total_tokens"] == n_prompt + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12
    assert (body["finish_reason"] == "length") == (usage["completion_tokens"] == 12)
    assert not body["generated_text"].startswith(prompt)


async def test_max_length_counts_the_prompt_and_max_new_tokens_wins(
    client: httpx.AsyncClient, tiny_loaded: LoadedModel
) -> None:
    prompt = "Hello world, this is"
    n_prompt = len(tiny_loaded.tokenizer.encode(prompt))
    base = {"prompt": prompt, "do_sample": False, "stop": None}
    r = (await client.post("/generate", json={**base, "max_length": n_prompt + 5})).json()
    assert r["usage"]["completion_tokens"] <= 5 and r["usage"]["total_tokens"] <= n_prompt + 5
    r2 = (await client.post("/generate", json={**base, "max_length": n_prompt + 5, "max_new_tokens": 9})).json()
    assert r2["usage"]["completion_tokens"] <= 9
    if r["finish_reason"] == "length" and r2["finish_reason"] == "length":
        assert (r["usage"]["completion_tokens"], r2["usage"]["completion_tokens"]) == (5, 9)


async def test_seed_makes_sampling_reproducible(client: httpx.AsyncClient) -> None:
    req = {"prompt": "라즈베리 파이", "max_new_tokens": 16, "temperature": 1.5, "top_k": 0, "seed": 1234}
    a = (await client.post("/generate", json=req)).json()["generated_text"]
    b = (await client.post("/generate", json=req)).json()["generated_text"]
    others = {(await client.post("/generate", json={**req, "seed": s})).json()["generated_text"] for s in range(5)}
    assert a == b
    assert len(others | {a}) > 1


async def test_stop_string_cuts_the_output(client: httpx.AsyncClient) -> None:
    req = {"prompt": "한국어 GPT-2", "max_new_tokens": 24, "do_sample": False}
    full = (await client.post("/generate", json=req)).json()["generated_text"]
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = (await client.post("/generate", json={**req, "stop": [stop]})).json()
    assert cut["generated_text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


@pytest.mark.parametrize(("payload", "param"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "max_length": 0}, "max_length"),
    ({"prompt": "hi", "max_new_tokens": -3}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 10**9}, "max_new_tokens"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "do_sample": "maybe"}, "do_sample"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
])
async def test_invalid_fields_are_400(client: httpx.AsyncClient, payload: dict, param: str) -> None:
    """As OpenAI answers them: 400, invalid_request_error, the field in `param` (not FastAPI's 422)."""
    r = await client.post("/generate", json=payload)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"].startswith(param)


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = _error(r)
    assert err["code"] == "invalid_json" and "JSON" in err["message"]


BAD_TEXT = [  # (route, raw JSON body, param named): lone surrogates as JSON escapes and as raw bytes
    ("/generate", b'{"prompt": "hi \\ud800 there"}', "prompt"),
    ("/generate", b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop"),
    ("/v1/completions", b'{"model": "M", "prompt": ["\\ud83d"]}', "prompt"),
    ("/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": "a \xed\xa0\x80 b"}]}',
     "messages.0.content"),
    ("/v1/chat/completions",
     b'{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content"),
]


@pytest.mark.parametrize(("route", "body", "param"), BAD_TEXT)
async def test_lone_surrogates_are_400_naming_the_field(client: httpx.AsyncClient, tiny_model_dir: Path,
                                                        route: str, body: bytes, param: str) -> None:
    """Text that is not valid Unicode gets a 400 that says so and names the field, never a 500."""
    body = body.replace(b'"M"', f'"{tiny_model_dir}"'.encode())
    r = await client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] == param and "surrogate" in err["message"], err


async def test_invalid_utf8_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", content=b'{"prompt": "\xff\xfe bad"}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert _error(r)["type"] == "invalid_request_error"


async def test_context_overflow_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "안녕", "max_new_tokens": TINY.n_positions})
    assert r.status_code == 400
    err = _error(r)
    assert err["code"] == "context_length_exceeded" and str(TINY.n_positions) in err["message"]
    r = await client.post("/generate", json={"prompt": "안녕하세요 반갑습니다", "max_length": 2})
    assert r.status_code == 400 and _error(r)["param"] == "max_length"


async def test_generation_failure_is_500_json(tiny_loaded: LoadedModel, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(tiny_loaded, tiny_model_dir)

    def explode(*_a: object, **_k: object) -> None:
        raise RuntimeError("onnxruntime exploded")

    monkeypatch.setattr(tiny_loaded.runtime, "prefill_chunk", explode)
    async with make_client(svc) as c:
        svc.wait_loaded(10)
        r = await c.post("/generate", json={"prompt": "hi"})
    assert r.status_code == 500
    err = _error(r)
    assert err["type"] == "server_error"


async def test_health_answers_while_generating(tiny_loaded: LoadedModel, tiny_model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiny_loaded.runtime.decode

    def slow(*args: object, **kw: object) -> tuple:
        time.sleep(0.05)
        return real(*args, **kw)

    monkeypatch.setattr(tiny_loaded.runtime, "decode", slow)
    svc = make_service(tiny_loaded, tiny_model_dir)
    async with make_client(svc) as c:
        svc.wait_loaded(10)
        gen = asyncio.create_task(c.post("/generate", json={"prompt": "hi", "max_new_tokens": 20, "do_sample": False}))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        health = await c.get("/health")
        latency = time.perf_counter() - t0
        assert not gen.done()  # generation (>= 1 s) is still running
        assert health.status_code == 200
        assert latency < 0.5
        assert (await gen).status_code == 200


async def test_prompts_are_not_logged_by_default(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    secret = "비밀번호는 1234"
    with caplog.at_level(logging.DEBUG):
        r = await client.post("/generate", json={"prompt": secret, "max_new_tokens": 3})
    assert r.status_code == 200
    assert secret not in caplog.text


def test_api_layer_does_not_touch_tensors() -> None:  # guard: the API layer never imports numpy or onnxruntime
    import kolite.api.app as app_mod
    import kolite.api.routes_simple as routes

    for mod in (app_mod, routes):
        assert "numpy" not in vars(mod) and "onnxruntime" not in vars(mod)
    assert np  # numpy is used by the tests, not the API


async def test_ignore_eos_is_passed_to_the_engine(client: httpx.AsyncClient, ready_service: ModelService,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`ignore_eos` (as llama.cpp's server has it) reaches the sampling parameters; off by default."""
    seen = []
    real = ready_service.submit
    monkeypatch.setattr(ready_service, "submit",
                        lambda model, ids, params, **kw: (seen.append(params), real(model, ids, params, **kw))[1])
    for body in ({"prompt": "안녕", "max_new_tokens": 3}, {"prompt": "안녕", "max_new_tokens": 3, "ignore_eos": True}):
        r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text
    assert [p.ignore_eos for p in seen] == [False, True]


def _pooled_service(loaded: LoadedModel, model_dir: Path, **options: int) -> ModelService:
    return make_service(loaded, model_dir, SchedulerOptions(**options))


async def test_request_larger_than_the_kv_pool_is_400(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    """More tokens than the whole KV pool: a 400 naming the pool, with the context error's code (it could
    never be served, so it is not queued); within the pool it is served, and answers that fill "the rest
    of the window" (chat without max_tokens) fit the pool instead of being refused."""
    svc = _pooled_service(tiny_loaded, tiny_model_dir, max_batch=2, max_kv_tokens=48)
    async with make_client(svc) as c:
        svc.wait_loaded(10)
        ids = tiny_loaded.tokenizer.encode("안녕")
        r = await c.post("/generate", json={"prompt": "안녕", "max_new_tokens": 49 - len(ids)})
        assert r.status_code == 400
        err = _error(r)
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_new_tokens"
        assert "KV cache pool of 48 tokens" in err["message"] and err["type"] == "invalid_request_error"
        r = await c.post("/v1/completions", json={"model": str(tiny_model_dir), "prompt": "안녕", "max_tokens": 60})
        assert r.status_code == 400 and "KV cache pool" in _error(r)["message"]
        r = await c.post("/generate", json={"prompt": "안녕", "max_new_tokens": 48 - len(ids), "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 48
        r = await c.post("/v1/chat/completions", json={"model": str(tiny_model_dir), "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": "안녕"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == 48  # the rest of the pool's window, not of the model's 128
        # the engine thread hands the answer over, then gives the reservation back in the same step
        deadline = time.monotonic() + 5
        while svc.scheduler is not None and svc.scheduler.kv_reserved and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert svc.scheduler is not None and svc.scheduler.kv_reserved == 0


async def test_full_kv_pool_waits_and_a_full_queue_is_429(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    """With the pool full a request waits (rows are free) and is served when the running one ends; one
    more than the queue holds gets 429 with Retry-After, as any full queue."""
    body = {"prompt": "안녕", "max_new_tokens": 30, "ignore_eos": True, "do_sample": False}
    pool = len(tiny_loaded.tokenizer.encode("안녕")) + 30  # one such request at a time
    svc = _pooled_service(tiny_loaded, tiny_model_dir, max_batch=4, max_queue=1, max_kv_tokens=pool)
    with slowed(tiny_loaded.runtime, 0.01):
        async with make_client(svc) as c:
            svc.wait_loaded(10)
            sched = svc.scheduler
            assert sched is not None
            first = asyncio.create_task(c.post("/generate", json=body))
            await wait_until_async(lambda: sched.active == 1, what="the first request to run")
            second = asyncio.create_task(c.post("/generate", json=body))
            await wait_until_async(lambda: sched.waiting == 1, what="the second request to wait")
            assert sched.active == 1
            r = await c.post("/generate", json={**body, "max_new_tokens": 1})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert _error(r)["type"] == "rate_limit_error"
            done = await asyncio.gather(first, second)
    assert [d.status_code for d in done] == [200, 200]
    assert [d.json()["usage"]["completion_tokens"] for d in done] == [30, 30]


async def test_chat_content_parts_follow_the_chat_rule(client: httpx.AsyncClient, tiny_model_dir: Path) -> None:
    """Over HTTP, text parts are joined as `kolite.chat.validate_messages` joins them (with a newline),
    and a part the model cannot read is a 400 naming `messages`."""
    async def answer(content: object) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={
            "model": str(tiny_model_dir), "temperature": 0, "max_tokens": 6,
            "messages": [{"role": "user", "content": content}]})

    parts = await answer([{"type": "text", "text": "안녕"}, {"type": "text", "text": "하세요"}])
    joined = await answer("안녕\n하세요")
    assert parts.status_code == joined.status_code == 200
    assert parts.json()["usage"] == joined.json()["usage"]
    assert parts.json()["choices"][0]["message"] == joined.json()["choices"][0]["message"]
    image = await answer([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    assert image.status_code == 400 and _error(image)["param"] == "messages"
    assert "only text parts" in _error(image)["message"]


async def test_log_prompts_logs_every_generation_route(ready_service: ModelService, tiny_model_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`--log-prompts` writes the prompt and the output of /generate, /v1/completions and
    /v1/chat/completions, streamed or not."""
    model = str(tiny_model_dir)
    calls = [("/generate", {"prompt": "첫째 질문", "max_new_tokens": 3}),
             ("/generate", {"prompt": "둘째 질문", "max_new_tokens": 3, "stream": True}),
             ("/v1/completions", {"model": model, "prompt": "셋째 질문", "max_tokens": 3}),
             ("/v1/completions", {"model": model, "prompt": "넷째 질문", "max_tokens": 3, "stream": True}),
             ("/v1/chat/completions", {"model": model, "max_tokens": 3,
                                       "messages": [{"role": "user", "content": "다섯째 질문"}]})]
    async with make_client(ready_service, log_prompts=True) as c:
        with caplog.at_level(logging.INFO, logger="kolite"):
            for path, body in calls:
                r = await c.post(path, json=body)
                assert r.status_code == 200, r.text
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt=")]
    for word in ("첫째", "둘째", "셋째", "넷째", "다섯째"):
        assert any(word in line and "output=" in line for line in logged), word


async def test_an_error_mid_stream_is_the_json_error_body(tiny_loaded: LoadedModel, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One error builder: a request that times out after its stream started ends with an error event
    that is exactly the body a JSON response would carry (type, message, code), then `[DONE]`."""
    import json

    from kolite.api.errors import error_of
    from kolite.errors import RequestTimeout

    real = tiny_loaded.runtime.decode

    def slow(*args: object, **kw: object) -> object:
        time.sleep(0.05)
        return real(*args, **kw)

    monkeypatch.setattr(tiny_loaded.runtime, "decode", slow)
    svc = make_service(tiny_loaded, tiny_model_dir, SchedulerOptions(timeout=0.3))
    async with make_client(svc) as c:
        svc.wait_loaded(10)
        r = await c.post("/v1/completions", json={"model": str(tiny_model_dir), "prompt": "안녕", "max_tokens": 60,
                                                  "ignore_eos": True, "stream": True})
    assert r.status_code == 200
    data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    event = json.loads(data[-2])
    status, body = error_of(RequestTimeout("the request ran past its time limit of 0.3s"))
    assert status == 504 and event == body.model_dump()
