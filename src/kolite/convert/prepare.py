"""The path a model takes: name → files → numpy weights, one at a time → ONNX graph (fp32, int8, int4) in the cache.

`kolite pull` runs this and stops; `kolite serve` runs it in the background and then opens a
session on the result. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import onnxruntime

from kolite import __version__
from kolite.config import SMALL_MEMORY_BYTES, ModelSettings, memory_limit_bytes
from kolite.engine.cpu import CpuInfo, auto_precision, detect, int8_weights_for
from kolite.errors import ModelFormatError
from kolite.models.cache import GRAPH, CacheEntry, entry_folder, entry_lock, file_fingerprint, lookup, write_entry
from kolite.models.gpt2_keys import GPT2Weights
from kolite.models.gpt2config import GPT2Config
from kolite.models.resolve import ModelFiles, resolve_model
from kolite.models.weights import open_checkpoint

log = logging.getLogger(__name__)

# The modules whose code decides what a converted graph holds: reading the checkpoint, building and
# quantizing the graph, the token table's layout. A change to any of them changes `converter_digest()`,
# and with it every cache key, so a graph is rebuilt without anyone remembering to bump a number (the
# hand-bumped GRAPH_VERSION it replaces once left graphs the runtime could not feed).
CONVERTER_MODULES = ("kolite.convert.graph", "kolite.convert.quantize", "kolite.convert.kvcache",
                     "kolite.convert.prepare", "kolite.engine.embeddings", "kolite.models.weights",
                     "kolite.models.checkpoint", "kolite.models.safetensors_file", "kolite.models.torch_file",
                     "kolite.models.gpt2_keys",
                     "kolite.models.gpt2config")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PreparedModel:
    """Everything needed to open a session and a tokenizer for one model."""

    files: ModelFiles
    config: GPT2Config
    precision: str  # concrete: "auto" is resolved for this CPU
    graph: Path
    manifest: dict
    converted: bool  # False when the cache already held it

    @property
    def graph_bytes(self) -> int:
        """The graph and its external weights file together: the model's size on disk."""
        return sum(p.stat().st_size for p in (self.graph, self.graph.with_name(self.graph.name + ".data"),
                                               self.graph.with_name(self.graph.name + ".tokens")) if p.is_file())


@dataclass(frozen=True)
class Kernels:
    """What a conversion produces for a CPU: precision, int8 activation scheme and int8 weight form."""

    precision: str
    scheme: str | None  # int8 only
    int8_weights: str | None  # int8 only: "s8" or "u8"
    kv_cache: str = "float"  # or "int8"

    @property
    def variant(self) -> str:
        """The cache folder's name: a graph made for one weight form or cache type is never found as another."""
        name = self.precision
        if self.precision == "int8":
            name = "int8" if self.scheme == "per-token" else f"int8-{self.scheme}"
            name = name if self.int8_weights == "s8" else f"{name}-{self.int8_weights}"
        return name if self.kv_cache == "float" else f"{name}-kv8"


def choose_kv_cache(setting: str, memory: int | None) -> str:
    """Resolve `--kv-cache auto`: int8 where the machine (or its container) has SMALL_MEMORY_BYTES or less."""
    if setting != "auto":
        return setting
    return "int8" if memory is not None and memory <= SMALL_MEMORY_BYTES else "float"


