"""OpenAI completions and chat completions: requests → prompt ids and sampling → responses or chunks.

This is the serving logic between the schemas (`openai_protocol.py`) and the routes: it knows the
OpenAI shapes and kolite's service, never HTTP details beyond producing SSE payloads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar

from kolite.api.metrics import Metrics
from kolite.api.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from kolite.api.protocol import Usage
from kolite.api.serving import Generation, Serving, finish_reason_of, usage_of
from kolite.chat.prompt import build_chat_prompt
from kolite.engine.sequence import TokenEvent
from kolite.errors import InvalidRequest, ModelNotFound
from kolite.service import LoadedModel, ModelService

CHAT_ANSWER_RESERVE = 256  # tokens kept free for the answer when a chat request gives no max_tokens


class OpenAIServing(Serving):
    """Builds engine requests from OpenAI requests and OpenAI answers from engine events."""

    param_names: ClassVar[Mapping[str, str]] = {"max_new_tokens": "max_tokens"}

    def __init__(self, service: ModelService, served_name: str | None = None, *, log_prompts: bool = False,
                 metrics: Metrics | None = None) -> None:
        super().__init__(service, log_prompts=log_prompts, metrics=metrics)
        self.model_id = served_name or service.model_name
        self._created = now()

    # models -------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self._created)])

    def model(self, name: str) -> ModelCard:
        """`GET /v1/models/{model}`: the served model's card (404 for any other name)."""
        self.check_model(name)
        return ModelCard(id=self.model_id, created=self._created)

    def check_model(self, name: str) -> None:
        """The served name, or the --model value it came from (a client that knows it learns nothing)."""
        if name not in (self.model_id, self.service.settings.model):
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {self.model_id!r}",
                                param="model")

    # completions --------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest) -> Generation:
        self.check_model(req.model)
        req.check_supported()
        model = self.service.ready_model()
        text, ids = await asyncio.to_thread(self._prompt, model, req.prompt)  # tokenizing: not on the event loop
        max_new = req.max_tokens if req.max_tokens is not None else model.n_positions - len(ids)
        stream = self.submit(model, text, ids, req.to_sampling_params(max_new, model.prepared.config.vocab_size))
        echo = text if req.echo else ""
        cid, created = new_id("cmpl"), now()

        async def response() -> CompletionResponse:
            finish = await stream.result()
            choice = CompletionChoice(text=echo + finish.text, finish_reason=finish_reason_of(finish))
            return CompletionResponse(id=cid, created=created, model=req.model, usage=usage_of(finish),
                                      choices=[choice])

        def chunk(text: str, reason: str | None, usage: Usage | None = None, choices: bool = True) -> str:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [choice] if choices else []}
            if usage is not None:
                body["usage"] = usage.model_dump()
            return json.dumps(body, ensure_ascii=False)

        async def chunks() -> AsyncIterator[str]:
            """Text pieces, the finish reason, optional usage; `[DONE]` is added by `streaming`."""
            if echo:
                yield chunk(echo, None)
            async for event in stream:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield chunk(event.text, None)
                else:
                    yield chunk("", finish_reason_of(event))
                    if req.include_usage:
                        yield chunk("", None, usage_of(event), choices=False)

        return Generation(stream, response, chunks)

    @staticmethod
    def _prompt(model: LoadedModel, prompt: str | list[str] | list[int]) -> tuple[str, list[int]]:
        """A completion's prompt as text and ids: token ids as given (checked), or the text tokenized."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            if any(t < 0 or t >= model.prepared.config.vocab_size for t in ids):
                raise InvalidRequest("prompt token ids out of the vocabulary", param="prompt")
            return model.tokenizer.decode(ids), ids
        text = (prompt[0] if prompt else "") if isinstance(prompt, list) else prompt
        if not isinstance(text, str) or not text:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return text, model.tokenizer.encode(text)

    # chat completions ---------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Generation:
        self.check_model(req.model)
        req.check_supported()
        model = self.service.ready_model()
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        limit = req.new_token_limit
        reserve = limit if limit is not None else min(CHAT_ANSWER_RESERVE, model.n_positions // 4)
        prompt = await asyncio.to_thread(build_chat_prompt, messages, model.chat_template, model.tokenizer,
                                         model.n_positions - reserve)  # templating and tokenizing: off the loop
        max_new = limit if limit is not None else model.n_positions - len(prompt.ids)
        params = req.to_sampling_params(max_new, model.prepared.config.vocab_size, prompt.stop_ids,
                                        prompt.stop_strings)
        stream = self.submit(model, model.tokenizer.decode(prompt.ids), prompt.ids, params)
        cid, created = new_id("chatcmpl"), now()

        async def response() -> ChatCompletionResponse:
            finish = await stream.result()
            choice = ChatChoice(message=ChatMessageOut(content=finish.text), finish_reason=finish_reason_of(finish))
            return ChatCompletionResponse(id=cid, created=created, model=req.model, usage=usage_of(finish),
                                          choices=[choice])

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=cid, created=created, model=req.model, choices=choices,
                                       usage=usage).model_dump_json(exclude_none=False)

        async def chunks() -> AsyncIterator[str]:
            yield chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
            async for event in stream:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield chunk([ChatChunkChoice(delta=ChatDelta(content=event.text))])
                else:
                    yield chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason_of(event))])
                    if req.include_usage:
                        yield chunk([], usage_of(event))

        return Generation(stream, response, chunks)
