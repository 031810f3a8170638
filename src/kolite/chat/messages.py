"""Chat messages as kolite sees them: a role and plain text, checked once before any template runs.

Rules (OpenAI-compatible where KoGPT2's format allows):
- roles are "system", "user" and "assistant"; OpenAI's newer "developer" role is the same as "system".
  Tool and function roles are rejected (kolite has no tool calling).
- content is a string, or OpenAI's list of content parts when every part is text (joined with "\n").
- the list must not be empty and the last message must be from the user or the assistant:
  * user last: the prompt ends with the template's generation prompt and the model writes a new answer;
  * assistant last: *continuation* (prefill) - the prompt ends inside that assistant message, with no
    end-of-turn marker, and the model continues its text. The new text is the continuation only.
  A system message last has nothing to answer and is rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kolite.errors import InvalidRequest

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
ROLE_ALIASES: dict[str, str] = {"developer": "system"}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation (use `validate_messages` to build checked lists)."""

    role: Role
    content: str


def validate_messages(messages: Sequence[ChatMessage | Mapping[str, Any] | Any]) -> list[ChatMessage]:
    """Checked `ChatMessage`s from messages, OpenAI-style dicts or objects with `role` and `content`
    attributes (pydantic models); InvalidRequest(param="messages") if unusable."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidRequest("messages must be a list of {role, content} objects", param="messages")
    if not messages:
        raise InvalidRequest("messages must contain at least one message", param="messages")
    checked = [_one(i, m) for i, m in enumerate(messages)]
    if checked[-1].role == "system":
        raise InvalidRequest(
            "the last message must be from the user (or from the assistant, whose answer is then continued); "
            "it is a system message",
            param="messages",
        )
    return checked


def _one(index: int, message: Any) -> ChatMessage:
    if isinstance(message, ChatMessage):
        role, content = message.role, message.content
    elif isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    elif hasattr(message, "role") and hasattr(message, "content"):  # e.g. the API layer's pydantic models
        role, content = message.role, message.content
    else:
        raise InvalidRequest(f"messages[{index}] must be an object with role and content", param="messages")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise InvalidRequest(
            f"messages[{index}].role {role!r} is not supported; use 'system', 'user' or 'assistant'",
            param="messages",
        )
    return ChatMessage(role, _text(index, content))  # type: ignore[arg-type]


def _text(index: int, content: Any) -> str:
    """A message's text: a string, or a list of text parts (images and audio cannot be read by a GPT-2)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        texts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequest(
                    f"messages[{index}].content has a {kind!r} part; only text parts are supported",
                    param="messages",
                )
        return "\n".join(texts)
    if content is None:
        raise InvalidRequest(f"messages[{index}].content is missing", param="messages")
    raise InvalidRequest(f"messages[{index}].content must be a string", param="messages")


def turn_numbers(messages: Sequence[ChatMessage]) -> list[int]:
    """The turn each message belongs to (-1 for system messages), so history is trimmed by whole turns.

    A turn starts at a user message that follows an assistant message (or opens the conversation) and runs
    until the next such user message: consecutive user messages and the assistant's answer to them stay
    together. Assistant messages before the first user message form turn 0 on their own.
    """
    numbers: list[int] = []
    turn = -1
    previous: str | None = None
    for message in messages:
        if message.role == "system":
            numbers.append(-1)
            continue
        if turn < 0 or (message.role == "user" and previous == "assistant"):
            turn += 1
        previous = message.role
        numbers.append(turn)
    return numbers
