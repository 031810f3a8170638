"""Chat templates: how a conversation becomes prompt ids for one model family (roles and text, never tensors).

`template_for` picks one per model:
- **jinja**: the model folder ships a `chat_template` (`chat_template.jinja`, or the `chat_template` entry
  of `tokenizer_config.json`: a string, or a list of {name, template} of which "default" is used). It is
  rendered as transformers' `apply_chat_template(add_generation_prompt=True)` renders it and the text is
  encoded with `add_special_tokens=False`, so kolite's ids equal transformers' for the same messages.
- **kogpt2** (profile "kogpt2", no chat_template): the format KoGPT2 chat fine-tunes are trained on.
  A user message is `<usr>` + text ids, an assistant message `<sys>` + text ids + `</s>`, and the prompt
  ends with `<sys>`; each text is encoded on its own, so `[user q]` gives exactly `[2] + encode(q) + [4]`.
  System messages (wherever they are) are joined with "\n" and put first as plain text ids, before the
  first `<usr>`: KoGPT2 has no system marker, and plain text is what the base model understands.
  Generation stops at `</s>` or `<usr>`.
- **plain** (GPT-2, distilgpt2, anything else): a transcript without special markers,
  `[system text\n]User: q1\nAssistant: a1\nUser: q2\nAssistant:` (texts stripped of surrounding
  whitespace). Generation stops at eos or at the stop strings "\nUser:" and "\nAssistant:", where the
  model starts writing the next turn itself. Each line is encoded on its own; for GPT-2's byte-level BPE
  this gives the same ids as encoding the whole transcript.

All message text, system text included, goes through `TextEncoder`: control-token strings written in a
message (`<usr>`, `</s>`, `<|endoftext|>`, a template's `<|im_end|>` ...) are encoded as plain text and can
never become control ids. When the last message is the assistant's, the prompt ends inside it (no end
marker, no generation prompt) and the model continues it.

Turn templates (kogpt2, plain) are concatenations of per-message ids, which lets `build_chat_prompt` trim
history by summing lengths; a jinja template is re-rendered with fewer turns instead.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from kolite.chat.messages import ChatMessage
from kolite.chat.sanitize import TextEncoder
from kolite.errors import InvalidRequest, ModelFormatError
from kolite.tokenizer import Tokenizer

SYSTEM_SEPARATOR = "\n"


class ChatTemplate(ABC):
    """Turns validated messages into prompt ids, plus what ends the answer."""

    name: ClassVar[str]

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end the answer (a superset of tokenizer.stop_ids)."""
        return self.tokenizer.stop_ids

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends the answer (not part of it), for formats without an end-of-turn token."""
        return ()

    @abstractmethod
    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt ids for validated messages: ends with the generation prompt, or inside a last assistant message."""


class TurnTemplate(ChatTemplate):
    """A template whose prompt is system ids + one block of ids per message + the generation prompt."""

    @abstractmethod
    def system_ids(self, texts: Sequence[str]) -> list[int]:
        """Ids of all system texts, placed first (empty when there are none)."""

    @abstractmethod
    def message_ids(self, message: ChatMessage, *, open_ended: bool = False) -> list[int]:
        """Ids of one user or assistant message; `open_ended` leaves an assistant message open."""

    @abstractmethod
    def generation_ids(self) -> list[int]:
        """Ids that open the assistant's answer."""

    def turn_ids(self, turn: Sequence[ChatMessage], *, open_ended: bool = False) -> list[int]:
        """Ids of consecutive non-system messages; `open_ended`: continue the last (assistant) one."""
        ids: list[int] = []
        for i, message in enumerate(turn):
            ids += self.message_ids(message, open_ended=open_ended and i == len(turn) - 1)
        return ids

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        system = [m.content for m in messages if m.role == "system"]
        rest = [m for m in messages if m.role != "system"]
        continuation = bool(rest) and rest[-1].role == "assistant"
        ids = self.system_ids(system) + self.turn_ids(rest, open_ended=continuation)
        return ids if continuation else ids + self.generation_ids()


