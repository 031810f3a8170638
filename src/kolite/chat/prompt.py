"""Messages -> the prompt ids of one chat request, fitted to the context window by dropping old turns.

History that does not fit is dropped from the oldest *whole* turn (a user message together with the
assistant's answer to it, see `turn_numbers`), so the model never sees half an exchange. System messages
are always kept. If the newest turn alone (with the system messages) does not fit, the request fails
with ContextTooLong (HTTP 400): cutting the question itself would answer a different question.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kolite.chat.messages import ChatMessage, turn_numbers, validate_messages
from kolite.chat.templates import ChatTemplate, TurnTemplate
from kolite.errors import ContextTooLong, InvalidRequest
from kolite.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatPrompt:
    """What the engine needs for one chat request."""

    ids: list[int]
    stop_strings: tuple[str, ...]  # end the answer; not part of it
    stop_ids: frozenset[int]  # end the answer; tokenizer.stop_ids included
    dropped_turns: int  # oldest turns left out to fit max_prompt_tokens
    dropped_messages: int
    continuation: bool  # the last message was the assistant's: the answer continues its text
    template: str  # the template's name: "kogpt2", "plain" or "jinja"


def build_chat_prompt(
    messages: Sequence[ChatMessage | Mapping[str, Any] | Any],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    max_prompt_tokens: int,
) -> ChatPrompt:
    """Validate `messages`, encode them with `template` and keep as many recent turns as fit.

    `max_prompt_tokens` is what the context window leaves for the prompt (n_positions minus the tokens
    to generate). Raises InvalidRequest for bad messages and ContextTooLong when even the newest turn
    does not fit.
    """
    checked = validate_messages(messages)
    numbers = turn_numbers(checked)
    n_turns = max(numbers) + 1  # >= 1: the last message is a user or assistant message
    if isinstance(template, TurnTemplate):
        ids, first = _fit_turns(checked, numbers, n_turns, template, max_prompt_tokens)
    else:
        ids, first = _fit_rendered(checked, numbers, n_turns, template, max_prompt_tokens)
    if not ids:
        raise InvalidRequest("the chat template produced an empty prompt", param="messages")
    return ChatPrompt(
        ids=ids,
        stop_strings=template.stop_strings,
        stop_ids=template.stop_ids | tokenizer.stop_ids,
        dropped_turns=first,
        dropped_messages=sum(1 for n in numbers if 0 <= n < first),
        continuation=checked[-1].role == "assistant",
        template=template.name,
    )


def _fit_turns(
    messages: list[ChatMessage], numbers: list[int], n_turns: int, template: TurnTemplate, limit: int
) -> tuple[list[int], int]:
    """Concatenating template: encode every turn once and drop the oldest while the sum is too long."""
    continuation = messages[-1].role == "assistant"
    head = template.system_ids([m.content for m in messages if m.role == "system"])
    tail = [] if continuation else template.generation_ids()
    turns: list[list[ChatMessage]] = [[] for _ in range(n_turns)]
    for message, number in zip(messages, numbers, strict=True):
        if number >= 0:
            turns[number].append(message)
    blocks = [template.turn_ids(t, open_ended=continuation and i == n_turns - 1) for i, t in enumerate(turns)]
    total = len(head) + len(tail) + sum(map(len, blocks))
    first = 0
    while total > limit and first < n_turns - 1:
        total -= len(blocks[first])
        first += 1
    if total > limit:
        raise _too_long(total, limit)
    return head + [i for block in blocks[first:] for i in block] + tail, first


def _fit_rendered(
    messages: list[ChatMessage], numbers: list[int], n_turns: int, template: ChatTemplate, limit: int
) -> tuple[list[int], int]:
    """Any template: re-render without the oldest turns; binary search on how many to drop."""
    cache: dict[int, list[int]] = {}

    def ids_without(first: int) -> list[int]:
        if first not in cache:
            kept = [m for m, n in zip(messages, numbers, strict=True) if n < 0 or n >= first]
            cache[first] = template.encode(kept)
        return cache[first]

    newest = ids_without(n_turns - 1)
    if len(newest) > limit:
        raise _too_long(len(newest), limit)
    if len(ids_without(0)) <= limit:
        return ids_without(0), 0
    low, high = 0, n_turns - 1  # dropping `low` turns is too long, dropping `high` fits
    while high - low > 1:
        mid = (low + high) // 2
        if len(ids_without(mid)) <= limit:
            high = mid
        else:
            low = mid
    return ids_without(high), high


def _too_long(needed: int, limit: int) -> ContextTooLong:
    return ContextTooLong(
        f"the last message (with the system messages) needs {needed} prompt tokens, but only {max(limit, 0)} "
        "fit in the model's context window after the tokens to generate; shorten the message or the system "
        "prompt, or ask for fewer max_tokens",
        param="messages",
    )
