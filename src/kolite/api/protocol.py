"""Request and response schemas of the original simple API (`/`, `/health`, `/generate`).

`max_length` keeps the meaning it had in the original app (transformers' `max_length`): prompt
tokens plus new tokens. `max_new_tokens` counts new tokens only and wins when both are given.
When neither is given, 64 new tokens are generated.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from kolite.engine.sampling import SamplingParams

DEFAULT_NEW_TOKENS = 64
LENGTH_LIMIT = 32768  # a sanity bound; the model's own context window is checked per request


MAX_STOPS = 16
_SURROGATE = re.compile("[\ud800-\udfff]")


def reject_surrogates(value: object) -> object:
    """Text must be valid Unicode: a lone surrogate (JSON "\\ud800", or the bytes ED A0 80 in a body)
    cannot be encoded as UTF-8, and the tokenizer would fail on it; refuse it with the field's name."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            raise ValueError(f"contains a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}; "
                             "text must be valid UTF-8")
    elif isinstance(value, list | tuple):
        for item in value:
            reject_surrogates(item)
    elif isinstance(value, dict):
        for item in value.values():
            reject_surrogates(item)
    return value


class TextFields(BaseModel):
    """Every string of a request, at any depth, is checked by `reject_surrogates` (a 400 naming it)."""

    _valid_text = field_validator("*")(lambda v: reject_surrogates(v))


def check_stops(value: str | list[str] | None) -> str | list[str] | None:
    """Stop strings, as OpenAI takes them (one string or a list), checked the same way everywhere."""
    items = [value] if isinstance(value, str) else (value or [])
    if len(items) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(not s for s in items):
        raise ValueError("stop strings must not be empty")
    return value


def stop_tuple(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class GenerateRequest(TextFields):
    prompt: str = Field(..., description="Text to continue (not written to the log).")
    max_length: int | None = Field(None, ge=1, le=LENGTH_LIMIT,
                                   description="Prompt tokens + new tokens, as in transformers.")
    max_new_tokens: int | None = Field(None, ge=1, le=LENGTH_LIMIT, description="New tokens; wins over max_length.")
    temperature: float = Field(0.7, ge=0.0, le=100.0, description="0 means greedy.")
    do_sample: bool = Field(True, description="False means greedy decoding.")
    top_k: int = Field(50, ge=0, le=1_000_000, description="0 turns top-k off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the output).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible.")
    stream: bool = Field(False, description="Server-Sent Events: {'text': piece} events, then the full answer.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-text (as llama.cpp's server).")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    _stops = field_validator("stop")(lambda v: check_stops(v))

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """The engine's parameters for this request (`max_new_tokens` from `max_length` or the default)."""
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, do_sample=self.do_sample,
                              top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, stop=stop_tuple(self.stop), ignore_eos=self.ignore_eos)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    input_prompt: str
    generated_text: str = Field(..., description="Only the new text: the prompt is not repeated.")
    finish_reason: Literal["stop", "length"]
    usage: Usage


class StatusResponse(BaseModel):
    service_status: Literal["LOADING", "READY", "ERROR"]
    model: str
    error: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, used for every error kolite returns."""

    error: ErrorDetail
