"""The loaded model as the API sees it: a state (LOADING / READY / ERROR) and a generate call.

Loading (resolve, convert, open the session) runs on a background thread so the server answers
`GET /` at once. All generation runs on one engine thread that owns the session: requests wait
their turn instead of fighting over the cores, and the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kolite.config import ModelSettings
from kolite.engine.generate import collect, run_sequence
from kolite.engine.runtime import GPT2Runtime, RuntimeOptions
from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import Finish, Sequence
from kolite.errors import GenerationFailed, KoliteError, ModelNotReady
from kolite.models.convert import PreparedModel, prepare_model
from kolite.models.profiles import profile_for
from kolite.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    ERROR = "ERROR"


@dataclass
class LoadedModel:
    """A model ready to generate: its files, tokenizer and runtime."""

    prepared: PreparedModel
    tokenizer: Tokenizer
    runtime: GPT2Runtime
    load_seconds: float

    @property
    def n_positions(self) -> int:
        return self.prepared.config.n_positions

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        return Sequence(prompt_ids, params, self.tokenizer, self.n_positions)


def load_model(settings: ModelSettings, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Resolve, convert (or reuse), then open the tokenizer and the ONNX Runtime session."""
    started = time.perf_counter()
    prepared = prepare_model(settings, progress=progress)
    files = prepared.files
    profile = profile_for(files.repo_id or files.name, files.tokenizer or files.vocab, files.tokenizer_config)
    tokenizer = Tokenizer.from_files(files.tokenizer, profile, vocab=files.vocab, merges=files.merges)
    runtime = GPT2Runtime(prepared.graph, prepared.config, RuntimeOptions(threads=settings.threads))
    return LoadedModel(prepared, tokenizer, runtime, time.perf_counter() - started)


class ModelService:
    """Owns the model's lifecycle and the engine thread."""

    def __init__(self, settings: ModelSettings,
                 loader: Callable[[ModelSettings], LoadedModel] = load_model) -> None:
        self.settings = settings
        self.model_name = settings.model
        self._loader = loader
        self.state = State.LOADING
        self.error: str | None = None
        self.model: LoadedModel | None = None
        self._engine = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolite-engine")
        self._loading: threading.Thread | None = None

    # lifecycle -----------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load in the background (once); the state says how it went, never LOADING forever."""
        if self._loading is not None:
            return
        self._loading = threading.Thread(target=self._load, name="kolite-loader", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        try:
            self.model = self._loader(self.settings)
        except Exception as exc:  # any failure must surface as ERROR with its reason
            log.exception("loading %s failed", self.model_name)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = State.ERROR
            return
        log.info("model %s ready (%s, %.1fs)", self.model_name, self.model.prepared.precision,
                 self.model.load_seconds)
        self.state = State.READY

    def wait_loaded(self, timeout: float | None = None) -> State:
        if self._loading is not None:
            self._loading.join(timeout)
        return self.state

    def shutdown(self) -> None:
        self._engine.shutdown(wait=False, cancel_futures=True)

    # generation ----------------------------------------------------------------------------
    def ready_model(self) -> LoadedModel:
        if self.state is State.READY and self.model is not None:
            return self.model
        if self.state is State.ERROR:
            raise ModelNotReady(f"model {self.model_name} failed to load: {self.error}")
        raise ModelNotReady(f"model {self.model_name} is still loading; retry shortly")

    def encode(self, text: str) -> list[int]:
        return self.ready_model().tokenizer.encode(text)

    def _generate_blocking(self, prompt_ids: list[int], params: SamplingParams,
                           cancelled: threading.Event) -> Finish:
        model = self.ready_model()
        seq = model.new_sequence(prompt_ids, params)
        try:
            return collect(run_sequence(model.runtime, seq, cancelled.is_set))
        except KoliteError:
            raise
        except Exception as exc:
            log.exception("generation failed")
            raise GenerationFailed(f"generation failed: {type(exc).__name__}") from exc

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Finish:
        """Generate on the engine thread; if the caller is cancelled, the work stops within a token."""
        model = self.ready_model()
        model.new_sequence(prompt_ids, params)  # validate (context size) before queueing
        cancelled = threading.Event()
        future = self._engine.submit(self._generate_blocking, prompt_ids, params, cancelled)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancelled.set()
            future.cancel()
            raise
