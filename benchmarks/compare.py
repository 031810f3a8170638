"""Head to head: kolite (int8, fp32, int4) against llama.cpp (Q8_0, Q4_0) and transformers, same weights.

For each model shape (`--models kogpt2,distilgpt2`; random weights, KoGPT2's exact shape: vocab 51200,
12 layers, 768 wide, 12 heads, 1024 positions; distilgpt2's: vocab 50257, 6 layers) one run:

1. writes GGUF files of the SAME random checkpoint that kolite converts: F32 with gguf-py (tensor
   names, transposes and keys as llama.cpp's `convert_hf_to_gguf.py` writes GPT-2; a `gpt2` tokenizer
   section built from the checkpoint's `tokenizer.json`), then Q8_0 and Q4_0 with llama.cpp's own
   quantizer (`llama_model_quantize`, the library call behind `llama-quantize`);
2. checks correctness before timing anything: llama.cpp F32 (F32 KV cache, flash attention off:
   its most exact path) against kolite fp32 on the same ids: max abs diff of the logits at every
   step of a 64-token greedy run (teacher-forced with kolite's tokens) and after a 512-token prompt,
   top-1 agreement, and both against an independent float64 numpy forward. If they disagree
   (`--tolerance`), nothing is timed. The default llama.cpp context and Q8_0/Q4_0 are reported too;
3. times each engine in its own fresh subprocess (peak RSS = that process's `VmHWM`), batch 1:
   decode tok/s (128 new tokens after a 16-token prompt), TTFT for a 512-token prompt, decode tok/s
   at ~900 tokens of context (64 new tokens after an 868-token prompt); the same thread count for all.
   A fixed numpy workload runs before and after each engine; when it shows the shared host slowed
   down, the engine is run again (`--retries`);
4. times batched decoding: 8 sequences decoding together, one token each per step (kolite: slots
   0..7 of its runtime; llama.cpp: one `llama_batch` with 8 seq_ids, as llama-batched-bench does);
5. reports greedy agreement with kolite fp32 (leading run of equal tokens of a 64-token greedy
   continuation) and prints tables with ratios against llama.cpp Q8_0 and transformers.

Every engine gets token ids (KoGPT2's tokenizer is not byte-level BPE, so llama.cpp's tokenizer is
never used) and does the same work per token: one forward step, then `argmax` of the logits in
numpy. kolite runs `GPT2Runtime.prefill/decode`, llama.cpp `llama_decode` through llama-cpp-python's
low-level binding (context defaults otherwise: F16 KV cache, flash attention "auto"), transformers
the pipeline's model through `generate` (greedy, `min_new_tokens == max_new_tokens`).

    /work/venv/bin/python benchmarks/compare.py                     # both shapes, a few minutes on 2 cores
    /work/venv/bin/python benchmarks/compare.py --quick             # 2-layer shapes, short prompts
    /work/venv/bin/python benchmarks/compare.py --models kogpt2 --threads 2 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core as core  # noqa: E402  (checkpoints, prompts text, machine description, memory)

ENGINES = ("kolite-int8", "kolite-fp32", "kolite-int4", "llama-Q8_0", "llama-Q4_0", "transformers")
BATCHED = ("kolite-int8", "kolite-fp32", "kolite-int4", "llama-Q8_0", "llama-Q4_0")
MODELS = ("kogpt2", "distilgpt2")
GPT2_TOKENIZER = core.FIXTURES / "gpt2-tokenizer" / "tokenizer.json"
GGUF_WRITER_VERSION = 1  # bump when the GGUF layout written here changes: cached files are rewritten
GGUF_KINDS = ("F32", "Q8_0", "Q4_0")
AGREE_TOKENS = 64


# ====================================================================================================
# shapes, checkpoints, prompts


def _shape(model: str, quick: bool):
    from dataclasses import replace

    from kolite.models.synthetic import DISTILGPT2_SHAPE, KOGPT2_SHAPE

    shape = {"kogpt2": KOGPT2_SHAPE, "distilgpt2": DISTILGPT2_SHAPE}[model]
    return replace(shape, n_layer=2) if quick else shape


def _folder_name(model: str, quick: bool) -> str:
    # kogpt2's names are bench_core's, so both benchmarks share one checkpoint and its converted graphs
    return f"{model}-shape-2layer-random" if quick else f"{model}-shape-random"


def _tokenizer_json(model: str, work: Path, vocab_size: int) -> tuple[Path, str]:
    if model == "kogpt2" and core.KOGPT2_TOKENIZER.is_file():
        return core.KOGPT2_TOKENIZER, "KoGPT2 tokenizer.json (fixture)"
    if model == "distilgpt2" and GPT2_TOKENIZER.is_file():
        return GPT2_TOKENIZER, "GPT-2 tokenizer.json (fixture; distilgpt2 uses it unchanged)"
    path = work / "fallback-tokenizer" / "tokenizer.json"
    if not path.is_file():
        core._fallback_tokenizer(path, vocab_size)
    return path, "fallback byte-level BPE (fixture absent)"


def _text_ids(tokenizer_json: Path, n: int) -> list[int]:
    """At least `n` ids of real Korean text (ChatbotData rows, else bench_core's built-in sample)."""
    import unicodedata

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    lines = core._korean_lines()
    take = 64
    while True:
        text = " ".join((lines * (1 + take // max(1, len(lines))))[:take])
        ids = tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids
        if len(ids) >= n:
            return ids[:n]
        take *= 2


def _lengths(args_like: dict) -> dict[str, int]:
    quick = args_like["quick"]
    return {"short": 16, "ttft": 128 if quick else 512, "long": 224 if quick else 868,
            "long_new": 16 if quick else 64}


# ====================================================================================================
# GGUF: F32 written here (as convert_hf_to_gguf.py writes GPT-2), Q8_0/Q4_0 by llama.cpp's quantizer


def _gguf_vocab(tokenizer_json: Path, vocab_size: int, profile) -> dict[str, Any]:
    """A `gpt2` (BPE) tokenizer section from tokenizer.json: tokens by id, types, merges, special ids.

    llama.cpp needs a vocab to load a model and checks it against the embedding's rows; it is never
    asked to tokenize here. Ids the tokenizer lacks (a small fallback tokenizer) become unused pads.
    """
    import gguf

    raw = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = raw["model"]
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for piece, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = piece
    for added in raw.get("added_tokens") or ():
        i = int(added["id"])
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for i, piece in enumerate(tokens):
        if piece is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    index = {t: i for i, t in enumerate(tokens)}
    special = {key: index.get(getattr(profile, f"{key}_token")) for key in ("bos", "eos", "unk", "pad")}
    return {"tokens": tokens, "types": types, "merges": merges, "special": special,
            "pre": "gpt-2" if profile.name == "gpt2" else "default"}


def _write_gguf_f32(model_dir: Path, out: Path) -> dict[str, Any]:
    """GPT-2 in llama.cpp's layout. Tensor names and the Conv1D transposes follow convert_hf_to_gguf.py's
    GPT2Model: HF's Conv1D stores [in, out]; llama.cpp wants ggml {in, out}, i.e. numpy [out, in].
    No `output.weight`: llama.cpp ties the head to `token_embd` when it is absent (as the converter does)."""
    import gguf
    import numpy as np

    from kolite.models.gpt2_keys import gpt2_weights
    from kolite.models.gpt2config import GPT2Config
    from kolite.models.profiles import profile_for
    from kolite.models.weights import load_state_dict

    cfg = GPT2Config.from_file(model_dir / "config.json")
    w = gpt2_weights(load_state_dict(model_dir), cfg)
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.inner_dim)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokenizer_json = model_dir / "tokenizer.json"
    vocab = _gguf_vocab(tokenizer_json, cfg.vocab_size, profile_for(model_dir.name, tokenizer_json))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if vocab["special"][key] is not None:
            add(vocab["special"][key])
    writer.add_add_bos_token(False)

    def put(name: str, arr: np.ndarray) -> None:
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    t = "transformer."
    put("token_embd.weight", w[t + "wte.weight"])
    put("position_embd.weight", w[t + "wpe.weight"])
    put("output_norm.weight", w[t + "ln_f.weight"])
    put("output_norm.bias", w[t + "ln_f.bias"])
    for i in range(cfg.n_layer):
        p, b = f"{t}h.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", w[p + "ln_1.weight"])
        put(b + "attn_norm.bias", w[p + "ln_1.bias"])
        put(b + "attn_qkv.weight", w[p + "attn.c_attn.weight"].T)
        put(b + "attn_qkv.bias", w[p + "attn.c_attn.bias"])
        put(b + "attn_output.weight", w[p + "attn.c_proj.weight"].T)
        put(b + "attn_output.bias", w[p + "attn.c_proj.bias"])
        put(b + "ffn_norm.weight", w[p + "ln_2.weight"])
        put(b + "ffn_norm.bias", w[p + "ln_2.bias"])
        put(b + "ffn_up.weight", w[p + "mlp.c_fc.weight"].T)
        put(b + "ffn_up.bias", w[p + "mlp.c_fc.bias"])
        put(b + "ffn_down.weight", w[p + "mlp.c_proj.weight"].T)
        put(b + "ffn_down.bias", w[p + "mlp.c_proj.bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tokens": len(vocab["tokens"]), "merges": len(vocab["merges"]), "special_ids": vocab["special"],
            "tokenizer_pre": vocab["pre"]}


_LLAMA_LOG: list[str] = []
_LLAMA_LOG_CB = None


def _quiet_llama() -> None:
    """Send llama.cpp's log to a list (kept in the JSON) instead of stderr."""
    global _LLAMA_LOG_CB
    import llama_cpp as L

    if _LLAMA_LOG_CB is None:
        def keep(level: int, text: bytes, _user: Any) -> None:
            if text and len(_LLAMA_LOG) < 4000:
                _LLAMA_LOG.append(text.decode("utf-8", "replace"))

        _LLAMA_LOG_CB = L.llama_log_callback(keep)
        L.llama_log_set(_LLAMA_LOG_CB, None)
        L.llama_backend_init()


def _llama_log_lines(keywords: tuple[str, ...]) -> list[str]:
    lines = "".join(_LLAMA_LOG).splitlines()
    return [s.strip() for s in lines if any(k in s for k in keywords)]


def _quantize_gguf(src: Path, dst: Path, kind: str, threads: int) -> None:
    """llama.cpp's own quantizer with llama-quantize's defaults (not --pure): GPT-2's head is tied to
    token_embd, so for Q4_0 llama.cpp stores token_embd as Q6_K (its rule for output tensors)."""
    import llama_cpp as L

    _quiet_llama()
    params = L.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = {"Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {rc}")


def _gguf_tensor_types(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    named = {t.name: t.tensor_type.name for t in reader.tensors
             if t.name in ("token_embd.weight", "position_embd.weight", "blk.0.attn_qkv.weight")}
    return {"counts": counts, "examples": named}


def _ensure_gguf(model_dir: Path, out_dir: Path, threads: int) -> dict[str, Any]:
    """F32, Q8_0 and Q4_0 GGUFs of the checkpoint in `model_dir`, cached while the checkpoint is unchanged."""
    import gguf
    import llama_cpp

    stamp = {"checkpoint": json.loads((model_dir / "bench-stamp.json").read_text(encoding="utf-8")),
             "writer_version": GGUF_WRITER_VERSION, "gguf": core._version("gguf"),
             "llama_cpp_python": llama_cpp.__version__}
    paths = {k: out_dir / f"{model_dir.name}-{k}.gguf" for k in GGUF_KINDS}
    stamp_file = out_dir / "gguf-stamp.json"
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        old = json.loads(stamp_file.read_text(encoding="utf-8"))
        if old.get("stamp") == stamp and all(p.is_file() for p in paths.values()):
            info = old["info"]
            info["written"] = False
    if not info:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        started = time.perf_counter()
        core._log(f"writing {paths['F32'].name} (gguf-py {gguf.__name__} {core._version('gguf')})")
        info = {"vocab": _write_gguf_f32(model_dir, paths["F32"])}
        info["f32_write_s"] = round(time.perf_counter() - started, 2)
        for kind in ("Q8_0", "Q4_0"):
            started = time.perf_counter()
            core._log(f"quantizing to {kind} with llama.cpp's llama_model_quantize")
            _quantize_gguf(paths["F32"], paths[kind], kind, threads)
            info[f"{kind}_quantize_s"] = round(time.perf_counter() - started, 2)
        info["types"] = {k: _gguf_tensor_types(p) for k, p in paths.items()}
        stamp_file.write_text(json.dumps({"stamp": stamp, "info": info}, indent=2), encoding="utf-8")
        info["written"] = True
    info["paths"] = {k: str(p) for k, p in paths.items()}
    info["mb"] = {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items()}
    return info


# ====================================================================================================
# workers: prepare, int4 probe, kolite conversion


def worker_prepare(spec: dict) -> dict:
    work = Path(spec["work_dir"])
    model = spec["model"]
    shape = _shape(model, spec["quick"])
    tokenizer_json, tokenizer_kind = _tokenizer_json(model, work, shape.vocab_size)
    folder = work / _folder_name(model, spec["quick"])
    written, seconds = core._ensure_checkpoint(folder, shape, tokenizer_json)
    core._log(("wrote" if written else "reusing") + f" random checkpoint {folder.name} ({seconds:.1f}s)")
    gguf_info = _ensure_gguf(folder, work / "gguf" / folder.name, spec["threads"])
    n = _lengths(spec)
    batch = spec["batch"]
    ids = _text_ids(folder / "tokenizer.json", max(n["long"], n["short"] * batch))
    prompts = {"short": ids[:n["short"]], "ttft": ids[:n["ttft"]], "long": ids[:n["long"]],
               "batch": [ids[i * n["short"]:(i + 1) * n["short"]] for i in range(batch)]}

    from kolite.models.profiles import profile_for

    profile = profile_for(folder.name, folder / "tokenizer.json")
    n_params = (shape.vocab_size + shape.n_positions) * shape.n_embd + shape.n_layer * (
        12 * shape.n_embd * shape.n_embd + 13 * shape.n_embd) + 2 * shape.n_embd
    return {"model": model, "model_dir": str(folder), "tokenizer_json": str(folder / "tokenizer.json"),
            "tokenizer_kind": tokenizer_kind, "shape": shape.to_dict(), "parameters": n_params,
            "checkpoint_written": written, "gguf": gguf_info, "prompts": prompts,
            "hf_special": {k: getattr(profile, f"{k}_token") for k in ("bos", "eos", "unk", "pad", "mask")},
            "llama_log": _llama_log_lines(("quantiz", "size", "llama_model_quantize", "Q6_K")),
            "memory": core._memory()}


def worker_int4_probe(spec: dict) -> dict:
    """Does this kolite accept precision="int4"? (It may be added while the benchmark is being written.)"""
    from kolite.config import ModelSettings

    try:
        ModelSettings(model=spec["model_dir"], precision="int4", local_files_only=True)
    except Exception as exc:
        return {"int4": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {"int4": True}


def _kolite_settings(spec: dict, precision: str):
    from kolite.config import ModelSettings

    return ModelSettings(model=spec["model_dir"], precision=precision, kolite_home=spec["kolite_home"],
                         threads=spec["threads"], local_files_only=True)


def worker_convert(spec: dict) -> dict:
    from kolite.service import load_model

    precision = spec["precision"]
    started = time.perf_counter()
    lm = load_model(_kolite_settings(spec, precision), progress=lambda m: core._log(f"kolite {precision}: {m}"))
    seconds = time.perf_counter() - started
    graph = lm.prepared.graph
    size = sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())
    return {"precision": precision, "converted": lm.prepared.converted, "seconds": round(seconds, 2),
            "graph": str(graph), "graph_mb": round(size / 2**20, 1), "manifest": core._manifest(lm)}


# ====================================================================================================
# engines: the same greedy work per token for every engine


def _argmax(logits) -> int:
    import numpy as np

    return int(np.argmax(logits))


class KoliteEngine:
    def __init__(self, spec: dict, precision: str) -> None:
        from kolite.service import load_model

        self.lm = load_model(_kolite_settings(spec, precision))
        self.runtime = self.lm.runtime
        if self.lm.prepared.converted:
            core._log(f"WARNING: kolite {precision} converted during the timed load (the warm-up should have)")

    def info(self) -> dict:
        graph = self.lm.prepared.graph
        size = sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())
        so = self.runtime.session.get_session_options()
        return {"threads": so.intra_op_num_threads, "graph": str(graph), "file_mb": round(size / 2**20, 1),
                "manifest": core._manifest(self.lm), "torch_imported": "torch" in sys.modules}

    def prefill(self, ids: list[int]):
        return self.runtime.prefill(0, ids)[-1]

    def step(self, token: int, pos: int):
        return self.runtime.decode([token], [pos])[0]

    def batched(self, prompts: list[list[int]], n: int) -> dict:
        """`len(prompts)` sequences in slots 0..B-1; every step decodes all rows at once."""
        import numpy as np

        rt = self.runtime
        rows = len(prompts)
        rt.ensure_slots(rows)
        start = time.perf_counter()
        toks = [_argmax(rt.prefill(i, p)[-1]) for i, p in enumerate(prompts)]
        lengths = [len(p) for p in prompts]
        out = [[t] for t in toks]
        prefilled = time.perf_counter()
        for _ in range(n - 1):
            logits = rt.decode(toks, lengths)
            toks = np.argmax(logits, axis=1).tolist()
            lengths = [x + 1 for x in lengths]
            for row, t in zip(out, toks, strict=True):
                row.append(t)
        end = time.perf_counter()
        return {"start": start, "prefilled": prefilled, "end": end, "ids": out}


class LlamaEngine:
    """llama.cpp through llama-cpp-python's low-level binding: llama_batch in, llama_decode, logits out."""

    def __init__(self, path: str, threads: int, *, n_ctx: int = 1024, n_seq: int = 1, kv_f32: bool = False,
                 flash_attn: int | None = None) -> None:
        import llama_cpp as L

        _quiet_llama()
        self.L = L
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}: {''.join(_LLAMA_LOG[-5:])}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx  # a whole prompt in one llama_decode call (n_ubatch stays at its default, 512)
        cp.n_seq_max = n_seq
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = False
        if kv_f32:
            cp.type_k = L.GGML_TYPE_F32
            cp.type_v = L.GGML_TYPE_F32
        if flash_attn is not None:  # default: LLAMA_FLASH_ATTN_TYPE_AUTO (on for this CPU build)
            cp.flash_attn_type = flash_attn
        self.params = {"n_ctx": cp.n_ctx, "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch, "n_seq_max": cp.n_seq_max,
                       "n_threads": cp.n_threads, "n_threads_batch": cp.n_threads_batch,
                       "type_k": cp.type_k, "type_v": cp.type_v, "flash_attn_type": cp.flash_attn_type,
                       "kv_unified": bool(cp.kv_unified)}
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context: {''.join(_LLAMA_LOG[-5:])}")
        self.memory = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, n_seq)
        self.path = path

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def info(self) -> dict:
        L = self.L
        desc = ctypes_buffer = None
        with contextlib.suppress(Exception):
            import ctypes

            ctypes_buffer = ctypes.create_string_buffer(256)
            L.llama_model_desc(self.model, ctypes_buffer, 256)
            desc = ctypes_buffer.value.decode()
        return {"threads": self.params["n_threads"], "context": self.params, "model_desc": desc,
                "file_mb": round(Path(self.path).stat().st_size / 2**20, 1),
                "model_size_mb": round(L.llama_model_size(self.model) / 2**20, 1),
                "torch_imported": "torch" in sys.modules}

    def _fill(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[int]) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, o) in enumerate(zip(tokens, positions, seqs, outputs, strict=True)):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = o

    def _decode(self) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, rows: int):
        import numpy as np

        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))

    def reset(self) -> None:
        self.L.llama_memory_clear(self.memory, True)

    def prefill(self, ids: list[int]):
        self.reset()
        n = len(ids)
        self._fill(ids, list(range(n)), [0] * n, [0] * (n - 1) + [1])
        self._decode()
        return self._logits(1)[0]

    def step(self, token: int, pos: int):
        self._fill([token], [pos], [0], [1])
        self._decode()
        return self._logits(1)[0]

    def batched(self, prompts: list[list[int]], n: int) -> dict:
        """All prompts in one llama_decode (seq_id = row), then one token per sequence per step."""
        import numpy as np

        rows = len(prompts)
        self.reset()
        start = time.perf_counter()
        toks_in, pos, seqs, outs = [], [], [], []
        for s, p in enumerate(prompts):
            toks_in += p
            pos += list(range(len(p)))
            seqs += [s] * len(p)
            outs += [0] * (len(p) - 1) + [1]
        self._fill(toks_in, pos, seqs, outs)
        self._decode()
        toks = np.argmax(self._logits(rows), axis=1).tolist()
        lengths = [len(p) for p in prompts]
        out = [[t] for t in toks]
        prefilled = time.perf_counter()
        self.perf_reset()  # so llama_perf then holds the decode steps only
        for _ in range(n - 1):
            self._fill(toks, lengths, list(range(rows)), [1] * rows)
            self._decode()
            toks = np.argmax(self._logits(rows), axis=1).tolist()
            lengths = [x + 1 for x in lengths]
            for row, t in zip(out, toks, strict=True):
                row.append(t)
        end = time.perf_counter()
        return {"start": start, "prefilled": prefilled, "end": end, "ids": out}

    def perf(self) -> dict:
        d = self.L.llama_perf_context(self.ctx)
        return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval, "t_eval_ms": d.t_eval_ms, "n_eval": d.n_eval}

    def perf_reset(self) -> None:
        self.L.llama_perf_context_reset(self.ctx)


