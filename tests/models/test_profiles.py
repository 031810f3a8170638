"""Profile choice: KoGPT2 by name or vocab layout, GPT-2 by `<|endoftext|>`, else tokenizer_config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from kolite.errors import ModelFormatError
from kolite.models.profiles import GPT2_PROFILE, KOGPT2_PROFILE, ModelProfile, profile_for
from kolite.models.tokenizer_config import read_tokenizer_config
from kolite.tokenizer import Tokenizer
from tests.conftest import fixture_path


def write_tokenizer(path: Path, words: list[str], specials: list[str]) -> Path:
    """A tiny word-level tokenizer.json: specials first (ids 0..), then words."""
    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=specials[0] if specials else "a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return path


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---- KoGPT2 -----------------------------------------------------------------------------------


def test_kogpt2_by_repo_name() -> None:
    path = fixture_path("kogpt2-base-v2-tokenizer", "tokenizer.json")
    profile = profile_for("skt/kogpt2-base-v2", path)
    assert profile == KOGPT2_PROFILE
    assert profile.name == "kogpt2"
    assert (profile.bos_token, profile.eos_token) == ("</s>", "</s>")
    assert (profile.unk_token, profile.pad_token, profile.mask_token) == ("<unk>", "<pad>", "<mask>")
    assert (profile.user_token, profile.assistant_token) == ("<usr>", "<sys>")
    assert profile.stop_tokens == ("</s>", "<usr>")
    assert profile.compat_jamo


def test_kogpt2_by_vocab_layout_for_chatbot_tiny_ko() -> None:
    """The fixture chat model reuses KoGPT2's tokenizer under another name: same profile."""
    path = fixture_path("chatbot-tiny-ko", "tokenizer.json")
    assert profile_for("/models/chatbot-tiny-ko", path) == KOGPT2_PROFILE


def test_kogpt2_hidden_tokens_are_markup_only() -> None:
    hidden = set(KOGPT2_PROFILE.hidden_tokens)
    assert {"<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>", "<d>", "</d>"} <= hidden
    assert "<unused0>" in hidden and "<unused99>" in hidden
    assert not {"😤", ":)", "l^o", "ㅠㅠ", "^^"} & hidden


def test_kogpt2_layout_on_a_tiny_byte_level_tokenizer(tiny_model_dir: Path) -> None:
    """The shared tiny test model has KoGPT2's specials at ids 0-6, so it is served as KoGPT2."""
    profile = profile_for(str(tiny_model_dir), tiny_model_dir / "tokenizer.json")
    assert profile.name == "kogpt2"
    assert not profile.compat_jamo  # no NFKC normalizer, nothing to map back
    tok = Tokenizer.from_files(tiny_model_dir / "tokenizer.json", profile)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 1, 3, 5)
    assert tok.stop_ids == {1, 2}


def test_kogpt2_fine_tune_with_its_own_eos_stops_on_both(tmp_path: Path) -> None:
    specials = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
    path = write_tokenizer(tmp_path / "tokenizer.json", ["안녕", "<|endoftext|>"], specials)
    config = write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|endoftext|>"})
    profile = profile_for("someone/kogpt2-chat", path, read_tokenizer_config(config))
    assert profile.name == "kogpt2"
    assert profile.eos_token == "</s>"
    assert profile.stop_tokens == ("</s>", "<usr>", "<|endoftext|>")
    assert "<|endoftext|>" in profile.hidden_tokens


def test_kogpt2_name_with_a_foreign_vocab_is_refused(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "tokenizer.json", ["hello"], ["<|endoftext|>"])
    with pytest.raises(ModelFormatError, match="KoGPT2"):
        profile_for("skt/kogpt2-base-v2", path)


# ---- GPT-2 ------------------------------------------------------------------------------------


def test_gpt2_from_tokenizer_json_and_config() -> None:
    folder = fixture_path("gpt2-tokenizer")
    config = folder / "tokenizer_config.json"
    profile = profile_for("openai-community/gpt2", folder / "tokenizer.json", read_tokenizer_config(config))
    assert profile == GPT2_PROFILE
    assert profile.bos_token == profile.eos_token == profile.pad_token == "<|endoftext|>"
    assert profile.unk_token is None
    assert profile.user_token is None and profile.assistant_token is None


def test_gpt2_from_vocab_json_only() -> None:
    """Old GPT-2 repos (distilgpt2 era) have only vocab.json + merges.txt."""
    assert profile_for("distilgpt2", fixture_path("gpt2-tokenizer", "vocab.json")) == GPT2_PROFILE


def test_explicit_config_eos_beats_the_gpt2_guess(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "tokenizer.json", ["hello"], ["<|endoftext|>", "</s>"])
    config = write_json(tmp_path / "tokenizer_config.json", {"eos_token": "</s>"})
    profile = profile_for("someone/gpt2-ko", path, read_tokenizer_config(config))
    assert profile.name == "generic"
    assert profile.eos_token == "</s>"


# ---- generic ----------------------------------------------------------------------------------


def test_generic_from_config_strings_and_dicts(tmp_path: Path) -> None:
    specials = ["<bos>", "<eos>", "[PAD]", "<|sep|>"]
    path = write_tokenizer(tmp_path / "tokenizer.json", ["hi", "there"], specials)
    config = write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": {"__type": "AddedToken", "content": "<bos>", "special": True},
        "eos_token": {"content": "<eos>"},
        "pad_token": "[PAD]",
        "unk_token": None,
    })
    profile = profile_for("someone/model", path, read_tokenizer_config(config))
    assert (profile.name, profile.bos_token, profile.eos_token, profile.pad_token) == (
        "generic", "<bos>", "<eos>", "[PAD]",
    )
    assert profile.unk_token is None
    assert "<|sep|>" in profile.hidden_tokens  # markup-looking special tokens are hidden
    tok = Tokenizer.from_files(path, profile)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 2, None)
    assert tok.decode([0, *tok.encode("hi there"), 3, 1]) == "hi there"  # no decoder: tokens joined by spaces


def test_generic_without_bos_uses_eos_and_pad_falls_back_to_eos(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "tokenizer.json", ["hi"], ["<end>"])
    config = write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<end>", "pad_token": "<nope>"})
    profile = profile_for("x", path, read_tokenizer_config(config))
    assert profile.bos_token == "<end>"
    tok = Tokenizer.from_files(path, profile)
    assert tok.pad_id == tok.eos_id == 0


@pytest.mark.parametrize("config", [None, {}, {"eos_token": None}, {"eos_token": {"content": ""}}])
def test_no_eos_anywhere_is_a_format_error(tmp_path: Path, config: dict | None) -> None:
    path = write_tokenizer(tmp_path / "tokenizer.json", ["hi"], ["<x>"])
    cfg = write_json(tmp_path / "tokenizer_config.json", config) if config is not None else None
    with pytest.raises(ModelFormatError, match="eos"):
        profile_for("x", path, read_tokenizer_config(cfg))


def test_config_eos_missing_from_vocab_is_a_format_error(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "tokenizer.json", ["hi"], ["<x>"])
    config = write_json(tmp_path / "tokenizer_config.json", {"eos_token": "</s>"})
    with pytest.raises(ModelFormatError, match="not in the vocab"):
        profile_for("x", path, read_tokenizer_config(config))


def test_unreadable_tokenizer_file_is_a_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFormatError):
        profile_for("x", bad)
    with pytest.raises(ModelFormatError):
        profile_for("x", tmp_path / "missing.json")


def test_profile_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        KOGPT2_PROFILE.eos_token = "<s>"  # type: ignore[misc]
    assert isinstance(GPT2_PROFILE, ModelProfile)
