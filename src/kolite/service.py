"""The loaded model as the API sees it: a state (LOADING / READY / ERROR) and generate/stream calls.

Loading (resolve, convert, open the session) runs on a background thread so the server answers
`GET /` at once. All generation runs on the scheduler's engine thread, which owns the session and
batches concurrent requests; the event loop only waits for events, so it never blocks on the model.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

from kolite.chat.templates import ChatTemplate, template_for
from kolite.config import ModelSettings
from kolite.convert.prepare import PreparedModel, prepare_model
from kolite.engine.runtime import GPT2Runtime, RuntimeOptions
from kolite.engine.sampling import SamplingParams
from kolite.engine.scheduler import EngineRequest, Scheduler, SchedulerOptions
from kolite.engine.sequence import Finish, Sequence, TokenEvent
from kolite.errors import (
    GenerationFailed,
    HubUnreachable,
    ModelFormatError,
    ModelNotReady,
    RequestTimeout,
    ShuttingDown,
)
from kolite.models.profiles import profile_for
from kolite.models.resolve import public_name
from kolite.models.tokenizer_config import read_chat_template, read_tokenizer_config
from kolite.tokenizer import Tokenizer

log = logging.getLogger(__name__)


RETRY_FIRST_S = 5.0  # the first wait before loading again after the hub could not be reached
RETRY_MAX_S = 300.0

class State(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    ERROR = "ERROR"


@dataclass
class LoadedModel:
    """A model ready to generate: its files, tokenizer and runtime, and the KV pool it is served with."""

    prepared: PreparedModel
    tokenizer: Tokenizer
    runtime: GPT2Runtime
    chat_template: ChatTemplate
    load_seconds: float
    kv_pool: int | None = None  # the scheduler's `max_kv_tokens`, once it serves

    @property
    def n_positions(self) -> int:
        """Tokens one request may use: the model's context window, or the KV pool when that is smaller
        (so answers that fill "the rest of the window" fit the pool instead of being refused)."""
        window = min(self.prepared.config.n_positions, self.runtime.capacity)
        return min(window, self.kv_pool) if self.kv_pool else window

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A sequence for the scheduler; 400 (ContextTooLong) when it exceeds the model's window (the
        scheduler's `submit` refuses one larger than its KV pool, KVPoolExceeded)."""
        return Sequence(prompt_ids, params, self.tokenizer, self.prepared.config.n_positions)


