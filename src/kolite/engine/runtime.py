"""An ONNX Runtime session over kolite's GPT-2 graph, with a KV cache that is never copied per step.

The cache is one preallocated buffer per layer and kind, [slots, heads, capacity, head_dim], in the
dtype the graph declares (float16 for kolite's int8/int4 graphs, float32 for fp32). A
sequence owns a slot (a row); the runtime binds the buffers as both `past` and `present`, so
`GroupQueryAttention` writes each new key and value in place. Decoding `n` sequences uses slots
0..n-1, a contiguous view, so no batch is ever assembled by copying. Pages of the buffers become
resident only when written (see `lazy_zeros`), so a large capacity costs nothing until it is used.
The token embeddings of each step are read from the table file beside the graph
(`kolite.engine.embeddings`), so the table is never mapped into the server's memory.

Session options that matter on a small board: intra-op threads equal to the cores we may use, one
inter-op thread (the graph is a chain), full graph optimisation, and no memory arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kolite.engine.cpu import CpuInfo, detect
from kolite.engine.embeddings import TokenTable
from kolite.errors import ModelFormatError
from kolite.models.gpt2config import GPT2Config


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A zeroed buffer whose pages become resident only when written, 4 KB at a time.

    A sequence's cache rows are spread over every head's region of the buffer; with transparent
    huge pages each first write would make a whole 2 MB page resident, so a 16-token request
    would cost a full slot (75 MB for KoGPT2). Anonymous memory with MADV_NOHUGEPAGE avoids that.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mem, dtype).reshape(shape)


def release_free_memory() -> None:
    """Hand memory that the C heap holds but no longer uses back to the system (glibc only).

    Why: onnxruntime frees a session's load buffers and a long prompt's activations, but glibc keeps
    most of those pages, so the resident set stays at its high-water mark. `malloc_trim(0)` returns
    them in 1-5 ms (KoGPT2 int8, measured: 331 -> 276 MB after load). Elsewhere it does nothing.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None

# The cache element types a kolite graph declares: float32 (fp32 graphs), float16 (int8/int4), int8
# (`--kv-cache int8`, see `kolite.convert.kvcache`).
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}

# Prompt tokens per prefill call (see `GPT2Runtime.prefill`); 256 measured fastest of 128/256/whole.
PREFILL_CHUNK = 256
# The most attention scratch one layer of a prefill chunk may take: [heads, chunk, slot capacity] float32,
# 12.6 MB for KoGPT2's 12 heads x 256 x 1024. A model with more heads or a longer window gets shorter chunks,
# so this scratch does not grow with the slot capacity (onnxruntime sizes it by the cache buffer's length).
ATTENTION_SCRATCH_BYTES = 12 * 256 * 1024 * 4


@dataclass(frozen=True)
class RuntimeOptions:
    """How the session runs; the defaults suit a 4-core Pi and a 2-core PC alike."""

    threads: int = 1
    spin: bool = True  # busy-wait between ops: lower latency per token, at the cost of idle CPU

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        # No arena: a long prompt's scratch memory goes back after the step instead of staying
        # reserved for the life of the server (measured: ~100 MB less RSS after a 512-token
        # prompt on KoGPT2, no measurable decode cost).
        so.enable_cpu_mem_arena = False
        return so


