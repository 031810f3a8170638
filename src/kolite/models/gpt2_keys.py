"""GPT-2 checkpoints' key names → the canonical transformers names the graph builder asks for, checked
against the shapes the config implies."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import numpy as np

from kolite.errors import ModelFormatError
from kolite.models.checkpoint import Checkpoint
from kolite.models.gpt2config import GPT2Config

# ----------------------------------------------------------------------------------------------------
# GPT-2 key normalisation

_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_PREFIX = "transformer."


def gpt2_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every weight a GPT-2 graph needs, by canonical transformers name, with the shape `cfg` implies."""
    e, inner = cfg.n_embd, cfg.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (cfg.vocab_size, e),
        "transformer.wpe.weight": (cfg.n_positions, e),
        "transformer.ln_f.weight": (e,),
        "transformer.ln_f.bias": (e,),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (e,), p + "ln_1.bias": (e,),
            p + "attn.c_attn.weight": (e, 3 * e), p + "attn.c_attn.bias": (3 * e,),
            p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,),
            p + "ln_2.weight": (e,), p + "ln_2.bias": (e,),
            p + "mlp.c_fc.weight": (e, inner), p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, e), p + "mlp.c_proj.bias": (e,),
        })
    return shapes


def _canonical_key(key: str) -> str | None:
    """Old gpt2/distilgpt2 checkpoints omit `transformer.`; attention-mask buffers are not weights."""
    bare = key.removeprefix(_PREFIX)
    if _BUFFER.match(bare):
        return None
    return key if key.startswith("lm_head.") else _PREFIX + bare


def gpt2_weights(sd: Mapping[str, np.ndarray], cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Canonical float32 GPT-2 weights, checked against `cfg`, so the graph builder can trust every shape."""
    return dict(GPT2Weights(sd, cfg).items())


class GPT2Weights(Mapping[str, np.ndarray]):
    """The canonical GPT-2 weights of a state dict or an open `Checkpoint`, read only when asked for.

    Names, shapes and the tied head are checked against `cfg` up front, from a checkpoint's index alone;
    each weight is fetched (as contiguous float32) when it is indexed, so over a `Checkpoint` the graph
    builder holds one tensor at a time instead of the whole model.
    """

    def __init__(self, sd: Mapping[str, np.ndarray], cfg: GPT2Config) -> None:
        self._sd = sd
        names = {ck: k for k in sd if (ck := _canonical_key(k)) is not None}
        head = names.pop("lm_head.weight", None)
        if head is not None and "transformer.wte.weight" in names:
            _check_tied_head(sd, head, names["transformer.wte.weight"])
        expected = gpt2_shapes(cfg)
        missing = [k for k in expected if k not in names]
        wrong = [f"{k}: {shape} != {s}" for k, s in expected.items()
                 if k in names and (shape := _shape_of(sd, names[k])) != s]
        if missing or wrong:
            raise ModelFormatError(_shape_report(missing, wrong))
        self._names = {k: names[k] for k in expected}

    def __getitem__(self, key: str) -> np.ndarray:
        return np.ascontiguousarray(self._sd[self._names[key]], dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the weight
        return key in self._names


def _shape_of(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    return sd.shape(key) if isinstance(sd, Checkpoint) else tuple(np.shape(sd[key]))


def _check_tied_head(sd: Mapping[str, np.ndarray], head: str, wte: str) -> None:
    """The graph reuses wte as the output projection; a different lm_head would silently change the model.

    A checkpoint that saved the tied head as a view of wte's storage is known equal without reading it.
    """
    if _shape_of(sd, head) == _shape_of(sd, wte):
        if isinstance(sd, Checkpoint) and sd.same_data(head, wte):
            return
        if np.array_equal(np.asarray(sd[head], np.float32), np.asarray(sd[wte], np.float32)):
            return
    raise ModelFormatError("lm_head.weight differs from transformer.wte.weight; untied heads are not supported")


def _shape_report(missing: list[str], wrong: list[str], limit: int = 8) -> str:
    parts = []
    if missing:
        more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
        parts.append(f"missing {len(missing)} weights: {', '.join(missing[:limit])}{more}")
    if wrong:
        parts.append("wrong shapes: " + "; ".join(wrong[:limit]))
    return "checkpoint does not match config.json: " + " | ".join(parts)
