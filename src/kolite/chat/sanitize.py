"""Encoding caller text so that control-token strings inside it stay text (no prompt injection).

`Tokenizer.encode` turns `<usr>`, `</s>` or `<|endoftext|>` written in a message into the control ids
themselves, so a user could close the assistant's turn or forge a new one. Message text therefore goes
through `TextEncoder`: the control-token strings in it are encoded as ordinary text (`<usr>` becomes the
pieces `<` `us` `r` `>`), as transformers' `apply_chat_template(sanitize_control_tokens=True)` does, and
everything else is encoded as usual (KoGPT2's emoji and emoticons such as `:)` are added tokens too,
but they are text and keep their ids). Decoding the ids gives the caller's text back.

Pieces after a control-token string are encoded behind a newline that is then removed (transformers'
trick), so Metaspace tokenizers do not add a word-start space in the middle of a word.
Last line of defence: ids of control tokens are removed from the result, should a normalizer or merge
ever produce one (`<unk>` stays: it is what the vocab gives for characters it cannot spell).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable

from kolite.tokenizer import Tokenizer


class TextEncoder:
    """Encodes untrusted text for one tokenizer; thread-safe (no state after construction)."""

    def __init__(self, tokenizer: Tokenizer, extra_control: Iterable[str] = ()) -> None:
        """`extra_control`: more token strings to keep as text (e.g. those a chat template writes)."""
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        added = {tok.content: tid for tid, tok in backend.get_added_tokens_decoder().items()}
        wanted = {*tokenizer.profile.hidden_tokens, *extra_control}
        # Longest first, so `</s>` wins over `<s>`-like prefixes when both could match.
        self.literals: tuple[str, ...] = tuple(
            sorted((t for t in wanted if t in added and t.strip()), key=lambda t: (-len(t), t))
        )
        control = {added[t] for t in self.literals} | set(tokenizer.hidden_ids)
        control.discard(tokenizer.unk_id)  # type: ignore[arg-type]
        self.control_ids: frozenset[int] = frozenset(control)
        self.literal_pattern: re.Pattern[str] | None = (
            re.compile("|".join(map(re.escape, self.literals))) if self.literals else None
        )
        self._split = re.compile(f"({self.literal_pattern.pattern})") if self.literal_pattern else None
        self._newline = tokenizer.encode("\n")

    def encode(self, text: str) -> list[int]:
        """Ids of caller text in which no control token is ever recognised."""
        text = unicodedata.normalize("NFC", text)
        pieces = self._split.split(text) if self._split else [text]  # odd positions are control strings
        ids: list[int] = []
        at_start = True
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = self.encode_piece(piece, as_text=as_text, at_start=at_start)
            if not as_text and self.control_ids.intersection(piece_ids):
                # A normalizer turned look-alike characters into a control token: spell the piece out instead.
                piece_ids = self.encode_piece(piece, as_text=True, at_start=at_start)
            ids += piece_ids
            at_start = False
        return [i for i in ids if i not in self.control_ids]

    def encode_piece(self, piece: str, *, as_text: bool, at_start: bool) -> list[int]:
        """One piece as is: `as_text` ignores added tokens; not `at_start` means it follows other text."""
        encode = self.encode_plain if as_text else self.tokenizer.encode
        return encode(piece) if at_start else self._after_break(encode, piece)

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with no added-token matching at all: normalizer, pre-tokenizer, model."""
        backend = self.tokenizer.backend
        text = unicodedata.normalize("NFC", text)
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        parts = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [tok.id for part in parts for tok in backend.model.tokenize(part)]

    def _after_break(self, encode: Callable[[str], list[int]], piece: str) -> list[int]:
        """Encode a piece from the middle of a text, without the word-start space a fresh string gets."""
        ids = encode("\n" + piece)
        n = len(self._newline)
        if ids[:n] == self._newline:
            return ids[n:]
        return encode(piece)
