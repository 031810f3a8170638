"""Memory: resident set, its peak (and resetting it between phases), and the read bandwidth that bounds decode."""

from __future__ import annotations

import gc
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass
from kolite.bench.machine import MB, last_level_cache_bytes, read_sysfile


def _status_kb(field: str, pid: int | str = "self") -> int | None:
    for line in (read_sysfile(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory now (VmRSS), MB, of this process or of `pid` (a server under test)."""
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else round(kb / 1024, 1)


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """The resident high-water mark (VmHWM), MB: what the board must have free.

    Off Linux, this process's getrusage ru_maxrss (which cannot be reset, so it includes setup).
    """
    kb = _status_kb("VmHWM", pid)
    if kb is not None:
        return round(kb / 1024, 1)
    if pid != "self":
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(maxrss / (MB if sys.platform == "darwin" else 1024), 1)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/PID/clear_refs).

    Conversion (and writing random weights) needs far more memory than serving; without the reset the
    serving peak would just repeat the conversion's. Returns False where the kernel does not allow it.
    """
    if pid == "self":
        gc.collect()
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def bandwidth_buffer_bytes(requested_mb: int | None = None) -> int:
    """max(256 MB, 8 x the last-level cache) so caches cannot serve the reads, at most a quarter of the
    free memory (a 512 MB Pi Zero 2 still runs it), at least 32 MB."""
    if requested_mb is not None:
        return int(requested_mb * MB)
    import psutil

    llc = last_level_cache_bytes() or 0
    size = max(256 * MB, 8 * llc)
    return int(max(32 * MB, min(size, psutil.virtual_memory().available // 4)))


def memory_read_bandwidth(threads: int = 1, size_bytes: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Memory read bandwidth, bytes/s: numpy reductions streaming over a buffer far larger than the caches.

    Why: a batch-1 decode step reads every weight matrix once, so its speed is bounded by how fast the
    memory delivers them. Each pass reads the buffer once (sum and max of float32: on some cores the
    float sum is compute-bound, so the faster kernel is the better estimate); with `threads` > 1 each
    thread reduces its own slice (numpy releases the GIL inside reductions), as onnxruntime's threads
    share a MatMul. The best pass of all is the bandwidth; every configuration's best is kept too.
    """
    size = size_bytes if size_bytes is not None else bandwidth_buffer_bytes()
    buf = np.ones(size // 4, np.float32)  # written once, so every page is resident before timing
    best: dict[str, float] = {}
    try:
        for n in sorted({1, max(1, threads)}):
            chunks = np.array_split(buf, n)
            with ThreadPoolExecutor(n) as pool:
                for kernel in (np.sum, np.max):
                    list(pool.map(kernel, chunks))  # warm-up pass
                    times = []
                    for _ in range(max(1, repeats)):
                        started = time.perf_counter()
                        list(pool.map(kernel, chunks))
                        times.append(time.perf_counter() - started)
                    best[f"{kernel.__name__}_{n}_threads"] = buf.nbytes / min(times)
    finally:
        nbytes = buf.nbytes
        del buf
    top = max(best.values())
    return {"bytes_per_s": top, "gb_s": round(top / 1e9, 2), "buffer_mb": round(nbytes / MB),
            "repeats": repeats, "by_kernel_gb_s": {k: round(v / 1e9, 2) for k, v in best.items()}}
