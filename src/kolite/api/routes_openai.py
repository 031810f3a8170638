"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`. Thin by design."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kolite.api.openai_protocol import ChatCompletionRequest, CompletionRequest, ModelList
from kolite.api.openai_serving import OpenAIServing
from kolite.api.streaming import sse_response, until_disconnect

router = APIRouter(prefix="/v1")


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.openai


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _serving(request).models()


@router.post("/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> Response | object:
    serving = _serving(request)
    prepared = serving.prepare_completion(req)
    stream = serving.service.submit(prepared.prompt_ids, prepared.params)
    if req.stream:
        return sse_response(serving.completion_chunks(req, stream, prepared), stream)
    return await until_disconnect(request, stream, serving.completion(req, stream, prepared))


@router.post("/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | object:
    serving = _serving(request)
    prepared = serving.prepare_chat(req)
    stream = serving.service.submit(prepared.prompt_ids, prepared.params)
    if req.stream:
        return sse_response(serving.chat_chunks(req, stream), stream)
    return await until_disconnect(request, stream, serving.chat(req, stream))
