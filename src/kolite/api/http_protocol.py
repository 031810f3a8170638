"""uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and body.

Why: uvicorn closes idle keep-alive connections, but a connection that never sends a request, or
sends half its headers, or a body shorter than its Content-Length, was kept open forever; with the
usual limit of 1024 open files, about a thousand of them locked every client out. Here a request
must arrive whole within `request_timeout` seconds of the connection opening (or of the previous
answer on a kept-alive one), or the connection is closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    request_timeout = 10.0  # set per server by `with_timeout`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and not cycle.more_body:  # headers and body are in: the deadline is met
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            return  # it is being answered: not ours to cut
        self.transport.close()


def with_timeout(seconds: float) -> type[TimedH11Protocol]:
    """The protocol class with this request deadline (uvicorn takes a class, not an instance)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"request_timeout": seconds})
