"""`GET /metrics`: Prometheus text with the figures of the requests served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kolite.api.app import create_app
from kolite.config import ServerSettings
from kolite.service import LoadedModel
from tests.conftest import make_service

pytestmark = pytest.mark.anyio


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_what_was_served(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    svc = make_service(tiny_loaded, tiny_model_dir)
    app = create_app(server_settings=ServerSettings(), service=svc)
    svc.start_loading()
    svc.wait_loaded(10)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
        for _ in range(2):
            r = await c.post("/generate", json={"prompt": "안녕", "max_new_tokens": 5, "ignore_eos": True})
            assert r.status_code == 200
        r = await c.post("/v1/completions", json={"model": tiny_model_dir.name, "prompt": "안녕", "max_tokens": 3,
                                                  "ignore_eos": True, "stream": True})
        assert r.status_code == 200
        assert (await c.post("/generate", json={"prompt": ""})).status_code == 400
        m = await c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    got = _samples(m.text)
    prompt = len(tiny_loaded.tokenizer.encode("안녕"))
    assert got[("kolite_generation_tokens_total", ())] == 13
    assert got[("kolite_prompt_tokens_total", ())] == 3 * prompt
    assert got[("kolite_requests_total", (("finish_reason", "length"),))] == 3
    assert got[("kolite_time_to_first_token_seconds_count", ())] == 3
    assert got[("kolite_e2e_request_latency_seconds_count", ())] == 3
    assert got[("kolite_request_queue_time_seconds_count", ())] == 3
    assert got[("kolite_inter_token_latency_seconds_count", ())] == 3
    assert got[("kolite_http_requests_total", (("route", "/generate"), ("status", "200")))] == 2
    assert got[("kolite_http_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 1
    assert got[("kolite_rejected_requests_total", (("status", "400"),))] == 1
    assert got[("kolite_requests_running", ())] == 0 and got[("kolite_requests_waiting", ())] == 0
    assert got[("kolite_kv_cache_pool_tokens", ())] > 0 and got[("kolite_model_ready", ())] == 1
    assert got[("process_resident_memory_bytes", ())] > 0
