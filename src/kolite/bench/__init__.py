"""`kolite bench`: what this machine does with the configured model and precision, split by job:
the machine (`machine`), memory and bandwidth (`memory`), the bytes a decode step reads (`roofline`),
the model it runs on (`model`), timed requests through the serving scheduler (`timing`), the whole
run (`run`) and its report (`report`). `run.py`'s docstring says what a run does and in what order.

The names below are the package's public face: `kolite bench` and the scripts in benchmarks/ use
them. Heavy imports (onnx, onnxruntime, the engine) stay inside functions, so the CLI parser stays fast.
"""

from kolite.bench.machine import MB, board_model, cpu_model, last_level_cache_bytes, machine_info
from kolite.bench.memory import (
    bandwidth_buffer_bytes,
    memory_read_bandwidth,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from kolite.bench.model import (
    RANDOM_SHAPES,
    BenchModel,
    IdsOnlyTokenizer,
    RandomCheckpoint,
    ensure_random_checkpoint,
    open_model,
    prompt_ids,
)
from kolite.bench.report import plot_available, render_table, table_rows, write_json, write_plot
from kolite.bench.roofline import kv_bytes_per_token, parameter_count, weight_bytes_per_token
from kolite.bench.run import BenchOptions, run_bench, run_command
from kolite.bench.timing import (
    Timed,
    decode_rate,
    distinct_lengths,
    measure_concurrency,
    measure_context,
    measure_decode,
    measure_ttft,
    time_request,
    timed_generation,
)

__all__ = [
    "MB", "RANDOM_SHAPES", "BenchModel", "BenchOptions", "IdsOnlyTokenizer", "RandomCheckpoint", "Timed",
    "bandwidth_buffer_bytes", "board_model", "cpu_model", "decode_rate", "distinct_lengths",
    "ensure_random_checkpoint", "kv_bytes_per_token", "last_level_cache_bytes", "machine_info",
    "measure_concurrency", "measure_context", "measure_decode", "measure_ttft", "memory_read_bandwidth",
    "open_model", "parameter_count", "peak_rss_mb", "plot_available", "prompt_ids", "render_table",
    "reset_peak_rss", "rss_mb", "run_bench", "run_command", "table_rows", "time_request",
    "timed_generation", "weight_bytes_per_token", "write_json", "write_plot",
]