def load_model(settings: ModelSettings, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Resolve, convert (or reuse), then open the tokenizer and the ONNX Runtime session."""
    started = time.perf_counter()
    prepared = prepare_model(settings, progress=progress, need_tokenizer=True)
    files = prepared.files
    config = read_tokenizer_config(files.tokenizer_config)  # parsed once, for the profile and the template
    profile = profile_for(files.repo_id or files.name, files.tokenizer or files.vocab, config)
    tokenizer = Tokenizer.from_files(files.tokenizer, profile, vocab=files.vocab, merges=files.merges)
    chat_template = template_for(tokenizer, read_chat_template(files.tokenizer_config, files.chat_template,
                                                               config=config))
    # A slot never holds more than the pool, and attention's prefill scratch is [heads, chunk, capacity]:
    # a pool smaller than the context window makes both smaller.
    capacity = min(prepared.config.n_positions, settings.max_kv_tokens)
    runtime = GPT2Runtime(prepared.graph, prepared.config, RuntimeOptions(threads=settings.threads), capacity=capacity)
    if runtime.io_spec() != prepared.manifest.get("graph_io"):
        raise ModelFormatError(f"the converted graph {prepared.graph} does not have the inputs and outputs its "
                               f"manifest records: delete {prepared.graph.parent} and it is converted again")
    return LoadedModel(prepared, tokenizer, runtime, chat_template, time.perf_counter() - started)


class ModelService:
    """Owns the model's lifecycle and its scheduler (the engine thread)."""

    def __init__(self, settings: ModelSettings,
                 loader: Callable[[ModelSettings], LoadedModel] = load_model,
                 scheduler_options: SchedulerOptions | None = None) -> None:
        self.settings = settings
        self.model_name = public_name(settings.model)  # a local folder by its name, never its path
        self._loader = loader
        options = scheduler_options or SchedulerOptions()
        if options.max_kv_tokens is None:  # the setting, unless the caller chose a pool
            options = replace(options, max_kv_tokens=settings.max_kv_tokens)
        self._scheduler_options = options
        self.state = State.LOADING
        self.error: str | None = None
        self.model: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self._loading: threading.Thread | None = None
        self.draining = False  # SIGTERM/SIGINT: no new requests, running ones finish (see kolite.api.server)
        self.on_fatal: Callable[[], None] | None = None  # called when loading failed for good
        self._stopped = threading.Event()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()

    # lifecycle -----------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load in the background (once); the state says how it went, never LOADING forever."""
        if self._loading is not None:
            return
        self._loading = threading.Thread(target=self._load, name="kolite-loader", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        """Load once; a hub that cannot be reached is retried with backoff (GET / says ERROR and why
        meanwhile), any other failure is final: one clear log line (the traceback at debug level), state
        ERROR, and `on_fatal` (the server then exits non-zero, so a service manager sees it)."""
        delay = RETRY_FIRST_S
        while True:
            try:
                model = self._loader(self.settings)
                self.scheduler = Scheduler(model.runtime, self._scheduler_options)
                self.model = model = replace(model, kv_pool=self.scheduler.kv_pool)  # a copy: loaders may share one
                break
            except HubUnreachable as exc:
                self.error = f"{type(exc).__name__}: {exc} (retrying in {delay:g}s)"
                self.state = State.ERROR
                log.warning("loading %s: %s", self.model_name, self.error)
                if self._stopped.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
            except Exception as exc:  # any other failure must surface as ERROR with its reason
                self.error = f"{type(exc).__name__}: {exc}"
                self.state = State.ERROR
                log.error("loading %s failed: %s", self.model_name, self.error)
                log.debug("loading %s failed", self.model_name, exc_info=True)
                if self.on_fatal is not None:
                    self.on_fatal()
                return
        log.info("model %s ready (%s, %.1fs)", self.model_name, model.prepared.precision, model.load_seconds)
        self.state = State.READY
        self.error = None

    def wait_loaded(self, timeout: float | None = None) -> State:
        if self._loading is not None:
            self._loading.join(timeout)
        return self.state

    def shutdown(self) -> None:
        """Stop the engine: requests still running end with ShuttingDown (503, an error event in a stream)."""
        self.draining = True
        self._stopped.set()
        if self.scheduler is not None:
            self.scheduler.stop()

    def busy(self) -> bool:
        """Whether any request is running or waiting in the engine."""
        return self.scheduler is not None and self.scheduler.busy

    def begin_drain(self) -> None:
        """Take no new requests (503) and report not-ready in /health; running ones go on."""
        self.draining = True

    # generation ----------------------------------------------------------------------------
    def ready_model(self) -> LoadedModel:
        if self.draining:
            raise ShuttingDown("the server is shutting down: it takes no new requests")
        if self.state is State.READY and self.model is not None:
            return self.model
        if self.state is State.ERROR:
            raise ModelNotReady(f"model {self.model_name} failed to load: {self.error}")
        raise ModelNotReady(f"model {self.model_name} is still loading; retry shortly")

    def submit(self, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, *,
               on_finish: Callable[[EventStream, Finish], None] | None = None) -> EventStream:
        """Queue a request for `model` (what `ready_model()` returned: readiness is checked there, once) now,
        so 400/429/503 are raised before any response starts, and return its events. `on_finish` sees
        the final event (the API logs prompts with it). Call from the event loop's thread."""
        assert self.scheduler is not None and model is self.model
        seq = model.new_sequence(prompt_ids, params)  # the context window; submit checks the KV pool
        mailbox = self._mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[TokenEvent | Finish] = asyncio.Queue()
        request = self.scheduler.submit(seq, lambda ev: mailbox.post(queue, ev))
        return EventStream(request, queue, self._scheduler_options.timeout, on_finish)

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = _Mailbox(loop)
        return box


class _Mailbox:
    """Hands engine events to an event loop, waking it once per batch of events rather than once
    per token per request (a decode step of 8 rows is one wake-up, not 8)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[tuple[asyncio.Queue, TokenEvent | Finish]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event: TokenEvent | Finish) -> None:
        with self._lock:
            self._items.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, event in items:
            queue.put_nowait(event)


class EventStream:
    """A submitted request's events: `TokenEvent`s, then one `Finish` (stop or length).

    Engine failures, timeouts and a stop by the server's shutdown arrive as exceptions. `cancel()` (also
    called when the consumer stops early) takes the request out of the queue or the batch within one
    decode step.
    """

    def __init__(self, request: EngineRequest, queue: asyncio.Queue[TokenEvent | Finish], timeout: float | None,
                 on_finish: Callable[[EventStream, Finish], None] | None = None) -> None:
        self._request = request
        self._queue = queue
        self._timeout = timeout
        self._on_finish = on_finish
        self.first_token_at: float | None = None  # when the consumer got the first token (time to first token)
        self._cancelled = False
        self.finish: Finish | None = None

    @property
    def submitted_at(self) -> float:
        return self._request.submitted_at

    @property
    def started_at(self) -> float | None:
        """When the engine began its prefill (None while it waits in the queue)."""
        return self._request.started_at

    def cancel(self) -> None:
        self._cancelled = True
        self._request.cancel()  # a no-op once it finished

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent | Finish:
        if self.finish is not None:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, Finish):
            if event.reason == "error":
                raise GenerationFailed("generation failed in the engine")
            if event.reason == "timeout":
                raise RequestTimeout(f"the request ran past its time limit of {self._timeout:g}s")
            if event.reason == "cancelled" and not self._cancelled:  # the engine stopped: shutdown
                raise ShuttingDown("the server is shutting down: the request was stopped before it finished")
            self.finish = event
            if self._on_finish is not None:
                self._on_finish(self, event)
        elif self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return event

    async def result(self) -> Finish:
        async for _ in self:
            pass
        if self.finish is None:
            raise GenerationFailed("generation ended without a result")
        return self.finish