def _greedy(engine, ids: list[int], n: int, keep_logits: bool = False) -> dict:
    """Prefill, then n-1 single-token steps; each token is the argmax of the previous logits."""
    start = time.perf_counter()
    logits = engine.prefill(ids)
    kept = [logits.copy()] if keep_logits else []
    tok = _argmax(logits)
    out, stamps = [tok], [time.perf_counter()]
    pos = len(ids)
    for _ in range(n - 1):
        logits = engine.step(tok, pos)
        if keep_logits:
            kept.append(logits.copy())
        pos += 1
        tok = _argmax(logits)
        out.append(tok)
        stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "ids": out, "logits": kept}


class TransformersEngine:
    """The model the transformers pipeline loads (as the original app did), driven by `generate`."""

    def __init__(self, spec: dict) -> None:
        import torch
        from transformers import PreTrainedTokenizerFast, pipeline

        torch.set_num_threads(spec["threads"])
        special = {f"{k}_token": v for k, v in spec["hf_special"].items() if v}
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=spec["tokenizer_json"], **special)
        self.generator = pipeline("text-generation", model=spec["model_dir"], tokenizer=tokenizer, device="cpu")
        self.model = self.generator.model
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.torch = torch

    def info(self) -> dict:
        return {"threads": self.torch.get_num_threads(), "interop_threads": self.torch.get_num_interop_threads(),
                "dtype": str(self.model.dtype), "model_class": type(self.model).__name__,
                "file_mb": round(sum(p.stat().st_size for p in Path(self.model.name_or_path).glob("*.safetensors"))
                                 / 2**20, 1)}

    def greedy(self, ids: list[int], n: int) -> dict:
        torch = self.torch
        streamer = core.token_stamper()
        x = torch.tensor([ids], dtype=torch.long)
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, streamer=streamer, pad_token_id=self.pad)
        return {"start": start, "stamps": streamer.times, "ids": streamer.ids}


