"""Request ids: every answer carries `x-request-id` (the client's `X-Request-ID` if it sent a sane one,
else a new one), streaming answers included, so a client's report can be matched with the server's log."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str] = ContextVar("kolite_request_id", default="-")
_SANE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # echoed into headers and logs: nothing that could inject


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE.match(given) else f"req-{uuid.uuid4().hex[:24]}"
        token = REQUEST_ID.set(rid)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            REQUEST_ID.reset(token)
