"""GGUF files of the checkpoint kolite converts, for llama.cpp: F32 written here (as llama.cpp's
convert_hf_to_gguf.py writes GPT-2), Q8_0 and Q4_0 by llama.cpp's own quantizer."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_core as core  # noqa: E402

GGUF_WRITER_VERSION = 1  # bump when the GGUF layout written here changes: cached files are rewritten
GGUF_KINDS = ("F32", "Q8_0", "Q4_0")


# GGUF: F32 written here (as convert_hf_to_gguf.py writes GPT-2), Q8_0/Q4_0 by llama.cpp's quantizer


def gguf_vocab(tokenizer_json: Path, vocab_size: int, profile) -> dict[str, Any]:
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


def write_gguf_f32(model_dir: Path, out: Path) -> dict[str, Any]:
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
    vocab = gguf_vocab(tokenizer_json, cfg.vocab_size, profile_for(model_dir.name, tokenizer_json))
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


LLAMA_LOG: list[str] = []
LLAMA_LOG_CB = None


def quiet_llama() -> None:
    """Send llama.cpp's log to a list (kept in the JSON) instead of stderr."""
    global LLAMA_LOG_CB
    import llama_cpp as L

    if LLAMA_LOG_CB is None:
        def keep(level: int, text: bytes, _user: Any) -> None:
            if text and len(LLAMA_LOG) < 4000:
                LLAMA_LOG.append(text.decode("utf-8", "replace"))

        LLAMA_LOG_CB = L.llama_log_callback(keep)
        L.llama_log_set(LLAMA_LOG_CB, None)
        L.llama_backend_init()


def llama_log_lines(keywords: tuple[str, ...]) -> list[str]:
    lines = "".join(LLAMA_LOG).splitlines()
    return [s.strip() for s in lines if any(k in s for k in keywords)]


def quantize_gguf(src: Path, dst: Path, kind: str, threads: int) -> None:
    """llama.cpp's own quantizer with llama-quantize's defaults (not --pure): GPT-2's head is tied to
    token_embd, so for Q4_0 llama.cpp stores token_embd as Q6_K (its rule for output tensors)."""
    import llama_cpp as L

    quiet_llama()
    params = L.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = {"Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {rc}")


def gguf_tensor_types(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    named = {t.name: t.tensor_type.name for t in reader.tensors
             if t.name in ("token_embd.weight", "position_embd.weight", "blk.0.attn_qkv.weight")}
    return {"counts": counts, "examples": named}


def ensure_gguf(model_dir: Path, out_dir: Path, threads: int) -> dict[str, Any]:
    """F32, Q8_0 and Q4_0 GGUFs of the checkpoint in `model_dir`, cached while the checkpoint is unchanged."""
    import gguf
    import llama_cpp

    stamp = {"checkpoint": json.loads((model_dir / "bench-stamp.json").read_text(encoding="utf-8")),
             "writer_version": GGUF_WRITER_VERSION, "gguf": core.version("gguf"),
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
        core.log(f"writing {paths['F32'].name} (gguf-py {gguf.__name__} {core.version('gguf')})")
        info = {"vocab": write_gguf_f32(model_dir, paths["F32"])}
        info["f32_write_s"] = round(time.perf_counter() - started, 2)
        for kind in ("Q8_0", "Q4_0"):
            started = time.perf_counter()
            core.log(f"quantizing to {kind} with llama.cpp's llama_model_quantize")
            quantize_gguf(paths["F32"], paths[kind], kind, threads)
            info[f"{kind}_quantize_s"] = round(time.perf_counter() - started, 2)
        info["types"] = {k: gguf_tensor_types(p) for k, p in paths.items()}
        stamp_file.write_text(json.dumps({"stamp": stamp, "info": info}, indent=2), encoding="utf-8")
        info["written"] = True
    info["paths"] = {k: str(p) for k, p in paths.items()}
    info["mb"] = {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items()}
    return info
