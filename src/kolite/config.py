"""Every setting once, read from flags or `KOLITE_*` environment variables (pydantic-settings).

Model settings (what to load and how) are apart from server settings (where to listen), as in
llama-cpp-python, so `kolite pull` needs only the first and `kolite serve` both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "skt/kogpt2-base-v2"
Precision = Literal["int8", "int4", "fp32"]
Int8Scheme = Literal["per-token", "ort-dynamic"]


def default_threads() -> int:
    """Intra-op threads: one per CPU this process may run on (a Pi 4 has 4 cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def default_kolite_home() -> Path:
    """Converted graphs live beside the hub cache so one `rm -r` forgets a model."""
    return Path(os.environ.get("KOLITE_HOME", Path.home() / ".cache" / "kolite"))


class ModelSettings(BaseSettings):
    """What model to load and how to run it."""

    model_config = SettingsConfigDict(env_prefix="KOLITE_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="Hub id (e.g. skt/kogpt2-base-v2, distilgpt2) or a local folder.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default: main.")
    precision: Precision = Field(
        "int8", description="int8 (per-channel weights), int4 (4-bit blocks, smaller and less exact) or fp32.")
    int8_scheme: Int8Scheme = Field(
        "per-token",
        description="int8 activations: per-token (each token its own scale: results never depend on batching) "
        "or ort-dynamic (onnxruntime's quantize_dynamic: one scale per tensor).",
    )
    cache_dir: Path | None = Field(None, description="Hub download cache (default: HF_HOME's hub cache).")
    kolite_home: Path = Field(default_factory=default_kolite_home, description="Where converted graphs go.")
    threads: int = Field(default_factory=default_threads, ge=1, le=256, description="ONNX Runtime threads.")
    local_files_only: bool = Field(False, description="Never touch the network (also set by HF_HUB_OFFLINE=1).")


class ServerSettings(BaseSettings):
    """Where and how the HTTP server listens."""

    model_config = SettingsConfigDict(env_prefix="KOLITE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    max_batch: int = Field(8, ge=1, le=256, description="Requests decoded together in one batch.")
    max_queue: int = Field(64, ge=0, le=100_000, description="Requests waiting for a batch slot; more get HTTP 429.")
    request_timeout: float = Field(600.0, gt=0, description="Seconds a request may take before it is stopped (504).")
    served_model_name: str | None = Field(None, description="Model name the API shows and accepts (default: --model).")
    log_prompts: bool = Field(False, description="Write prompts and outputs to the log (off: they are private).")
    log_level: str = Field("info", description="uvicorn/kolite log level.")