def _open_engine(spec: dict):
    engine = spec["engine"]
    if engine.startswith("kolite-"):
        return KoliteEngine(spec, engine.removeprefix("kolite-"))
    if engine.startswith("llama-"):
        kind = engine.removeprefix("llama-")
        if spec.get("batched"):
            per_seq = _lengths(spec)["short"] + spec["new_tokens"]
            n_seq = spec["batch"]
            return LlamaEngine(spec["gguf"]["paths"][kind], spec["threads"], n_ctx=n_seq * max(256, per_seq),
                               n_seq=n_seq)
        return LlamaEngine(spec["gguf"]["paths"][kind], spec["threads"], n_ctx=spec["shape"]["n_positions"])
    return TransformersEngine(spec)


# ====================================================================================================
# worker: correctness (llama.cpp against kolite fp32 on the same ids)


STRICT = "F32 GGUF, F32 KV cache, flash-attn off"
CHECK_VARIANTS = {  # label: (GGUF, F32 KV cache, flash_attn_type or None for llama.cpp's default)
    STRICT: ("F32", True, 0),
    "F32 GGUF, defaults (F16 KV cache, flash-attn auto)": ("F32", False, None),
    "Q8_0, defaults": ("Q8_0", False, None),
    "Q4_0, defaults": ("Q4_0", False, None),
}


