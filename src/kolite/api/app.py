"""`create_app()`: the FastAPI application, with the model loading in the background."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from kolite import __version__
from kolite.api import routes_openai, routes_simple
from kolite.api.access import ApiKeyAuth
from kolite.api.errors import install_error_handlers
from kolite.api.limits import BodySizeLimit
from kolite.api.metrics import HttpMetrics, Metrics
from kolite.api.openai_serving import OpenAIServing
from kolite.api.request_id import RequestId
from kolite.api.simple_serving import SimpleServing
from kolite.config import ModelSettings, ServerSettings
from kolite.engine.scheduler import SchedulerOptions
from kolite.service import ModelService


def create_app(
    model_settings: ModelSettings | None = None,
    server_settings: ServerSettings | None = None,
    service: ModelService | None = None,
) -> FastAPI:
    """Build the app; the lifespan starts loading the model (unless `service` already did)."""
    server_settings = server_settings or ServerSettings()
    svc = service or ModelService(model_settings or ModelSettings(), scheduler_options=SchedulerOptions(
        max_batch=server_settings.max_batch, max_queue=server_settings.max_queue,
        timeout=server_settings.request_timeout))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.start_loading()
        try:
            yield
        finally:
            await asyncio.to_thread(svc.shutdown)  # joins the engine thread: not on the event loop

    # No /docs or /redoc: their pages load scripts from a CDN, which a Pi on a home network may not reach
    # (or should not); the schema stays at /openapi.json for tools.
    app = FastAPI(title="kolite", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Korean-first GPT-2 text generation (KoGPT2) on an int8 ONNX Runtime engine.")
    app.state.service = svc
    app.state.metrics = metrics = Metrics(svc)
    app.state.simple = SimpleServing(svc, log_prompts=server_settings.log_prompts, metrics=metrics)
    app.state.openai = OpenAIServing(svc, server_settings.served_model_name, log_prompts=server_settings.log_prompts,
                                     metrics=metrics)
    install_error_handlers(app)
    # Added innermost first: a request gets its id, meets the Host check, CORS, the key, then the body limit.
    app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(BodySizeLimit, limit=server_settings.max_body_bytes)
    keys = server_settings.api_keys()
    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys)
    if server_settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server_settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["x-request-id"], max_age=600)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=server_settings.trusted_hosts())
    app.add_middleware(RequestId)  # outermost: every answer, refusals included, carries x-request-id
    app.include_router(routes_simple.router)
    app.include_router(routes_openai.router)
    return app
