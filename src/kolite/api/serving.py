"""What every generation route shares between its schema and the service: a submitted request
(`Generation`: the event stream, the whole answer, the streamed chunks), prompt logging, and the
usage and finish reason both APIs report.

Each API has a serving class on this base (`simple_serving.SimpleServing` for `/generate`,
`openai_serving.OpenAIServing` for `/v1/...`): a route parses its body, calls one serving method and
returns what `streaming.respond` makes of the `Generation`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel

from kolite.api.metrics import Metrics
from kolite.api.protocol import Usage
from kolite.engine.sampling import SamplingParams
from kolite.engine.sequence import Finish
from kolite.errors import KoliteError
from kolite.service import EventStream, LoadedModel, ModelService

log = logging.getLogger("kolite.api")


@dataclass(frozen=True)
class Generation:
    """A request queued in the engine; `response()` awaits the whole answer, `chunks()` streams it."""

    stream: EventStream
    response: Callable[[], Awaitable[BaseModel]]
    chunks: Callable[[], AsyncIterator[str]]


class Serving:
    """The service, and the `--log-prompts` switch every route honours."""

    param_names: ClassVar[Mapping[str, str]] = {}  # engine parameter -> the name this API's requests use

    def __init__(self, service: ModelService, *, log_prompts: bool = False, metrics: Metrics | None = None) -> None:
        self.service = service
        self.log_prompts = log_prompts
        self.metrics = metrics

    def submit(self, model: LoadedModel, prompt: str, prompt_ids: list[int], params: SamplingParams) -> EventStream:
        """Queue the request; when it finishes its figures go to the metrics and, with `log_prompts`, its
        prompt and output to the log."""
        def finished(stream: EventStream, finish: Finish) -> None:
            if self.log_prompts:
                log.info("prompt=%r output=%r", prompt, finish.text)
            if self.metrics is not None:
                self.metrics.observe(stream, finish)

        try:
            return self.service.submit(model, prompt_ids, params, on_finish=finished)
        except KoliteError as exc:  # name the field this API's client sent (max_tokens, not max_new_tokens)
            sent = self.param_names.get(getattr(exc, "param", None) or "")
            if sent:
                exc.param = sent  # type: ignore[attr-defined]
                exc.args = tuple(str(a).replace("max_new_tokens", sent) for a in exc.args)
            raise


def usage_of(finish: Finish) -> Usage:
    return Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
                 total_tokens=finish.prompt_tokens + finish.completion_tokens)


def finish_reason_of(finish: Finish) -> Literal["stop", "length"]:
    """What both APIs report: `length` at the token limit, `stop` for everything that ended it early."""
    return "length" if finish.reason == "length" else "stop"