def choose_kernels(settings: ModelSettings, cpu: CpuInfo, memory: int | None = None) -> Kernels:
    """Resolve `--precision auto`, `--int8-weights auto` and `--kv-cache auto` for `cpu` and `memory`
    (bytes this process may use), warning where a choice is slow or wrong."""
    precision = auto_precision(cpu) if settings.precision == "auto" else settings.precision
    kv_cache = choose_kv_cache(settings.kv_cache, memory)
    if precision != "int8":
        if precision == "int4" and not cpu.int4_fast:
            log.warning("int4 on this CPU (%s) runs ONNX Runtime's fallback 4-bit kernel (it needs %s): "
                        "expect it slower than int8", cpu.summary(), "dot product" if cpu.is_arm64 else "AVX2")
        return Kernels(precision, None, None, kv_cache)
    weights = int8_weights_for(settings.int8_weights, cpu)
    if weights == "s8" and not cpu.exact_u8s8 and kv_cache == "int8":
        raise ModelFormatError(
            "an int8 KV cache is calibrated by running the model, and s8 int8 weights compute wrong on this CPU "
            f"({cpu.int8_kernel}): convert on the machine that will serve it, or with --kv-cache float")
    if weights == "s8" and not cpu.exact_u8s8:
        log.warning("int8 weights s8 were asked for, but this CPU's int8 kernel (%s) saturates with them: the "
                    "graph is for another machine and will be refused here", cpu.int8_kernel)
    return Kernels("int8", settings.int8_scheme, weights, kv_cache)


@functools.cache
def converter_digest() -> str:
    """sha256 (first 16 hex digits) of the CONVERTER_MODULES' source files, found without importing them
    (serving a cached graph never imports onnx)."""
    h = hashlib.sha256()
    for name in CONVERTER_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModelFormatError(f"kolite's converter module {name} is missing from this installation")
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _expected_manifest(files: ModelFiles, kernels: Kernels) -> dict:
    return {
        "converter": converter_digest(),
        "precision": kernels.precision,
        "int8_scheme": kernels.scheme,
        "int8_weights": kernels.int8_weights,
        "kv_cache": kernels.kv_cache,
        "source": {"name": files.name, "revision": files.revision,
                   "weights": file_fingerprint(files.weights), "config": file_fingerprint(files.config)},
        "onnx": version("onnx"),  # read from metadata: serving a cached graph never imports onnx (~25 MB)
        "onnxruntime": onnxruntime.__version__,
    }


def build_graph_files(files: ModelFiles, cfg: GPT2Config, precision: str, out_dir: Path,
                      *, scheme: str = "per-token", int8_weights: str | None = None, kv_cache: str = "float",
                      progress: Progress | None = None) -> Path:
    """Convert the checkpoint in `files` to `out_dir/model.onnx` (weights in `model.onnx.data`); returns that path.

    int8 "per-token" and int4 are built straight into the graph (int8 weights per column with
    activations quantized per token at run time; int4 blocks for onnxruntime's MatMulNBits);
    int8 "ort-dynamic" builds fp32 and runs onnxruntime's `quantize_dynamic` (per-channel) over it.
    `int8_weights` is the int8 weight form ("s8" or "u8"; None: the one exact on this CPU).
    `kv_cache="int8"` then calibrates the cache's scales on the finished graph and makes its cache int8
    (`kolite.convert.kvcache.calibrate_kv_cache`).

    Streamed, so a Pi can convert KoGPT2: the checkpoint is read one tensor at a time and each weight,
    quantized as it comes, goes straight into the external-data file (`build_gpt2_graph`'s
    `external_data`); the largest thing in memory is the token embedding and one form of it
    (benchmarks/bench_convert.py measures the peak). onnxruntime's `quantize_dynamic` loads a whole graph,
    so "ort-dynamic" peaks higher.
    """
    import onnx

    from kolite.convert.graph import build_gpt2_graph, token_table_path
    from kolite.convert.quantize import quantize_int8

    say = progress or (lambda _msg: None)
    ort_dynamic = precision == "int8" and scheme == "ort-dynamic"
    quant = "fp32" if ort_dynamic else precision
    target = out_dir / GRAPH
    graph = out_dir / "model.fp32.onnx" if ort_dynamic else target
    say(f"reading weights {files.weights.name} (one tensor at a time)")
    with open_checkpoint(files.weights) as checkpoint:
        weights = GPT2Weights(checkpoint, cfg)
        say(f"building GPT-2 graph ({cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size})")
        if quant == "int8":
            say("quantizing weights to int8 (per column; activations per token at run time)")
        elif quant == "int4":
            say("quantizing weights to int4 (blocks of 32, as llama.cpp's Q4_0)")
        # Quantized graphs keep a float16 KV cache (as llama.cpp does); fp32 stays exact end to end.
        model = build_gpt2_graph(cfg, weights, quant=quant, kv_cache="fp32" if quant == "fp32" else "fp16",
                                 int8_weights=int8_weights,  # type: ignore[arg-type]
                                 external_data=_data_file(graph), token_table=token_table_path(target))
    onnx.save_model(model, str(graph))  # the graph alone: its weights are in the data file already
    del model
    gc.collect()
    if ort_dynamic:
        say("quantizing to int8 with onnxruntime's quantize_dynamic (per-channel)")
        quantize_int8(graph, target, per_channel=True, int8_weights=int8_weights,  # type: ignore[arg-type]
                      external_data=True)
        graph.unlink()
        _data_file(graph).unlink()
    if kv_cache == "int8":
        from kolite.convert.kvcache import calibrate_kv_cache

        say("calibrating the int8 KV cache")
        calibrate_kv_cache(target, cfg, files.tokenizer)
    return target


