"""Pieces of OpenAI's contract clients rely on: one model's card, `refusal`, request ids."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kolite.api.app import create_app
from kolite.config import ServerSettings
from kolite.service import LoadedModel
from tests.conftest import make_service

pytestmark = pytest.mark.anyio


def _client(tiny_loaded: LoadedModel, tiny_model_dir: Path, **server: object) -> tuple[object, httpx.AsyncClient]:
    svc = make_service(tiny_loaded, tiny_model_dir)
    app = create_app(server_settings=ServerSettings(**server), service=svc)
    svc.start_loading()
    svc.wait_loaded(10)
    return svc, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=30)


async def test_one_models_card_with_a_slash_in_its_id(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    _, c = _client(tiny_loaded, tiny_model_dir, served_model_name="skt/kogpt2-base-v2")
    async with c:
        r = await c.get("/v1/models/skt/kogpt2-base-v2")
        assert r.status_code == 200 and r.json()["id"] == "skt/kogpt2-base-v2" and r.json()["object"] == "model"
        missing = await c.get("/v1/models/gpt-4")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_chat_messages_carry_a_null_refusal(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    _, c = _client(tiny_loaded, tiny_model_dir)
    async with c:
        r = await c.post("/v1/chat/completions", json={"model": tiny_model_dir.name, "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "안녕"}]})
        assert r.status_code == 200
        message = r.json()["choices"][0]["message"]
        assert "refusal" in message and message["refusal"] is None


async def test_every_answer_carries_a_request_id(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    """The client's X-Request-ID is echoed (a sane one), a new id is made otherwise, on answers of every
    kind: JSON, streamed, refused by the key check."""
    _, c = _client(tiny_loaded, tiny_model_dir, api_key=["k"])
    async with c:
        auth = {"Authorization": "Bearer k"}
        r = await c.get("/v1/models", headers={**auth, "X-Request-ID": "client-123"})
        assert r.headers["x-request-id"] == "client-123"
        made = (await c.get("/v1/models", headers=auth)).headers["x-request-id"]
        assert made.startswith("req-") and made != (await c.get("/v1/models", headers=auth)).headers["x-request-id"]
        odd = await c.get("/v1/models", headers={**auth, "X-Request-ID": "bad id\twith spaces"})
        assert odd.headers["x-request-id"].startswith("req-")
        assert (await c.get("/v1/models")).headers["x-request-id"].startswith("req-")  # a 401 too
        async with c.stream("POST", "/v1/completions", headers={**auth, "X-Request-ID": "stream-1"}, json={
                "model": tiny_model_dir.name, "prompt": "안녕", "max_tokens": 2, "stream": True}) as s:
            assert s.headers["x-request-id"] == "stream-1"
            assert [line async for line in s.aiter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"


async def test_streams_use_lf_line_endings_and_docs_need_no_cdn(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    _, c = _client(tiny_loaded, tiny_model_dir)
    async with c:
        r = await c.post("/v1/completions", json={"model": tiny_model_dir.name, "prompt": "안녕", "max_tokens": 3,
                                                  "stream": True})
        assert r.status_code == 200 and "\r" not in r.text and r.text.rstrip("\n").endswith("data: [DONE]")
        assert "\n\n" in r.text
        assert (await c.get("/docs")).status_code == 404  # no page that loads a CDN's scripts
        assert (await c.get("/openapi.json")).json()["info"]["title"] == "kolite"


async def test_logit_bias_is_applied_and_checked(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    """+100 makes a token the only choice, -100 bans the greedy one; keys that are not token ids of this
    vocabulary, or biases outside -100..100, are a 400 naming logit_bias (never silently ignored)."""
    _, c = _client(tiny_loaded, tiny_model_dir)
    body = {"model": tiny_model_dir.name, "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}
    async with c:
        plain = (await c.post("/v1/completions", json=body)).json()["usage"]
        assert plain["completion_tokens"] == 1
        greedy = tiny_loaded.runtime.prefill(0, [5, 6, 7])[-1].argmax()
        tiny_loaded.runtime.release(0)
        forced_id = (int(greedy) + 17) % tiny_loaded.prepared.config.vocab_size
        forced = await c.post("/v1/completions", json={**body, "logit_bias": {str(forced_id): 100}})
        banned = await c.post("/v1/completions", json={**body, "logit_bias": {str(int(greedy)): -100}})
        greedy_text = tiny_loaded.tokenizer.decode([int(greedy)])
        assert greedy_text and (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"] == greedy_text
        assert forced.status_code == banned.status_code == 200
        assert forced.json()["choices"][0]["text"] == tiny_loaded.tokenizer.decode([forced_id])
        assert banned.json()["choices"][0]["text"] != greedy_text
        for bias in ({"abc": 1}, {"5": 101}, {str(tiny_loaded.prepared.config.vocab_size + 3): 1}):
            r = await c.post("/v1/completions", json={**body, "logit_bias": bias})
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (bias, r.text)


async def test_context_errors_name_the_field_the_client_sent(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    _, c = _client(tiny_loaded, tiny_model_dir)
    async with c:
        r = await c.post("/v1/completions", json={"model": tiny_model_dir.name, "prompt": "안녕", "max_tokens": 5000})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded"
        assert err["param"] == "max_tokens" and "max_tokens" in err["message"]
        assert "max_new_tokens" not in err["message"]
        g = await c.post("/generate", json={"prompt": "안녕", "max_new_tokens": 5000})
        assert g.status_code == 400 and g.json()["error"]["param"] == "max_new_tokens"  # its own API's name
