"""Tokenizer facts from the real KoGPT2 / GPT-2 files, and streaming decode of whole characters."""

from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path

import pytest

from kolite.errors import ModelFormatError
from kolite.models.profiles import GPT2_PROFILE, profile_for
from kolite.tokenizer import IncrementalDecoder, Tokenizer
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def chatbot_rows() -> list[dict[str, str]]:
    with fixture_path("chatbot-data", "ChatbotData.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | tuple[int, ...] = ()) -> list[str]:
    """All pieces an IncrementalDecoder yields, flush last."""
    dec = tok.incremental_decoder(prompt_ids)
    return [dec.push(i) for i in ids] + [dec.flush()]


CARD = "안녕하세요. 한국어 GPT-2 입니다.😤:)l^o"
CARD_IDS = [25906, 8702, 7801, 25856, 34407, 10528, 422, 426, 18258, 9241, 12521, 254, 110, 162]
HELLO_KO = "안녕하세요 반갑습니다"
HELLO_KO_IDS = [25906, 8702, 7801, 8084, 9138, 6831, 16913, 7182]


# ---- KoGPT2 facts -----------------------------------------------------------------------------


def test_kogpt2_special_ids(ko: Tokenizer) -> None:
    assert (ko.bos_id, ko.eos_id, ko.pad_id, ko.unk_id, ko.mask_id) == (1, 1, 3, 5, 6)
    assert (ko.user_id, ko.assistant_id) == (2, 4)
    names = ("</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>")
    assert [ko.token_id(t) for t in names] == [1, 2, 3, 4, 5, 6]
    assert ko.stop_ids == {1, 2}
    assert ko.vocab_size == 51200


def test_token_id_of_a_missing_token_is_a_format_error(ko: Tokenizer) -> None:
    with pytest.raises(ModelFormatError):
        ko.token_id("<|endoftext|>")


def test_kogpt2_encode_decode(ko: Tokenizer) -> None:
    assert ko.encode(HELLO_KO) == HELLO_KO_IDS
    assert ko.decode(HELLO_KO_IDS) == HELLO_KO


def test_kogpt2_model_card_example_keeps_emoji(ko: Tokenizer) -> None:
    assert ko.encode(CARD) == CARD_IDS
    assert ko.decode(CARD_IDS) == CARD
    # Why kolite filters by id: the library's skip_special_tokens drops `😤:)l^o`.
    assert ko.backend.decode(CARD_IDS, skip_special_tokens=True) == "안녕하세요. 한국어 GPT-2 입니다."


def test_every_kogpt2_emoji_and_emoticon_survives_decode(ko: Tokenizer) -> None:
    for tid in range(109, 375):
        assert ko.decode([tid]) == ko.backend.id_to_token(tid), tid


def test_decode_hides_control_tokens_only(ko: Tokenizer) -> None:
    # <s> </s> <usr> <pad> <sys> <unk> <mask> <d> </d> <unused0> <unused99>
    controls = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 108]
    assert ko.decode([*controls, *HELLO_KO_IDS, *controls]) == HELLO_KO
    assert ko.decode([2, *CARD_IDS, 4, 1]) == CARD


def test_unk_is_hidden(ko: Tokenizer) -> None:
    ids = ko.encode("걔 너무 싫다")  # `걔` is not in KoGPT2's vocab
    assert ko.unk_id in ids
    assert "<unk>" not in ko.decode(ids)
    assert ko.decode(ids).strip() == "너무 싫다"


def test_compat_jamo_come_back_as_typed(ko: Tokenizer) -> None:
    """KoGPT2's NFKC turns `ㅋ` (U+314B) into U+110F; decode maps it back so `ㅋㅋ` reads right."""
    text = "ㅋㅋ 웃겨 ㅎㅎ 힘들어ㅠ ㄳ"
    assert any("\u1100" <= ch <= "\u11ff" for ch in ko.backend.decode(ko.encode(text)))
    assert ko.decode(ko.encode(text)) == text


def test_nfd_hangul_encodes_like_nfc(ko: Tokenizer, gpt2: Tokenizer) -> None:
    nfd = unicodedata.normalize("NFD", HELLO_KO)
    assert nfd != HELLO_KO
    assert ko.encode(nfd) == HELLO_KO_IDS
    assert gpt2.encode(nfd) == gpt2.encode(HELLO_KO)
    # GPT-2 has no normalizer: without kolite's NFC step the ids would differ.
    assert gpt2.backend.encode(nfd, add_special_tokens=False).ids != gpt2.encode(HELLO_KO)


