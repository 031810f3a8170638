"""The original simple API: `GET /`, `GET /health` and `POST /generate`. Routes stay thin: parse, call
one serving method (`simple_serving.SimpleServing`), return JSON or a stream."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kolite.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kolite.api.protocol import GenerateRequest, GenerateResponse, StatusResponse
from kolite.api.simple_serving import SimpleServing
from kolite.api.streaming import respond

router = APIRouter()


def _serving(request: Request) -> SimpleServing:
    return request.app.state.simple


@router.get("/", response_model=StatusResponse, response_model_exclude_none=True)
async def status(request: Request) -> StatusResponse:
    return _serving(request).status()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    body, code = _serving(request).health()
    return JSONResponse(body, status_code=code)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format (behind the API key when one is set)."""
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.post("/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest, request: Request) -> object:
    return await respond(request, req.stream, await _serving(request).generate(req))