class KoGPT2Template(TurnTemplate):
    """`<usr>` question `<sys>` answer `</s>`, as KoGPT2 chatbots are trained (see the module docstring)."""

    name = "kogpt2"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        if tokenizer.user_id is None or tokenizer.assistant_id is None:
            raise ModelFormatError(f"the {tokenizer.profile.name} profile has no <usr>/<sys> chat markers")
        self.user_id: int = tokenizer.user_id
        self.assistant_id: int = tokenizer.assistant_id
        self.encoder = TextEncoder(tokenizer)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.tokenizer.stop_ids | {self.tokenizer.eos_id, self.user_id}

    def system_ids(self, texts: Sequence[str]) -> list[int]:
        text = SYSTEM_SEPARATOR.join(t for t in texts if t.strip())
        return self.encoder.encode(text) if text else []

    def message_ids(self, message: ChatMessage, *, open_ended: bool = False) -> list[int]:
        text = self.encoder.encode(message.content)
        if message.role == "user":
            return [self.user_id, *text]
        if message.role == "assistant":
            return [self.assistant_id, *text] if open_ended else [self.assistant_id, *text, self.tokenizer.eos_id]
        raise ValueError("system messages are encoded by system_ids")

    def generation_ids(self) -> list[int]:
        return [self.assistant_id]


class PlainTextTemplate(TurnTemplate):
    """A `User:`/`Assistant:` transcript for models without chat markers (see the module docstring)."""

    name = "plain"

    def __init__(self, tokenizer: Tokenizer, user_label: str = "User", assistant_label: str = "Assistant") -> None:
        super().__init__(tokenizer)
        self.user_label = user_label
        self.assistant_label = assistant_label
        self.encoder = TextEncoder(tokenizer)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (f"\n{self.user_label}:", f"\n{self.assistant_label}:")

    def system_ids(self, texts: Sequence[str]) -> list[int]:
        text = SYSTEM_SEPARATOR.join(t.strip() for t in texts if t.strip())
        return self.encoder.encode(text + "\n") if text else []

    def message_ids(self, message: ChatMessage, *, open_ended: bool = False) -> list[int]:
        if message.role == "system":
            raise ValueError("system messages are encoded by system_ids")
        label = self.user_label if message.role == "user" else self.assistant_label
        text = message.content.strip()
        line = f"{label}: {text}" if text else f"{label}:"
        return self.encoder.encode(line if open_ended and message.role == "assistant" else line + "\n")

    def generation_ids(self) -> list[int]:
        return self.encoder.encode(f"{self.assistant_label}:")

    def transcript(self, messages: Sequence[ChatMessage]) -> str:
        """The transcript `encode` spells (for logs and tests)."""
        system = SYSTEM_SEPARATOR.join(m.content.strip() for m in messages if m.role == "system" and m.content.strip())
        rest = [m for m in messages if m.role != "system"]
        lines = [f"{system}\n"] if system else []
        for m in rest:
            label = self.user_label if m.role == "user" else self.assistant_label
            t = m.content.strip()
            lines.append((f"{label}: {t}" if t else f"{label}:") + "\n")
        if rest and rest[-1].role == "assistant":
            lines[-1] = lines[-1][:-1]
        else:
            lines.append(f"{self.assistant_label}:")
        return "".join(lines)


# ---- jinja -------------------------------------------------------------------------------------------

# Private-use characters (as transformers uses): they wrap control-token strings found in message text, so
# the rendered prompt tells them apart from the tokens the template writes. Stripped from caller text first.
_MARK_START, _MARK_END, _CONTINUE = "\U000f0000", "\U000f0001", "\U000f0002"
_PRIVATE = str.maketrans("", "", _MARK_START + _MARK_END + _CONTINUE)
_PROBE = "kolite-end-of-turn-probe"


