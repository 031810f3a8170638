"""The subset of a transformers `config.json` that defines a GPT-2 graph, checked on load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kolite.errors import ModelFormatError

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


@dataclass(frozen=True)
class GPT2Config:
    """Shape and numerics of a GPT-2 family checkpoint (names follow transformers' GPT2Config)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> GPT2Config:
        """Build from a config.json dict, refusing architectures the graph builder does not know."""
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ModelFormatError(f"model_type {model_type!r} is not GPT-2; kolite converts GPT-2 family models")
        if raw.get("add_cross_attention"):
            raise ModelFormatError("GPT-2 with cross-attention is not supported")
        if raw.get("reorder_and_upcast_attn"):
            raise ModelFormatError("reorder_and_upcast_attn is not supported")
        act = raw.get("activation_function", "gelu_new")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ModelFormatError(f"activation {act!r} is not supported (use one of {SUPPORTED_ACTIVATIONS})")
        if raw.get("tie_word_embeddings") is False:
            raise ModelFormatError("untied lm_head is not supported; GPT-2 ties it to the token embedding")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        eos = fields.get("eos_token_id")
        if isinstance(eos, list):  # some configs list several eos ids; the first is the canonical one
            fields["eos_token_id"] = eos[0] if eos else None
        cfg = cls(**fields)
        if cfg.n_embd % cfg.n_head:
            raise ModelFormatError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        if cfg.head_dim % 8:  # onnxruntime's fused attention kernel works on 8-wide heads (GPT-2's are 64)
            raise ModelFormatError(f"head size {cfg.head_dim} (n_embd / n_head) must be a multiple of 8")
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> GPT2Config:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"cannot read {path}: {exc}") from exc
        return cls.from_dict(raw)
