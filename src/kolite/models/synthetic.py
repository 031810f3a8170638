"""Random-weight GPT-2 checkpoints of any shape, written exactly as the hub stores real ones.

Tests and benchmarks run offline, so they build their own models: the shape rules, key names,
tied embeddings and file layout are real; only the numbers are random.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from kolite.models.cache import publish_folder
from kolite.models.gpt2config import GPT2Config

KOGPT2_SHAPE = GPT2Config(
    vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
    bos_token_id=0, eos_token_id=1, pad_token_id=3,
)
DISTILGPT2_SHAPE = GPT2Config(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12,
    bos_token_id=50256, eos_token_id=50256,
)


def random_state_dict(cfg: GPT2Config, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """A transformers-named GPT-2 state dict (no lm_head: it is tied to wte, as on the hub)."""
    rng = np.random.default_rng(seed)
    e, inner = cfg.n_embd, cfg.inner_dim

    def normal(*shape: int, scale: float = std) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    sd: dict[str, np.ndarray] = {
        "transformer.wte.weight": normal(cfg.vocab_size, e),
        "transformer.wpe.weight": normal(cfg.n_positions, e, scale=0.01),
        "transformer.ln_f.weight": (1.0 + normal(e, scale=0.1)).astype(np.float32),
        "transformer.ln_f.bias": normal(e, scale=0.05),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = (1.0 + normal(e, scale=0.1)).astype(np.float32)
        sd[p + "ln_1.bias"] = normal(e, scale=0.05)
        sd[p + "attn.c_attn.weight"] = normal(e, 3 * e)  # Conv1D: [in, out]
        sd[p + "attn.c_attn.bias"] = normal(3 * e, scale=0.05)
        sd[p + "attn.c_proj.weight"] = normal(e, e)
        sd[p + "attn.c_proj.bias"] = normal(e, scale=0.05)
        sd[p + "ln_2.weight"] = (1.0 + normal(e, scale=0.1)).astype(np.float32)
        sd[p + "ln_2.bias"] = normal(e, scale=0.05)
        sd[p + "mlp.c_fc.weight"] = normal(e, inner)
        sd[p + "mlp.c_fc.bias"] = normal(inner, scale=0.05)
        sd[p + "mlp.c_proj.weight"] = normal(inner, e)
        sd[p + "mlp.c_proj.bias"] = normal(e, scale=0.05)
    return sd


def config_json(cfg: GPT2Config) -> dict:
    """A config.json as transformers writes it for GPT2LMHeadModel."""
    raw = {k: v for k, v in cfg.to_dict().items() if v is not None}
    raw.update(
        architectures=["GPT2LMHeadModel"], n_ctx=cfg.n_positions, tie_word_embeddings=True,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, use_cache=True,
    )
    return raw


def write_checkpoint(
    folder: Path,
    cfg: GPT2Config,
    *,
    seed: int = 0,
    tokenizer_json: Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json copied from `tokenizer_json`)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(cfg), indent=2), encoding="utf-8")
    save_file(random_state_dict(cfg, seed=seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


STAMP = "bench-stamp.json"


def ensure_checkpoint(folder: Path, cfg: GPT2Config, *, seed: int, stamp: dict,
                      tokenizer_json: Path | None = None) -> bool:
    """A random checkpoint in `folder`, written once: `stamp` (say, shape and seed) is stored beside it
    and the folder is reused while it matches, so its converted graphs are reused too. Written into
    a temporary folder and renamed, so an interrupted write is never taken for a checkpoint.
    Returns True when it wrote one."""
    folder = Path(folder)
    with contextlib.suppress(OSError, json.JSONDecodeError):
        current = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        if current == stamp and (folder / "model.safetensors").is_file():
            return False

    def build(tmp: Path) -> None:
        write_checkpoint(tmp, cfg, seed=seed, tokenizer_json=tokenizer_json)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")

    publish_folder(folder, build)
    return True


def train_byte_level_bpe(path: Path, lines: Iterable[str], vocab_size: int, special_tokens: Sequence[str]) -> Path:
    """A GPT-2-style byte-level BPE tokenizer trained on `lines`, saved as tokenizer.json at `path`.

    `special_tokens` take the first ids, in order (KoGPT2's specials at 0-6, say). Byte-level means any
    text encodes, and one token can hold half a Hangul syllable: the hard case for streaming whole
    characters. For tests and benchmarks that cannot download a real tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return Path(path)