class JinjaTemplate(ChatTemplate):
    """A model's own Jinja `chat_template`, rendered like transformers (sandboxed), then encoded safely."""

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, source: str) -> None:
        super().__init__(tokenizer)
        try:
            from kolite.chat import jinja_env

            self._template = jinja_env.compile_template(source)
            literal = jinja_env.literal_text(source)
        except ImportError as exc:
            raise ModelFormatError(
                f"this model ships a chat_template; rendering it needs jinja2>=3.1.6 ({exc})"
            ) from exc
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise ModelFormatError(f"the model's chat_template cannot be compiled: {exc}") from exc
        self.source = source
        # Control tokens: the profile's, plus every added token the template itself writes (`<|im_end|>`).
        added = [tok.content for tok in tokenizer.backend.get_added_tokens_decoder().values()]
        self.encoder = TextEncoder(tokenizer, extra_control=[t for t in added if t.strip() and t in literal])
        pattern = self.encoder.literal_pattern
        self._marked = re.compile(
            f"{_MARK_START}({pattern.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]"
            if pattern else f"[{_MARK_START}{_MARK_END}]"
        )
        profile = tokenizer.profile
        specials = {"bos": profile.bos_token, "eos": profile.eos_token, "unk": profile.unk_token,
                    "pad": profile.pad_token, "mask": profile.mask_token}
        self._specials = {f"{k}_token": v for k, v in specials.items() if v}
        self._stop_ids = tokenizer.stop_ids | self._end_of_turn_ids()

    @property
    def stop_ids(self) -> frozenset[int]:
        """The tokenizer's stops plus the token the template closes an assistant message with."""
        return self._stop_ids

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text, as transformers' `apply_chat_template(tokenize=False)` gives it."""
        return self._render(messages).translate(_PRIVATE)

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self._render(messages)
        pieces = self._marked.split(text)  # [text, marked token or None, text, ...]
        ids: list[int] = []
        at_start = True
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            ids += self.encoder.encode_piece(piece, as_text=i % 2 == 1, at_start=at_start)
            at_start = False
        return ids

    def _render(self, messages: Sequence[ChatMessage]) -> str:
        """Rendered text with caller control-token strings marked; cut inside a continued assistant message."""
        continuation = bool(messages) and messages[-1].role == "assistant"
        data = [{"role": m.role, "content": self._mark(m.content)} for m in messages]
        if continuation:
            data[-1]["content"] += _CONTINUE
        text = self._render_data(data, add_generation_prompt=not continuation)
        if continuation:
            cut = text.rfind(_CONTINUE)
            if cut < 0:
                raise InvalidRequest(
                    "this model's chat template cannot continue an assistant message; end with a user message",
                    param="messages",
                )
            text = text[:cut]
        return text

    def _mark(self, text: str) -> str:
        text = text.translate(_PRIVATE)  # caller text must not forge markers
        pattern = self.encoder.literal_pattern
        return pattern.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", text) if pattern else text

    def _render_data(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self._specials,
            )
        except Exception as exc:  # raise_exception(), undefined names, type errors: the template refused them
            raise InvalidRequest(f"the model's chat template rejected the messages: {exc}", param="messages") from exc

    def _end_of_turn_ids(self) -> frozenset[int]:
        """The control token right after an assistant message (ChatML's `<|im_end|>`): it ends answers too."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self._render_data(probe, add_generation_prompt=False)
        except InvalidRequest:
            return frozenset()
        _, found, tail = text.partition(_PROBE)
        tail = tail.lstrip()
        for literal in self.encoder.literals if found else ():
            if tail.startswith(literal):
                return frozenset({self.tokenizer.token_id(literal)})
        return frozenset()


# ---- choice ------------------------------------------------------------------------------------------


def template_for(tokenizer: Tokenizer, source: str | None) -> ChatTemplate:
    """The model's own Jinja template (`source`, from `kolite.models.tokenizer_config.read_chat_template`)
    if it has one, else KoGPT2's format for the kogpt2 profile, else plain text.

    Raises ModelFormatError for an uncompilable template (a wrong format would only give garbage
    answers); build it once per loaded model, it is immutable and thread-safe.
    """
    if source is not None:
        return JinjaTemplate(tokenizer, source)
    if tokenizer.profile.name == "kogpt2":
        return KoGPT2Template(tokenizer)
    return PlainTextTemplate(tokenizer)
