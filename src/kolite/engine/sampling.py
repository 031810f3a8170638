"""Logits → next token id: greedy, or sampling with temperature, top-k, top-p, repetition penalty and
OpenAI's logit bias.

Each request owns its random generator, seeded from the request's `seed`, so a request's tokens do
not depend on what else is running. The order of the transforms is transformers' (OpenAI's
presence/frequency penalties, repetition penalty → temperature → top-k → top-p), so the same
settings mean the same thing here as there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` or `do_sample=False` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    do_sample: bool = True
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, cut from the output
    stop_token_ids: frozenset[int] = frozenset()  # besides the tokenizer's eos (e.g. a chat template's)
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks); stop strings still apply
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias) added to the logits first

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


class Sampler:
    """Picks the next token for one sequence."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: Iterable[int] = (), generated: Sequence[int] = ()) -> int:
        """`seen`: prompt and output ids (repetition penalty); `generated`: output ids only (OpenAI penalties)."""
        p = self.params
        penalised = (p.repetition_penalty != 1.0 or bool(p.logit_bias)
                     or ((p.presence_penalty or p.frequency_penalty) and len(generated)))
        if p.greedy and not penalised:
            return int(np.argmax(logits))  # the common case, without copying the vocabulary's logits
        scores = logits.astype(np.float64, copy=True)
        if p.logit_bias:  # as OpenAI: -100 bans a token, +100 makes it the only choice
            ids, biases = zip(*p.logit_bias, strict=True)
            scores[np.asarray(ids, dtype=np.int64)] += np.asarray(biases, dtype=np.float64)
        if (p.presence_penalty or p.frequency_penalty) and len(generated):
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            scores[ids] -= counts * p.frequency_penalty + p.presence_penalty
        if p.repetition_penalty != 1.0:
            idx = np.fromiter(set(seen), dtype=np.int64)
            if idx.size:
                vals = scores[idx]
                scores[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(scores))
        scores /= p.temperature
        if 0 < p.top_k < scores.size:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores[scores < kth] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of the better tokens
            cut = max(1, int(np.count_nonzero(before < p.top_p)))  # always keep the best token
            keep = order[:cut]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), probs.size - 1))
