"""Who may call the API: API keys, CORS, the Host header, and names that never show server paths."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from kolite.api.app import create_app
from kolite.cli import main
from kolite.config import ServerSettings
from kolite.service import LoadedModel
from tests.conftest import make_service

pytestmark = pytest.mark.anyio


def _client(svc: object, base: str = "http://localhost", **server: object) -> httpx.AsyncClient:
    app = create_app(server_settings=ServerSettings(**server), service=svc)  # type: ignore[arg-type]
    svc.start_loading()  # type: ignore[attr-defined]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base, timeout=30)


@pytest.fixture()
def svc(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> object:
    return make_service(tiny_loaded, tiny_model_dir)


async def test_api_keys_none_wrong_and_right(svc: object, tiny_model_dir: Path, tmp_path: Path) -> None:
    """With keys set, every API route needs `Authorization: Bearer KEY` (401 in OpenAI's shape without
    or with a wrong one); / and /health stay open; keys come from flags and from a file."""
    key_file = tmp_path / "keys"
    key_file.write_text("# one per line\nfile-key\n", encoding="utf-8")
    body = {"model": tiny_model_dir.name, "prompt": "안녕", "max_tokens": 2}
    async with _client(svc, api_key=["flag-key-1,flag-key-2"], api_key_file=key_file) as c:
        svc.wait_loaded(10)  # type: ignore[attr-defined]
        assert (await c.get("/")).status_code == 200 and (await c.get("/health")).status_code == 200
        for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                                ({"Authorization": "Basic flag-key-1"}, 401),
                                ({"Authorization": "Bearer flag-key-1"}, 200),
                                ({"Authorization": "Bearer flag-key-2"}, 200),
                                ({"Authorization": "Bearer file-key"}, 200)):
            r = await c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == status, (headers, r.text)
            if status == 401:
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.post("/generate", json={"prompt": "안녕"})).status_code == 401


async def test_no_key_configured_means_open(svc: object, tiny_model_dir: Path) -> None:
    async with _client(svc) as c:
        svc.wait_loaded(10)  # type: ignore[attr-defined]
        assert (await c.get("/v1/models")).status_code == 200


async def test_cors_preflight_and_headers_for_allowed_origins_only(svc: object) -> None:
    async with _client(svc, cors_origins=["http://localhost:3000"], api_key=["k"]) as c:
        svc.wait_loaded(10)  # type: ignore[attr-defined]
        pre = await c.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200  # answered without a key: browsers send preflights without one
        assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = await c.get("/v1/models", headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = await c.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers
    async with _client(svc) as c:  # off by default: no CORS headers, preflights not answered as CORS
        r = await c.options("/v1/models", headers={"Origin": "http://localhost:3000",
                                                   "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers


async def test_host_header_is_checked_against_dns_rebinding(svc: object) -> None:
    """Bound to loopback (the default), only localhost names are accepted as Host; an allow-list opens others."""
    async with _client(svc, base="http://rebound.evil.example") as c:
        assert (await c.get("/health")).status_code == 400
    for base in ("http://localhost:8000", "http://127.0.0.1:8000"):
        async with _client(svc, base=base) as c:
            assert (await c.get("/health")).status_code in (200, 503)
    async with _client(svc, base="http://kolite.lan", allowed_hosts=["*.lan"]) as c:
        assert (await c.get("/health")).status_code in (200, 503)
    async with _client(svc, base="http://anything.example", host="0.0.0.0") as c:  # all interfaces: any name
        assert (await c.get("/health")).status_code in (200, 503)


async def test_a_local_folder_is_served_under_its_name(svc: object, tiny_model_dir: Path) -> None:
    """No absolute path in /, /v1/models or a 404; the folder's path is still accepted as the model."""
    async with _client(svc) as c:
        svc.wait_loaded(10)  # type: ignore[attr-defined]
        texts = [(await c.get("/")).text, (await c.get("/v1/models")).text,
                 (await c.post("/v1/completions", json={"model": "other", "prompt": "x"})).text]
        assert all(str(tiny_model_dir) not in t and tiny_model_dir.name in t for t in texts), texts
        for name in (tiny_model_dir.name, str(tiny_model_dir)):
            r = await c.post("/v1/completions", json={"model": name, "prompt": "안녕", "max_tokens": 2})
            assert r.status_code == 200, r.text


def test_serving_all_interfaces_without_a_key_warns(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    ran = []
    monkeypatch.setattr("kolite.api.server.run", lambda app, **kw: ran.append(kw) or 0)
    with caplog.at_level(logging.WARNING, logger="kolite"):
        assert main(["serve", "--host", "0.0.0.0", "--model", "distilgpt2"]) == 0
    assert ran and "without an API key" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kolite"):
        assert main(["serve", "--host", "0.0.0.0", "--model", "distilgpt2", "--api-key", "k1", "--api-key", "k2"]) == 0
    assert "without an API key" not in caplog.text


def test_api_key_flags_add_up_and_the_env_var_is_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from kolite.cli import build_parser, settings_from

    ns = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b,c"])
    assert settings_from(ns, ServerSettings).api_keys() == ["a", "b", "c"]  # type: ignore[attr-defined]
    monkeypatch.setenv("KOLITE_API_KEY", "x, y")
    assert ServerSettings().api_keys() == ["x", "y"]
