"""Chat: messages, per-model templates and prompt building (roles and token ids, never tensors)."""

from kolite.chat.messages import ChatMessage, validate_messages
from kolite.chat.prompt import ChatPrompt, build_chat_prompt
from kolite.chat.templates import (
    ChatTemplate,
    JinjaTemplate,
    KoGPT2Template,
    PlainTextTemplate,
    TurnTemplate,
    template_for,
)

__all__ = [
    "ChatMessage",
    "ChatPrompt",
    "ChatTemplate",
    "JinjaTemplate",
    "KoGPT2Template",
    "PlainTextTemplate",
    "TurnTemplate",
    "build_chat_prompt",
    "template_for",
    "validate_messages",
]
