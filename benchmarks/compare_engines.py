"""The engines benchmarks/compare.py times, behind one interface: the same greedy work per token for
kolite, llama.cpp (through llama-cpp-python's low-level binding) and transformers."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core as core  # noqa: E402
from compare_gguf import LLAMA_LOG, quiet_llama  # noqa: E402


def run_lengths(args_like: dict) -> dict[str, int]:
    """Prompt and generation lengths of a run (shorter with --quick)."""
    quick = args_like["quick"]
    return {"short": 16, "ttft": 128 if quick else 512, "long": 224 if quick else 868,
            "long_new": 16 if quick else 64}


ENGINES = ("kolite-int8", "kolite-fp32", "kolite-int4", "llama-Q8_0", "llama-Q4_0", "transformers")
BATCHED = ("kolite-int8", "kolite-fp32", "kolite-int4", "llama-Q8_0", "llama-Q4_0")


# engines: the same greedy work per token for every engine


def argmax(logits) -> int:
    import numpy as np

    return int(np.argmax(logits))


class KoliteEngine:
    def __init__(self, spec: dict, precision: str) -> None:
        from kolite.service import load_model

        self.lm = load_model(core.kolite_settings(spec, precision))
        self.runtime = self.lm.runtime
        if self.lm.prepared.converted:
            core.log(f"WARNING: kolite {precision} converted during the timed load (the warm-up should have)")

    def info(self) -> dict:
        graph = self.lm.prepared.graph
        size = sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())
        so = self.runtime.session.get_session_options()
        return {"threads": so.intra_op_num_threads, "graph": str(graph), "file_mb": round(size / 2**20, 1),
                "manifest": core.manifest_of(self.lm), "torch_imported": "torch" in sys.modules}

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
        toks = [argmax(rt.prefill(i, p)[-1]) for i, p in enumerate(prompts)]
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

        quiet_llama()
        self.L = L
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}: {''.join(LLAMA_LOG[-5:])}")
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
            raise RuntimeError(f"llama.cpp could not create a context: {''.join(LLAMA_LOG[-5:])}")
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


def greedy_run(engine, ids: list[int], n: int, keep_logits: bool = False) -> dict:
    """Prefill, then n-1 single-token steps; each token is the argmax of the previous logits."""
    start = time.perf_counter()
    logits = engine.prefill(ids)
    kept = [logits.copy()] if keep_logits else []
    tok = argmax(logits)
    out, stamps = [tok], [time.perf_counter()]
    pos = len(ids)
    for _ in range(n - 1):
        logits = engine.step(tok, pos)
        if keep_logits:
            kept.append(logits.copy())
        pos += 1
        tok = argmax(logits)
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


def open_engine(spec: dict):
    engine = spec["engine"]
    if engine.startswith("kolite-"):
        return KoliteEngine(spec, engine.removeprefix("kolite-"))
    if engine.startswith("llama-"):
        kind = engine.removeprefix("llama-")
        if spec.get("batched"):
            per_seq = run_lengths(spec)["short"] + spec["new_tokens"]
            n_seq = spec["batch"]
            return LlamaEngine(spec["gguf"]["paths"][kind], spec["threads"], n_ctx=n_seq * max(256, per_seq),
                               n_seq=n_seq)
        return LlamaEngine(spec["gguf"]["paths"][kind], spec["threads"], n_ctx=spec["shape"]["n_positions"])
    return TransformersEngine(spec)
