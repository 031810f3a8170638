"""Tokenizers for the chat tests: the real KoGPT2 / GPT-2 files (skipped when absent) and tiny built ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kolite.models.profiles import profile_for
from kolite.models.synthetic import train_byte_level_bpe
from kolite.models.tokenizer_config import read_tokenizer_config
from kolite.tokenizer import Tokenizer
from tests.conftest import CORPUS, build_tiny_tokenizer, fixture_path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def facts() -> list[dict]:
    return json.loads(fixture_path("chatbot-tiny-ko", "facts.json").read_text(encoding="utf-8"))[
        "greedy_exact_answers"
    ]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A byte-level tokenizer with KoGPT2's specials at ids 0-6 (so the kogpt2 profile)."""
    path = build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok") / "tokenizer.json")
    return Tokenizer.from_files(path, profile_for("tiny", path))


def build_chatml_model(folder: Path, config: dict | None = None, *, template: str | None = CHATML) -> Path:
    """A folder with a small byte-level tokenizer that has ChatML's tokens, and a tokenizer_config.json.

    `<|endoftext|>` is the bos, `<|im_end|>` the eos, so the tokenizer gets a generic profile.
    Returns the tokenizer_config.json path.
    """
    train_byte_level_bpe(folder / "tokenizer.json", [*CORPUS, "system user assistant"] * 2, 400,
                         ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template is not None:
        cfg["chat_template"] = template
    cfg.update(config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return folder / "tokenizer_config.json"


def load_folder(config: Path) -> Tokenizer:
    folder = config.parent
    profile = profile_for("chatml", folder / "tokenizer.json", read_tokenizer_config(config))
    return Tokenizer.from_files(folder / "tokenizer.json", profile)
