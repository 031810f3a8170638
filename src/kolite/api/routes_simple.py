"""The original simple API: `GET /`, `GET /health` and `POST /generate`. Routes stay thin."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from kolite.api.protocol import (
    DEFAULT_NEW_TOKENS,
    GenerateRequest,
    GenerateResponse,
    StatusResponse,
    finish_reason_of,
    usage_of,
)
from kolite.api.streaming import sse_response, until_disconnect
from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import Finish
from kolite.errors import ContextTooLong
from kolite.service import ModelService, State

log = logging.getLogger(__name__)
router = APIRouter()


def _service(request: Request) -> ModelService:
    return request.app.state.service


@router.get("/", response_model=StatusResponse, response_model_exclude_none=True)
async def status(request: Request) -> StatusResponse:
    svc = _service(request)
    return StatusResponse(service_status=svc.state.value, model=svc.model_name, error=svc.error)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    svc = _service(request)
    body = {"status": "ok" if svc.state is State.READY else svc.state.value.lower(), "model": svc.model_name}
    return JSONResponse(body, status_code=200 if svc.state is State.READY else 503)


def new_token_budget(req: GenerateRequest, prompt_tokens: int) -> int:
    """max_new_tokens if given, else max_length minus the prompt, else the default."""
    if req.max_new_tokens is not None:
        return req.max_new_tokens
    if req.max_length is not None:
        budget = req.max_length - prompt_tokens
        if budget < 1:
            raise ContextTooLong(
                f"max_length ({req.max_length}) counts the prompt too, and the prompt already has "
                f"{prompt_tokens} tokens; raise max_length or use max_new_tokens", param="max_length")
        return budget
    return DEFAULT_NEW_TOKENS


def _response(req: GenerateRequest, finish: Finish) -> GenerateResponse:
    return GenerateResponse(input_prompt=req.prompt, generated_text=finish.text,
                            finish_reason=finish_reason_of(finish), usage=usage_of(finish))


@router.post("/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest, request: Request) -> GenerateResponse | EventSourceResponse:
    svc = _service(request)
    prompt_ids = svc.encode(req.prompt)
    params = SamplingParams(
        max_new_tokens=new_token_budget(req, len(prompt_ids)), temperature=req.temperature,
        do_sample=req.do_sample, top_k=req.top_k, top_p=req.top_p,
        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
    )
    stream = svc.submit(prompt_ids, params)
    log_prompts = request.app.state.log_prompts

    if req.stream:
        async def payloads() -> AsyncIterator[str]:
            async for event in stream:
                if isinstance(event, Finish):
                    if log_prompts:
                        log.info("prompt=%r output=%r", req.prompt, event.text)
                    yield _response(req, event).model_dump_json()
                elif event.text:
                    yield json.dumps({"text": event.text}, ensure_ascii=False)

        return sse_response(payloads(), stream)
    finish = await until_disconnect(request, stream, stream.result())
    if log_prompts:
        log.info("prompt=%r output=%r", req.prompt, finish.text)
    return _response(req, finish)
