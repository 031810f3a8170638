"""Connections that send nothing, or too little, are closed; many of them do not lock clients out."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from kolite.api.app import create_app
from kolite.api.http_protocol import with_timeout
from kolite.config import ServerSettings
from kolite.service import LoadedModel, State
from tests.api.live_server import LiveServer
from tests.conftest import make_service

TIMEOUT = 0.5


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (EOF), or None if it stayed open that long."""
    sock.settimeout(seconds)
    started = time.perf_counter()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.perf_counter() - started


def test_slow_and_silent_connections_are_closed(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    svc = make_service(tiny_loaded, tiny_model_dir)
    app = create_app(server_settings=ServerSettings(), service=svc)
    server = LiveServer(app, http=with_timeout(TIMEOUT)).start()
    try:
        assert svc.wait_loaded(10) is State.READY
        addr = ("127.0.0.1", server.port)
        silent = socket.create_connection(addr)
        half = socket.create_connection(addr)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # headers never finished
        short = socket.create_connection(addr)
        short.sendall(b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\":")  # a body shorter than it said
        idle = [socket.create_connection(addr) for _ in range(200)]
        started = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # others are still served
        assert time.perf_counter() - started < 1.0
        for sock in (silent, half, short):
            waited = _closed_within(sock, 5 * TIMEOUT + 2)
            assert waited is not None and waited < 5 * TIMEOUT + 2
        assert all(_closed_within(s, 3) is not None for s in idle[:20])
        for s in (silent, half, short, *idle):
            s.close()
        r = httpx.post(server.url + "/generate", json={"prompt": "안녕", "max_new_tokens": 2}, timeout=10)
        assert r.status_code == 200  # a whole request within the deadline is served as ever
    finally:
        server.stop()
