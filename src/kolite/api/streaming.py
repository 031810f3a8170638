"""Server-Sent Events and client-disconnect handling shared by every route that generates.

A client that goes away cancels its request: streaming responses notice through sse-starlette
(the generator is closed), plain responses through a watcher on the ASGI receive channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request

from kolite.api.errors import error_event
from kolite.api.server import MARGIN_S
from kolite.api.serving import Generation
from kolite.service import EventStream

log = logging.getLogger(__name__)
T = TypeVar("T")


def sse_response(payloads: AsyncIterator[str], stream: EventStream) -> EventSourceResponse:
    """Stream `payloads` as `data:` events, then `data: [DONE]`; an error mid-stream becomes an
    OpenAI error event. Closing the connection cancels the request."""

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for data in payloads:
                yield {"data": data}
        except Exception as exc:  # the status line is sent: report in-band, as OpenAI does
            log.warning("stream ended with an error: %s", exc)
            yield {"data": error_event(exc)}
        finally:
            stream.cancel()
        yield {"data": "[DONE]"}

    # At shutdown sse-starlette would cancel the stream at once; the grace lets kolite's drain end it with
    # its error event and [DONE] (kolite.api.server).
    # sep "\n": OpenAI's streams end their lines with LF, and some clients split on "\n\n" only.
    return EventSourceResponse(events(), ping=15, sep="\n", shutdown_grace_period=MARGIN_S,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def respond(request: Request, streaming: bool, generation: Generation) -> object:
    """What a generation route returns: the stream as Server-Sent Events, or the whole answer (a
    disconnecting client cancels either)."""
    if streaming:
        return sse_response(generation.chunks(), generation.stream)
    return await until_disconnect(request, generation.stream, generation.response())


async def until_disconnect(request: Request, stream: EventStream, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel the request (it leaves within a step)."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()
        stream.cancel()