def _reference_logits(model_dir: Path, ids: list[int]):
    """An independent float64 numpy GPT-2 forward (exact tanh GELU): last position's logits."""
    import numpy as np

    from kolite.models.gpt2_keys import gpt2_weights
    from kolite.models.gpt2config import GPT2Config
    from kolite.models.weights import load_state_dict

    cfg = GPT2Config.from_file(model_dir / "config.json")
    w = gpt2_weights(load_state_dict(model_dir), cfg)
    t, n, heads = "transformer.", len(ids), cfg.n_head
    hd = cfg.n_embd // heads

    def f64(key: str):
        return w[key].astype(np.float64)

    def norm(x, key: str):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * f64(key + ".weight") + f64(key + ".bias")

    x = f64(t + "wte.weight")[ids] + f64(t + "wpe.weight")[:n]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg.n_layer):
        p = f"{t}h.{i}."
        qkv = norm(x, p + "ln_1") @ f64(p + "attn.c_attn.weight") + f64(p + "attn.c_attn.bias")
        q, k, v = (a.reshape(n, heads, hd).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + (s @ v).transpose(1, 0, 2).reshape(n, -1) @ f64(p + "attn.c_proj.weight") + f64(p + "attn.c_proj.bias")
        h = norm(x, p + "ln_2") @ f64(p + "mlp.c_fc.weight") + f64(p + "mlp.c_fc.bias")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + h @ f64(p + "mlp.c_proj.weight") + f64(p + "mlp.c_proj.bias")
    return norm(x[-1:], t + "ln_f")[0] @ f64(t + "wte.weight").T


def worker_check(spec: dict) -> dict:
    import gguf
    import numpy as np

    n = spec["agree_tokens"]
    prompts = spec["prompts"]
    kolite = KoliteEngine(spec, "fp32")
    ref = _greedy(kolite, prompts["short"], n, keep_logits=True)
    ref_logits = np.stack(ref["logits"])
    ref_ttft = kolite.prefill(prompts["ttft"]).copy()
    ref64 = _reference_logits(Path(spec["model_dir"]), prompts["ttft"])
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    report: dict[str, Any] = {
        "tokens": n, "kolite_fp32_ids": ref["ids"],
        "kolite_logits_std": round(float(ref_logits[0].std()), 4),
        "kolite_max_abs_diff_vs_fp64_reference": round(float(np.abs(ref_ttft - ref64).max()), 7),
        "kolite_top1_top2_margin_min": round(float(margins.min()), 5),
        "kolite_top1_top2_margin_median": round(float(np.median(margins)), 5),
        "variants": {},
    }
    for label, (kind, kv_f32, fa) in CHECK_VARIANTS.items():
        eng = LlamaEngine(spec["gguf"]["paths"][kind], spec["threads"], n_ctx=spec["shape"]["n_positions"],
                          kv_f32=kv_f32, flash_attn=fa)
        # teacher-forced: feed kolite's greedy tokens, compare the logits at every step
        diffs, top1 = [], 0
        logits = eng.prefill(prompts["short"])
        pos = len(prompts["short"])
        for i in range(n):
            diffs.append(float(np.abs(logits - ref_logits[i]).max()))
            top1 += int(_argmax(logits) == ref["ids"][i])
            if i < n - 1:
                logits = eng.step(ref["ids"][i], pos)
                pos += 1
        free = _greedy(eng, prompts["short"], n)
        ttft_diff = float(np.abs(eng.prefill(prompts["ttft"]) - ref_ttft).max())
        report["variants"][label] = {
            "gguf": kind, "kv_cache": "F32" if kv_f32 else "F16", "flash_attn_type": fa,
            "max_abs_diff_vs_fp64_reference": round(float(np.abs(eng.prefill(prompts["ttft"]) - ref64).max()), 6),
            "first_step_max_abs_diff": round(diffs[0], 6), "max_abs_diff_all_steps": round(max(diffs), 6),
            "median_step_max_abs_diff": round(float(np.median(diffs)), 6),
            f"max_abs_diff_after_{len(prompts['ttft'])}_token_prompt": round(ttft_diff, 6),
            "teacher_forced_top1_agreement": top1,
            "free_greedy_leading_agreement": core._agreement(free["ids"], ref["ids"]),
            "free_greedy_equal_positions": sum(int(a == b) for a, b in zip(free["ids"], ref["ids"], strict=False)),
            "flash_attn": _llama_log_lines(("flash_attn",))[-1:] or None,
        }
        eng.close()
        core._log(f"  {label}: first-step max|diff| {diffs[0]:.2e}, all steps {max(diffs):.2e}, "
                  f"{len(prompts['ttft'])}-token prompt {ttft_diff:.2e}, top-1 teacher-forced {top1}/{n}, "
                  f"free greedy {report['variants'][label]['free_greedy_leading_agreement']}/{n}")

    # Did llama.cpp's quantizer produce the blocks we expect? Compare one Q8_0 tensor with gguf-py's reference.
    reader = gguf.GGUFReader(spec["gguf"]["paths"]["Q8_0"])
    f32 = gguf.GGUFReader(spec["gguf"]["paths"]["F32"])
    name = "blk.0.ffn_up.weight"
    q_ll = next(t for t in reader.tensors if t.name == name)
    w = np.array(next(t for t in f32.tensors if t.name == name).data, dtype=np.float32)
    q_py = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    report["q8_0_blocks_equal_gguf_py"] = bool(np.array_equal(np.asarray(q_ll.data).reshape(-1), q_py.reshape(-1)))

    strict = report["variants"][STRICT]
    tol = spec["tolerance"]
    long_key = f"max_abs_diff_after_{len(prompts['ttft'])}_token_prompt"
    report["passed"] = bool(strict["max_abs_diff_all_steps"] <= tol and strict[long_key] <= tol
                            and strict["teacher_forced_top1_agreement"] >= n - 1)
    report["tolerance"] = tol
    return report


# ====================================================================================================
# worker: one engine, batch 1


def worker_engine(spec: dict) -> dict:
    t0 = time.perf_counter()
    engine = _open_engine(spec)
    load_s = time.perf_counter() - t0
    mem_load = core._memory()
    greedy = engine.greedy if isinstance(engine, TransformersEngine) else (lambda ids, n: _greedy(engine, ids, n))
    prompts, n, reps = spec["prompts"], spec["new_tokens"], spec["repeats"]
    n_long = _lengths(spec)["long_new"]

    def check(run: dict, want: int) -> dict:
        if len(run["stamps"]) != want:
            raise RuntimeError(f"expected {want} tokens, got {len(run['stamps'])}")
        return run

    cold = check(greedy(prompts["ttft"], 1), 1)
    check(greedy(prompts["short"], n), n)  # warm-up (allocations, graph reservation, caches)
    check(greedy(prompts["long"], 4), 4)
    ttft, rate, rate_long, ttft_long, ids = [], [], [], [], []
    perf = None
    for r in range(reps):
        one = check(greedy(prompts["ttft"], 1), 1)
        ttft.append(one["stamps"][0] - one["start"])
        if isinstance(engine, LlamaEngine) and r == 0:
            engine.perf_reset()
        full = check(greedy(prompts["short"], n), n)
        if isinstance(engine, LlamaEngine) and r == 0:
            perf = engine.perf()
            wall = full["stamps"][-1] - full["stamps"][0]
            perf["wall_ms_per_decode_step"] = round(1000 * wall / (n - 1), 3)
            perf["llama_ms_per_decode_step"] = round(perf["t_eval_ms"] / max(1, perf["n_eval"]), 3)
        rate.append(core._decode_rate(full["stamps"]))
        if r == 0:
            ids = full["ids"]
        lng = check(greedy(prompts["long"], n_long), n_long)
        rate_long.append(core._decode_rate(lng["stamps"]))
        ttft_long.append(lng["stamps"][0] - lng["start"])
        core._log(f"  {spec['engine']} repeat {r + 1}/{reps}: decode {rate[-1]:.1f} tok/s, TTFT {ttft[-1]:.3f}s, "
                  f"decode@{len(prompts['long'])} {rate_long[-1]:.1f} tok/s")
    result = {
        "engine": spec["engine"], "load_s": round(load_s, 3), **engine.info(),
        "cold_ttft_s": round(cold["stamps"][0] - cold["start"], 4),
        "decode_tok_s": core._summary(rate), "ttft_s": core._summary(ttft),
        "decode_long_tok_s": core._summary(rate_long), "ttft_long_s": core._summary(ttft_long),
        "generated_ids": ids, "memory_after_load": mem_load, "memory_end": core._memory(),
    }
    if perf is not None:
        result["llama_perf_first_repeat"] = perf
    if isinstance(engine, LlamaEngine):
        result["llama_log"] = _llama_log_lines(("flash_attn", "n_ctx", "buffer size", "REPACK", "repack", "type_k",
                                                "file type", "n_seq_max", "causal", "graph"))
    return result


def worker_batched(spec: dict) -> dict:
    engine = _open_engine({**spec, "batched": True})
    prompts, n, reps = spec["prompts"]["batch"], spec["new_tokens"], spec["repeats"]
    rows = len(prompts)
    engine.batched(prompts, 8)  # warm-up
    agg, agg_total, prefill = [], [], []
    ids: list[list[int]] = []
    perf = None
    for r in range(reps):
        run = engine.batched(prompts, n)
        if isinstance(engine, LlamaEngine) and r == 0:
            # llama_perf counts multi-token batches as "prompt eval"; batched() resets it after the prefill
            perf = engine.perf()
            perf["wall_ms_per_decode_step"] = round(1000 * (run["end"] - run["prefilled"]) / (n - 1), 3)
            perf["llama_ms_per_decode_step"] = round(perf["t_p_eval_ms"] / (n - 1), 3)
        if any(len(row) != n for row in run["ids"]):
            raise RuntimeError("a row produced the wrong number of tokens")
        agg.append(rows * (n - 1) / (run["end"] - run["prefilled"]))
        agg_total.append(rows * n / (run["end"] - run["start"]))
        prefill.append(run["prefilled"] - run["start"])
        if r == 0:
            ids = run["ids"]
        core._log(f"  {spec['engine']} x{rows} repeat {r + 1}/{reps}: {agg[-1]:.1f} tok/s aggregate decode")
    result = {"engine": spec["engine"], "rows": rows, "new_tokens": n, "aggregate_decode_tok_s": core._summary(agg),
              "aggregate_with_prefill_tok_s": core._summary(agg_total), "prefill_all_rows_s": core._summary(prefill),
              "generated_ids": ids, **engine.info(), "memory_end": core._memory()}
    if isinstance(engine, LlamaEngine):
        result["llama_perf_first_repeat"] = perf
        result["llama_log"] = _llama_log_lines(("flash_attn", "n_ctx", "n_seq_max", "kv_unified"))
    return result


WORKERS = {"prepare": worker_prepare, "int4_probe": worker_int4_probe, "convert": worker_convert,
           "check": worker_check, "engine": worker_engine, "batched": worker_batched, "probe": core.worker_probe}


def worker_main(argv: list[str]) -> int:
    kind, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sha = core.kolite_source()["sha256"]  # kolite is edited while benchmarks run: record what this process ran
    result = WORKERS[kind](spec)
    result["kolite_sha"] = sha
    peak = core._memory()
    result["memory_peak"] = {k: peak[k] for k in ("vmhwm_mb", "ru_maxrss_mb")}
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(out_path).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    return 0


# ====================================================================================================
# orchestrator (standard library only: the heavy work runs in subprocesses)


def _kolite_home(work: Path) -> Path:
    """kolite's converted-graph cache for this benchmark (kolite's cache key includes a digest of its
    converter's code, so a converter change rebuilds the graphs here too)."""
    return work / "compare-kolite-home"


def _run_worker(kind: str, spec: dict, scratch: Path, name: str) -> dict:
    """bench_core's worker runner, on this script's workers, with every BLAS pinned to the same threads."""
    threads = str(spec["threads"])
    pinned = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return core._run_worker(kind, spec, scratch, pinned, name=name, script=Path(__file__))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2-layer shapes, prompts 16/128/224 tokens, 32 new tokens, 1 repeat")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    ap.add_argument("--threads", type=int, default=core._usable_cpus(), help="threads for every engine (default: CPUs)")
    ap.add_argument("--work-dir", type=Path, default=core.DEFAULT_OUT / "work",
                    help="checkpoints, GGUFs and kolite's converted graphs (shared with bench_core)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per generation (default 128)")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together in the batched test")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per engine; medians reported (3)")
    ap.add_argument("--tolerance", type=float, default=5e-3,
                    help="max |logit difference| allowed between llama.cpp F32 (F32 KV) and kolite fp32")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-runs of an engine whose machine probes show a slowed-down host (default 2)")
    ap.add_argument("--contention", type=float, default=0.7,
                    help="a probe below this fraction of the run's best probe counts as contention (0.7)")
    ap.add_argument("--check-only", action="store_true", help="write the GGUFs and run the correctness check only")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the results here (always written to benchmarks/out/compare[-quick].json)")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for e in args.engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.new_tokens < AGREE_TOKENS and not args.quick:
        ap.error(f"--new-tokens must be >= {AGREE_TOKENS} (the greedy agreement length)")
    if args.new_tokens < 2 or args.threads < 1 or args.repeats < 1 or args.batch < 1:
        ap.error("--new-tokens must be >= 2; --threads, --repeats and --batch >= 1")
    return args


