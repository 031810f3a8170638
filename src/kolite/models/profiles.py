"""Which special tokens a model family uses, set by kolite explicitly.

KoGPT2 ships only `tokenizer.json` (no `tokenizer_config.json`), so library defaults would guess
its bos/eos/pad wrong; GPT-2 has a single `<|endoftext|>` for everything. A profile pins these
choices in one place so the tokenizer, the generation loop and the chat template agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kolite.errors import ModelFormatError

KOGPT2_REPO = "skt/kogpt2-base-v2"
GPT2_EOS = "<|endoftext|>"

# KoGPT2 ids 0-108 are markup (`<s>` ... `<unused99>`); ids 109-374 are emoticons and emoji that the
# file marks special too, but they are text and must survive decoding.
_KOGPT2_CONTROL = (
    "<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>", "<d>", "</d>",
    *(f"<unused{i}>" for i in range(100)),
)

# Special added tokens that look like markup (`<x>`, `</x>`, `<|x|>`, `[X]`) are hidden in generic
# profiles; anything else (emoji, emoticons such as `:)` or `<(^_^)>`-like text) stays visible.
_MARKUP = re.compile(r"^(<\|[^|\s]+\|>|</?[A-Za-z_][\w.\-]*>|\[[A-Z][A-Z0-9_]*\])$")


@dataclass(frozen=True)
class ModelProfile:
    """Special tokens of one model family, as strings (ids are resolved by the tokenizer)."""

    name: str  # "kogpt2", "gpt2" or "generic"
    bos_token: str
    eos_token: str
    unk_token: str | None = None
    pad_token: str | None = None
    mask_token: str | None = None
    user_token: str | None = None  # chat: a user turn is user_token + text
    assistant_token: str | None = None  # chat: an assistant turn is assistant_token + text + eos
    extra_stop_tokens: tuple[str, ...] = ()  # besides eos, tokens that end generation
    control_tokens: tuple[str, ...] = ()  # hidden by decode (the named tokens above always are)
    # Map standalone conjoining jamo back to compatibility jamo on decode: an NFKC normalizer turns
    # the `ㅋㅋ`/`ㅠㅠ` users type into U+110F/U+1172 (which render as odd leading-consonant glyphs).
    compat_jamo: bool = False

    @property
    def named_tokens(self) -> tuple[str, ...]:
        """Every token this profile names, without duplicates, in a stable order."""
        named = (
            self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token,
            self.user_token, self.assistant_token, *self.extra_stop_tokens,
        )
        return tuple(dict.fromkeys(t for t in named if t))

    @property
    def hidden_tokens(self) -> tuple[str, ...]:
        """Tokens decode drops: the named ones (incl. unk) plus the extra control tokens."""
        return tuple(dict.fromkeys((*self.named_tokens, *self.control_tokens)))

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.eos_token, *self.extra_stop_tokens)))


KOGPT2_PROFILE = ModelProfile(
    name="kogpt2",
    bos_token="</s>",  # model card: bos = eos = `</s>` (config.json's bos_token_id 0 is not used)
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    mask_token="<mask>",
    user_token="<usr>",
    assistant_token="<sys>",
    extra_stop_tokens=("<usr>",),  # a new user turn also ends the assistant's turn
    control_tokens=_KOGPT2_CONTROL,
    compat_jamo=True,
)

GPT2_PROFILE = ModelProfile(
    name="gpt2",
    bos_token=GPT2_EOS,
    eos_token=GPT2_EOS,
    pad_token=GPT2_EOS,
    control_tokens=(GPT2_EOS,),
)


@dataclass(frozen=True)
class _VocabInfo:
    vocab: dict[str, int]  # model vocab plus added tokens
    special_added: tuple[str, ...]  # added tokens marked special
    nfkc: bool  # the normalizer applies NFKC


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc


def _normalizer_types(node: Any) -> set[str]:
    if not isinstance(node, dict):
        return set()
    found = {str(node.get("type", ""))}
    for child in node.get("normalizers") or ():
        found |= _normalizer_types(child)
    return found


def read_vocab(tokenizer_json: Path) -> _VocabInfo:
    """Vocab of a `tokenizer.json`, or of a GPT-2 style `vocab.json` (old repos ship only that)."""
    raw = _read_json(tokenizer_json)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        vocab = raw["model"].get("vocab")
        if isinstance(vocab, list):  # Unigram models store [piece, score] pairs
            vocab = {piece[0]: i for i, piece in enumerate(vocab)}
        if not isinstance(vocab, dict):
            raise ModelFormatError(f"{tokenizer_json} has no readable model vocab")
        vocab = dict(vocab)
        special: list[str] = []
        for tok in raw.get("added_tokens") or ():
            vocab[tok["content"]] = int(tok["id"])
            if tok.get("special"):
                special.append(tok["content"])
        nfkc = bool(_normalizer_types(raw.get("normalizer")) & {"NFKC"})
        return _VocabInfo(vocab, tuple(special), nfkc)
    if isinstance(raw, dict) and raw and all(isinstance(v, int) for v in raw.values()):
        return _VocabInfo(dict(raw), (), False)
    raise ModelFormatError(f"{tokenizer_json} is neither a tokenizer.json nor a vocab.json")


def _config_token(config: dict, key: str) -> str | None:
    """A token entry of tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _is_kogpt2_name(repo_or_name: str) -> bool:
    name = repo_or_name.strip().rstrip("/").lower()
    return name in ("kogpt2", KOGPT2_REPO) or name.endswith("/kogpt2-base-v2") or name == "kogpt2-base-v2"


