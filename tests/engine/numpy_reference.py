"""An independent numpy GPT-2 forward pass, written from transformers' GPT2 modelling code.

It shares nothing with kolite's graph builder (no scale folding, no Trilu: a plain loop over explicit
masks), so agreement between the two is evidence that the ONNX graph is right.
"""

from __future__ import annotations

import math

import numpy as np

from kolite.models.gpt2config import GPT2Config


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    return ((x64 - mu) / np.sqrt(var + eps) * g + b).astype(np.float64)


def _gelu(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gelu":
        from math import erf

        return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def forward(
    cfg: GPT2Config,
    sd: dict[str, np.ndarray],
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    past: list[tuple[np.ndarray, np.ndarray]] | None = None,
    position_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Logits for every position [B, S, V] (float64) and the new cache (keys/values per layer)."""
    bsz, seq = input_ids.shape
    past_len = 0 if past is None else past[0][0].shape[2]
    total = past_len + seq
    if attention_mask is None:
        attention_mask = np.ones((bsz, total), np.int64)
    if position_ids is None:
        position_ids = np.tile(np.arange(past_len, total), (bsz, 1))
    w = {k: v.astype(np.float64) for k, v in sd.items()}
    h = w["transformer.wte.weight"][input_ids] + w["transformer.wpe.weight"][position_ids]
    nh, hd, e = cfg.n_head, cfg.head_dim, cfg.n_embd

    allowed = np.zeros((bsz, seq, total), bool)
    for bi in range(bsz):
        for qi in range(seq):
            for kj in range(total):
                allowed[bi, qi, kj] = kj <= past_len + qi and attention_mask[bi, kj] == 1

    presents = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        x = _layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.layer_norm_epsilon)
        qkv = x @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        q, k, v = (t.reshape(bsz, seq, nh, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        if past is not None:
            k = np.concatenate([past[i][0], k], axis=2)
            v = np.concatenate([past[i][1], v], axis=2)
        presents.append((k, v))
        scores = q @ k.transpose(0, 1, 3, 2)
        if cfg.scale_attn_weights:
            scores = scores / math.sqrt(hd)
        if cfg.scale_attn_by_inverse_layer_idx:
            scores = scores / float(i + 1)
        scores = np.where(allowed[:, None], scores, -np.inf)
        scores = scores - np.where(np.isfinite(scores), scores, -1e300).max(-1, keepdims=True)
        probs = np.exp(scores)
        denom = probs.sum(-1, keepdims=True)
        probs = np.divide(probs, denom, out=np.zeros_like(probs), where=denom > 0)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, e)
        h = h + ctx @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        x = _layer_norm(h, w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.layer_norm_epsilon)
        m = _gelu(x @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], cfg.activation_function)
        h = h + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    h = _layer_norm(h, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], cfg.layer_norm_epsilon)
    return h @ w["transformer.wte.weight"].T, presents
