"""Shared fixtures: tiny models the tests build themselves, and the path to the real data fixtures.

Everything here works on a clone without `../shared/fixtures`; tests that need the real files use
`real_fixtures` and skip with a reason when they are absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kolite.config import ModelSettings
from kolite.engine.scheduler import SchedulerOptions
from kolite.models.gpt2config import GPT2Config
from kolite.models.profiles import profile_for
from kolite.models.synthetic import train_byte_level_bpe, write_checkpoint
from kolite.models.tokenizer_config import read_tokenizer_config
from kolite.service import LoadedModel, ModelService, load_model
from kolite.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("KOLITE_FIXTURES", REPO.parent / "shared" / "fixtures"))

# KoGPT2's control tokens in KoGPT2's id order, so a tiny tokenizer gets the KoGPT2 profile.
KOGPT2_SPECIALS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
CORPUS = [
    "안녕하세요 반갑습니다. 오늘 날씨가 좋네요.",
    "한국어 GPT-2 모델로 문장을 만들어 봅시다.",
    "라즈베리 파이에서도 빠르게 돌아가는 챗봇 서버입니다.",
    "Hello world, this is a tiny byte-level tokenizer for tests.",
    "12시 땡! 하루가 또 가네요. 푹 쉬세요.",
] * 20

TINY = GPT2Config(vocab_size=400, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                  bos_token_id=1, eos_token_id=1, pad_token_id=3)


def fixture_path(*parts: str) -> Path:
    """A file under the real data fixtures, or skip the test with a reason."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real fixture {path} is absent (set KOLITE_FIXTURES to ../shared/fixtures)")
    return path


def build_tiny_tokenizer(path: Path, vocab_size: int = TINY.vocab_size) -> Path:
    """A byte-level BPE trained on a few Korean/English lines, with KoGPT2's specials at ids 0-6.

    Byte-level means any text encodes, and one token can hold half a Hangul syllable: the hard case
    for streaming whole characters.
    """
    from tokenizers import Tokenizer as HFTokenizer

    train_byte_level_bpe(path, CORPUS, vocab_size, KOGPT2_SPECIALS)
    assert HFTokenizer.from_file(str(path)).get_vocab_size() <= vocab_size
    return path


@pytest.fixture(scope="session")
def ko() -> Tokenizer:
    """KoGPT2's real tokenizer with its profile (skips without the fixtures)."""
    path = fixture_path("kogpt2-base-v2-tokenizer", "tokenizer.json")
    return Tokenizer.from_files(path, profile_for("skt/kogpt2-base-v2", path))


@pytest.fixture(scope="session")
def gpt2() -> Tokenizer:
    """GPT-2's real tokenizer with its profile (skips without the fixtures)."""
    folder = fixture_path("gpt2-tokenizer")
    profile = profile_for("gpt2", folder / "tokenizer.json", read_tokenizer_config(folder / "tokenizer_config.json"))
    return Tokenizer.from_files(folder / "tokenizer.json", profile)


def silence_eos(weights: Path, eos_id: int) -> None:
    """Zero eos's (tied) embedding row, so its logit is exactly 0 while the others spread around it.

    A random model otherwise picks eos greedily at a step decided by rounding, which differs
    between CPUs (a CI machine without VNNI ended a 3-token answer at once). End-of-text handling
    is tested with fake models and with the trained `chatbot-tiny-ko` fixture instead.
    """
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(weights))
    sd["transformer.wte.weight"][eos_id] = 0.0
    save_file(sd, str(weights), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 checkpoint folder (config, safetensors, tokenizer.json)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    write_checkpoint(folder, TINY, seed=0)
    silence_eos(folder / "model.safetensors", TINY.eos_token_id)
    build_tiny_tokenizer(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model converted to int8 (per-token) once per session."""
    home = tmp_path_factory.mktemp("home")
    return load_model(ModelSettings(model=str(tiny_model_dir), kolite_home=home, threads=1))


@pytest.fixture()
def kolite_home(tmp_path: Path) -> Path:
    return tmp_path / "kolite-home"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (marked `anyio`) run on asyncio, as uvicorn does."""
    return "asyncio"


def make_service(loaded: LoadedModel | None, model: Path | str, options: SchedulerOptions | None = None,
                 loader: Callable[[ModelSettings], LoadedModel] | None = None) -> ModelService:
    """The tests' one way to build a service over an already loaded model (no conversion; `loader`
    replaces it, for loading and failing on purpose). Not started: `start_loading()` or the app's
    lifespan starts it."""
    return ModelService(ModelSettings(model=str(model)), loader=loader or (lambda _s: loaded),  # type: ignore[arg-type]
                        scheduler_options=options)
