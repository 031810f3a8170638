"""`GET /metrics`: Prometheus text format (prometheus-client), names prefixed `kolite_`.

What a vLLM, TGI or llama.cpp server user expects to scrape: requests running and waiting, the KV
cache pool's use, prompt and generated token counters, requests by how they ended, time to first
token, inter-token latency, end-to-end latency and time in the queue, HTTP requests by route and
status, the model's load time, and the process's memory and CPU (prometheus-client's process
collector). Each app has its own registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kolite.engine.sequence import Finish
from kolite.service import EventStream, ModelService

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metrics, fed by the serving layer (`observe`) and by `HttpMetrics`."""

    def __init__(self, service: ModelService) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        sched = lambda: service.scheduler  # noqa: E731  (created when the model has loaded)
        Gauge("kolite_requests_running", "Requests being prefilled or decoded.", registry=r).set_function(
            lambda: sched().running if sched() else 0)
        Gauge("kolite_requests_waiting", "Requests queued for a batch row or for KV pool room.",
              registry=r).set_function(lambda: sched().waiting if sched() else 0)
        Gauge("kolite_kv_cache_reserved_tokens", "KV cache tokens reserved by running requests.",
              registry=r).set_function(lambda: sched().kv_reserved if sched() else 0)
        Gauge("kolite_kv_cache_pool_tokens", "KV cache tokens all running requests may hold (--max-kv-tokens).",
              registry=r).set_function(lambda: sched().kv_pool if sched() else 0)
        Gauge("kolite_kv_cache_usage_ratio", "Share of the KV pool reserved (0 to 1).", registry=r).set_function(
            lambda: sched().kv_reserved / sched().kv_pool if sched() and sched().kv_pool else 0.0)
        Gauge("kolite_model_load_seconds", "Seconds the model took to load (and convert, if it had to).",
              registry=r).set_function(lambda: service.model.load_seconds if service.model else 0.0)
        Gauge("kolite_model_ready", "1 when the model serves requests.", registry=r).set_function(
            lambda: 1.0 if service.model is not None and not service.draining else 0.0)
        self.prompt_tokens = Counter("kolite_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("kolite_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("kolite_requests", "Finished requests by how they ended.", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("kolite_time_to_first_token_seconds", "From submission to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kolite_inter_token_latency_seconds", "Mean time between tokens of a request.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("kolite_e2e_request_latency_seconds", "From submission to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("kolite_request_queue_time_seconds", "From submission to the start of its prefill.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.http = Counter("kolite_http_requests", "HTTP requests by route and status.", ["route", "status"],
                            registry=r)
        self.rejected = Counter("kolite_rejected_requests", "Requests refused before generating, by status.",
                                ["status"], registry=r)

    def observe(self, stream: EventStream, finish: Finish) -> None:
        """A request's figures, when it finished."""
        now = time.monotonic()
        self.prompt_tokens.inc(finish.prompt_tokens)
        self.generation_tokens.inc(finish.completion_tokens)
        self.requests.labels(finish_reason=finish.reason).inc()
        self.e2e.observe(now - stream.submitted_at)
        if stream.started_at is not None:
            self.queue.observe(stream.started_at - stream.submitted_at)
        if stream.first_token_at is not None:
            self.ttft.observe(stream.first_token_at - stream.submitted_at)
            if finish.completion_tokens > 1:
                self.itl.observe((now - stream.first_token_at) / (finish.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetrics:
    """Counts every HTTP answer by route template (never the raw path: no unbounded label values) and
    status; 4xx/5xx answers of the generation routes count as rejected too."""

    GENERATION = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.http.labels(route=route, status=str(status)).inc()
            if route in self.GENERATION and status >= 400:
                self.metrics.rejected.labels(status=str(status)).inc()
