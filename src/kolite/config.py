"""Every setting once, read from flags or `KOLITE_*` environment variables (pydantic-settings).

Model settings (what to load and how) are apart from server settings (where to listen), as in
llama-cpp-python, so `kolite pull` needs only the first and `kolite serve` both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "skt/kogpt2-base-v2"
Precision = Literal["auto", "int8", "int4", "fp32"]
Int8Scheme = Literal["per-token", "ort-dynamic"]
Int8WeightsSetting = Literal["auto", "s8", "u8"]
KVCache = Literal["auto", "float", "int8"]
# `--kv-cache auto` picks int8 on machines with this much memory or less (a 1 or 2 GB Pi, a container
# limited so): half the cache per token, for prompts that prefill 30-50% slower (benchmarks/RESULTS.md).
SMALL_MEMORY_BYTES = 2 * 2**30
# The KV pool's default: 4 full KoGPT2 contexts, or 8 streams of 512 tokens (144 MB in float16 for KoGPT2).
# Why not max_batch x 1024: 8 full contexts are 288 MB of cache alone; with the ~270 MB a warm server holds
# and a long prompt's scratch that is ~0.65 GB, too much for a 1 GB board beside its system.
DEFAULT_MAX_KV_TOKENS = 4096


def default_threads() -> int:
    """Intra-op threads: one per CPU this process may use (a Pi 4 has 4 cores).

    Both limits count: the affinity mask (taskset, cpusets) and the cgroup CPU quota (`docker run
    --cpus 2`, a Kubernetes CPU limit), which leaves every core visible but throttles the process;
    more threads than the quota allows spin against each other and run slower.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """CPUs allowed by this process's cgroup quota (rounded up), or None when unlimited or unknown.

    cgroup v2: `cpu.max` ("QUOTA PERIOD" or "max PERIOD") in the process's cgroup and each parent up to
    the mount; cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us`. The smallest limit wins.
    """
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        rel = path.strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base = next((root / d for d in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if (root / d).is_dir()), root / "cpu")
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        folder = base / rel
        while True:
            limit = _read_quota(folder, files)
            if limit:
                limits.append(limit)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    if not limits:
        return None
    return max(1, math.ceil(min(limits) - 1e-9))


def _read_quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            quota, period = (folder / files[0]).read_text(encoding="utf-8").split()[:2]
        else:
            quota, period = ((folder / f).read_text(encoding="utf-8").strip() for f in files)
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or not period.isdigit() or int(period) == 0:
        return None
    try:
        return int(quota) / int(period)
    except ValueError:
        return None