def _has_kogpt2_signature(vocab: dict[str, int]) -> bool:
    return vocab.get("</s>") == 1 and vocab.get("<usr>") == 2 and vocab.get("<sys>") == 4


def profile_for(
    repo_or_name: str, tokenizer_json: Path, config: Mapping[str, Any] | None = None
) -> ModelProfile:
    """Pick the profile: KoGPT2 (by name or vocab layout), GPT-2 (`<|endoftext|>`), else the config.

    `tokenizer_json` may also be a `vocab.json` for repos without a tokenizer.json; `config` is the model's
    parsed tokenizer_config.json (`kolite.models.tokenizer_config.read_tokenizer_config`), if it has one.
    An explicit eos in tokenizer_config.json wins over the GPT-2 guess (fine-tunes that changed
    eos); for KoGPT2 layouts such an eos is added as an extra stop token instead.
    """
    info = read_vocab(tokenizer_json)
    vocab = info.vocab
    config = config or {}
    config_eos = _config_token(config, "eos_token")

    if _is_kogpt2_name(repo_or_name) or _has_kogpt2_signature(vocab):
        missing = [t for t in KOGPT2_PROFILE.named_tokens if t not in vocab]
        if missing:
            raise ModelFormatError(f"{repo_or_name}: KoGPT2 tokenizer lacks {missing} in {tokenizer_json}")
        profile = KOGPT2_PROFILE
        if not info.nfkc:  # e.g. a byte-level retrain with KoGPT2's specials: no jamo to undo
            profile = replace(profile, compat_jamo=False)
        if config_eos and config_eos in vocab and config_eos not in profile.stop_tokens:
            profile = replace(
                profile,
                extra_stop_tokens=(*profile.extra_stop_tokens, config_eos),
                control_tokens=(*profile.control_tokens, config_eos),
            )
        return profile

    if GPT2_EOS in vocab and config_eos in (None, GPT2_EOS):
        return GPT2_PROFILE

    if not config_eos:
        where = "its tokenizer_config.json has none" if config else "no tokenizer_config.json"
        raise ModelFormatError(f"{repo_or_name}: cannot find an eos token ({where})")
    named = {key: _config_token(config, f"{key}_token") for key in ("bos", "unk", "pad", "mask")}
    for key, token in (("eos", config_eos), ("bos", named["bos"])):
        if token is not None and token not in vocab:
            raise ModelFormatError(f"{repo_or_name}: {key} token {token!r} is not in the vocab")
    markup = tuple(t for t in info.special_added if _MARKUP.match(t))
    return ModelProfile(
        name="generic",
        bos_token=named["bos"] or config_eos,
        eos_token=config_eos,
        unk_token=named["unk"],
        pad_token=named["pad"],
        mask_token=named["mask"],
        control_tokens=markup,
        compat_jamo=info.nfkc,
    )

