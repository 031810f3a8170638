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

import gc
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolite.bench.machine import MB, machine_info
from kolite.bench.memory import bandwidth_buffer_bytes, memory_read_bandwidth, peak_rss_mb, reset_peak_rss, rss_mb
from kolite.bench.model import BenchModel, Progress, ensure_random_checkpoint, open_model, prompt_ids
from kolite.bench.report import PLOT_HINT, plot_available, render_table, write_json, write_plot
from kolite.bench.roofline import kv_bytes_per_token, parameter_count, weight_bytes_per_token
from kolite.bench.timing import (
    distinct_lengths,
    fit_length,
    measure_concurrency,
    measure_context,
    measure_decode,
    measure_ttft,
    timed_generation,
)
from kolite.config import ModelSettings

if TYPE_CHECKING:
    from kolite.convert.prepare import PreparedModel


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






def run_bench(settings: ModelSettings, options: BenchOptions | None = None, *, random_weights: str | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Measure everything (see the module docstring for the order) and return the report (JSON-ready)."""
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

    settings, prepared, weights, report["setup"] = _setup(settings, random_weights, say)
    phases = _Phases(reset_ok=reset_peak_rss())

    say("loading from the converted cache ...")
    load_settings = settings.model_copy(update={"local_files_only": True})  # already resolved: no hub call
    model = open_model(load_settings, with_tokenizer=prepared.files.has_tokenizer)
    if model.prepared.converted:  # pragma: no cover - setup converted it just before
        say("WARNING: the model was converted again during the timed load")
    report["model"] = _model_entry(model, settings, random_weights, weights)
    report["load_seconds"] = round(model.load_seconds, 3)
    report["weights"] = weights
    memory: dict[str, Any] = {"rss_after_load_mb": rss_mb()}
    phases.done("load")
    say(f"  loaded in {model.load_seconds:.2f}s; {model.cfg.n_layer} layers x {model.cfg.n_embd}, "
        f"{model.prepared.precision}, {settings.threads} threads")

    _measure(model, opts, report, phases, say)

    serving = [v for k, v in phases.peaks.items() if k != "load" and v is not None]
    memory.update(peak_rss_mb=max(serving) if serving else peak_rss_mb(), peak_rss_includes_setup=not phases.reset_ok,
                  rss_end_mb=rss_mb(), peak_rss_by_phase_mb=phases.peaks)
    report["memory"] = memory
    _roofline(report, bw, weights)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["table"] = render_table(report)
    return report


def _setup(settings: ModelSettings, random_weights: str | None,
           say: Progress) -> tuple[ModelSettings, PreparedModel, dict[str, Any], dict[str, Any]]:
    """Random weights (if asked), conversion, the weight bytes a step reads; then the C heap is trimmed.

    Setup's freed arrays (a random checkpoint written in this process) stay in the C heap until trimmed;
    without that the load phase's "peak" would be that leftover, not the load's own.
    """
    from kolite.convert.prepare import prepare_model
    from kolite.engine.runtime import release_free_memory

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
    gc.collect()
    release_free_memory()
    return settings, prepared, weights, setup


@dataclass
class _Phases:
    """Where the memory goes: each phase's own high-water mark (only where the kernel's can be reset)."""

    reset_ok: bool
    peaks: dict[str, float | None] = field(default_factory=dict)

    def done(self, name: str) -> None:
        if self.reset_ok:
            self.peaks[name] = peak_rss_mb()
            reset_peak_rss()


def _model_entry(model: BenchModel, settings: ModelSettings, random_weights: str | None,
                 weights: dict[str, Any]) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "name": f"random weights, {random_weights} shape" if random_weights else settings.model,
        "path": str(model.prepared.files.root), "precision": model.prepared.precision,
        "int8_scheme": model.prepared.manifest.get("int8_scheme"),
        "int8_weights": model.prepared.manifest.get("int8_weights"), "threads": settings.threads,
        "kv_cache": f"{model.runtime.kv_dtype.name}, {model.runtime.kv_bytes_per_token // 1024} KB per token",
        "shape": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")},
        "parameters": parameter_count(cfg), "graph": str(model.prepared.graph),
        "graph_mb": round(weights["graph_file_bytes"] / MB, 1), "tokenizer": model.tokenizer_kind,
    }


def _measure(model: BenchModel, opts: BenchOptions, report: dict[str, Any], phases: _Phases, say: Progress) -> None:
    """Warm-up, batch-1 decode, time to first token, decode against context, concurrency; closes the model."""
    say("warm-up ...")
    longest = fit_length(max((*opts.contexts, *opts.ttft_prompts)), model.n_positions, 5)
    timed_generation(model, prompt_ids(longest, model.id_limit, seed=9), 4)  # the longest shapes run once
    timed_generation(model, prompt_ids(opts.short_prompt, model.id_limit, seed=9), 8)
    phases.done(f"warm-up ({longest}-token prompt)")

    say(f"decode, batch 1: {opts.short_prompt}-token prompt + {opts.new_tokens} new tokens x {opts.repeats} ...")
    report["decode"] = measure_decode(model, opts.short_prompt, opts.new_tokens, opts.repeats)
    say(f"  {report['decode']['tok_s']:.1f} tok/s")
    phases.done(f"decode ({opts.short_prompt}-token prompt)")
    report["ttft"] = []
    for n in distinct_lengths(opts.ttft_prompts, model.n_positions, 1):
        say(f"time to first token, {n}-token prompt ...")
        report["ttft"].append(measure_ttft(model, n, opts.repeats))
        say(f"  {report['ttft'][-1]['seconds']:.3f} s")
    report["context"] = []
    for n in distinct_lengths(opts.contexts, model.n_positions, opts.context_steps + 1):
        say(f"decode at {n} tokens of context ...")
        entry = measure_context(model, n, opts.context_steps, opts.repeats)
        entry["kv_bytes_per_token"] = kv_bytes_per_token(model.cfg, entry["context"], model.runtime.kv_dtype.itemsize)
        report["context"].append(entry)
        say(f"  {entry['tok_s']:.1f} tok/s")
    phases.done("long prompts and contexts")
    say(f"concurrent requests {', '.join(map(str, opts.concurrency))} through the scheduler ...")
    report["concurrency"] = measure_concurrency(model, opts.concurrency, opts.short_prompt, opts.new_tokens)
    model.close()
    for c in report["concurrency"]:
        say(f"  {c['requests']}: {c['aggregate_tok_s']:.1f} tok/s together")
    phases.done(f"{max(opts.concurrency)} concurrent requests")


def _roofline(report: dict[str, Any], bw: dict[str, Any], weights: dict[str, Any]) -> None:
    """What the memory allows: bandwidth / bytes per step, against the measured decode."""
    ceiling = bw["bytes_per_s"] / weights["bytes_per_token"]
    report["roofline"] = {
        "bandwidth_gb_s": bw["gb_s"], "weight_mb_per_token": round(weights["bytes_per_token"] / MB, 2),
        "ceiling_tok_s": round(ceiling, 1), "decode_tok_s": round(report["decode"]["tok_s"], 2),
        "decode_pct_of_ceiling": round(100 * report["decode"]["tok_s"] / ceiling, 1),
    }
    for entry in report["context"]:
        entry["ceiling_tok_s"] = round(bw["bytes_per_s"] / (weights["bytes_per_token"] + entry["kv_bytes_per_token"]),
                                       1)




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
