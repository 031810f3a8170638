"""OpenAI completions and chat completions: requests → prompt ids and sampling → responses or chunks.

This is the serving logic between the schemas (`openai_protocol.py`) and the routes: it knows the
OpenAI shapes and kolite's service, never HTTP details beyond producing SSE payloads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
    SamplingFields,
    new_id,
    now,
)
from kolite.api.protocol import Usage, finish_reason_of, usage_of
from kolite.chat.prompt import build_chat_prompt
from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import TokenEvent
from kolite.errors import InvalidRequest, KoliteError, ModelNotFound
from kolite.service import EventStream, ModelService

CHAT_ANSWER_RESERVE = 256  # tokens kept free for the answer when a chat request gives no max_tokens


def error_payload(exc: Exception) -> str:
    """An error in the middle of a stream, in OpenAI's error shape (the status line is already sent)."""
    from kolite.api.errors import status_of  # local: errors imports protocol, not serving

    if isinstance(exc, KoliteError):
        status, type_ = status_of(exc)
        message = str(exc)
    else:
        status, type_, message = 500, "server_error", "internal server error"
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": str(status)}},
                      ensure_ascii=False)


@dataclass
class Prepared:
    """A validated request ready to submit."""

    prompt_ids: list[int]
    params: SamplingParams
    echo_text: str = ""


class OpenAIServing:
    """Builds engine requests from OpenAI requests and OpenAI answers from engine events."""

    def __init__(self, service: ModelService, served_name: str | None = None) -> None:
        self.service = service
        self.model_id = served_name or service.model_name
        self._created = now()

    # models -------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self._created)])

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {self.model_id!r}",
                                param="model")

    # requests -> engine ---------------------------------------------------------------------
    def _params(self, req: SamplingFields, max_new_tokens: int, stop_ids: frozenset[int] = frozenset(),
                extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=req.temperature, do_sample=req.temperature > 0,
            top_k=req.top_k, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            stop=tuple(dict.fromkeys(req.stop_list() + extra_stops)), stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos,
        )

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self.check_model(req.model)
        req.check_supported()
        model = self.service.ready_model()
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= model.prepared.config.vocab_size for t in ids):
                raise InvalidRequest("prompt token ids out of the vocabulary", param="prompt")
            text = model.tokenizer.decode(ids)
        else:
            text = (prompt[0] if prompt else "") if isinstance(prompt, list) else prompt
            if not isinstance(text, str) or not text:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            ids = model.tokenizer.encode(text)
        max_new = req.max_tokens if req.max_tokens is not None else model.n_positions - len(ids)
        return Prepared(ids, self._params(req, max_new), echo_text=text if req.echo else "")

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        req.check_supported()
        model = self.service.ready_model()
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        limit = req.new_token_limit
        reserve = limit if limit is not None else min(CHAT_ANSWER_RESERVE, model.n_positions // 4)
        prompt = build_chat_prompt(messages, model.chat_template, model.tokenizer, model.n_positions - reserve)
        max_new = limit if limit is not None else model.n_positions - len(prompt.ids)
        return Prepared(prompt.ids, self._params(req, max_new, prompt.stop_ids, prompt.stop_strings))

    # engine -> answers -------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, stream: EventStream, prepared: Prepared) -> CompletionResponse:
        finish = await stream.result()
        choice = CompletionChoice(text=prepared.echo_text + finish.text, finish_reason=finish_reason_of(finish))
        return CompletionResponse(id=new_id("cmpl"), created=now(), model=req.model, usage=usage_of(finish),
                                  choices=[choice])

    async def chat(self, req: ChatCompletionRequest, stream: EventStream) -> ChatCompletionResponse:
        finish = await stream.result()
        choice = ChatChoice(message=ChatMessageOut(content=finish.text), finish_reason=finish_reason_of(finish))
        return ChatCompletionResponse(id=new_id("chatcmpl"), created=now(), model=req.model, usage=usage_of(finish),
                                      choices=[choice])

    async def completion_chunks(self, req: CompletionRequest, stream: EventStream,
                                prepared: Prepared) -> AsyncIterator[str]:
        """SSE payloads: text pieces, the finish reason, optional usage; `[DONE]` is added by the route."""
        cid, created = new_id("cmpl"), now()

        def chunk(text: str, reason: str | None, usage: Usage | None = None, choices: bool = True) -> str:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [choice] if choices else []}
            if usage is not None:
                body["usage"] = usage.model_dump()
            return json.dumps(body, ensure_ascii=False)

        if prepared.echo_text:
            yield chunk(prepared.echo_text, None)
        async for event in stream:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield chunk(event.text, None)
            else:
                yield chunk("", finish_reason_of(event))
                if req.include_usage:
                    yield chunk("", None, usage_of(event), choices=False)

    async def chat_chunks(self, req: ChatCompletionRequest, stream: EventStream) -> AsyncIterator[str]:
        cid, created = new_id("chatcmpl"), now()

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=cid, created=created, model=req.model, choices=choices,
                                       usage=usage).model_dump_json(exclude_none=False)

        yield chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
        async for event in stream:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield chunk([ChatChunkChoice(delta=ChatDelta(content=event.text))])
            else:
                yield chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason_of(event))])
                if req.include_usage:
                    yield chunk([], usage_of(event))
