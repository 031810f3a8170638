"""OpenAI-compatible request and response schemas (`/v1/models`, `/v1/completions`, `/v1/chat/completions`).

Only the schemas live here (as in vLLM's `protocol.py`); turning them into engine calls is
`openai_serving.py`, and the HTTP routes are `routes_openai.py`. Fields kolite cannot honour are
refused with a clear 400 rather than silently ignored; unknown extra fields are ignored, as
OpenAI-compatible servers usually do, so newer SDKs keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from kolite.api.protocol import TextFields, Usage, check_stops, stop_tuple
from kolite.engine.sampling import SamplingParams
from kolite.errors import InvalidRequest


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(TextFields):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's JSON has it) -> -100..100
    user: str | None = None
    # kolite extras (as in vLLM and llama.cpp's server)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 turns top-k off.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    ignore_eos: bool = Field(False, description="Keep generating past end-of-text (for benchmarks).")

    _stops = field_validator("stop")(lambda v: check_stops(v))

    def to_sampling_params(self, max_new_tokens: int, vocab_size: int, stop_token_ids: frozenset[int] = frozenset(),
                           extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        """The engine's parameters for this request (a chat template adds its stop ids and strings);
        `vocab_size` bounds the token ids `logit_bias` may name."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, do_sample=self.temperature > 0,
            top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=tuple(dict.fromkeys(stop_tuple(self.stop) + extra_stops)), stop_token_ids=stop_token_ids,
            ignore_eos=self.ignore_eos, logit_bias=self.logit_bias_items(vocab_size),
        )

    def logit_bias_items(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (id, bias) pairs; keys that are not ids of the vocabulary, or biases outside
        -100..100, are a 400 naming the field."""
        items = []
        for key, bias in (self.logit_bias or {}).items():
            if not str(key).isdigit() or int(key) >= vocab_size:
                raise InvalidRequest(f"logit_bias keys must be token ids below {vocab_size}, not {key!r}",
                                     param="logit_bias")
            if not -100.0 <= float(bias) <= 100.0:
                raise InvalidRequest(f"logit_bias values must be between -100 and 100, not {bias}", param="logit_bias")
            items.append((int(key), float(bias)))
        return tuple(items)

    def check_supported(self) -> None:
        """Refuse what kolite does not do, naming the field (HTTP 400)."""
        if self.n != 1:
            raise InvalidRequest("n > 1 is not supported: send one request per completion", param="n")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1, le=32768)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise InvalidRequest("suffix (insertion) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of > 1 is not supported", param="best_of")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise InvalidRequest("one prompt per request: send a list of several prompts as several requests",
                                 param="prompt")


class ChatMessageIn(TextFields):
    """A message as sent; its role and content are checked and its text parts joined by
    `kolite.chat.validate_messages`, the one rule for every way a conversation comes in."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None
    name: str | None = None



class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    tools: list[dict] | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise InvalidRequest("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequest("only response_format type 'text' is supported", param="response_format")

    @property
    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # OpenAI's field: always null here (a GPT-2 does not refuse)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict:
        """OpenAI sends only the fields a delta carries ({} in the last chunk)."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kolite"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
