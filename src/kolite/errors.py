"""One error hierarchy for kolite; `kolite.api.errors` maps each class to an HTTP status in one place."""

from __future__ import annotations


class KoliteError(Exception):
    """Base of every error kolite raises on purpose."""


class InvalidRequest(KoliteError):
    """The caller asked for something impossible (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLong(InvalidRequest):
    """Prompt plus requested tokens do not fit the model's context window (HTTP 400)."""


class KVPoolExceeded(ContextTooLong):
    """Prompt plus requested tokens need more KV cache than the server's whole pool (`max_kv_tokens`)
    holds (HTTP 400): such a request could never be admitted, so it is refused instead of waiting."""


class ModelNotReady(KoliteError):
    """The model is still loading or failed to load (HTTP 503)."""


class ModelNotFound(KoliteError):
    """A model name or folder that cannot be resolved to files (HTTP 404 in the API)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class HubUnreachable(ModelNotFound):
    """The hub could not be reached and the model is not in the local cache: a retry may fix it."""


class ModelFormatError(KoliteError):
    """Checkpoint files exist but are not a GPT-2 family model kolite can convert."""


class UnsafeCheckpoint(ModelFormatError):
    """A pickled checkpoint tried to load something other than plain tensors."""


class ShuttingDown(ModelNotReady):
    """The server stopped while the request ran (HTTP 503): the client sees an error, never a normal end."""


class Overloaded(KoliteError):
    """The request queue is full (HTTP 429)."""


class RequestTimeout(KoliteError):
    """A request ran past its time limit and was stopped (HTTP 504)."""


class GenerationFailed(KoliteError):
    """The engine failed while generating (HTTP 500)."""