def prefill_chunk_tokens(heads: int, capacity: int) -> int:
    """PREFILL_CHUNK, or fewer where one layer's attention scratch ([heads, chunk, capacity] float32)
    would pass ATTENTION_SCRATCH_BYTES: more heads or a longer slot than KoGPT2's."""
    return min(PREFILL_CHUNK, max(16, ATTENTION_SCRATCH_BYTES // (4 * heads * capacity)))


def check_int8_weights(metadata: dict[str, str], cpu: CpuInfo) -> None:
    """Refuse an int8 graph whose weight form computes wrong on this CPU (an s8 graph converted on a
    VNNI or ARM machine and copied to an x86 CPU without VNNI, where u8 x s8 saturates)."""
    form = metadata.get("kolite.int8_weights")
    if form == "s8" and not cpu.exact_u8s8:
        raise ModelFormatError(
            f"this int8 graph stores s8 weights, which ONNX Runtime's int8 kernel on this CPU ({cpu.int8_kernel}: "
            "no VNNI) computes with 16-bit saturation, so its answers would be wrong. Convert the model on this "
            "machine (kolite pull converts it for this CPU; --int8-weights auto) instead of copying the graph.")


class GPT2Runtime:
    """Prefill and decode steps of a kolite GPT-2 graph over slot-addressed, in-place KV buffers."""

    def __init__(self, model_path: Path | str, cfg: GPT2Config, options: RuntimeOptions | None = None,
                 *, slots: int = 1, capacity: int | None = None) -> None:
        self.cfg = cfg
        self.options = options or RuntimeOptions()
        self.session = ort.InferenceSession(
            str(model_path), sess_options=self.options.session_options(), providers=["CPUExecutionProvider"]
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        check_int8_weights(metadata, detect())
        self.tokens = TokenTable.for_graph(Path(model_path), metadata)
        self.capacity = capacity or cfg.n_positions
        self._kv_names = [f"{kind}_{i}" for i in range(cfg.n_layer) for kind in ("key", "value")]
        past = {i.name: i.type for i in self.session.get_inputs()}["past_key_0"]
        self.kv_dtype = np.dtype(KV_DTYPES[past])  # as the graph says
        self._all_logits = self.session.get_outputs()[0].shape[1] != 1  # graph built with all_logits
        self.slots = 0
        self.ensure_slots(slots)
        release_free_memory()

    def ensure_slots(self, slots: int) -> None:
        """Have at least `slots` cache rows (call while no sequence is running: caches start empty)."""
        if slots <= self.slots:
            return
        shape = (slots, self.cfg.n_head, self.capacity, self.cfg.head_dim)
        self.cache = [lazy_zeros(shape, self.kv_dtype) for _ in range(2 * self.cfg.n_layer)]  # [key_0, value_0, ...]
        self._logits = np.zeros((slots, 1, self.cfg.vocab_size), np.float32)
        self._decode_bindings: dict[int, ort.IOBinding] = {}
        self.slots = slots

    def io_spec(self) -> dict[str, list[list[object]]]:
        """The session's inputs and outputs ([name, type, shape]): compared with what the cache's manifest
        recorded when the graph was converted (`kolite.convert.graph.io_spec`)."""
        def values(items: Sequence[ort.NodeArg]) -> list[list[object]]:
            return [[v.name, v.type, list(v.shape)] for v in items]

        return {"inputs": values(self.session.get_inputs()), "outputs": values(self.session.get_outputs())}

    # --- the two steps -----------------------------------------------------------------------
    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Run a prompt into `slot` (its cache starts empty). Returns logits [1, vocab] for the last
        position, or [seq, vocab] when the graph was built with `all_logits`: `[-1]` is the next token's.

        Long prompts go in chunks of `chunk_tokens` (see `prefill_chunk`). Why: attention's
        scratch is [heads, chunk, capacity] floats, so a whole 900-token prompt needed ~43 MB of it per
        layer, and in chunks the prompt is also faster (the logits are identical; KoGPT2 int8, 900
        tokens: 300 -> 232 ms, peak RSS 396 -> 330 MB).
        """
        n = len(ids)
        if not 0 < n <= self.capacity:
            raise ValueError(f"prompt of {n} tokens does not fit a slot of {self.capacity}")
        step = self.chunk_tokens
        parts = [self.prefill_chunk(slot, ids, start, min(n, start + step)) for start in range(0, n, step)]
        return np.concatenate(parts) if self._all_logits else parts[-1]

    def prefill_chunk(self, slot: int, ids: Sequence[int], start: int, end: int) -> np.ndarray:
        """Run prompt tokens `ids[start:end]` into `slot`, whose cache already holds `ids[:start]`.
        Returns the logits of the chunk (its last position, unless `all_logits`).

        The scheduler calls this between decode steps, so a long prompt never stalls the running
        requests for longer than one chunk.
        """
        if not 0 <= start < end <= min(len(ids), self.capacity):
            raise ValueError(f"prompt tokens {start}..{end} do not fit a slot of {self.capacity}")
        io = self.session.io_binding()
        self._bind_cache(io, slice(slot, slot + 1))
        feeds = self._feeds(np.asarray(ids[start:end], np.int64)[None, :],
                            np.arange(start, end, dtype=np.int64)[None, :], np.array([end - 1], np.int32), end)
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits")
        self.session.run_with_iobinding(io)
        # Only the logits: `copy_outputs_to_cpu()` would also copy every bound cache buffer (a whole
        # 75 MB slot for KoGPT2, ~25 ms) just to throw the copies away.
        return io.get_outputs()[-1].numpy()[0]  # bound last

    def decode(self, tokens: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
        """One new token for each of slots 0..len(tokens)-1, whose caches hold `lengths` tokens.

        Returns logits [rows, vocab]; a view into a buffer the next call overwrites.
        """
        rows = len(tokens)
        io = self._decode_bindings.get(rows)
        if io is None:
            io = self.session.io_binding()
            self._bind_cache(io, slice(0, rows))
            out = self._logits[:rows]
            io.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self._decode_bindings[rows] = io
        lens = np.asarray(lengths, np.int64)
        if lens.max(initial=0) >= self.capacity:
            raise ValueError("a sequence is at the end of its slot")
        feeds = self._feeds(np.asarray(tokens, np.int64)[:, None], lens[:, None], lens.astype(np.int32),
                            int(lens.max()) + 1)
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        self.session.run_with_iobinding(io)
        return self._logits[:rows, 0]

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's cache to another slot (the scheduler keeps active slots contiguous); both
        slots' other pages go back to the system, so `src` is free afterwards.

        Why: the resident cache must stay what the running sequences hold, or the KV pool's bound
        would not hold. `dst`'s old content (a finished request's, maybe longer) is dropped before the
        copy instead of lingering past `length`, and `src` is given back one layer's buffer at a time,
        so a moved sequence is never resident twice (at most 1/(2 x layers) of it for a moment).
        """
        if src == dst:
            return
        for buf in self.cache:
            _give_back(buf, dst)
            buf[dst, :, :length] = buf[src, :, :length]
            _give_back(buf, src)

    def release(self, slot: int) -> None:
        """Hand a free slot's cache pages back to the system; they come back as zeros when written.

        Why: a long conversation leaves its keys and values resident (33 MB for 900 KoGPT2 tokens
        with the float16 cache) after it ends; on a small board that memory should go back.
        """
        for buf in self.cache:
            _give_back(buf, slot)

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per prefill call for this model and slot capacity (`prefill_chunk_tokens`)."""
        return prefill_chunk_tokens(self.cfg.n_head, self.capacity)

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes in every layer, keys and values (36 KB for KoGPT2 in float16)."""
        return 2 * self.cfg.n_layer * self.cfg.n_embd * self.kv_dtype.itemsize

    @property
    def kv_page_tokens(self) -> int:
        """Tokens per memory page of one head's cache rows: a slot's resident cache grows in steps of
        this many tokens (32 for head_dim 64 in float16 with 4 KB pages; 128 with 16 KB pages)."""
        return max(1, mmap.PAGESIZE // (self.cfg.head_dim * self.kv_dtype.itemsize))

    # --- binding ------------------------------------------------------------------------------
    def _bind_cache(self, io: ort.IOBinding, rows: slice) -> None:
        for name, buf in zip(self._kv_names, self.cache, strict=True):
            view = buf[rows]  # leading-axis slice of a C-contiguous array: contiguous, no copy
            shape = list(view.shape)
            io.bind_input(f"past_{name}", "cpu", 0, self.kv_dtype, shape, view.ctypes.data)
            io.bind_output(f"present_{name}", "cpu", 0, self.kv_dtype, shape, view.ctypes.data)

    def _feeds(self, ids: np.ndarray, positions: np.ndarray, seqlens_k: np.ndarray,
               total: int) -> dict[str, np.ndarray]:
        return {"token_embeddings": self.tokens.lookup(ids), "position_ids": positions, "seqlens_k": seqlens_k,
                "total_sequence_length": np.array(total, np.int32)}


def _give_back(buf: np.ndarray, slot: int) -> None:
    """`madvise(MADV_DONTNEED)` the whole pages of `buf[slot]` (one layer's keys or values of a slot),
    when `buf` is a `lazy_zeros` mapping; a plain numpy buffer keeps its memory."""
    region, mem = buf[slot], buf.base
    while isinstance(mem, np.ndarray):  # the reshaped view -> the flat array -> its buffer
        mem = mem.base
    if isinstance(mem, memoryview):  # np.frombuffer keeps a memoryview of the mapping
        mem = mem.obj
    if not isinstance(mem, mmap.mmap):
        return
    start = region.ctypes.data - buf.ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the slot only
    last = (start + region.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mem.madvise(mmap.MADV_DONTNEED, first, last - first)