def test_chatbot_tiny_ko_prompt_ids_and_answers() -> None:
    facts = json.loads(fixture_path("chatbot-tiny-ko", "facts.json").read_text(encoding="utf-8"))
    path = fixture_path("chatbot-tiny-ko", "tokenizer.json")
    tok = Tokenizer.from_files(path, profile_for("chatbot-tiny-ko", path))
    assert tok.profile.name == "kogpt2"
    pairs = facts["greedy_exact_answers"]
    assert len(pairs) == 30
    for pair in pairs:
        assert pair["prompt_ids"] == [tok.user_id, *tok.encode(pair["q"]), tok.assistant_id]
        assert tok.decode(pair["answer_ids"]) == pair["a"]
        assert "".join(stream(tok, [*pair["answer_ids"], tok.eos_id], pair["prompt_ids"])) == pair["a"]


def test_chatbot_rows_round_trip(ko: Tokenizer, chatbot_rows: list[dict[str, str]]) -> None:
    """The first 500 rows round trip exactly; all rows do up to NFKC's `…`->`...` and spaces that
    KoGPT2's Metaspace puts after an added token (`ㅠㅠ?` -> `ㅠㅠ ?`)."""
    checked = 0
    for i, row in enumerate(chatbot_rows):
        for text in (row["Q"], row["A"]):
            ids = ko.encode(text)
            if ko.unk_id in ids:
                continue
            got = ko.decode(ids)
            if i < 500:
                assert got == text
            assert got.replace(" ", "") == text.replace("…", "...").replace(" ", ""), text
            checked += 1
    assert checked > 23000


# ---- GPT-2 facts ------------------------------------------------------------------------------


def test_gpt2_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello, my dog is cute") == [15496, 11, 616, 3290, 318, 13779]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" The quick brown fox<|endoftext|>") == [383, 2068, 7586, 21831, 50256]
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.unk_id) == (50256, 50256, 50256, None)
    assert gpt2.stop_ids == {50256}
    assert gpt2.vocab_size == 50257
    assert gpt2.decode([15496, 995, 50256]) == "Hello world"


def test_gpt2_from_vocab_and_merges_matches_tokenizer_json(gpt2: Tokenizer) -> None:
    folder = fixture_path("gpt2-tokenizer")
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    old = Tokenizer.from_files(folder / "missing-tokenizer.json", GPT2_PROFILE, vocab=vocab, merges=merges)
    for text in ("Hello, my dog is cute", " The quick brown fox<|endoftext|>", HELLO_KO, "이모지 😤 와 ㅋㅋ"):
        assert old.encode(text) == gpt2.encode(text)
    assert (old.eos_id, old.vocab_size) == (50256, 50257)
    ids = old.encode(CARD)
    assert old.decode(ids) == gpt2.decode(ids) == CARD


def test_no_tokenizer_files_is_a_format_error() -> None:
    with pytest.raises(ModelFormatError):
        Tokenizer.from_files(None, GPT2_PROFILE)


# ---- incremental decoding ---------------------------------------------------------------------


def test_stream_korean_kogpt2(ko: Tokenizer, chatbot_rows: list[dict[str, str]]) -> None:
    for row in chatbot_rows[:200]:
        ids = ko.encode(f"{row['Q']} {row['A']}")
        pieces = stream(ko, ids)
        assert "".join(pieces) == ko.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", [HELLO_KO, CARD, "한글과 emoji 😤🤦🏽‍♀️ 섞기", "ㅋㅋㅋ 진짜?! 🐶🐱"])
def test_stream_gpt2_byte_tokens_never_split_a_character(gpt2: Tokenizer, text: str) -> None:
    ids = gpt2.encode(text)
    assert any("\ufffd" in gpt2.backend.decode([i]) for i in ids)  # single tokens are partial UTF-8
    pieces = stream(gpt2, ids)
    assert "".join(pieces) == gpt2.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # it waited for a character to complete
    for piece in pieces:  # every piece is whole syllables: NFC-stable and no lone jamo
        assert unicodedata.normalize("NFC", piece) == piece


