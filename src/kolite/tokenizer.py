"""Text <-> ids for kolite, with the model profile's special tokens and streaming detokenization.

Decoding rule: only *control* tokens are hidden (the profile's bos/eos/pad/unk/mask, chat markers
and markup such as KoGPT2's `<unused0>`). KoGPT2 marks its emoji and emoticons (`😤`, `:)`, `ㅠㅠ`,
`^^`) as special tokens too, so the library's `skip_special_tokens=True` would silently drop them;
kolite filters by id instead and decodes the rest with `skip_special_tokens=False`.
`<unk>` is hidden as well: it stands for a character the vocab cannot spell, and showing the
literal markup `<unk>` to a reader is worse than leaving the gap (transformers hides it too).

Streaming: `IncrementalDecoder` decodes a small sliding window of ids and emits only the new,
complete characters, like transformers' TextStreamer / vLLM's detokenizer. tokenizers 0.23 has
`decoders.DecodeStream` (~0.5 us/token against ~2 us here) but it is not used: it has no flush
(text held back at the end, e.g. an unfinished character, is lost, breaking
`pieces + flush == decode`), its state cannot be inspected to write one, and its special-token
switch is all-or-nothing (KoGPT2 needs "hide markup, keep emoji").
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from kolite.errors import ModelFormatError
from kolite.models.profiles import ModelProfile

_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode shows for an incomplete byte sequence


def _compat_jamo_table() -> dict[int, str]:
    """Conjoining jamo -> the compatibility jamo that NFKC turned into it (U+110F -> `ㅋ`)."""
    table: dict[int, str] = {}
    for code in range(0x3131, 0x318F):
        if code == 0x3164:  # Hangul filler: invisible either way, leave it alone
            continue
        folded = unicodedata.normalize("NFKC", chr(code))
        if len(folded) == 1 and folded != chr(code):
            table[ord(folded)] = chr(code)
    return table


_COMPAT_JAMO = _compat_jamo_table()


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids kolite needs, resolved once from a ModelProfile."""

    def __init__(self, backend: _HFTokenizer, profile: ModelProfile) -> None:
        self._backend = backend
        self.profile = profile
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int = self.token_id(profile.bos_token)
        self.eos_id: int = self.token_id(profile.eos_token)
        self.unk_id: int | None = self._optional_id(profile.unk_token)
        self.mask_id: int | None = self._optional_id(profile.mask_token)
        pad = self._optional_id(profile.pad_token)
        self.pad_id: int = pad if pad is not None else self.eos_id  # GPT-2 pads with eos
        # Chat markers must exist if the profile names them: the chat template depends on them.
        self.user_id: int | None = self.token_id(profile.user_token) if profile.user_token else None
        self.assistant_id: int | None = (
            self.token_id(profile.assistant_token) if profile.assistant_token else None
        )
        self.stop_ids: frozenset[int] = frozenset(self.token_id(t) for t in profile.stop_tokens)
        self.hidden_ids: frozenset[int] = frozenset(
            i for i in map(self._optional_id, profile.hidden_tokens) if i is not None
        )
        self._jamo = _COMPAT_JAMO if profile.compat_jamo else None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        tokenizer_json: Path | None,
        profile: ModelProfile,
        *,
        vocab: Path | None = None,
        merges: Path | None = None,
    ) -> Tokenizer:
        """Load tokenizer.json, or build GPT-2's byte-level BPE from vocab.json + merges.txt."""
        if tokenizer_json is not None and Path(tokenizer_json).exists():
            try:
                backend = _HFTokenizer.from_file(str(tokenizer_json))
            except Exception as exc:  # the Rust side raises plain Exception
                raise ModelFormatError(f"cannot load {tokenizer_json}: {exc}") from exc
        elif vocab is not None and merges is not None:
            backend = _byte_level_bpe(Path(vocab), Path(merges), profile)
        else:
            raise ModelFormatError(
                f"no tokenizer: {tokenizer_json or 'tokenizer.json'} is missing and "
                "vocab.json + merges.txt were not both given"
            )
        backend.no_truncation()
        backend.no_padding()
        return cls(backend, profile)

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (thread-safe for encode/decode)."""
        return self._backend

    def token_id(self, token: str) -> int:
        """Id of a token string; a missing special token means the profile does not fit the files."""
        tid = self._backend.token_to_id(token)
        if tid is None:
            raise ModelFormatError(f"token {token!r} is not in the {self.profile.name} tokenizer vocab")
        return tid

    def _optional_id(self, token: str | None) -> int | None:
        return self._backend.token_to_id(token) if token else None

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (NFC first, so decomposed Hangul matches); no bos/eos, no token_type_ids.

        Control-token strings in `text` (e.g. `</s>`, `<usr>`) become their control ids, as in
        transformers: chat code must strip or reject them in user input.
        """
        text = unicodedata.normalize("NFC", text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def visible(self, ids: Iterable[int]) -> list[int]:
        """`ids` without control tokens (emoji and other text-like added tokens stay)."""
        hidden = self.hidden_ids
        return [i for i in ids if i not in hidden]

    def _raw(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def _finish(self, text: str) -> str:
        return text.translate(self._jamo) if self._jamo else text

    def decode(self, ids: Iterable[int], *, prompt_ids: Sequence[int] = ()) -> str:
        """Text of `ids` with control tokens hidden and emoji kept.

        With `prompt_ids`, returns the text that `ids` add *after* the prompt, i.e. exactly what an
        `IncrementalDecoder(prompt_ids=...)` streams: a Metaspace word-start `▁` right after prompt
        text becomes a space (`안녕하세요` + `▁반갑` -> " 반갑"), while after a hidden control token
        (chat's `<sys>`) the text starts fresh with no leading space, as plain `decode(ids)` does.
        """
        tail = self._context_tail(prompt_ids)
        visible = self.visible(ids)
        if not tail:
            return self._finish(self._raw(visible))
        head = self._raw(tail).rstrip(_REPLACEMENT)
        return self._finish(self._raw(tail + visible)[len(head):])

    def _context_tail(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few visible prompt ids after the last control token: enough for a word-start
        space or a UTF-8 character split across the boundary, nothing more."""
        tail: list[int] = []
        for tid in reversed(prompt_ids):
            if tid in self.hidden_ids or len(tail) == IncrementalDecoder.KEEP:
                break
            tail.append(tid)
        tail.reverse()
        return tail

    def incremental_decoder(self, prompt_ids: Sequence[int] = ()) -> IncrementalDecoder:
        """A streaming decoder for ids generated after `prompt_ids` (see IncrementalDecoder)."""
        return IncrementalDecoder(self, prompt_ids)


def _byte_level_bpe(vocab: Path, merges: Path, profile: ModelProfile) -> _HFTokenizer:
    """GPT-2's pipeline (byte-level BPE, no prefix space) for repos that predate tokenizer.json."""
    try:
        backend = _HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:
        raise ModelFormatError(f"cannot build a BPE tokenizer from {vocab} and {merges}: {exc}") from exc
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    present = [t for t in profile.hidden_tokens if backend.token_to_id(t) is not None]
    # Register them as special so `<|endoftext|>` in text maps to its id, as tokenizer.json does.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
    return backend


class IncrementalDecoder:
    """Turns ids arriving one at a time into text pieces of whole characters.

    `"".join(push(i) for i in new_ids) + flush() == tokenizer.decode(new_ids, prompt_ids=prompt)`,
    which equals plain `decode(new_ids)` when there is no prompt or it ends with a control token.
    A piece is `""` while a character is still incomplete (a Hangul syllable split over GPT-2 byte
    tokens) and for control tokens; it never ends in U+FFFD from a half UTF-8 sequence.
    Per token it decodes a window of at most MAX ids, so cost does not grow with the sequence.
    """

    KEEP = 4  # ids kept as context when the window is cut (a UTF-8 char spans at most 4 bytes)
    MAX = 16  # window length that triggers a cut
    HARD_MAX = 64  # give up waiting for a character that invalid bytes will never complete

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._window: list[int] = tokenizer._context_tail(prompt_ids)
        # Text of the prompt tail counts as shown, except a trailing incomplete character, which
        # the new ids may complete: that character then belongs to the new text.
        self._emitted = len(tokenizer._raw(self._window).rstrip(_REPLACEMENT)) if self._window else 0
        self._closed = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text ("" if none yet)."""
        if self._closed:
            raise RuntimeError("IncrementalDecoder.push after flush")
        if token_id in self._tok.hidden_ids:
            return ""
        self._window.append(token_id)
        text = self._tok._raw(self._window)
        end = len(text.rstrip(_REPLACEMENT))
        if len(self._window) > self.HARD_MAX:
            end = len(text)
        piece = text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        if end == len(text) and len(self._window) > self.MAX:
            # Everything is shown: keep a short tail as context and measure its text afresh.
            self._window = self._window[-self.KEEP:]
            self._emitted = len(self._tok._raw(self._window))
        return self._tok._finish(piece)

    def flush(self) -> str:
        """End of generation: return whatever is still held back (possibly U+FFFD, as decode shows)."""
        if self._closed:
            return ""
        self._closed = True
        text = self._tok._raw(self._window) if self._window else ""
        piece = text[self._emitted:]
        self._emitted = len(text)
        return self._tok._finish(piece)
