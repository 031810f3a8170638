"""SIGTERM and SIGINT: drain, let running requests finish or end them with an error the client sees,
then exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kolite.api.app import create_app
from kolite.config import ServerSettings
from kolite.service import LoadedModel, State
from tests.api.live_server import LiveServer, slowed
from tests.conftest import make_service


def _stream(base: str, model: str, max_tokens: int, out: dict) -> None:
    """A streaming completion; collects its data lines."""
    lines = []
    with httpx.stream("POST", base + "/v1/completions", timeout=30, json={
            "model": model, "prompt": "안녕", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: "):])
    out["data"] = lines


def _drained(tiny_loaded: LoadedModel, tiny_model_dir: Path, shutdown_timeout: float, max_tokens: int) -> dict:
    """Start a stream, send the server SIGTERM's handler mid-stream, probe it while it drains."""
    svc = make_service(tiny_loaded, tiny_model_dir)
    app = create_app(server_settings=ServerSettings(), service=svc)
    server = LiveServer(app, shutdown_timeout=shutdown_timeout).start()
    assert svc.wait_loaded(10) is State.READY
    out: dict = {}
    with slowed(tiny_loaded.runtime, 0.02):
        client = threading.Thread(target=_stream, args=(server.url, tiny_model_dir.name, max_tokens, out))
        client.start()
        time.sleep(0.3)  # the stream is running
        server.server.handle_exit(signal.SIGTERM, None)
        health = httpx.get(server.url + "/health", timeout=5)
        new = httpx.post(server.url + "/generate", json={"prompt": "안녕"}, timeout=5)
        client.join(30)
        server._thread.join(15)
    out.update(health=(health.status_code, health.json()), new=(new.status_code, new.json()),
               exited=not server._thread.is_alive())
    return out


def test_sigterm_lets_a_running_stream_finish(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    """Within --shutdown-timeout the stream ends normally (finish reason, [DONE]); meanwhile /health is
    503 "draining" and new requests get 503; then the server exits."""
    out = _drained(tiny_loaded, tiny_model_dir, shutdown_timeout=20, max_tokens=60)
    assert out["status"] == 200 and out["data"][-1] == "[DONE]"
    assert json.loads(out["data"][-2])["choices"][0]["finish_reason"] == "length"
    assert out["health"] == (503, {"status": "draining", "model": tiny_model_dir.name})
    assert out["new"][0] == 503 and "shutting down" in out["new"][1]["error"]["message"]
    assert out["exited"]


def test_sigterm_ends_a_stream_that_outlasts_the_timeout_with_an_error(tiny_loaded: LoadedModel,
                                                                       tiny_model_dir: Path) -> None:
    """Past --shutdown-timeout the stream gets an error event it can see, then [DONE], never a cut."""
    out = _drained(tiny_loaded, tiny_model_dir, shutdown_timeout=0.5, max_tokens=120)
    assert out["status"] == 200 and out["data"][-1] == "[DONE]"
    error = json.loads(out["data"][-2])["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert out["exited"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_kolite_serve_exits_0_on_a_signal(tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """A real `kolite serve`, ready, then the signal: a drained shutdown is a normal exit (status 0, not -15)."""
    port = _free_port()
    env = {**os.environ, "KOLITE_MODEL": str(tiny_model_dir), "KOLITE_KOLITE_HOME": str(tmp_path / "home"),
           "KOLITE_PORT": str(port), "KOLITE_THREADS": "1", "KOLITE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "kolite.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).json()["service_status"] == "READY":
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kolite_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    """A load failure a retry cannot fix: one clear line, no traceback, exit status 1 (systemd, Docker)."""
    env = {**os.environ, "KOLITE_MODEL": str(tmp_path / "no-such-model"), "KOLITE_KOLITE_HOME": str(tmp_path / "home"),
           "KOLITE_PORT": str(_free_port()), "KOLITE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kolite.cli", "serve"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "failed" in proc.stderr