def _data_file(graph: Path) -> Path:
    """Where a graph's weights live: `model.onnx.data` beside `model.onnx`."""
    return graph.with_name(graph.name + ".data")


def prepare_model(settings: ModelSettings, *, progress: Progress | None = None,
                  need_tokenizer: bool = False) -> PreparedModel:
    """Resolve, and convert unless the cache holds a graph made from the same source.

    `need_tokenizer` refuses a model without tokenizer files before spending minutes converting it.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    files = resolve_model(settings.model, revision=settings.revision, cache_dir=settings.cache_dir,
                          local_files_only=settings.local_files_only, progress=progress is not None)
    if need_tokenizer:
        files.check_tokenizer()
    cfg = GPT2Config.from_file(files.config)
    cpu = detect()
    memory = memory_limit_bytes()
    kernels = choose_kernels(settings, cpu, memory)
    auto = [name for name in ("precision", "kv_cache") if getattr(settings, name) == "auto"]
    log.info("CPU %s: int8 kernel %s; memory %s; %s%s", cpu.summary(), cpu.int8_kernel,
             f"{memory / 2**30:.1f} GB" if memory else "unknown", kernels.variant,
             f" ({' and '.join(auto)} auto)" if auto else "")
    folder = entry_folder(settings.kolite_home, files.name, files.revision, kernels.variant)
    with entry_lock(folder):  # a second process waits for this one's conversion, then reuses it
        return _lookup_or_convert(files, cfg, kernels, folder, say)


def _lookup_or_convert(files: ModelFiles, cfg: GPT2Config, kernels: Kernels, folder: Path,
                       say: Progress) -> PreparedModel:
    expected = _expected_manifest(files, kernels)
    entry: CacheEntry | None = lookup(folder, expected)
    if entry is not None:
        say(f"using converted graph {entry.graph}")
        return PreparedModel(files, cfg, kernels.precision, entry.graph, entry.manifest, converted=False)

    started = time.perf_counter()
    manifest = {**expected, "config": cfg.to_dict(), "kolite": __version__}

    def build(tmp: Path) -> None:
        import onnx

        from kolite.convert.graph import io_spec

        graph = build_graph_files(files, cfg, kernels.precision, tmp, scheme=kernels.scheme or "per-token",
                                  int8_weights=kernels.int8_weights, kv_cache=kernels.kv_cache, progress=say)
        manifest["graph_io"] = io_spec(onnx.load(str(graph), load_external_data=False))

    entry = write_entry(folder, manifest, build)
    say(f"converted {files.name} to {kernels.variant} in {time.perf_counter() - started:.1f}s: {entry.graph}")
    return PreparedModel(files, cfg, kernels.precision, entry.graph, entry.manifest, converted=True)
