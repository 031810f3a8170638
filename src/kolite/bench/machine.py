"""The machine a benchmark runs on: CPU, board, caches, cores, versions (reported with every result)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kolite import __version__
from kolite.config import default_threads
from kolite.engine.cpu import detect

if TYPE_CHECKING:
    pass


MB = 2**20


def read_sysfile(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's name (arm64 part numbers mapped to core names, see `kolite.engine.cpu`)."""
    return detect().model or platform.processor() or platform.machine() or "unknown"


def board_model() -> str | None:
    """The board, where the firmware names it ("Raspberry Pi 4 Model B Rev 1.4"); None on a PC."""
    text = read_sysfile("/proc/device-tree/model")
    if text:
        return text.strip("\x00\n ") or None
    for line in (read_sysfile("/proc/cpuinfo") or "").splitlines():
        if line.startswith("Model") and ":" in line:  # Pi kernels; x86's lowercase "model" is a number
            return line.split(":", 1)[1].strip() or None
    return None


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (sysfs), to size the bandwidth buffer well beyond it."""
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        size = (read_sysfile(str(index / "size")) or "").strip().upper()
        if not size:
            continue
        with contextlib.suppress(ValueError):
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
            value = int(size.rstrip("KMG")) * scale
            best = value if best is None else max(best, value)
    return best


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on: they mean little without it."""
    import onnxruntime
    import psutil

    return {
        "cpu": cpu_model(),
        "cpu_features": detect().to_dict(),
        "board": board_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": default_threads(),  # the affinity mask and the cgroup quota
        "threads": threads,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "last_level_cache_mb": (lambda b: None if b is None else round(b / MB, 1))(last_level_cache_bytes()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "kolite": __version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