def memory_limit_bytes(meminfo: Path = Path("/proc/meminfo"), root: Path = Path("/sys/fs/cgroup"),
                       proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The memory this process may use: the machine's (MemTotal) or its cgroup's limit if smaller
    (v2 `memory.max`, v1 `memory.limit_in_bytes`, in its cgroup and each parent); None when unknown."""
    limits: list[int] = []
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.strip().lstrip("/")
        while True:
            try:
                text = (folder / name).read_text(encoding="ascii").strip()
                if text.isdigit() and int(text) < 2**60:  # "max", or v1's huge "unlimited"
                    limits.append(int(text))
            except OSError:
                pass
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def default_kolite_home() -> Path:
    """Converted graphs live beside the hub cache so one `rm -r` forgets a model."""
    return Path(os.environ.get("KOLITE_HOME", Path.home() / ".cache" / "kolite"))


class ModelSettings(BaseSettings):
    """What model to load and how to run it."""

    model_config = SettingsConfigDict(env_prefix="KOLITE_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="Hub id (e.g. skt/kogpt2-base-v2, distilgpt2) or a local folder.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default: main.")
    precision: Precision = Field(
        "auto", description="auto (the best measured for this CPU: int8), int8 (per-channel weights), "
        "int4 (4-bit blocks, smaller and less exact) or fp32.")
    int8_scheme: Int8Scheme = Field(
        "per-token",
        description="int8 activations: per-token (each token its own scale: results never depend on batching) "
        "or ort-dynamic (onnxruntime's quantize_dynamic: one scale per tensor).",
    )
    int8_weights: Int8WeightsSetting = Field(
        "auto", description="How int8 weights are stored: auto (the form exact on this CPU), s8 (fastest with VNNI, "
        "AMX or ARM; saturates on x86 without VNNI) or u8 (exact on every CPU). For converting on one machine for "
        "another.")
    kv_cache: KVCache = Field(
        "auto", description="KV cache: float (float16 for int8/int4 models, float32 for fp32), int8 (half the "
        "memory per token of float16, scales calibrated at conversion; long prompts prefill a third to a half "
        "slower) or auto (int8 where the machine or its container has 2 GB of memory or less, else float).")
    cache_dir: Path | None = Field(None, description="Hub download cache (default: HF_HOME's hub cache).")
    kolite_home: Path = Field(default_factory=default_kolite_home, description="Where converted graphs go.")
    threads: int = Field(default_factory=default_threads, ge=1, le=256, description="ONNX Runtime threads.")
    max_kv_tokens: int = Field(
        DEFAULT_MAX_KV_TOKENS, ge=2, le=1_048_576,
        description="KV cache tokens all running requests may hold together (each reserves its prompt + max new "
        "tokens); more requests wait in the queue, one larger than this is refused (400). 4096 = 144 MB for KoGPT2 "
        "int8: a server peak of about 0.5 GB, which leaves a 1 GB board room.")
    local_files_only: bool = Field(False, description="Never touch the network (also set by HF_HUB_OFFLINE=1).")


class ServerSettings(BaseSettings):
    """Where and how the HTTP server listens."""

    model_config = SettingsConfigDict(env_prefix="KOLITE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    max_batch: int = Field(8, ge=1, le=256, description="Requests decoded together in one batch.")
    max_queue: int = Field(64, ge=0, le=100_000, description="Requests waiting for a batch slot; more get HTTP 429.")
    request_timeout: float = Field(600.0, gt=0, description="Seconds a request may take before it is stopped (504).")
    shutdown_timeout: float = Field(
        30.0, ge=0, le=3600, description="Seconds running requests get to finish after SIGTERM/SIGINT; those still "
        "running then end with an error the client sees (and [DONE] when streaming).")
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a connection has to send a whole request (headers and body); "
        "then it is closed (connections that send nothing, or too little, are never kept open).")
    max_connections: int = Field(
        512, ge=1, le=1_000_000, description="Connections and requests served at once; more get 503 at once "
        "(below the usual limit of 1024 open files, so /health and new clients are still answered).")
    max_body_bytes: int = Field(
        2 * 2**20, ge=1024, le=1 << 40,
        description="Largest request body accepted; a larger one gets 413 before it is read (KoGPT2's whole "
        "1024-token window is a few KB of text).")
    served_model_name: str | None = Field(
        None, description="Model name the API shows and accepts (default: --model, a local folder by its name only).")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API key clients must send as `Authorization: Bearer KEY`; repeat the flag "
        "(or comma-separate the env var) for several. None: no key needed. / and /health stay open.")
    api_key_file: Path | None = Field(None, description="A file of API keys, one per line (# comments allowed).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS), e.g. "
        "http://localhost:3000; '*' for any. None: CORS off.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host header values accepted (against DNS rebinding); '*.lan' wildcards. "
        "Default: localhost names when bound to a loopback address, any host otherwise.")

    @field_validator("api_key", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """A plain env var (KOLITE_API_KEY=a,b) or one flag value is a comma-separated list."""
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [v.strip() for item in value for v in str(item).split(",") if v.strip()]
        return value

    def api_keys(self) -> list[str]:
        """--api-key values and the lines of --api-key-file, together."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read --api-key-file {self.api_key_file}: {exc}") from exc
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys

    def trusted_hosts(self) -> list[str]:
        """The Host headers to accept: the setting, else localhost names on a loopback bind, else any."""
        if self.allowed_hosts:
            return self.allowed_hosts
        if self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127."):
            return ["localhost", "127.0.0.1", "::1", "[::1]", self.host]
        return ["*"]

    @property
    def binds_all_interfaces(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")
    log_prompts: bool = Field(False, description="Write prompts and outputs to the log (off: they are private).")
    log_level: str = Field("info", description="uvicorn/kolite log level.")