COLUMNS: list[tuple[str, str, str, str]] = [
    # (header, short header for the ratio table, key path, format)
    ("decode tok/s, {short}-token prompt", "decode", "decode_tok_s.median", "{:.1f}"),
    ("TTFT, {ttft}-token prompt (s)", "TTFT", "ttft_s.median", "{:.3f}"),
    ("decode tok/s at {long}..{long_end} ctx", "decode@{long}", "decode_long_tok_s.median", "{:.1f}"),
    ("batch-{b} aggregate decode tok/s", "batch-{b}", "batched.aggregate_decode_tok_s.median", "{:.1f}"),
    ("peak RSS (MB)", "RSS", "memory_peak.vmhwm_mb", "{:.0f}"),
    ("model file (MB)", "file", "file_mb", "{:.0f}"),
]
RATIO_REFS = {"llama-Q8_0": "Q8_0", "transformers": "HF"}


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def render_tables(mres: dict, args: argparse.Namespace) -> str:
    n = mres["lengths"]
    fill = {"short": n["short"], "ttft": n["ttft"], "long": n["long"], "long_end": n["long"] + n["long_new"],
            "b": args.batch}
    results = mres["results"]
    names = [e for e in ENGINES if e in results and "error" not in results[e]]
    lines = ["| engine | " + " | ".join(h.format(**fill) for h, *_ in COLUMNS)
             + f" | greedy = fp32 (of {mres['agree_tokens']}) |", "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for e in names:
        cells = []
        for _h, _s, key, fmt in COLUMNS:
            v = _get(results[e], key)
            cells.append(fmt.format(v) if isinstance(v, int | float) else "-")
        for i, (_h, _s, key, _f) in enumerate(COLUMNS):  # (c): still contended after the retries
            if _get(results[e], "batched.contended" if key.startswith("batched") else "contended") and i < 4:
                cells[i] += " (c)"
        agree = mres["greedy_agreement"].get(e)
        cells.append("ref" if e == "kolite-fp32" else (str(agree) if agree is not None else "-"))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    for e, r in results.items():
        if "error" in r:
            lines.append(f"| {e} | " + " | ".join(["n/a"] * len(COLUMNS)) + f" | {r['error']} |")
    refs = [r for r in RATIO_REFS if r in names]
    pairs = [(col, r) for col in COLUMNS for r in refs
             if col[2] != "file_mb" and not (r == "transformers" and col[2].startswith("batched"))]
    if not pairs:
        return "\n".join(lines)
    lines += ["", "Ratios, engine / reference (tok/s: above 1 is faster; TTFT and RSS: below 1 is better):", "",
              "| engine | " + " | ".join(f"{col[1].format(**fill)} vs {RATIO_REFS[r]}" for col, r in pairs) + " |",
              "|---|" + "---:|" * len(pairs)]
    for e in names:
        cells = []
        for col, r in pairs:
            x, y = _get(results[e], col[2]), _get(results[r], col[2])
            ok = isinstance(x, int | float) and isinstance(y, int | float) and y
            cells.append(f"{x / y:.2f}x" if ok else "-")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_summary(check: dict) -> list[str]:
    out = []
    for label, v in check["variants"].items():
        long_key = next(k for k in v if k.startswith("max_abs_diff_after_"))
        out.append(f"  llama.cpp {label} vs kolite fp32: first-step max|diff| {v['first_step_max_abs_diff']:.2e}, "
                   f"all {check['tokens']} steps {v['max_abs_diff_all_steps']:.2e}, "
                   f"{long_key.split('_')[4]}-token prompt {v[long_key]:.2e}; top-1 teacher-forced "
                   f"{v['teacher_forced_top1_agreement']}/{check['tokens']}, free greedy "
                   f"{v['free_greedy_leading_agreement']}/{check['tokens']}; vs fp64 reference "
                   f"{v['max_abs_diff_vs_fp64_reference']:.1e}")
    out.append(f"  kolite fp32 vs the fp64 reference: {check['kolite_max_abs_diff_vs_fp64_reference']:.1e}; "
               f"kolite fp32 logits: std {check['kolite_logits_std']}, top-1/top-2 margin min "
               f"{check['kolite_top1_top2_margin_min']} (median {check['kolite_top1_top2_margin_median']}); "
               f"Q8_0 blocks equal to gguf-py's quantizer: {check['q8_0_blocks_equal_gguf_py']}; "
               f"{'PASSED' if check['passed'] else 'FAILED'} (tolerance {check['tolerance']:g})")
    return out


_BEST_PROBE = {"gemm_gflops": 0.0, "gemv_gbps": 0.0}


def _timed(args: argparse.Namespace, kind: str, spec: dict, scratch: Path, name: str) -> dict:
    """Run a timing worker between two machine probes; when either probe shows the shared host slowed
    down (below `--contention` of the best probe seen in this run), run it again (up to `--retries`)."""
    discarded = []
    for attempt in range(args.retries + 1):
        before = _run_worker("probe", spec, scratch, f"probe-{name}")
        result = _run_worker(kind, spec, scratch, name)
        after = _run_worker("probe", spec, scratch, f"probe-{name}-after")
        for p in (before, after):
            for k in _BEST_PROBE:
                _BEST_PROBE[k] = max(_BEST_PROBE[k], p[k])
        slow = [f"{k} {p[k]} < {args.contention:.0%} of {_BEST_PROBE[k]}" for p in (before, after) for k in _BEST_PROBE
                if p[k] < args.contention * _BEST_PROBE[k]]
        result.update(probe_before=before, probe_after=after, contended=bool(slow), attempt=attempt + 1)
        core._log(f"  probes: gemm {before['gemm_gflops']} -> {after['gemm_gflops']} GFLOP/s, gemv "
                  f"{before['gemv_gbps']} -> {after['gemv_gbps']} GB/s" + (f"; CONTENDED ({'; '.join(slow)})"
                                                                          if slow else ""))
        if not slow:
            break
        discarded.append({k: result.get(k) for k in ("decode_tok_s", "ttft_s", "decode_long_tok_s",
                                                     "aggregate_decode_tok_s", "probe_before", "probe_after")})
        if attempt < args.retries:
            core._log(f"  re-running {name} (attempt {attempt + 2}/{args.retries + 1})")
            time.sleep(5)
    result["discarded_contended_attempts"] = discarded
    return result


def run_model(model: str, args: argparse.Namespace, base: dict, scratch: Path, int4: bool) -> dict:
    core._log(f"=== {model}: checkpoint, GGUFs, prompts")
    prep = _run_worker("prepare", {**base, "model": model}, scratch, f"prepare-{model}")
    lengths = _lengths(base)
    spec = {**base, "model": model, "model_dir": prep["model_dir"], "tokenizer_json": prep["tokenizer_json"],
            "shape": prep["shape"], "gguf": prep["gguf"], "prompts": prep["prompts"], "hf_special": prep["hf_special"],
            "agree_tokens": min(AGREE_TOKENS, args.new_tokens), "tolerance": args.tolerance}
    mres: dict[str, Any] = {
        "model": {k: prep[k] for k in ("model_dir", "tokenizer_kind", "shape", "parameters", "checkpoint_written")},
        "gguf": prep["gguf"], "lengths": lengths, "agree_tokens": spec["agree_tokens"],
        "prompt_source": "ChatbotData.csv" if core.CHATBOT_CSV.is_file() else "built-in Korean sample",
    }
    engines = [e for e in args.engines if int4 or e != "kolite-int4"]
    precisions = [e.removeprefix("kolite-") for e in engines if e.startswith("kolite-")]
    if "fp32" not in precisions:
        precisions.append("fp32")  # the reference for the check and for greedy agreement
    mres["warmup_conversion"] = {}
    failed: dict[str, str] = {}
    for precision in precisions:
        core._log(f"kolite {precision}: conversion (or cache check)")
        try:
            conv = _run_worker("convert", {**spec, "precision": precision}, scratch, f"convert-{model}-{precision}")
        except RuntimeError as exc:
            failed[f"kolite-{precision}"] = f"conversion failed: {exc}"
            core._log(f"  {exc}")
            continue
        mres["warmup_conversion"][precision] = conv
        core._log(f"  {'converted' if conv['converted'] else 'cached'} in {conv['seconds']:.1f}s, "
                  f"graph {conv['graph_mb']:.0f} MB")
    if "kolite-fp32" in failed:
        raise RuntimeError(f"{model}: kolite fp32 (the reference) is unavailable: {failed['kolite-fp32']}")

    core._log("correctness: llama.cpp GGUFs against kolite fp32 on the same ids")
    check = _run_worker("check", spec, scratch, f"check-{model}")
    mres["check"] = check
    for line in _check_summary(check):
        core._log(line)
    if not check["passed"]:
        raise RuntimeError(f"{model}: llama.cpp F32 disagrees with kolite fp32: the GGUF is wrong; nothing timed")
    results: dict[str, dict] = {e: {"error": failed[e]} for e in engines if e in failed}
    mres["results"] = results
    if args.check_only:
        return mres

    for engine in engines:
        if engine in failed:
            continue
        core._log(f"engine {engine} ({model}): fresh process, {args.threads} threads")
        try:
            results[engine] = _timed(args, "engine", {**spec, "engine": engine}, scratch, f"engine-{model}-{engine}")
        except RuntimeError as exc:
            core._log(f"  {exc}")
            results[engine] = {"error": str(exc)}
    for engine in engines:
        if engine not in BATCHED or "error" in results.get(engine, {}):
            continue
        core._log(f"batched {engine} ({model}): {args.batch} sequences x {args.new_tokens} tokens")
        try:
            results[engine]["batched"] = _timed(args, "batched", {**spec, "engine": engine}, scratch,
                                                f"batched-{model}-{engine}")
        except RuntimeError as exc:
            core._log(f"  {exc}")
            results[engine]["batched"] = {"error": str(exc)}

    n = spec["agree_tokens"]
    ref = check["kolite_fp32_ids"]
    mres["greedy_agreement"] = {e: core._agreement(r["generated_ids"][:n], ref)
                                for e, r in results.items() if "generated_ids" in r}
    mres["greedy_agreement"]["llama-F32 (check, strict)"] = check["variants"][STRICT]["free_greedy_leading_agreement"]
    # batch invariance: row 0 of the batched run has the same prompt as the batch-1 run
    mres["batch_row0_equals_batch1"] = {
        e: core._agreement(r["batched"]["generated_ids"][0][:n], r["generated_ids"][:n])
        for e, r in results.items() if "generated_ids" in r and "generated_ids" in r.get("batched", {})}
    mres["table_markdown"] = render_tables(mres, args)
    return mres


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = core.machine_info()
    machine["llama_cpp_python"] = core._version("llama_cpp_python")
    machine["gguf"] = core._version("gguf")
    scratch = Path(tempfile.mkdtemp(prefix="compare-", dir=work))
    base = {"work_dir": str(work), "kolite_home": str(_kolite_home(work)), "quick": args.quick,
            "threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats, "batch": args.batch}
    report: dict[str, Any] = {
        "benchmark": "compare", "machine": machine, "kolite_source_at_start": core.kolite_source(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, "benchmarks/compare.py", *(argv or sys.argv[1:])]),
        "models": {},
    }
    status = 0
    try:
        probe_spec = {**base, "model_dir": str(work)}
        int4 = _run_worker("int4_probe", probe_spec, scratch, "int4-probe") if "kolite-int4" in args.engines else {}
        report["kolite_int4"] = int4
        if int4 and not int4["int4"]:
            core._log(f"kolite int4: not available ({int4['reason']}); skipped")
        for model in args.models:
            try:
                report["models"][model] = run_model(model, args, base, scratch, bool(int4.get("int4")))
            except RuntimeError as exc:
                core._log(f"ERROR {exc}")
                report["models"].setdefault(model, {})["error"] = str(exc)
                status = 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["kolite_source_at_end"] = core.kolite_source()
    if report["kolite_source_at_end"]["sha256"] != report["kolite_source_at_start"]["sha256"]:
        core._log("WARNING: kolite's sources changed during the run; engines may have measured different code")

    lengths = _lengths(base)
    header = [
        f"compare  {machine['date']}",
        f"machine: {machine['cpu_model']} | {machine['usable_cpus']} usable CPUs ({machine['physical_cores']} "
        f"physical) | {machine['memory_gb']} GB | {machine['os']} | flags {' '.join(machine['cpu_flags'])}",
        f"versions: python {machine['python']}, onnxruntime {machine['onnxruntime']}, llama-cpp-python "
        f"{machine['llama_cpp_python']}, gguf {machine['gguf']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, kolite {machine['kolite']} (sources {report['kolite_source_at_start']['sha256']}"
        f" -> {report['kolite_source_at_end']['sha256']})",
        f"run: {args.threads} threads for every engine, greedy, {args.new_tokens} new tokens after "
        f"{lengths['short']}; TTFT {lengths['ttft']}-token prompt; long context {lengths['long']} + "
        f"{lengths['long_new']} new; batch {args.batch} x {args.new_tokens}; {args.repeats} repeats (medians); "
        f"load average {machine['loadavg_at_start']} -> {machine['loadavg_at_end']}",
    ]
    if report.get("kolite_int4") and not report["kolite_int4"].get("int4"):
        header.append(f"kolite int4: unavailable ({report['kolite_int4']['reason']})")
    report["header"] = header
    print("\n".join(header))
    for model, mres in report["models"].items():
        print()
        if "model" in mres:
            s = mres["model"]["shape"]
            print(f"## {model}: random weights, {s['n_layer']} layers x {s['n_embd']} wide, vocab {s['vocab_size']} "
                  f"({mres['model']['parameters'] / 1e6:.0f}M params); tokenizer: {mres['model']['tokenizer_kind']}")
            g = mres["gguf"]
            print("GGUF: " + ", ".join(f"{k} {g['mb'][k]:.0f} MB {g['types'][k]['counts']}" for k in GGUF_KINDS))
        if "check" in mres:
            print("correctness (before timing):")
            print("\n".join(_check_summary(mres["check"])))
        if "table_markdown" in mres:
            print()
            print(mres["table_markdown"])
            print()
            print("greedy agreement with kolite fp32 (leading equal tokens): " + ", ".join(
                f"{e} {n}/{mres['agree_tokens']}" for e, n in mres["greedy_agreement"].items()))
            perf = {e: r["llama_perf_first_repeat"] for e, r in mres["results"].items()
                    if "llama_perf_first_repeat" in r}
            for e, r in mres["results"].items():
                if (_get(r, "batched.llama_perf_first_repeat") or {}).get("llama_ms_per_decode_step") is not None:
                    perf[f"{e} batch-{args.batch}"] = r["batched"]["llama_perf_first_repeat"]
            if perf:
                print("llama.cpp time per decode step, inside llama_decode (llama_perf) / wall clock incl. Python: "
                      + ", ".join(f"{e} {p['llama_ms_per_decode_step']:.2f} / {p['wall_ms_per_decode_step']:.2f} ms"
                                  for e, p in perf.items()))
            shas = sorted({s for r in mres["results"].values()
                           for s in (r.get("kolite_sha"), _get(r, "batched.kolite_sha")) if s}
                          | {mres["check"].get("kolite_sha")} - {None})
            print("kolite sources measured (hash per worker process): " + ", ".join(shas)
                  + (" -- CHANGED during the run" if len(shas) > 1 else ""))
            if any(r.get("contended") or _get(r, "batched.contended") for r in mres["results"].values()):
                print("(c): the machine probes still showed a slowed-down host after the retries")
            print("batched row 0 equal to the batch-1 run (leading tokens): " + ", ".join(
                f"{e} {n}/{mres['agree_tokens']}" for e, n in mres["batch_row0_equals_batch1"].items()))
        if "error" in mres:
            print(f"ERROR: {mres['error']}")

    out = core.DEFAULT_OUT / ("compare-quick.json" if args.quick else "compare.json")
    for path in {out, *([args.json] if args.json else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        core._log(f"wrote {path}")
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
