"""Stop rules of one sequence: stop ids, stop strings across pieces, length, and safe streaming."""

from __future__ import annotations

import numpy as np
import pytest

from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import Sequence, check_fits
from kolite.errors import ContextTooLong, InvalidRequest

EOS = 0


class CharDecoder:
    def __init__(self) -> None:
        self.closed = False

    def push(self, token_id: int) -> str:
        return "" if token_id == EOS else chr(token_id)

    def flush(self) -> str:
        self.closed = True
        return ""


class CharTokenizer:
    """Token id = Unicode code point; id 0 is eos."""

    stop_ids = frozenset({EOS})

    def incremental_decoder(self, prompt_ids: list[int]) -> CharDecoder:
        return CharDecoder()


def _feed(text: str, stop: tuple[str, ...] = (), max_new: int = 100, eos: bool = False) -> tuple[list[str], Sequence]:
    seq = Sequence([ord("x")], SamplingParams(max_new_tokens=max_new, stop=stop), CharTokenizer(), 1024)
    pieces = []
    for ch in text:
        pieces.append(seq.accept(ord(ch)).text)
        if seq.finished:
            return pieces, seq
    if eos:
        pieces.append(seq.accept(EOS).text)
    return pieces, seq


def test_stop_string_is_cut_and_never_streamed() -> None:
    pieces, seq = _feed("abcENDxyz", stop=("END",))
    assert "".join(pieces) == "abc" == seq.result().text
    assert seq.finish_reason == "stop"
    assert all("E" not in p for p in pieces)
    assert seq.result().completion_tokens == 6  # a, b, c, E, N, D were generated


def test_partial_stop_prefix_is_held_then_released() -> None:
    pieces, seq = _feed("abEFg", stop=("EN",), eos=True)
    assert pieces[2] == ""  # 'E' might start "EN": held back
    assert pieces[3] == "EF"  # released once it cannot
    assert "".join(pieces) == "abEFg" and seq.finish_reason == "stop"


def test_earliest_of_several_stops_wins() -> None:
    pieces, seq = _feed("hello world", stop=("world", "lo"))
    assert seq.result().text == "hel" == "".join(pieces)


def test_length_and_eos_reasons() -> None:
    _, seq = _feed("abcdef", max_new=4)
    assert seq.finish_reason == "length" and seq.result().text == "abcd"
    pieces, seq = _feed("ab", eos=True)
    assert seq.finish_reason == "stop" and "".join(pieces) == "ab"
    assert seq.result().token_ids == (ord("a"), ord("b"))  # eos itself is not part of the output


def test_repetition_penalty_sees_prompt_and_output() -> None:
    seq = Sequence([5], SamplingParams(do_sample=False, repetition_penalty=10.0), CharTokenizer(), 1024)
    logits = np.zeros(10)
    logits[5], logits[6] = 3.0, 1.0
    assert seq.next_token(logits) == 6


def test_check_fits() -> None:
    check_fits(1000, 24, 1024)
    with pytest.raises(ContextTooLong, match="1024"):
        check_fits(1000, 25, 1024)
    with pytest.raises(InvalidRequest):
        check_fits(0, 5, 1024)
    with pytest.raises(InvalidRequest):
        check_fits(5, 0, 1024)


def test_ignore_eos_keeps_going_and_extra_stop_ids_stop() -> None:
    seq = Sequence([1], SamplingParams(max_new_tokens=3, ignore_eos=True), CharTokenizer(), 1024)
    for t in (ord("a"), EOS, ord("b")):
        seq.accept(t)
    assert seq.finish_reason == "length" and seq.result().completion_tokens == 3
    seq = Sequence([1], SamplingParams(max_new_tokens=9, stop_token_ids=frozenset({ord("z")})), CharTokenizer(), 1024)
    seq.accept(ord("a"))
    seq.accept(ord("z"))
    assert seq.finish_reason == "stop" and seq.result().text == "a"
