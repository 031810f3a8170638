"""What a benchmark runs on: a random checkpoint of a real model's shape, converted and loaded as
`kolite serve` loads it."""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kolite.config import ModelSettings
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import DISTILGPT2_SHAPE, KOGPT2_SHAPE

if TYPE_CHECKING:
    from kolite.convert.prepare import PreparedModel
    from kolite.engine.runtime import GPT2Runtime
    from kolite.engine.scheduler import Scheduler
    from kolite.engine.sequence import Sequence as GenSequence
from kolite.bench.roofline import parameter_count

Progress = Callable[[str], None]

# `--random-weights NAME`: the exact shapes of real checkpoints (only the numbers are random).
RANDOM_SHAPES: dict[str, GPT2Config] = {"kogpt2": KOGPT2_SHAPE, "distilgpt2": DISTILGPT2_SHAPE}
# Hub repos whose tokenizer fits each shape; used only if already in the hub cache (never downloaded).
SHAPE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "kogpt2": ("skt/kogpt2-base-v2",),
    "distilgpt2": ("distilgpt2", "distilbert/distilgpt2", "gpt2", "openai-community/gpt2"),
}
RANDOM_SEED = 0






@dataclass(frozen=True)
class RandomCheckpoint:
    folder: Path
    written: bool
    seconds: float
    tokenizer: str | None  # where its tokenizer.json came from, if it has one


def _cached_tokenizer(shape_name: str, cfg: GPT2Config, cache_dir: Path | None) -> Path | None:
    """A real tokenizer.json for this shape from the hub cache, if an earlier pull left one (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    for repo in SHAPE_TOKENIZERS.get(shape_name, ()):
        with contextlib.suppress(Exception):
            found = try_to_load_from_cache(repo, "tokenizer.json", cache_dir=cache_dir)
            if isinstance(found, str) and Tokenizer.from_file(found).get_vocab_size() <= cfg.vocab_size:
                return Path(found)
    return None


def ensure_random_checkpoint(home: Path, shape_name: str, *, cache_dir: Path | None = None,
                             progress: Progress | None = None) -> RandomCheckpoint:
    """`<home>/random-weights/<shape>/`: config.json + model.safetensors of that exact shape, random numbers.

    Written once (a stamp records shape and seed) and reused, so the converted graph is reused too (the
    conversion cache keys on the weights file's size and mtime). Written to a temporary folder and
    renamed, so an interrupted write is never mistaken for a checkpoint.
    """
    from kolite.models.synthetic import ensure_checkpoint

    if shape_name not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; choose from {', '.join(sorted(RANDOM_SHAPES))}")
    cfg = RANDOM_SHAPES[shape_name]
    say = progress or (lambda _msg: None)
    folder = Path(home) / "random-weights" / shape_name
    started = time.perf_counter()
    written = ensure_checkpoint(folder, cfg, seed=RANDOM_SEED, stamp={"shape": cfg.to_dict(), "seed": RANDOM_SEED})
    seconds = time.perf_counter() - started if written else 0.0
    if written:
        say(f"wrote a random-weight {shape_name} checkpoint ({parameter_count(cfg) / 1e6:.0f}M parameters) "
            f"to {folder}")
        gc.collect()
    source = None
    if (folder / "tokenizer.json").is_file():
        source = str(folder / "tokenizer.json")
    else:
        found = _cached_tokenizer(shape_name, cfg, cache_dir)
        if found is not None:
            shutil.copyfile(found, folder / "tokenizer.json")
            source = str(found)
            say(f"using the tokenizer from the hub cache: {found}")
    return RandomCheckpoint(folder, written, round(seconds, 2), source)


class _NoText:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class IdsOnlyTokenizer:
    """Stands in for a tokenizer when the model has none: no stop ids, no text.

    The bench feeds token ids and needs only the tokens, so a random-weight checkpoint needs no
    tokenizer; `Sequence` asks only for stop ids and a streaming decoder.
    """

    stop_ids: frozenset[int] = frozenset()

    def incremental_decoder(self, prompt_ids: Sequence[int] = ()) -> _NoText:
        return _NoText()


@dataclass
class BenchModel:
    """A model opened for measuring: the converted graph's session and whatever tokenizer it has."""

    prepared: PreparedModel
    runtime: GPT2Runtime
    tokenizer: Any  # kolite.tokenizer.Tokenizer or IdsOnlyTokenizer
    tokenizer_kind: str
    load_seconds: float
    max_batch: int = 8
    _scheduler: Scheduler | None = None

    @property
    def scheduler(self) -> Scheduler:
        """The serving scheduler over this runtime (started on first use; `close` stops it)."""
        if self._scheduler is None:
            from kolite.engine.scheduler import Scheduler, SchedulerOptions

            self._scheduler = Scheduler(self.runtime, SchedulerOptions(max_batch=self.max_batch,
                                                                       max_queue=self.max_batch, timeout=None))
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None

    @property
    def cfg(self) -> GPT2Config:
        return self.prepared.config

    @property
    def n_positions(self) -> int:
        return self.prepared.config.n_positions

    @property
    def id_limit(self) -> int:
        """Prompt ids stay below this: inside both the embedding and the tokenizer's vocab."""
        vocab = getattr(self.tokenizer, "vocab_size", None)
        return min(self.cfg.vocab_size, vocab) if vocab else self.cfg.vocab_size

    def sequence(self, prompt_ids: list[int], new_tokens: int) -> GenSequence:
        """Greedy, `ignore_eos`: a random model may emit eos at any step, and nothing may stop early."""
        from kolite.engine.sampling import SamplingParams
        from kolite.engine.sequence import Sequence as GenSequence

        params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
        return GenSequence(prompt_ids, params, self.tokenizer, self.n_positions)


def open_model(settings: ModelSettings, *, with_tokenizer: bool) -> BenchModel:
    """Open the converted graph (call after setup converted it) and time it: a `serve` start's load.

    With a tokenizer this is exactly `load_model` (cache lookup, tokenizer, chat template, session);
    without one, the same minus the tokenizer.
    """
    from kolite.convert.prepare import prepare_model
    from kolite.engine.runtime import GPT2Runtime, RuntimeOptions
    from kolite.service import load_model

    if with_tokenizer:
        lm = load_model(settings)
        return BenchModel(lm.prepared, lm.runtime, lm.tokenizer, f"{lm.tokenizer.profile.name} tokenizer",
                          lm.load_seconds)
    started = time.perf_counter()
    prepared = prepare_model(settings, progress=lambda _msg: None)
    runtime = GPT2Runtime(prepared.graph, prepared.config, RuntimeOptions(threads=settings.threads))
    return BenchModel(prepared, runtime, IdsOnlyTokenizer(), "none (token-id prompts; text decoding not measured)",
                      time.perf_counter() - started)


def prompt_ids(n: int, limit: int, seed: int = 0) -> list[int]:
    """`n` seeded pseudo-random ids below `limit`, past the first control ids where the vocab allows."""
    low = 16 if limit > 64 else 0
    return np.random.default_rng(seed).integers(low, limit, size=n).tolist()
