"""build_chat_prompt: whole-turn trimming, ContextTooLong, stops (tiny tokenizer; one real-KoGPT2 check)."""

from __future__ import annotations

import pytest

from kolite.chat import ChatMessage, KoGPT2Template, PlainTextTemplate, build_chat_prompt
from kolite.errors import ContextTooLong, InvalidRequest
from kolite.tokenizer import Tokenizer

U, A, S = "user", "assistant", "system"


def conversation(n_turns: int, system: str | None = "짧게 답하세요.") -> list[ChatMessage]:
    out = [ChatMessage(S, system)] if system else []
    for i in range(n_turns - 1):
        out += [ChatMessage(U, f"질문 {i} 오늘 날씨가 좋네요"), ChatMessage(A, f"답 {i} 반갑습니다.")]
    return [*out, ChatMessage(U, "마지막 질문입니다")]


def pieces(template: KoGPT2Template, messages: list[ChatMessage]) -> tuple[list[int], list[list[int]], list[int]]:
    """System ids, ids per turn (user + answer), generation prompt, computed by hand."""
    system = template.system_ids([m.content for m in messages if m.role == S])
    rest = [m for m in messages if m.role != S]
    turns = [rest[i:i + 2] for i in range(0, len(rest), 2)]
    return system, [template.turn_ids(t) for t in turns], template.generation_ids()


def test_everything_fits(tiny: Tokenizer) -> None:
    template = KoGPT2Template(tiny)
    messages = conversation(4)
    prompt = build_chat_prompt(messages, template, tiny, 10_000)
    assert prompt.ids == template.encode(messages)
    assert (prompt.dropped_turns, prompt.dropped_messages) == (0, 0)
    assert prompt.template == "kogpt2" and prompt.stop_ids == {1, 2} and prompt.stop_strings == ()


def test_oldest_whole_turns_are_dropped_first(tiny: Tokenizer) -> None:
    template = KoGPT2Template(tiny)
    messages = conversation(5)
    system, turns, gen = pieces(template, messages)
    assert template.encode(messages) == system + [i for t in turns for i in t] + gen
    keep_two = len(system) + len(turns[3]) + len(turns[4]) + len(gen)
    for limit in (keep_two, keep_two + len(turns[2]) - 1):
        prompt = build_chat_prompt(messages, template, tiny, limit)
        assert prompt.ids == system + turns[3] + turns[4] + gen
        assert len(prompt.ids) <= limit
        assert (prompt.dropped_turns, prompt.dropped_messages) == (3, 6)
    full = len(template.encode(messages))
    assert build_chat_prompt(messages, template, tiny, full).dropped_turns == 0
    assert build_chat_prompt(messages, template, tiny, full - 1).dropped_turns == 1


def test_only_the_newest_turn_and_system_left(tiny: Tokenizer) -> None:
    template = KoGPT2Template(tiny)
    messages = conversation(3)
    system, turns, gen = pieces(template, messages)
    prompt = build_chat_prompt(messages, template, tiny, len(system) + len(turns[-1]) + len(gen))
    assert prompt.ids == system + turns[-1] + gen
    assert prompt.dropped_turns == 2
    assert prompt.ids[: len(system)] == system  # the system text is never trimmed


def test_newest_turn_too_long(tiny: Tokenizer) -> None:
    template = KoGPT2Template(tiny)
    messages = conversation(3)
    system, turns, gen = pieces(template, messages)
    needed = len(system) + len(turns[-1]) + len(gen)
    with pytest.raises(ContextTooLong) as info:
        build_chat_prompt(messages, template, tiny, needed - 1)
    assert isinstance(info.value, InvalidRequest) and info.value.param == "messages"
    assert f"needs {needed} prompt tokens" in str(info.value) and f"only {needed - 1}" in str(info.value)
    with pytest.raises(ContextTooLong):
        build_chat_prompt(messages, template, tiny, 0)


def test_continuation_keeps_the_open_turn_whole(tiny: Tokenizer) -> None:
    template = KoGPT2Template(tiny)
    messages = [*conversation(3, system=None), ChatMessage(A, "반갑")]
    last_turn = template.turn_ids(messages[-2:], open_ended=True)
    assert last_turn == [2, *tiny.encode("마지막 질문입니다"), 4, *tiny.encode("반갑")]
    prompt = build_chat_prompt(messages, template, tiny, len(last_turn))
    assert prompt.ids == last_turn and prompt.continuation and prompt.dropped_turns == 2
    with pytest.raises(ContextTooLong):
        build_chat_prompt(messages, template, tiny, len(last_turn) - 1)


def test_invalid_messages_are_reported(tiny: Tokenizer) -> None:
    with pytest.raises(InvalidRequest):
        build_chat_prompt([], KoGPT2Template(tiny), tiny, 100)
    with pytest.raises(InvalidRequest):
        build_chat_prompt([{"role": "tool", "content": "x"}], KoGPT2Template(tiny), tiny, 100)


def test_plain_template_stops_and_trimming(tiny: Tokenizer) -> None:
    template = PlainTextTemplate(tiny)
    messages = conversation(3)
    full = build_chat_prompt(messages, template, tiny, 10_000)
    assert full.stop_strings == ("\nUser:", "\nAssistant:")
    assert full.stop_ids == tiny.stop_ids
    trimmed = build_chat_prompt(messages, template, tiny, len(full.ids) - 1)
    assert trimmed.dropped_turns == 1
    assert trimmed.ids == template.encode([messages[0], *messages[3:]])


def test_real_kogpt2_trimming(ko: Tokenizer) -> None:
    template = KoGPT2Template(ko)
    messages = conversation(6)
    full = template.encode(messages)
    prompt = build_chat_prompt(messages, template, ko, len(full) // 2)
    kept = [messages[0], *messages[1 + 2 * prompt.dropped_turns:]]
    assert prompt.ids == template.encode(kept)
    assert len(prompt.ids) <= len(full) // 2
    assert len(template.encode([messages[0], *messages[1 + 2 * (prompt.dropped_turns - 1):]])) > len(full) // 2
