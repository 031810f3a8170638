"""`kolite bench`: what this machine does with the configured model and precision.

A Pi owner runs it to learn what the board can serve before putting an app on it. Everything runs in
this one process on kolite's real serving code (the continuous-batching `Scheduler` that `kolite
serve` runs, for batch 1 too, the sampler and, when the model has a tokenizer, the streaming detokenizer),
with greedy decoding and `ignore_eos`, so no run stops early: every timed generation yields exactly
the tokens asked for, and is checked to.

Order of work, and why:

1. the machine (CPU, cores, arch, onnxruntime) and its memory read bandwidth, first, while no model
   occupies memory;
2. setup: with `--random-weights` a random checkpoint of a real model's exact shape is written into
   the kolite home (so the command works offline), then the model is converted (or found converted),
   and the weight bytes a decode step reads are computed from the graph. Setup is the memory peak of
   a first run, so its peak RSS is reported on its own and the kernel's high-water mark is then
   reset (`/proc/self/clear_refs`), so the serving peak does not include it;
3. load from the converted cache (what every later `kolite serve` start costs; the graph file was
   just written or read, so it is in the page cache: a cold start from an SD card reads it first),
   then the measurements, then the serving peak RSS (it includes the KV cache pages the runs
   touched: 900 tokens in one slot, then 8 concurrent requests).

Prompts are token ids (seeded pseudo-random ids): speed does not depend on which ids they are, and
a model folder without a tokenizer (random weights) can be measured too. When the folder has a
tokenizer it is loaded as `serve` loads it and used to detokenize the output, so its cost is in the
numbers; without one, text decoding is skipped (it costs microseconds a token against milliseconds
for a decode step). With `--random-weights kogpt2` the real KoGPT2 tokenizer is copied in when an
earlier `kolite pull` left it in the hub cache (it is never downloaded).

Heavy imports (onnx, onnxruntime, the engine) are inside the functions, so building the CLI parser
stays fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kolite import __version__
from kolite.config import ModelSettings, default_threads
from kolite.engine.cpu import detect
from kolite.engine.embeddings import TOKEN_TABLE_KEY
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import DISTILGPT2_SHAPE, KOGPT2_SHAPE

if TYPE_CHECKING:
    from kolite.convert.prepare import PreparedModel
    from kolite.engine.runtime import GPT2Runtime
    from kolite.engine.scheduler import Scheduler
    from kolite.engine.sequence import Sequence as GenSequence

Progress = Callable[[str], None]

# `--random-weights NAME`: the exact shapes of real checkpoints (only the numbers are random).
RANDOM_SHAPES: dict[str, GPT2Config] = {"kogpt2": KOGPT2_SHAPE, "distilgpt2": DISTILGPT2_SHAPE}
# Hub repos whose tokenizer fits each shape; used only if already in the hub cache (never downloaded).
SHAPE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "kogpt2": ("skt/kogpt2-base-v2",),
    "distilgpt2": ("distilgpt2", "distilbert/distilgpt2", "gpt2", "openai-community/gpt2"),
}
RANDOM_SEED = 0
PLOT_HINT = "pip install matplotlib  (or: pip install 'kolite[plot]')"
MB = 2**20


@dataclass(frozen=True)
class BenchOptions:
    """What to run. The defaults are the full run; `quick()` trims repeats and lengths."""

    new_tokens: int = 128  # batch-1 decode run and each concurrent request
    short_prompt: int = 16  # "a short prompt": the batch-1 and concurrency runs
    ttft_prompts: tuple[int, ...] = (128, 512)
    contexts: tuple[int, ...] = (16, 128, 512, 900)  # decode speed against context length
    context_steps: int = 32  # decode steps timed at each context length
    concurrency: tuple[int, ...] = (1, 4, 8)
    repeats: int = 3  # timed repeats of each batch-1 measurement (medians reported)
    bandwidth_repeats: int = 5
    bandwidth_mb: int | None = None  # None: max(256 MB, 8 x last-level cache), capped by free memory
    quick: bool = False

    @classmethod
    def make(cls, *, quick: bool = False, new_tokens: int | None = None) -> BenchOptions:
        """The full run, or with `quick` one repeat and shorter generations (32 new tokens unless given)."""
        opts = cls(new_tokens=32, context_steps=8, repeats=1, bandwidth_repeats=3, quick=True) if quick else cls()
        if new_tokens is not None:
            if new_tokens < 2:
                raise ValueError("--new-tokens must be at least 2 (a decode rate needs two tokens)")
            opts = replace(opts, new_tokens=new_tokens)
        return opts


# ====================================================================================================
# the machine


def _read(path: str) -> str | None:
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
    text = _read("/proc/device-tree/model")
    if text:
        return text.strip("\x00\n ") or None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("Model") and ":" in line:  # Pi kernels; x86's lowercase "model" is a number
            return line.split(":", 1)[1].strip() or None
    return None


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (sysfs), to size the bandwidth buffer well beyond it."""
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        size = (_read(str(index / "size")) or "").strip().upper()
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


