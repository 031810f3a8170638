"""A model folder's `tokenizer_config.json` and chat template, read once for the profile and the template.

The profile (`kolite.models.profiles`) needs the config's special tokens, the chat code
(`kolite.chat.templates`) the template's source; both get them from here, parsed once per load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kolite.errors import ModelFormatError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 4.50+: wins over tokenizer_config.json's entry


def read_tokenizer_config(path: Path | None) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} when the model has none); ModelFormatError when unreadable."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return loaded


def read_chat_template(tokenizer_config: Path | None, chat_template_file: Path | None = None, *,
                       config: Mapping[str, Any] | None = None) -> str | None:
    """The model's Jinja chat template, if any: `chat_template.jinja` (given, or next to
    tokenizer_config.json) wins over tokenizer_config.json's `chat_template` (a string, or
    [{name, template}] -> "default"). `config` is the already parsed tokenizer_config.json."""
    candidates = [chat_template_file] if chat_template_file is not None else []
    if tokenizer_config is not None:
        candidates.append(Path(tokenizer_config).parent / CHAT_TEMPLATE_FILE)
    for path in candidates:
        if path is not None and Path(path).is_file():
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"cannot read {path}: {exc}") from exc
            return text if text.strip() else None
    if config is None:
        config = read_tokenizer_config(tokenizer_config)
    value = config.get("chat_template")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t["template"] for t in value
                 if isinstance(t, dict) and isinstance(t.get("template"), str)}
        if "default" in named:
            return named["default"]
        raise ModelFormatError(
            f"{tokenizer_config}: chat_template lists {sorted(map(str, named))} but no 'default' template")
    raise ModelFormatError(f"{tokenizer_config}: chat_template must be a string or a list of {{name, template}}")
