"""The original simple API's serving: `GET /`, `GET /health` and `POST /generate` beyond their schemas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from kolite.api.protocol import DEFAULT_NEW_TOKENS, GenerateRequest, GenerateResponse, StatusResponse
from kolite.api.serving import Generation, Serving, finish_reason_of, usage_of
from kolite.engine.sequence import Finish
from kolite.errors import ContextTooLong
from kolite.service import State


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


class SimpleServing(Serving):
    def status(self) -> StatusResponse:
        svc = self.service
        return StatusResponse(service_status=svc.state.value, model=svc.model_name, error=svc.error)

    def health(self) -> tuple[dict[str, str], int]:
        svc = self.service
        ready = svc.state is State.READY and not svc.draining
        status = "ok" if ready else "draining" if svc.draining else svc.state.value.lower()
        return {"status": status, "model": svc.model_name}, 200 if ready else 503

    async def generate(self, req: GenerateRequest) -> Generation:
        model = self.service.ready_model()
        prompt_ids = await asyncio.to_thread(model.tokenizer.encode, req.prompt)  # a long prompt: not on the loop
        params = req.to_sampling_params(new_token_budget(req, len(prompt_ids)))
        stream = self.submit(model, req.prompt, prompt_ids, params)

        def answer(finish: Finish) -> GenerateResponse:
            return GenerateResponse(input_prompt=req.prompt, generated_text=finish.text,
                                    finish_reason=finish_reason_of(finish), usage=usage_of(finish))

        async def response() -> GenerateResponse:
            return answer(await stream.result())

        async def chunks() -> AsyncIterator[str]:
            """`{"text": piece}` events, then the whole answer object."""
            async for event in stream:
                if isinstance(event, Finish):
                    yield answer(event).model_dump_json()
                elif event.text:
                    yield json.dumps({"text": event.text}, ensure_ascii=False)

        return Generation(stream, response, chunks)
