"""Who may call the API: API keys (`--api-key`), browser origins (CORS, `--cors-origins`) and the Host
header (`--allowed-hosts`, against DNS rebinding), as middleware around every route.

kolite sits on home networks: a server bound to all interfaces without a key answers anyone on the
LAN, and a browser page anywhere can reach a loopback server through a rebound DNS name unless the
Host header is checked.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from kolite.api.errors import send_error

OPEN_PATHS = frozenset({"/", "/health"})  # status and health stay open: service managers probe them


class ApiKeyAuth:
    """`Authorization: Bearer KEY` with one of `keys` on every route but OPEN_PATHS (and CORS preflights,
    which browsers send without credentials); 401 in OpenAI's error shape otherwise. Every key is compared
    in constant time, all of them each time, so the answer's timing says nothing about a key."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token.strip(), key)
        if scheme.lower() == b"bearer" and matched:
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if header else
                   "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
        await send_error(send, 401, message, "invalid_api_key", ((b"www-authenticate", b'Bearer realm="kolite"'),))
