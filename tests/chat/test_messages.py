"""Message validation and turn grouping (no tokenizer needed)."""

from __future__ import annotations

import pytest

from kolite.chat.messages import ChatMessage, turn_numbers, validate_messages
from kolite.errors import InvalidRequest


def bad(messages: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_messages(messages)  # type: ignore[arg-type]
    assert info.value.param == "messages"
    return info.value


def test_accepts_dicts_and_messages() -> None:
    got = validate_messages([{"role": "system", "content": "s"}, ChatMessage("user", "q")])
    assert got == [ChatMessage("system", "s"), ChatMessage("user", "q")]


def test_accepts_objects_with_role_and_content() -> None:
    from pydantic import BaseModel

    class Message(BaseModel):
        role: str
        content: str | list[dict[str, str]] | None = None

    got = validate_messages([Message(role="user", content=[{"type": "text", "text": "q"}])])
    assert got == [ChatMessage("user", "q")]


def test_empty_list_is_rejected() -> None:
    assert "at least one" in str(bad([]))


@pytest.mark.parametrize("messages", ["hello", None, {"role": "user", "content": "q"}])
def test_not_a_list_is_rejected(messages: object) -> None:
    bad(messages)


@pytest.mark.parametrize("role", ["tool", "function", "User", "", None])
def test_unknown_role_is_rejected(role: object) -> None:
    err = bad([{"role": "user", "content": "q"}, {"role": role, "content": "x"}, {"role": "user", "content": "q"}])
    assert "messages[1].role" in str(err)


def test_developer_is_system() -> None:
    got = validate_messages([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"}])
    assert got[0] == ChatMessage("system", "be brief")


def test_last_message_must_not_be_system() -> None:
    assert "last message" in str(bad([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]))


def test_assistant_last_is_allowed_for_continuation() -> None:
    got = validate_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Once"}])
    assert got[-1] == ChatMessage("assistant", "Once")


def test_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "안녕"}, {"type": "text", "text": "하세요"}]
    assert validate_messages([{"role": "user", "content": parts}])[0].content == "안녕\n하세요"


@pytest.mark.parametrize(
    "content",
    [None, 3, [{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}], ["plain string part"]],
)
def test_bad_content_is_rejected(content: object) -> None:
    assert "messages[0].content" in str(bad([{"role": "user", "content": content}]))


def test_not_a_message_object_is_rejected() -> None:
    bad([["user", "q"]])


def m(role: str) -> ChatMessage:
    return ChatMessage(role, role[0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("roles", "numbers"),
    [
        (["user"], [0]),
        (["system", "user", "assistant", "user"], [-1, 0, 0, 1]),
        (["user", "assistant", "system", "user", "assistant", "user"], [0, 0, -1, 1, 1, 2]),
        (["user", "user", "assistant", "user"], [0, 0, 0, 1]),  # a question in two messages stays one turn
        (["assistant", "user", "assistant"], [0, 1, 1]),  # a greeting before the first question
        (["user", "assistant", "assistant", "user"], [0, 0, 0, 1]),
    ],
)
def test_turn_numbers(roles: list[str], numbers: list[int]) -> None:
    assert turn_numbers([m(r) for r in roles]) == numbers
