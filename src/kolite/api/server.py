"""Running the app under uvicorn with kolite's shutdown: drain, then exit 0.

On SIGTERM or SIGINT kolite drains before uvicorn shuts down: `/health` answers 503 and new requests
get 503 at once (`ModelService.begin_drain`; the server keeps listening, so probes see the drain),
running requests get `--shutdown-timeout` seconds to finish, and those still running then are
stopped so that each ends with an error its client can see (a streamed one with an error event and
`[DONE]`). Only then is uvicorn told to exit: it stops accepting, lets the last events out and runs
the app's shutdown. uvicorn re-raises the signal after a graceful shutdown, so the process would die
of it (status -15); a drained shutdown is a normal exit here, status 0. A second signal ends the drain
at once (a second SIGINT forces uvicorn's exit, as uvicorn does).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn

from kolite.api.http_protocol import with_timeout

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
MARGIN_S = 2.0  # uvicorn (and sse-starlette) wait this much longer, so stopped requests send their last event


class KoliteServer(uvicorn.Server):
    """uvicorn's server with kolite's drain on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float) -> None:
        config.timeout_graceful_shutdown = shutdown_timeout + MARGIN_S
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self._drain: threading.Thread | None = None
        self.exit_code = 0
        if self.service is not None:
            self.service.on_fatal = self._fatal  # type: ignore[attr-defined]

    def _fatal(self) -> None:
        """Loading failed for good: exit with status 1, so systemd or Docker see the failure."""
        self.exit_code = 1
        self.should_exit = True

    @property
    def service(self) -> object:
        return getattr(getattr(self.config.app, "state", None), "service", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        svc = self.service
        if svc is None or self._drain is not None:  # no service to drain, or a second signal: exit now
            self._exit(sig)
            return
        log.info("%s: draining; running requests get %gs to finish", signal.Signals(sig).name, self.shutdown_timeout)
        svc.begin_drain()  # type: ignore[attr-defined]
        self._drain = threading.Thread(target=self._drain_then_exit, args=(svc, sig), name="kolite-drain",
                                       daemon=True)
        self._drain.start()

    def _drain_then_exit(self, svc: object, sig: int) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while time.monotonic() < deadline and svc.busy():  # type: ignore[attr-defined]
            time.sleep(0.05)
        svc.shutdown()  # type: ignore[attr-defined]  # what still runs ends with an error its client sees
        self._exit(sig)

    def _exit(self, sig: int) -> None:
        """uvicorn's own exit (a second SIGINT forces it), without the signal being raised again later.

        Not through `super().handle_exit`: sse-starlette patches that to set a process-wide flag that
        is never cleared, which would cut every stream of a later server in the same process.
        """
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, without raising the signal again after the shutdown: draining is a normal exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run(app: object, *, host: str, port: int, log_level: str, shutdown_timeout: float, header_timeout: float,
        max_connections: int) -> int:
    """Serve `app` until SIGTERM/SIGINT (then drain, see the module docstring) or a load failure that a
    retry cannot fix; returns the process's exit status (0, or 1 for that failure). Each request must
    arrive within `header_timeout` (`kolite.api.http_protocol`); past `max_connections` uvicorn answers 503."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,  # type: ignore[arg-type]
                            http=with_timeout(header_timeout), limit_concurrency=max_connections)
    server = KoliteServer(config, shutdown_timeout)
    server.run()
    return server.exit_code
