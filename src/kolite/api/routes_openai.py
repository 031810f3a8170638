"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`. Thin by design:
parse, call one serving method (`openai_serving.OpenAIServing`), return JSON or a stream."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kolite.api.openai_protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from kolite.api.openai_serving import OpenAIServing
from kolite.api.streaming import respond

router = APIRouter(prefix="/v1")


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.openai


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _serving(request).models()


@router.get("/models/{model:path}", response_model=ModelCard)
async def model(model: str, request: Request) -> ModelCard:
    """One model's card; ids may hold slashes (`skt/kogpt2-base-v2`)."""
    return _serving(request).model(model)


@router.post("/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> object:
    return await respond(request, req.stream, await _serving(request).completion(req))


@router.post("/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> object:
    return await respond(request, req.stream, await _serving(request).chat(req))
