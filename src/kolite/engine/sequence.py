"""One request's generation state: ids, sampler, incremental text, stop rules and finish reason.

A `Sequence` knows nothing about batches or sessions, so the single-request loop and the batching
scheduler drive the same object and stop for the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from kolite.engine.sampling import Sampler, SamplingParams
from kolite.errors import ContextTooLong, InvalidRequest

# stop: eos, a stop id or a stop string; length: max_new_tokens; the rest end a request early
FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]


class TextDecoder(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class TokenizerLike(Protocol):
    stop_ids: frozenset[int] | set[int]

    def incremental_decoder(self, prompt_ids: list[int]) -> TextDecoder: ...


@dataclass(frozen=True)
class TokenEvent:
    """A new token and the text it released (may be empty while a character or stop string is pending)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class Finish:
    """The end of a sequence: why, its full text, and token usage."""

    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()


def check_fits(prompt_len: int, max_new_tokens: int, n_positions: int) -> None:
    """Refuse a request that cannot fit the context window, before any work is done."""
    if prompt_len == 0:
        raise InvalidRequest("the prompt has no tokens", param="prompt")
    if max_new_tokens < 1:
        raise InvalidRequest("at least one new token must be requested", param="max_new_tokens")
    if prompt_len + max_new_tokens > n_positions:
        raise ContextTooLong(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"window of {n_positions} tokens; shorten the prompt or ask for fewer tokens",
            param="max_new_tokens",
        )


class Sequence:
    """Generation state of one prompt."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: TokenizerLike,
                 n_positions: int) -> None:
        check_fits(len(prompt_ids), params.max_new_tokens, n_positions)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = Sampler(params)
        self.generated: list[int] = []
        self._decoder = tokenizer.incremental_decoder(self.prompt_ids)
        self._stop_ids = frozenset() if params.ignore_eos else frozenset(tokenizer.stop_ids) | params.stop_token_ids
        self._stops = tuple(s for s in params.stop if s)
        self._longest_stop = max(map(len, self._stops), default=0)
        self._seen: set[int] = set(prompt_ids)
        self.text = ""  # generated text so far (before stop-string truncation)
        self._released = 0  # characters of self.text already handed out
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_token(self, logits) -> int:
        """Sample the next id from this sequence's last-position logits."""
        return self.sampler(logits, self._seen, self.generated)

    def accept(self, token_id: int) -> TokenEvent:
        """Take a sampled token: stop on a stop id, a stop string or the length limit."""
        if token_id in self._stop_ids:
            self.finish_reason = "stop"
            self._finish_text()
            return TokenEvent(token_id, self._release(final=True))
        self.generated.append(token_id)
        self._seen.add(token_id)
        self.text += self._decoder.push(token_id)
        if self._cut_at_stop_string():
            self.finish_reason = "stop"
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            self._finish_text()
        return TokenEvent(token_id, self._release(final=self.finished))

    def stop(self, reason: FinishReason = "cancelled") -> None:
        """End it from outside (cancelled by its client, stopped at its time limit or by the engine)."""
        self.finish_reason = reason

    def result(self) -> Finish:
        assert self.finish_reason is not None
        return Finish(self.finish_reason, self.text, len(self.prompt_ids), len(self.generated), tuple(self.generated))

    def _cut_at_stop_string(self) -> bool:
        if not self._stops:
            return False
        start = max(0, self._released - self._longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _release(self, final: bool) -> str:
        """Text that is safe to hand out: at the end everything left, before it everything except
        a tail that could still grow into a stop string."""
        keep = len(self.text) if final else len(self.text) - self._pending_stop_prefix()
        piece = self.text[self._released:keep]
        self._released = max(self._released, keep)
        return piece

    def _finish_text(self) -> None:
        """At eos or the length limit, take what the decoder still holds (it may end in a stop string)."""
        self.text += self._decoder.flush()
        if self._cut_at_stop_string():
            self.finish_reason = "stop"

    def _pending_stop_prefix(self) -> int:
        """Length of the longest end of self.text that is the start of a stop string."""
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