def test_stream_gpt2_chatbot_rows(gpt2: Tokenizer, chatbot_rows: list[dict[str, str]]) -> None:
    for row in chatbot_rows[::100]:
        ids = gpt2.encode(f"{row['Q']}\n{row['A']}")
        pieces = stream(gpt2, ids)
        assert "".join(pieces) == gpt2.decode(ids) == f"{row['Q']}\n{row['A']}"
        assert not any("\ufffd" in p for p in pieces)


def test_flush_returns_an_unfinished_character(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("안녕")[:-1]  # generation stopped one byte short of `녕`
    pieces = stream(gpt2, ids)
    assert pieces[-1] == "\ufffd"  # flush shows what decode shows
    assert "".join(pieces) == gpt2.decode(ids) == "안\ufffd"


def test_control_tokens_in_a_stream_yield_nothing(ko: Tokenizer) -> None:
    dec = ko.incremental_decoder()
    assert dec.push(ko.eos_id) == ""
    assert [dec.push(i) for i in HELLO_KO_IDS[:2]] == ["안녕", "하"]
    assert dec.push(ko.user_id) == ""
    assert dec.push(HELLO_KO_IDS[4]) == " 반"  # text continues across a hidden token
    assert dec.flush() == ""
    with pytest.raises(RuntimeError):
        dec.push(HELLO_KO_IDS[5])


def test_first_piece_after_chat_prompt_has_no_space(ko: Tokenizer) -> None:
    """After `<sys>` the reply starts fresh: `▁푹` -> `푹`, same as decode of the new ids alone."""
    prompt = [ko.user_id, *ko.encode("오늘 너무 피곤해"), ko.assistant_id]
    answer = ko.encode("푹 쉬세요.")
    pieces = stream(ko, [*answer, ko.eos_id], prompt)
    assert pieces[0] == "푹"
    assert "".join(pieces) == ko.decode(answer) == ko.decode(answer, prompt_ids=prompt) == "푹 쉬세요."


def test_first_piece_after_text_prompt_keeps_the_word_space(ko: Tokenizer) -> None:
    """A completion continues the prompt text: `안녕하세요` + `▁반갑` streams " 반", so prompt + text reads
    right; without the prompt as context the Metaspace start-of-text rule would drop that space."""
    prompt, new = HELLO_KO_IDS[:4], HELLO_KO_IDS[4:]
    pieces = stream(ko, new, prompt)
    assert pieces[0] == " 반"
    assert "".join(pieces) == ko.decode(new, prompt_ids=prompt) == " 반갑습니다"
    assert ko.decode(new) == "반갑습니다"
    assert ko.decode(HELLO_KO_IDS[:4]) + ko.decode(new, prompt_ids=prompt) == HELLO_KO
    # A continuation inside a word gets no space.
    assert "".join(stream(ko, HELLO_KO_IDS[2:4], HELLO_KO_IDS[:2])) == "세요"


def test_gpt2_character_split_across_the_prompt_boundary(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("안녕")
    prompt, new = ids[:1], ids[1:]  # the prompt ends inside `안`
    pieces = stream(gpt2, new, prompt)
    assert "".join(pieces) == gpt2.decode(new, prompt_ids=prompt) == "안녕"
    assert not any("\ufffd" in p for p in pieces)
    # Byte-level text keeps its own spaces: nothing to add or strip at the boundary.
    assert "".join(stream(gpt2, [995], [15496])) == gpt2.decode([995]) == " world"


def test_window_stays_small(ko: Tokenizer, chatbot_rows: list[dict[str, str]]) -> None:
    """Per-token cost must not grow with the answer length."""
    ids = ko.encode(" ".join(row["A"] for row in chatbot_rows[:300]))
    assert len(ids) > 1000
    dec = IncrementalDecoder(ko)
    out = []
    for tid in ids:
        out.append(dec.push(tid))
        assert len(dec._window) <= IncrementalDecoder.MAX + 1
    out.append(dec.flush())
    assert "".join(out) == ko.decode(ids)


def test_tiny_byte_level_kogpt2_layout(tiny_model_dir: Path) -> None:
    """Runs without the real fixtures: the shared tiny tokenizer splits Hangul across tokens."""
    path = tiny_model_dir / "tokenizer.json"
    tok = Tokenizer.from_files(path, profile_for("tiny", path))
    text = "안녕하세요 반갑습니다. 라즈베리 파이 😤"
    ids = tok.encode(text)
    pieces = stream(tok, [*ids, tok.eos_id], [tok.user_id, tok.assistant_id])
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