# ====================================================================================================
# memory: peak RSS and read bandwidth


def _status_kb(field: str, pid: int | str = "self") -> int | None:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
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


# ====================================================================================================
# the graph: bytes a decode step reads


def weight_bytes_per_token(graph: Path | str) -> dict[str, Any]:
    """Bytes of weights one decode step reads, from the ONNX graph's initializers.

    Why: batch-1 decode is memory-bound, so bandwidth / these bytes is the fastest it could go. Every
    initializer is read once per step (the int8/int4/fp32 matrices of each layer and of lm_head, and
    the small biases, scales and norms), except the embedding tables (wte, wpe and their int8 scales:
    initializers used only as the data of a `Gather`): a step reads one row of each, so each counts
    as one row. kolite's graphs keep lm_head as its own initializer (quantized, or a transposed fp32
    copy), so the tied wte is not counted twice; a table that another node also reads in full (a
    lm_head sharing it) counts in full. The token table kolite keeps in a file beside the graph (see
    `kolite.engine.embeddings`) counts as one of those tables, "token_table", with one row (and its
    scale) per step. The KV cache, read too, grows with the context: see `kv_bytes_per_token`.
    Initializer sizes come from their shapes; the weights are not loaded.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits}
    read_whole = {name for n in model.graph.node for k, name in enumerate(n.input)
                  if name in gathered and not (n.op_type == "Gather" and k == 0)}
    gathered -= read_whole
    matrices = small = tables = table_rows = 0
    by_dtype: dict[str, int] = {}
    for name, t in inits.items():
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        nbytes = math.prod(t.dims) * dtype.itemsize
        if name in gathered:
            tables += nbytes
            table_rows += nbytes // max(1, t.dims[0]) if t.dims else nbytes
            continue
        if len(t.dims) >= 2:
            matrices += nbytes
            by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + nbytes
        else:
            small += nbytes
    names = sorted(gathered)
    layout = {p.key: p.value for p in model.metadata_props}.get(TOKEN_TABLE_KEY)
    if layout:
        table = json.loads(layout)
        row = table["dim"] * np.dtype(table["dtype"]).itemsize + (4 if table.get("scales") else 0)
        tables, table_rows, names = tables + row * table["rows"], table_rows + row, sorted([*names, "token_table"])
    return {"bytes_per_token": matrices + small + table_rows, "matrix_bytes": matrices, "other_bytes": small,
            "embedding_table_bytes": tables, "embedding_row_bytes": table_rows,
            "embedding_tables": names, "matrix_bytes_by_dtype": by_dtype,
            "graph_file_bytes": sum(p.stat().st_size for p in Path(graph).parent.glob(Path(graph).name + "*"))}


def kv_bytes_per_token(cfg: GPT2Config, context: int, itemsize: int = 4) -> int:
    """KV cache bytes a decode step reads at `context` tokens: keys and values of every layer
    (`itemsize` 4 for a float32 cache, 2 for float16)."""
    return 2 * cfg.n_layer * context * cfg.n_embd * itemsize


def parameter_count(cfg: GPT2Config) -> int:
    e = cfg.n_embd
    return (cfg.vocab_size + cfg.n_positions) * e + cfg.n_layer * (2 * e * cfg.inner_dim + 4 * e * e
                                                                    + 9 * e + cfg.inner_dim) + 2 * e


# ====================================================================================================
# setup: random checkpoint, model, tokenizer


@dataclass(frozen=True)
class RandomCheckpoint:
    folder: Path
    written: bool
    seconds: float
    tokenizer: str | None  # where its tokenizer.json came from, if it has one


def _cached_tokenizer(shape_name: str, cfg: GPT2Config, cache_dir: Path | None) -> Path | None:
    """A real tokenizer.json for this shape from the hub cache, if an earlier pull left one (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    for repo in SHAPE_TOKENIZERS.get(shape_name, ()):
        with contextlib.suppress(Exception):
            found = try_to_load_from_cache(repo, "tokenizer.json", cache_dir=cache_dir)
            if isinstance(found, str) and Tokenizer.from_file(found).get_vocab_size() <= cfg.vocab_size:
                return Path(found)
    return None


def ensure_random_checkpoint(home: Path, shape_name: str, *, cache_dir: Path | None = None,
                             progress: Progress | None = None) -> RandomCheckpoint:
    """`<home>/random-weights/<shape>/`: config.json + model.safetensors of that exact shape, random numbers.

    Written once (a stamp records shape and seed) and reused, so the converted graph is reused too (the
    conversion cache keys on the weights file's size and mtime). Written to a temporary folder and
    renamed, so an interrupted write is never mistaken for a checkpoint.
    """
    from kolite.models.synthetic import ensure_checkpoint

    if shape_name not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; choose from {', '.join(sorted(RANDOM_SHAPES))}")
    cfg = RANDOM_SHAPES[shape_name]
    say = progress or (lambda _msg: None)
    folder = Path(home) / "random-weights" / shape_name
    started = time.perf_counter()
    written = ensure_checkpoint(folder, cfg, seed=RANDOM_SEED, stamp={"shape": cfg.to_dict(), "seed": RANDOM_SEED})
    seconds = time.perf_counter() - started if written else 0.0
    if written:
        say(f"wrote a random-weight {shape_name} checkpoint ({parameter_count(cfg) / 1e6:.0f}M parameters) "
            f"to {folder}")
        gc.collect()
    source = None
    if (folder / "tokenizer.json").is_file():
        source = str(folder / "tokenizer.json")
    else:
        found = _cached_tokenizer(shape_name, cfg, cache_dir)
        if found is not None:
            shutil.copyfile(found, folder / "tokenizer.json")
            source = str(found)
            say(f"using the tokenizer from the hub cache: {found}")
    return RandomCheckpoint(folder, written, round(seconds, 2), source)


class _NoText:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class IdsOnlyTokenizer:
    """Stands in for a tokenizer when the model has none: no stop ids, no text.

    The bench feeds token ids and needs only the tokens, so a random-weight checkpoint needs no
    tokenizer; `Sequence` asks only for stop ids and a streaming decoder.
    """

    stop_ids: frozenset[int] = frozenset()

    def incremental_decoder(self, prompt_ids: Sequence[int] = ()) -> _NoText:
        return _NoText()


@dataclass
class BenchModel:
    """A model opened for measuring: the converted graph's session and whatever tokenizer it has."""

    prepared: PreparedModel
    runtime: GPT2Runtime
    tokenizer: Any  # kolite.tokenizer.Tokenizer or IdsOnlyTokenizer
    tokenizer_kind: str
    load_seconds: float
    max_batch: int = 8
    _scheduler: Scheduler | None = None

    @property
    def scheduler(self) -> Scheduler:
        """The serving scheduler over this runtime (started on first use; `close` stops it)."""
        if self._scheduler is None:
            from kolite.engine.scheduler import Scheduler, SchedulerOptions

            self._scheduler = Scheduler(self.runtime, SchedulerOptions(max_batch=self.max_batch,
                                                                       max_queue=self.max_batch, timeout=None))
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None

    @property
    def cfg(self) -> GPT2Config:
        return self.prepared.config

    @property
    def n_positions(self) -> int:
        return self.prepared.config.n_positions

    @property
    def id_limit(self) -> int:
        """Prompt ids stay below this: inside both the embedding and the tokenizer's vocab."""
        vocab = getattr(self.tokenizer, "vocab_size", None)
        return min(self.cfg.vocab_size, vocab) if vocab else self.cfg.vocab_size

    def sequence(self, prompt_ids: list[int], new_tokens: int) -> GenSequence:
        """Greedy, `ignore_eos`: a random model may emit eos at any step, and nothing may stop early."""
        from kolite.engine.sampling import SamplingParams
        from kolite.engine.sequence import Sequence as GenSequence

        params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
        return GenSequence(prompt_ids, params, self.tokenizer, self.n_positions)


def open_model(settings: ModelSettings, *, with_tokenizer: bool) -> BenchModel:
    """Open the converted graph (call after setup converted it) and time it: a `serve` start's load.

    With a tokenizer this is exactly `load_model` (cache lookup, tokenizer, chat template, session);
    without one, the same minus the tokenizer.
    """
    from kolite.convert.prepare import prepare_model
    from kolite.engine.runtime import GPT2Runtime, RuntimeOptions
    from kolite.service import load_model

    if with_tokenizer:
        lm = load_model(settings)
        return BenchModel(lm.prepared, lm.runtime, lm.tokenizer, f"{lm.tokenizer.profile.name} tokenizer",
                          lm.load_seconds)
    started = time.perf_counter()
    prepared = prepare_model(settings, progress=lambda _msg: None)
    runtime = GPT2Runtime(prepared.graph, prepared.config, RuntimeOptions(threads=settings.threads))
    return BenchModel(prepared, runtime, IdsOnlyTokenizer(), "none (token-id prompts; text decoding not measured)",
                      time.perf_counter() - started)


def prompt_ids(n: int, limit: int, seed: int = 0) -> list[int]:
    """`n` seeded pseudo-random ids below `limit`, past the first control ids where the vocab allows."""
    low = 16 if limit > 64 else 0
    return np.random.default_rng(seed).integers(low, limit, size=n).tolist()


# ====================================================================================================
# measurements


@dataclass(frozen=True)
class Timed:
    start: float
    stamps: list[float]  # perf_counter() as each token's event arrived
    end: float
    token_ids: tuple[int, ...] = ()


def time_request(scheduler: Scheduler, seq: GenSequence, timeout: float = 3600.0) -> Timed:
    """Run `seq` through the continuous-batching `Scheduler` that `kolite serve` runs, timestamping each
    token as the engine thread hands it over; it must produce all of its `max_new_tokens` (benchmarks
    compare fixed amounts of work). Alone in the scheduler this is the batch-1 figure a single user of
    the server sees, thread hand-off included."""
    from kolite.engine.sequence import Finish, TokenEvent

    new_tokens = seq.params.max_new_tokens
    stamps: list[float] = []
    finish: list[Finish] = []

    def deliver(ev: TokenEvent | Finish) -> None:
        if isinstance(ev, TokenEvent):
            stamps.append(time.perf_counter())
        else:
            finish.append(ev)

    start = time.perf_counter()
    req = scheduler.submit(seq, deliver)
    if not req.done.wait(timeout):
        req.cancel()
        raise RuntimeError(f"a request did not finish in {timeout:.0f}s")
    end = time.perf_counter()
    if not finish or finish[0].completion_tokens != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} tokens, got {len(stamps)} ({finish and finish[0]})")
    return Timed(start, stamps, end, finish[0].token_ids)


def timed_generation(model: BenchModel, prompt: list[int], new_tokens: int) -> Timed:
    """One request of `model`, greedy and `ignore_eos`, alone in its scheduler (see `time_request`)."""
    return time_request(model.scheduler, model.sequence(prompt, new_tokens))


def decode_rate(stamps: Sequence[float]) -> float:
    """Tokens/s between the first and the last token: decode steps only (the prefill is before the first)."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _fit(requested: int, n_positions: int, room: int) -> int:
    """A length that leaves `room` positions free in the model's window (small models have fewer)."""
    return max(1, min(requested, n_positions - room))


def _distinct(requested: Sequence[int], n_positions: int, room: int) -> list[int]:
    """The requested lengths, dropping those that clip to a length already measured (small models)."""
    seen: set[int] = set()
    kept = []
    for n in requested:
        if _fit(n, n_positions, room) not in seen:
            seen.add(_fit(n, n_positions, room))
            kept.append(n)
    return kept


def measure_decode(model: BenchModel, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Batch-1 decode tokens/s: the speed a single user sees once text starts streaming."""
    new = max(2, min(new_tokens, model.n_positions - 1))
    prompt = prompt_ids(_fit(prompt_tokens, model.n_positions, new), model.id_limit, seed=1)
    runs = [timed_generation(model, prompt, new) for _ in range(repeats)]
    rates = [decode_rate(r.stamps) for r in runs]
    return {"prompt_tokens": len(prompt), "new_tokens": new, "tok_s": _median(rates),
            "runs_tok_s": _rounded(rates), "seconds": round(_median([r.end - r.start for r in runs]), 4)}


def measure_ttft(model: BenchModel, prompt_tokens: int, repeats: int) -> dict[str, Any]:
    """Time to first token for a prompt: its prefill plus one sampling step, what a user waits before text."""
    n = _fit(prompt_tokens, model.n_positions, 1)
    prompt = prompt_ids(n, model.id_limit, seed=2)
    times = [r.stamps[0] - r.start for r in (timed_generation(model, prompt, 1) for _ in range(repeats))]
    seconds = _median(times)
    return {"requested": prompt_tokens, "prompt_tokens": n, "seconds": round(seconds, 5),
            "runs_s": _rounded(times, 5), "prefill_tok_s": round(n / seconds, 1) if seconds > 0 else None}


def measure_context(model: BenchModel, context: int, steps: int, repeats: int) -> dict[str, Any]:
    """Decode tokens/s with `context` tokens already in the cache: attention reads the whole cache each
    step, so long chats decode slower than short ones."""
    n = _fit(context, model.n_positions, steps + 1)
    prompt = prompt_ids(n, model.id_limit, seed=3)
    rates = [decode_rate(timed_generation(model, prompt, steps + 1).stamps) for _ in range(repeats)]
    return {"requested": context, "context": n, "steps": steps, "tok_s": _median(rates), "runs_tok_s": _rounded(rates)}


def measure_concurrency(model: BenchModel, levels: Sequence[int], prompt_tokens: int, new_tokens: int,
                        timeout: float = 3600.0) -> list[dict[str, Any]]:
    """Aggregate tokens/s with n requests at once through the continuous-batching `Scheduler` (no HTTP).

    Why: a decode step reads the weights once for all rows, so batching raises throughput where batch 1
    is memory-bound. Per level, n requests (each its own prompt) are submitted together; aggregate =
    all their tokens / wall time from the first submission to the last token. Per-request decode rate
    and time to first token (which grows with n: admitted requests are prefilled one after another)
    are reported too. One run per level, after an untimed warm-up of the largest level.
    """
    from kolite.engine.sequence import Finish, TokenEvent

    new = max(2, min(new_tokens, model.n_positions - 1))
    plen = _fit(prompt_tokens, model.n_positions, new)
    top = max(levels)
    if top > model.max_batch:
        model.close()
        model.max_batch = top
    sched = model.scheduler

    def run(n: int, tokens: int) -> dict[str, Any]:
        stamps: list[list[float]] = [[] for _ in range(n)]
        finishes: list[Finish | None] = [None] * n

        def deliver(i: int, ev: TokenEvent | Finish) -> None:
            if isinstance(ev, TokenEvent):
                stamps[i].append(time.perf_counter())
            else:
                finishes[i] = ev

        seqs = [model.sequence(prompt_ids(plen, model.id_limit, seed=100 + i), tokens) for i in range(n)]
        start = time.perf_counter()
        reqs = [sched.submit(seq, lambda ev, i=i: deliver(i, ev)) for i, seq in enumerate(seqs)]
        for req in reqs:
            if not req.done.wait(timeout):
                req.cancel()
                raise RuntimeError(f"{n} concurrent requests did not finish in {timeout:.0f}s")
        for i, fin in enumerate(finishes):
            if fin is None or fin.reason != "length" or len(stamps[i]) != tokens:
                raise RuntimeError(f"request {i} of {n} ended with {fin and fin.reason}, {len(stamps[i])} tokens")
        wall = max(s[-1] for s in stamps) - start
        ttfts = [s[0] - start for s in stamps]
        per_request = [decode_rate(s) for s in stamps]
        total = sum(len(s) for s in stamps)
        return {"requests": n, "prompt_tokens": plen, "new_tokens": tokens, "tokens": total,
                "wall_s": round(wall, 4), "aggregate_tok_s": round(total / wall, 2),
                "per_request_tok_s": round(_median(per_request), 2),
                "ttft_s": {"median": round(_median(ttfts), 5), "max": round(max(ttfts), 5)}}

    run(top, min(4, new))  # warm-up: every batch size the levels will meet, allocations done
    return [run(n, new) for n in levels]


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _rounded(xs: Sequence[float], digits: int = 3) -> list[float]:
    return [round(x, digits) for x in xs]


# ====================================================================================================
# the whole run


def run_bench(settings: ModelSettings, options: BenchOptions | None = None, *, random_weights: str | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Measure everything (see the module docstring for the order) and return the report (JSON-ready)."""
    from kolite.convert.prepare import prepare_model

    opts = options or BenchOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    report: dict[str, Any] = {"kolite_bench": 1, "quick": opts.quick}

    say("machine and memory read bandwidth ...")
    machine = report["machine"] = machine_info(settings.threads)
    bw = memory_read_bandwidth(settings.threads, bandwidth_buffer_bytes(opts.bandwidth_mb), opts.bandwidth_repeats)
    report["bandwidth"] = bw
    say(f"  memory read bandwidth {bw['gb_s']:.1f} GB/s ({bw['buffer_mb']} MB buffer)")
    reset_peak_rss()  # the setup peak should not be the bandwidth buffer's

    # --- setup: random weights, conversion, weight bytes --------------------------------------------
    setup: dict[str, Any] = {"random_weights": random_weights}
    if random_weights:
        ckpt = ensure_random_checkpoint(settings.kolite_home, random_weights, cache_dir=settings.cache_dir,
                                        progress=say)
        settings = settings.model_copy(update={"model": str(ckpt.folder)})
        setup.update(checkpoint=str(ckpt.folder), checkpoint_written=ckpt.written, checkpoint_seconds=ckpt.seconds)
    t0 = time.perf_counter()
    prepared = prepare_model(settings, progress=say)
    setup.update(converted=prepared.converted, prepare_seconds=round(time.perf_counter() - t0, 2),
                 graph=str(prepared.graph))
    weights = weight_bytes_per_token(prepared.graph)
    setup["peak_rss_mb"] = peak_rss_mb()
    report["setup"] = setup
    # Setup's freed arrays (a random checkpoint written in this process) stay in the C heap until
    # trimmed; without this the load phase's "peak" would be that leftover, not the load's own.
    from kolite.engine.runtime import release_free_memory

    gc.collect()
    release_free_memory()
    reset_ok = reset_peak_rss()

    # --- load from the converted cache --------------------------------------------------------------
    say("loading from the converted cache ...")
    load_settings = settings.model_copy(update={"local_files_only": True})  # already resolved: no hub call
    model = open_model(load_settings, with_tokenizer=prepared.files.has_tokenizer)
    if model.prepared.converted:  # pragma: no cover - setup converted it just before
        say("WARNING: the model was converted again during the timed load")
    cfg = model.cfg
    report["model"] = {
        "name": f"random weights, {random_weights} shape" if random_weights else settings.model,
        "path": str(model.prepared.files.root), "precision": model.prepared.precision,
        "int8_scheme": model.prepared.manifest.get("int8_scheme"),
        "int8_weights": model.prepared.manifest.get("int8_weights"), "threads": settings.threads,
        "kv_cache": f"{model.runtime.kv_dtype.name}, {model.runtime.kv_bytes_per_token // 1024} KB per token",
        "shape": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")},
        "parameters": parameter_count(cfg), "graph": str(model.prepared.graph),
        "graph_mb": round(weights["graph_file_bytes"] / MB, 1), "tokenizer": model.tokenizer_kind,
    }
    report["load_seconds"] = round(model.load_seconds, 3)
    report["weights"] = weights
    memory: dict[str, Any] = {"rss_after_load_mb": rss_mb()}
    phase_peaks: dict[str, float | None] = {}

    def phase_done(name: str) -> None:
        """Where the memory goes: each phase's own high-water mark (only where it can be reset)."""
        if reset_ok:
            phase_peaks[name] = peak_rss_mb()
            reset_peak_rss()

    phase_done("load")
    say(f"  loaded in {model.load_seconds:.2f}s; {cfg.n_layer} layers x {cfg.n_embd}, "
        f"{model.prepared.precision}, {settings.threads} threads")

    # --- measurements -------------------------------------------------------------------------------
    say("warm-up ...")
    longest = _fit(max((*opts.contexts, *opts.ttft_prompts)), model.n_positions, 5)
    timed_generation(model, prompt_ids(longest, model.id_limit, seed=9), 4)  # the longest shapes run once
    timed_generation(model, prompt_ids(opts.short_prompt, model.id_limit, seed=9), 8)
    phase_done(f"warm-up ({longest}-token prompt)")

    say(f"decode, batch 1: {opts.short_prompt}-token prompt + {opts.new_tokens} new tokens x {opts.repeats} ...")
    report["decode"] = measure_decode(model, opts.short_prompt, opts.new_tokens, opts.repeats)
    say(f"  {report['decode']['tok_s']:.1f} tok/s")
    phase_done(f"decode ({opts.short_prompt}-token prompt)")
    report["ttft"] = []
    for n in _distinct(opts.ttft_prompts, model.n_positions, 1):
        say(f"time to first token, {n}-token prompt ...")
        report["ttft"].append(measure_ttft(model, n, opts.repeats))
        say(f"  {report['ttft'][-1]['seconds']:.3f} s")
    report["context"] = []
    for n in _distinct(opts.contexts, model.n_positions, opts.context_steps + 1):
        say(f"decode at {n} tokens of context ...")
        entry = measure_context(model, n, opts.context_steps, opts.repeats)
        entry["kv_bytes_per_token"] = kv_bytes_per_token(cfg, entry["context"], model.runtime.kv_dtype.itemsize)
        report["context"].append(entry)
        say(f"  {entry['tok_s']:.1f} tok/s")
    phase_done("long prompts and contexts")
    say(f"concurrent requests {', '.join(map(str, opts.concurrency))} through the scheduler ...")
    report["concurrency"] = measure_concurrency(model, opts.concurrency, opts.short_prompt, opts.new_tokens)
    model.close()
    for c in report["concurrency"]:
        say(f"  {c['requests']}: {c['aggregate_tok_s']:.1f} tok/s together")
    phase_done(f"{max(opts.concurrency)} concurrent requests")

    serving = [v for k, v in phase_peaks.items() if k != "load" and v is not None]
    peak = max(serving) if serving else peak_rss_mb()
    memory.update(peak_rss_mb=peak, peak_rss_includes_setup=not reset_ok, rss_end_mb=rss_mb(),
                  peak_rss_by_phase_mb=phase_peaks)
    report["memory"] = memory

    # --- what the memory allows -----------------------------------------------------------------------
    ceiling = bw["bytes_per_s"] / weights["bytes_per_token"]
    report["roofline"] = {
        "bandwidth_gb_s": bw["gb_s"], "weight_mb_per_token": round(weights["bytes_per_token"] / MB, 2),
        "ceiling_tok_s": round(ceiling, 1), "decode_tok_s": round(report["decode"]["tok_s"], 2),
        "decode_pct_of_ceiling": round(100 * report["decode"]["tok_s"] / ceiling, 1),
    }
    for entry in report["context"]:
        entry["ceiling_tok_s"] = round(bw["bytes_per_s"] / (weights["bytes_per_token"] + entry["kv_bytes_per_token"]),
                                       1)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["table"] = render_table(report)
    return report


# ====================================================================================================
# output


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _tok(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{_num(x)} tok/s"


def _mb(n_bytes: float) -> str:
    mb = n_bytes / MB
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB" if mb >= 0.1 else f"{n_bytes / 1024:.0f} KB"


def _count(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def short_name(name: str) -> str:
    """A model's name for titles: a folder's last part, a hub id as is."""
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def _clipped(entry: dict[str, Any], key: str) -> str:
    asked = entry["requested"]
    return "" if entry[key] == asked else f" (asked {asked}; the model has fewer positions)"


def table_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(measurement, value) pairs in reading order; an empty value starts a section."""
    d, roof, mem, setup = report["decode"], report["roofline"], report["memory"], report["setup"]
    rows: list[tuple[str, str]] = [("speed, one request", "")]
    rows.append((f"decode, batch 1 ({d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens)",
                 _tok(d["tok_s"])))
    for t in report["ttft"]:
        rows.append((f"time to first token, {t['prompt_tokens']}-token prompt{_clipped(t, 'prompt_tokens')}",
                     f"{t['seconds']:.3f} s"))
    for c in report["context"]:
        rows.append((f"decode at {c['context']} tokens of context{_clipped(c, 'context')}", _tok(c["tok_s"])))
    rows.append(("continuous batching (scheduler, no HTTP)", ""))
    for c in report["concurrency"]:
        n = c["requests"]
        rows.append((f"{n} concurrent request{'s' if n > 1 else ''}: all together (each)",
                     f"{_tok(c['aggregate_tok_s'])} ({_num(c['per_request_tok_s'])})"))
    rows.append(("memory and load", ""))
    rows.append(("load time, from the converted cache", f"{report['load_seconds']:.2f} s"))
    rows.append(("RSS after load", f"{mem['rss_after_load_mb']:.0f} MB" if mem["rss_after_load_mb"] else "-"))
    peak_note = " (includes setup: no reset here)" if mem["peak_rss_includes_setup"] else ""
    rows.append((f"peak RSS, serving{peak_note}", f"{mem['peak_rss_mb']:.0f} MB" if mem["peak_rss_mb"] else "-"))
    for phase, mb in mem.get("peak_rss_by_phase_mb", {}).items():
        rows.append((f"  peak RSS during {phase}", f"{mb:.0f} MB" if mb else "-"))
    did = [w for w, on in (("random weights written", setup.get("checkpoint_written")),
                           (f"converted in {setup['prepare_seconds']:.0f} s", setup["converted"])) if on]
    if did:
        rows.append((f"peak RSS during setup ({', '.join(did)})", f"{setup['peak_rss_mb']:.0f} MB"))
    else:
        rows.append(("peak RSS during conversion", "- (graph was already converted)"))
    rows.append(("what the memory allows", ""))
    rows.append((f"memory read bandwidth (numpy, {report['bandwidth']['buffer_mb']} MB, best pass)",
                 f"{roof['bandwidth_gb_s']:.1f} GB/s"))
    rows.append(("weights read per decoded token (from the graph)", _mb(report["weights"]["bytes_per_token"])))
    rows.append(("decode ceiling = bandwidth / weight bytes", _tok(roof["ceiling_tok_s"])))
    rows.append(("batch-1 decode as % of that ceiling", f"{roof['decode_pct_of_ceiling']:.0f} %"))
    return rows


def render_table(report: dict[str, Any]) -> str:
    """The header (machine, model) and the table the command prints."""
    m, mod = report["machine"], report["model"]
    shape = mod["shape"]
    board = f" ({m['board']})" if m.get("board") else ""
    header = [
        f"kolite bench {m['date']}{'  [quick]' if report.get('quick') else ''}",
        f"machine:   {m['cpu']}{board} | {m['arch']} | {m['cores']} cores ({m['usable_cores']} usable) | "
        f"{m['memory_gb']} GB | {m['os']} | onnxruntime {m['onnxruntime']} | kolite {m['kolite']}",
        f"cpu:       {' '.join(m['cpu_features']['features']) or '-'} | int8 kernel {m['cpu_features']['int8_kernel']}"
        f" | int4 kernel {'integer' if m['cpu_features']['int4_fast'] else 'fallback'}",
        f"model:     {mod['name']} | {shape['n_layer']} layers x {shape['n_embd']}, vocab {shape['vocab_size']}, "
        f"{_count(mod['parameters'])} params | {mod['precision']}"
        f"{' ' + mod['int8_scheme'] if mod.get('int8_scheme') else ''}"
        f"{' ' + mod['int8_weights'] + ' weights' if mod.get('int8_weights') else ''}"
        f"{' | KV cache ' + mod['kv_cache'] if mod.get('kv_cache') else ''}"
        f" | graph {_mb(mod['graph_mb'] * MB)} | "
        f"{mod['threads']} thread{'s' if mod['threads'] > 1 else ''}",
        f"tokenizer: {mod['tokenizer']}",
    ]
    rows = table_rows(report)
    width = max(len(label) for label, _ in rows) + 2
    vwidth = max(len(value) for _, value in rows)
    lines = [*header, ""]
    for label, value in rows:
        if not value:
            lines.append(f"{label}")
            continue
        lines.append(f"  {label:<{width}}{value:>{vwidth}}")
    lines += ["", "Batch-1 decode reads every weight once per token, so it cannot beat the ceiling; batching "
                  "reads them once per step for all requests, so the total can."]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(report: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def plot_available() -> bool:
    """matplotlib is optional (the `plot` extra): `--plot` checks before measuring, not after."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """A PNG with two panels: tokens/s against concurrent requests, and decode tokens/s against context."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)

    conc = report["concurrency"]
    xs = [c["requests"] for c in conc]
    agg = [c["aggregate_tok_s"] for c in conc]
    left.plot(xs, agg, "o-", color="tab:blue", label="all requests together")
    left.plot(xs, [c["per_request_tok_s"] for c in conc], "s--", color="tab:orange", label="each request")
    for x, y in zip(xs, agg, strict=True):
        left.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    left.set_xticks(xs)
    left.set_xlabel("concurrent requests (continuous batching)")
    left.set_ylabel("tokens/s")
    left.set_title(f"Throughput, {conc[0]['new_tokens']} new tokens per request")
    left.set_ylim(0, max(agg) * 1.18)
    left.grid(alpha=0.3)
    left.legend(loc="upper left")

    ctx = report["context"]
    cx = [c["context"] for c in ctx]
    cy = [c["tok_s"] for c in ctx]
    right.plot(cx, cy, "o-", color="tab:green", label="kolite, batch 1")
    for x, y in zip(cx, cy, strict=True):
        right.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    roof = report["roofline"]
    top = max(cy) * 1.25
    ceilings = [c["ceiling_tok_s"] for c in ctx]
    if max(ceilings) <= 3 * max(cy):  # draw the memory ceiling when it fits the scale; else name it in the title
        right.plot(cx, ceilings, ":", color="gray", label="memory ceiling (weights + KV cache)")
        top = max(top, max(ceilings) * 1.1)
    else:
        right.text(0.98, 0.97, f"memory ceiling (weights only): {_tok(roof['ceiling_tok_s'])}, off this scale",
                   transform=right.transAxes, ha="right", va="top", fontsize=9, color="gray")
    right.set_title("Decode speed against context length, batch 1")
    right.set_xlabel("tokens already in context")
    right.set_ylabel("tokens/s")
    right.set_ylim(0, top)
    right.set_xlim(0, max(cx) * 1.05)
    right.grid(alpha=0.3)
    right.legend(loc="lower left")

    m, mod = report["machine"], report["model"]
    board = f" ({m['board']})" if m.get("board") else ""
    fig.suptitle(f"kolite bench: {short_name(mod['name'])}, {mod['precision']}, {mod['threads']} threads, "
                 f"on {m['cpu']}{board}, {m['arch']}", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def run_command(settings: ModelSettings, *, random_weights: str | None = None, new_tokens: int | None = None,
                quick: bool = False, json_path: Path | None = None, plot_path: Path | None = None) -> int:
    """`kolite bench`: run, print the table, write the JSON and the chart. Returns the exit status."""
    def say(msg: str) -> None:
        print(f"kolite bench: {msg}", file=sys.stderr, flush=True)

    if plot_path is not None and not plot_available():
        print(f"kolite: error: --plot needs matplotlib, which is not installed: {PLOT_HINT}", file=sys.stderr)
        return 2
    try:
        options = BenchOptions.make(quick=quick, new_tokens=new_tokens)
    except ValueError as exc:
        print(f"kolite: error: {exc}", file=sys.stderr)
        return 2
    report = run_bench(settings, options, random_weights=random_weights, progress=say)
    print(report["table"], flush=True)
    if json_path is not None:
        say(f"wrote {write_json(report, json_path)}")
    if plot_path is not None:
        say(f"wrote {write_plot(report, plot_path)}")
    return 0
